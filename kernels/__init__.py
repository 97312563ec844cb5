"""ul2x.kernels."""
