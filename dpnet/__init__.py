"""dpnet: exact data-parallel training of NumPy convolutional networks over MPI."""

__version__ = "0.1.0"
