"""Networks from files: ONNX, netquant safetensors (with their JSON card), or a shipped name.

    graph, name = load_network("resnet18.onnx")                 # via netquant.ir.onnx_import
    graph, name = load_network("out/cifarnet-20-16.safetensors") # written by `netquant train --out`
    graph, name = load_network("cifarnet-20-16")                 # shipped inside the package

PyTorch ``.pt``/``.pth`` files are pickles: loading one runs whatever code it names, so netquant
refuses them and says how to get a file it can read (ONNX) or to use the Python API on a module
the user loaded themselves.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ModelFileError  # noqa: F401  (a model argument naming no readable network)

log = logging.getLogger(__name__)

ONNX_SUFFIXES = (".onnx",)
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".tar", ".bin", ".mar")


@dataclass(frozen=True)
class NetworkSource:
    """What a model argument names, checked without loading it (cheap, for argument checks).

    ``kind``: ``"onnx"``, ``"safetensors"`` or ``"shipped"``; ``path``: the file (None for a
    shipped name); ``name``: the network's name (the file stem, or the shipped name)."""

    kind: str
    name: str
    path: Optional[Path] = None


def pickle_refusal(path) -> str:
    """The message for a PyTorch pickle file."""
    return (f"{path}: a PyTorch pickle file; netquant never unpickles model files (loading one can run any code "
            f"it names). Export the model to ONNX and pass the .onnx file: torch.onnx.export(model.eval(), "
            f"torch.rand(1, 3, H, W), 'net.onnx', dynamo=False); or load the module yourself and use the "
            f"Python API: netquant.Quantizer(model)")


def resolve_network(spec) -> NetworkSource:
    """Check a model argument (a ``.onnx`` or ``.safetensors`` file, or a shipped name) without
    loading it; raises :class:`ModelFileError` with what was expected."""
    from .pretrained import list_pretrained

    text = str(spec)
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelFileError(pickle_refusal(path))
    if suffix in ONNX_SUFFIXES + SAFETENSORS_SUFFIXES:
        if not path.is_file():
            raise ModelFileError(f"{path}: no such model file")
        return NetworkSource("onnx" if suffix in ONNX_SUFFIXES else "safetensors", path.stem, path)
    if text in list_pretrained():
        return NetworkSource("shipped", text)
    if path.exists():
        raise ModelFileError(f"{path}: not a model file netquant reads (expected .onnx or .safetensors)")
    raise ModelFileError(f"no pretrained network named {text!r} and no such model file; expected a .onnx or "
                         f".safetensors file or a shipped name: {', '.join(list_pretrained()) or 'none'}")


def load_module(source: NetworkSource):
    """The torch module of a safetensors or shipped network (in eval mode, with ``.card``)."""
    from .pretrained import load_model_file, load_pretrained

    if source.kind == "shipped":
        return load_pretrained(source.name)
    if source.kind == "safetensors":
        return load_model_file(source.path)
    raise ModelFileError(f"{source.path}: an ONNX model has no torch module; use load_network")


def _shape(input_shape, default_channels: Optional[int], what) -> Optional[tuple]:
    """(C, H, W) from ``input_shape`` = (C, H, W) or (H, W) (C from the model)."""
    if input_shape is None:
        return None
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 2:
        if default_channels is None:
            raise ModelFileError(f"{what}: input_shape {shape} gives no channel count and the model does not "
                                 f"declare one; pass (C, H, W)")
        shape = (default_channels, *shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ModelFileError(f"{what}: input_shape: expected (C, H, W) or (H, W) positive integers, got {input_shape}")
    return shape


def onnx_channels(path) -> Optional[int]:
    """The channel count the ONNX file declares for its image input (None when symbolic)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:   # old exporters list the weights as inputs too
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[1].HasField("dim_value"):
            return int(dims[1].dim_value)
        return None
    return None


def load_network(path, *, input_shape: Optional[Sequence[int]] = None):
    """``(Graph, name)`` of a network file or shipped name.

    ``.onnx``: :func:`netquant.ir.onnx_import.import_onnx` (checked against onnxruntime);
    ``.safetensors``: a netquant network with its card (in the file's metadata or a ``.json``
    beside it), captured with torch.fx; a shipped name (``cifarnet-20-16``) likewise.
    ``input_shape``: (C, H, W), or (H, W) with the model's channel count, for a model whose
    input size is not fixed (a symbolic ONNX height and width, or a global-pool CNN); e.g. (3, 224,
    224). Default: the ONNX file's declared shape, 3x32x32 for the CIFAR networks.
    """
    source = resolve_network(path)
    if source.kind == "onnx":
        from ..ir.onnx_import import import_onnx

        shape = _shape(input_shape, onnx_channels(source.path) if input_shape is not None else None, source.path)
        graph = import_onnx(source.path, name=source.name, input_shape=shape)
        return graph, source.name
    import torch

    from ..ir.capture import capture

    module = load_module(source)
    shape = _shape(input_shape, 3, source.path or source.name)
    example = None if shape is None else torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    name = module.card.get("name", source.name) if getattr(module, "card", None) else source.name
    return capture(module, example), name
