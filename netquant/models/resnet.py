"""Residual networks for CIFAR-10, named like MATLAB's "Train Residual Network" example.

``resnet(net_width=16, num_units=9, unit_type="standard")`` is ResNet-20 (MATLAB's
CIFARNet-20-16): depth 2*9+2 = 20 weighted layers; a bottleneck net has 3*num_units+2.

Layer names (stable: they are the keys of the shipped weights and the names in every table):

====================  =========================================================================
``input``             per-channel z-score normalisation of [0, 1] RGB input (no learnables)
``convInp``           3x3 conv, net_width filters; then ``bnInp``, ``reluInp``
``S{s}U{u}_conv{k}``  conv k of unit u in stage s (k = 1, 2; or 1, 2, 3 for bottleneck units)
``S{s}U{u}_bn{k}``    its batch norm; ``S{s}U{u}_relu{k}`` the ReLU inside the unit
``S{s}U{u}_convSkip`` 1x1 projection on the shortcut where the shape changes; ``S{s}U{u}_bnSkip``
``add{s}{u}``         the residual addition of unit u in stage s; then ``relu{s}{u}``
``globalPool``        global average pooling; ``fcFinal`` fully connected, 10 classes; ``softmax``
====================  =========================================================================

Stages run at 32x32, 16x16 and 8x8 with num_units/3 units each; the first unit of stages 2 and 3
has stride 2 (on conv1 of a standard unit, on the 3x3 conv2 of a bottleneck unit). Stage s has
width net_width * 2^(s-1); a bottleneck unit reduces to that width with a 1x1 conv, applies a 3x3
conv and expands to 4x the width with a 1x1 conv, so its residual path carries 4x the channels.

The module outputs class probabilities (after ``softmax``), like the MATLAB network;
:meth:`ResNet.logits` gives the scores before it, for training.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..data.transforms import CIFAR10_MEAN, CIFAR10_STD
from ..errors import ArgumentError

UNIT_TYPES = ("standard", "bottleneck")


class ImageInput(nn.Module):
    """z-score normalisation per channel: y = (x - mean[c]) / std[c] on NCHW input."""

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Add(nn.Module):
    """Elementwise sum of two tensors (a named layer, so it shows in tables as ``add11``...)."""

    def forward(self, a, b):
        return a + b


@dataclass(frozen=True)
class ResNetSpec:
    """The architecture of a CIFAR residual network (saved in the model card)."""

    net_width: int = 16     # filters of convInp and of stage 1
    num_units: int = 9      # residual units in all, a multiple of 3 (num_units/3 per stage)
    unit_type: str = "standard"  # "standard" (two 3x3) or "bottleneck" (1x1, 3x3, 1x1)
    num_classes: int = 10

    def __post_init__(self):
        for field in ("net_width", "num_units", "num_classes"):
            v = getattr(self, field)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ArgumentError(f"{field} must be a positive integer, got {v!r}")
        if self.num_units % 3:
            raise ArgumentError(f"num_units must be a multiple of 3 (units are split evenly over 3 "
                                f"stages), got {self.num_units}")
        if self.unit_type not in UNIT_TYPES:
            raise ArgumentError(f"unit_type must be one of {UNIT_TYPES}, got {self.unit_type!r}")

    @property
    def depth(self) -> int:
        """Weighted layers on the longest path: convInp + convs of every unit + fcFinal."""
        per_unit = 2 if self.unit_type == "standard" else 3
        return per_unit * self.num_units + 2

    @property
    def name(self) -> str:
        suffix = "" if self.unit_type == "standard" else "-bottleneck"
        return f"cifarnet-{self.depth}-{self.net_width}{suffix}"

    def to_dict(self) -> dict:
        return asdict(self)


class ResNet(nn.Module):
    """A CIFAR residual network with flat, MATLAB-style layer names (see the module docstring)."""

    def __init__(self, spec: ResNetSpec):
        super().__init__()
        self.spec = spec
        w = spec.net_width
        self.input = ImageInput()
        self.convInp = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.bnInp = nn.BatchNorm2d(w)
        self.reluInp = nn.ReLU()
        self.units: list[dict] = []  # one dict of layer names per unit, in execution order
        channels = w
        per_stage = spec.num_units // 3
        for s in range(1, 4):
            width = w * 2 ** (s - 1)
            out = width if spec.unit_type == "standard" else 4 * width
            for u in range(1, per_stage + 1):
                stride = 2 if (s > 1 and u == 1) else 1
                self.units.append(self._add_unit(f"S{s}U{u}", channels, width, out, stride, f"{s}{u}"))
                channels = out
        self.globalPool = nn.AdaptiveAvgPool2d(1)
        self.fcFinal = nn.Linear(channels, spec.num_classes)
        self.softmax = nn.Softmax(dim=1)
        self._init_weights()

    def _add_unit(self, p: str, cin: int, width: int, cout: int, stride: int, su: str) -> dict:
        if self.spec.unit_type == "standard":
            shapes = [(cin, width, 3, stride), (width, cout, 3, 1)]
        else:  # bottleneck: stride on the 3x3 conv
            shapes = [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)]
        convs = []
        for k, (ci, co, ks, st) in enumerate(shapes, 1):
            setattr(self, f"{p}_conv{k}", nn.Conv2d(ci, co, ks, st, padding=ks // 2, bias=False))
            setattr(self, f"{p}_bn{k}", nn.BatchNorm2d(co))
            if k < len(shapes):
                setattr(self, f"{p}_relu{k}", nn.ReLU())
            convs.append(k)
        skip = stride != 1 or cin != cout
        if skip:
            setattr(self, f"{p}_convSkip", nn.Conv2d(cin, cout, 1, stride, bias=False))
            setattr(self, f"{p}_bnSkip", nn.BatchNorm2d(cout))
        setattr(self, f"add{su}", Add())
        setattr(self, f"relu{su}", nn.ReLU())
        return {"prefix": p, "convs": convs, "skip": skip, "add": f"add{su}", "relu": f"relu{su}"}

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # zero-init the last BN of each residual path so every unit starts as the identity
        for unit in self.units:
            nn.init.zeros_(getattr(self, f"{unit['prefix']}_bn{unit['convs'][-1]}").weight)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores before softmax, (N, 3, 32, 32) in [0, 1] -> (N, num_classes)."""
        x = self.reluInp(self.bnInp(self.convInp(self.input(x))))
        for unit in self.units:
            p = unit["prefix"]
            y = x
            last = unit["convs"][-1]
            for k in unit["convs"]:
                y = getattr(self, f"{p}_bn{k}")(getattr(self, f"{p}_conv{k}")(y))
                if k != last:
                    y = getattr(self, f"{p}_relu{k}")(y)
            shortcut = getattr(self, f"{p}_bnSkip")(getattr(self, f"{p}_convSkip")(x)) if unit["skip"] else x
            x = getattr(self, unit["relu"])(getattr(self, unit["add"])(y, shortcut))
        x = self.globalPool(x)
        x = torch.flatten(x, 1)  # (N, C, 1, 1) -> (N, C)
        return self.fcFinal(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.logits(x))

    def extra_repr(self) -> str:
        s = self.spec
        return f"{s.name}: net_width={s.net_width}, num_units={s.num_units}, unit_type={s.unit_type}"


def resnet(net_width: int = 16, num_units: int = 9, unit_type: str = "standard",
           num_classes: int = 10) -> ResNet:
    """Build a CIFAR residual network; see the module docstring for the layout and names."""
    return ResNet(ResNetSpec(net_width, num_units, unit_type, num_classes))
