"""SSD kernels: plain-torch reference and the CUDA fast path."""
