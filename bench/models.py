"""ImageNet-size networks for the benchmarks, written in plain torch (no torchvision dependency).

    net = resnet50()                                 # eval mode, 224x224 RGB in [0, 1], 1000 classes
    calib = upsampled(cifar.train.images[:8])        # real CIFAR-10 images, bilinear to 224x224

``resnet18``, ``resnet50`` (ResNet v1.5: the stride on the bottleneck's 3x3 conv) and
``mobilenetv2`` follow torchvision's definitions module for module, so their layer names
(``layer1.0.conv1``, ``features.1.conv.0.0``), shapes, parameter counts (11,689,512; 25,557,032;
3,504,872) and MACs (1.81G, 4.09G, 0.30G per image) are torchvision's. They are what a user
brings without a checkpoint: random weights drawn with torchvision's initialisation (seeded), and
batch norms that are not the identity:

1. every batch norm gets gamma ~ U(0.5, 1.5) and beta ~ N(0, 0.1^2) (a trained network's are
   neither 1 nor 0),
2. then its running mean and variance are measured, as training would, on 32 seeded smooth random
   images (8x8 uniform noise upsampled bilinearly to 224: natural images' spatial correlation
   without reading any data), in train mode, as a cumulative average (momentum None), so the eval
   network sees activations of the scale it was "trained" on: for ResNet-50 the first batch norm
   ends with running means of -0.34..0.32 and variances of 0.0006..0.017, not 0 and 1.

The networks take netquant's images as they are (RGB in [0, 1], no ImageNet mean/std: the
statistics of step 2 are measured on that range), so every engine of the bench feeds them the
same array.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIZE = 224          # input height and width
CLASSES = 1000
_STAT_IMAGES, _STAT_BATCH = 32, 16


# --- ResNet (torchvision.models.resnet) -----------------------------------------------------

def _conv3x3(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs and the shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inp: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv3x3(inp, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride: ResNet v1.5), 1x1 expand by 4, and the shortcut."""

    expansion = 4

    def __init__(self, inp: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv1x1(inp, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet: 7x7/2 stem, 3x3/2 max pool, four stages, global average pool, fc."""

    def __init__(self, block, layers: list, num_classes: int = CLASSES):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():   # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))         # (N, 64, 56, 56)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))    # (N, 512 * expansion, 7, 7)
        x = torch.flatten(self.avgpool(x), 1)                         # (N, 512 * expansion)
        return self.fc(x)


# --- MobileNetV2 (torchvision.models.mobilenetv2) -------------------------------------------

def _make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round channels to a multiple of ``divisor``, never below 90% of ``v`` (32 * 1.0 -> 32)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class Conv2dNormActivation(nn.Sequential):
    """Conv (no bias, 'same' padding), batch norm, ReLU6: torchvision.ops.Conv2dNormActivation."""

    def __init__(self, inp: int, out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(inp, out, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6(inplace=True))
        self.out_channels = out


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear project; the shortcut where the
    stride is 1 and the channels stay."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, kernel_size=1))
        layers += [Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (width 1.0): 17 inverted residual blocks, 1280-channel head."""

    SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                [6, 160, 3, 2], [6, 320, 1, 1]]   # expansion t, channels c, repeats n, first stride s

    def __init__(self, num_classes: int = CLASSES, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        inp = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list = [Conv2dNormActivation(3, inp, stride=2)]
        for t, c, n, s in self.SETTINGS:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(inp, out, s if i == 0 else 1, expand_ratio=t))
                inp = out
        features.append(Conv2dNormActivation(inp, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():   # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)                                          # (N, 1280, 7, 7)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))                   # (N, 1000)


# --- non-trivial batch norms, and the public constructors -----------------------------------

def smooth_images(count: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """``count`` seeded images in [0, 1]: 8x8 uniform noise upsampled bilinearly to ``size``
    (neighbouring pixels correlated, as in photographs; white noise at 224 would not be)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 8, 8, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)


@torch.no_grad()
def randomize_batch_norms(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm a random gamma ~ U(0.5, 1.5) and beta ~ N(0, 0.1^2), then measure its
    running statistics on 32 seeded smooth images in train mode (cumulative average), and return
    ``net`` in eval mode. Deterministic for a given seed."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=g))
        bn.bias.copy_(0.1 * torch.randn(bn.num_features, generator=g))
        bn.reset_running_stats()
        bn.momentum = None   # cumulative moving average: every statistics batch counts the same
    net.train()
    images = smooth_images(_STAT_IMAGES, seed + 1)
    for start in range(0, _STAT_IMAGES, _STAT_BATCH):
        net(images[start:start + _STAT_BATCH])
    for bn in bns:
        bn.momentum = 0.1    # torchvision's default, for anyone who trains it further
    return net.eval()


def _build(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):   # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        net = make()
    return randomize_batch_norms(net, seed)


def resnet18(seed: int = 0) -> nn.Module:
    """torchvision's ResNet-18 (11,689,512 parameters, 1.81G MACs at 224x224), random weights."""
    return _build(lambda: ResNet(BasicBlock, [2, 2, 2, 2]), seed)


def resnet50(seed: int = 0) -> nn.Module:
    """torchvision's ResNet-50 v1.5 (25,557,032 parameters, 4.09G MACs at 224x224), random weights."""
    return _build(lambda: ResNet(Bottleneck, [3, 4, 6, 3]), seed)


def mobilenetv2(seed: int = 0) -> nn.Module:
    """torchvision's MobileNetV2 (3,504,872 parameters, 0.30G MACs at 224x224), random weights."""
    return _build(MobileNetV2, seed)


MODELS = {"resnet18": resnet18, "resnet50": resnet50, "mobilenetv2": mobilenetv2}


def upsampled(images: np.ndarray, size: int = SIZE, batch: int = 64) -> np.ndarray:
    """uint8 (or float in [0, 1]) NCHW images -> float32 (N, 3, size, size) in [0, 1], resized
    bilinearly (align_corners False, as torchvision's Resize on tensors): a 32x32 CIFAR-10 image
    becomes 224x224, each source pixel spread over 7x7 output pixels."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"upsampled: expected images of shape (N, 3, H, W), got {x.shape}")
    scale = np.float32(1 / 255) if x.dtype == np.uint8 else np.float32(1)
    out = np.empty((len(x), 3, size, size), np.float32)
    for start in range(0, len(x), batch):   # bounded temporaries for large sets
        part = torch.from_numpy(x[start:start + batch].astype(np.float32) * scale)
        out[start:start + batch] = F.interpolate(part, size=(size, size), mode="bilinear",
                                                 align_corners=False).clamp_(0, 1).numpy()
    return out


def calibration_images(data, count: int = 200, seed: int = 0, size: int = SIZE):
    """MATLAB's default calibration set (``count`` random CIFAR-10 training images, the same ones
    as ``netquant.data.calibration_set``), upsampled to ``size``: (float32 images, labels, source)."""
    from netquant.data import calibration_set

    subset = calibration_set(data, count, seed)
    return upsampled(subset.images, size), subset.labels, f"{subset.source}, upsampled bilinearly to {size}x{size}"


def parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


if __name__ == "__main__":   # a quick look: parameter counts and the output spread of each
    for name, make in MODELS.items():
        net = make()
        with torch.no_grad():
            y = net(smooth_images(4, 123))
        print(f"{name}: {parameters(net):,} parameters; scores std {float(y.std()):.3g}, "
              f"classes predicted {sorted(set(y.argmax(1).tolist()))}; all finite: {bool(torch.isfinite(y).all())}")
