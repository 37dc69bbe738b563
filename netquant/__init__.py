"""netquant: trained CNN -> verified int8 network, with C and CUDA code generation."""
__version__ = "0.1.0"
