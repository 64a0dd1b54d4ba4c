"""mpsserve: recommendation models on GPUs shared by many processes through CUDA MPS."""

__version__ = "0.1.0"
