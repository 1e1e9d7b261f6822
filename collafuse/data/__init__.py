"""Image sets (embedded digits, CIFAR-10, CelebA, AwA2, image folders, Hugging Face) and client partitions."""
from collafuse.data.formats import DATASETS, load_images
from collafuse.data.imageset import ImageSet
from collafuse.data.partition import CELEBA_ATTRIBUTE_GROUPS, PARTITIONS, ClientSplit, client_splits

__all__ = ["CELEBA_ATTRIBUTE_GROUPS", "DATASETS", "PARTITIONS", "ClientSplit", "ImageSet", "client_splits",
           "load_images"]
