"""Building blocks shared by every architecture: torch references here, Triton kernels beside them."""
