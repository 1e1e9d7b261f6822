"""Flower edge of collafuse: certificates, local process management and the Flower apps (kept thin)."""
