"""netquant: trained CNN -> verified int8 network, with C and CUDA code generation.

Importing netquant is light: submodules (torch capture, the web app, compilers) load on first use.

    from netquant import Quantizer, load_pretrained, load_cifar10
"""
__version__ = "0.1.0"

_LAZY = {
    "Quantizer": ("netquant.quantizer", "Quantizer"),
    "QuantConfig": ("netquant.quant.config", "QuantConfig"),
    "load_pretrained": ("netquant.models.pretrained", "load_pretrained"),
    "resnet": ("netquant.models.resnet", "resnet"),
    "analyze": ("netquant.models.analyze", "analyze"),
    "load_cifar10": ("netquant.data.cifar10", "load_cifar10"),
    "capture": ("netquant.ir.capture", "capture"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'netquant' has no attribute {name!r}")
