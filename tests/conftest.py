import os

import torch

# Tiny models gain nothing from intra-op threads, and OpenMP spin-waits badly when tests share cores.
torch.set_num_threads(1)
os.environ.setdefault("COLLAFUSE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "collafuse"))
