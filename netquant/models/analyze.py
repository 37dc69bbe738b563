"""Network analysis: every layer with its type, output shape, learnables and MACs, and totals.

The counterpart of MATLAB's ``analyzeNetwork``. MACs count multiply-accumulates of one image:
a conv layer producing (C_out, H, W) from C_in channels with a k x k kernel and g groups does
C_out*H*W * (C_in/g)*k*k of them; for ResNet-20's ``convInp`` that is 16*32*32 * 3*3*3 = 442,368.
Batch-norm learnables are its scale and offset (2 per channel); its running statistics are
states, not learnables, as in MATLAB.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BYTES_PER_FLOAT32 = 4


@dataclass(frozen=True)
class LayerInfo:
    """One row of the analysis table."""

    name: str
    type: str
    output_shape: tuple
    learnables: dict      # learnable name -> shape, e.g. {"Weights": (16, 3, 3, 3)}
    parameters: int
    macs: int


@dataclass(frozen=True)
class Analysis:
    """The layers of a network in execution order, with totals."""

    network: str
    layers: tuple
    depth: int            # weighted layers on the longest path (ResNet-20: 20)
    weighted_layers: int  # every conv and fully connected layer, projections included

    @property
    def parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)

    @property
    def learnable_bytes(self) -> int:
        return self.parameters * BYTES_PER_FLOAT32

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def table(self):
        """The layers as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame({
            "Name": [l.name for l in self.layers],
            "Type": [l.type for l in self.layers],
            "Output": ["x".join(map(str, l.output_shape)) for l in self.layers],
            "Learnables": [", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in l.learnables.items())
                           for l in self.layers],
            "Parameters": [l.parameters for l in self.layers],
            "MACs": [l.macs for l in self.layers],
        })

    def summary(self) -> str:
        return (f"{self.network}: {len(self.layers)} layers, depth {self.depth} "
                f"({self.weighted_layers} conv/fc layers incl. projections), "
                f"{self.parameters:,} parameters ({self.parameters / 1e6:.2f}M), "
                f"learnable memory {self.learnable_bytes:,} bytes ({self.learnable_bytes / 1e6:.2f} MB) "
                f"at float32, {self.macs:,} MACs per image ({self.macs / 1e6:.1f}M)")

    def to_dict(self) -> dict:
        return {"network": self.network, "depth": self.depth, "weighted_layers": self.weighted_layers,
                "parameters": self.parameters, "learnable_bytes": self.learnable_bytes, "macs": self.macs,
                "layers": [{"name": l.name, "type": l.type, "output_shape": list(l.output_shape),
                            "learnables": {k: list(v) for k, v in l.learnables.items()},
                            "parameters": l.parameters, "macs": l.macs} for l in self.layers]}

    def __str__(self) -> str:
        import pandas as pd

        with pd.option_context("display.max_rows", None, "display.width", 200):
            return self.table().to_string(index=False) + "\n" + self.summary()


_LEARNABLE_NAMES = {"weight": "Weights", "bias": "Bias"}
_BN_NAMES = {"weight": "Scale", "bias": "Offset"}


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return out[0].numel() * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return 0


def analyze(net: nn.Module, input_shape=(3, 32, 32)) -> Analysis:
    """Analyse ``net`` by running one zero image through it and recording every leaf layer."""
    rows: list[LayerInfo] = []
    hooks = []
    names = {m: n for n, m in net.named_modules()}

    def hook(module, _inputs, out):
        names_map = _BN_NAMES if isinstance(module, nn.modules.batchnorm._BatchNorm) else _LEARNABLE_NAMES
        learn = {names_map.get(k, k): tuple(p.shape) for k, p in module.named_parameters(recurse=False)}
        rows.append(LayerInfo(names[module], type(module).__name__, tuple(out.shape[1:]), learn,
                              sum(p.numel() for p in module.parameters(recurse=False)), _macs(module, out)))

    for module in net.modules():
        if not list(module.children()):
            hooks.append(module.register_forward_hook(hook))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    weighted = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules())
    spec = getattr(net, "spec", None)
    depth = spec.depth if spec is not None else weighted
    title = spec.name if spec is not None else type(net).__name__
    return Analysis(title, tuple(rows), depth, weighted)
