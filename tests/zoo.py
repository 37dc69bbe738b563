"""A zoo of small CIFAR-sized CNNs (3x32x32 in, 10 classes) written the way published code
writes them, to test that netquant takes such code as it is.

Each net copies the idioms of a popular public repository, not netquant's own conventions:

- ``resnet_a``: akamaster/pytorch_resnet_cifar10 ``resnet.py`` (the He et al. CIFAR ResNet):
  option-A shortcut ``LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p)))``,
  ``out += self.shortcut(x)``, ``F.avg_pool2d(out, out.size()[3])``, ``out.view(out.size(0), -1)``.
- ``resnet_b``: torchvision ``models/resnet.py`` (``BasicBlock``: one ``nn.ReLU(inplace=True)``
  module called twice, ``downsample`` = 1x1 conv + BN projection (option B), ``identity = x``,
  ``out += identity``; ``torch.flatten(x, 1)``), with the stages held in an ``nn.ModuleList`` of
  ``nn.Sequential`` as timm-style code does.
- ``vgg``: kuangliu/pytorch-cifar ``models/vgg.py`` (``cfg`` list, ``_make_layers``, the
  ``AvgPool2d(kernel_size=1, stride=1)`` no-op) with the classifier of
  chengyangfu/pytorch-vgg-cifar10 (``Dropout``, ``Linear``, ``ReLU(True)``, ``Dropout``, ``Linear``).
- ``mobilenetv2``: torchvision ``models/mobilenetv2.py`` (``ConvBNReLU`` as an ``nn.Sequential``
  subclass with ``ReLU6``, ``InvertedResidual`` with ``use_res_connect``, depthwise convs),
  head ``F.avg_pool2d(x, x.shape[-1])`` and ``x.reshape(x.shape[0], -1)``.
- ``shufflenetv2``: torchvision ``models/shufflenetv2.py`` (``channel_shuffle`` with
  ``batchsize, num_channels, height, width = x.size()``, view/``torch.transpose``/contiguous/view,
  ``x.chunk(2, dim=1)``, ``torch.cat``, ``x.mean([2, 3])``).
- ``biasnet``: the PyTorch "Training a classifier" tutorial style, deeper: biased convs, no batch
  norm, two linear layers.
- ``lenet``: the PyTorch CIFAR-10 tutorial ``Net`` (one ``nn.MaxPool2d`` module used twice,
  ``x.view(-1, 16 * 5 * 5)``), also kuangliu ``models/lenet.py``.
- ``upsample`` (extra): an FPN top-down path as in kuangliu ``models/fpn.py`` and detectron-style
  code: ``nn.Upsample(scale_factor=2, mode="nearest")``, ``F.interpolate(x, size=y.shape[-2:],
  mode="nearest")``, ``F.interpolate(..., mode="bilinear", align_corners=False)``, an add, a concat.
- ``se_hardswish`` (extra): MobileNetV3-style blocks with ``nn.Hardswish`` and two squeeze-excitation
  idioms: kuangliu ``models/senet.py`` (``w = F.avg_pool2d(out, out.size(2))``, 1x1 convs,
  ``out * F.sigmoid(w)``-style ``x * torch.sigmoid(...)``) and moskomule/senet.pytorch
  ``SELayer`` (``b, c, _, _ = x.size()``, ``.view(b, c)``, ``x * y.expand_as(x)``).
- ``dead_ops`` (extra): a ResNet-ish net whose forward computes ``x.view(...)``, ``x.size()``,
  a flatten and an activation it never uses, as forks of the CIFAR ResNet-20 do (debug
  leftovers). ``DeadOpsResNet`` subclasses ``TinyResNet``, which is the same net without them.

``make(name, seed)`` builds the net with the global RNG forked (the caller's stream is
untouched), gives every batch norm non-trivial statistics (running mean and variance measured
in train mode on three seeded random batches, then a seeded random gamma and beta), and
returns it in eval mode. No training happens here: the weights are the random initialisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

ARCHITECTURES = ("resnet_a", "resnet_b", "vgg", "mobilenetv2", "shufflenetv2", "biasnet", "lenet")
EXTRAS = ("upsample", "se_hardswish", "dead_ops")


# --- resnet_a: akamaster/pytorch_resnet_cifar10 -------------------------------------------------
def _weights_init(m):
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        init.kaiming_normal_(m.weight)


class LambdaLayer(nn.Module):
    def __init__(self, lambd):
        super().__init__()
        self.lambd = lambd

    def forward(self, x):
        return self.lambd(x)


class BasicBlockA(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, option="A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if option == "A":
                # For CIFAR10 ResNet paper uses option A.
                self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4),
                                                            "constant", 0))
            elif option == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(self.expansion * planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class ResNetA(nn.Module):
    def __init__(self, block, num_blocks, num_classes=10, width=8):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], stride=2)
        self.linear = nn.Linear(4 * width, num_classes)
        self.apply(_weights_init)

    def _make_layer(self, block, planes, num_blocks, stride):
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(block(self.in_planes, planes, stride))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


# --- resnet_b: torchvision BasicBlock, option-B projection, ModuleList stages -------------------
def conv3x3(in_planes, out_planes, stride=1):
    """3x3 convolution with padding"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    """1x1 convolution"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlockB(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class ResNetB(nn.Module):
    def __init__(self, layers=(2, 1, 1), widths=(8, 16, 32), num_classes=10):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.stages = nn.ModuleList()
        for i, (n, w) in enumerate(zip(layers, widths)):
            self.stages.append(self._make_layer(w, n, stride=1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * BasicBlockB.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlockB.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * BasicBlockB.expansion, stride),
                nn.BatchNorm2d(planes * BasicBlockB.expansion),
            )
        layers = [BasicBlockB(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlockB.expansion
        for _ in range(1, blocks):
            layers.append(BasicBlockB(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        for stage in self.stages:
            x = stage(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


# --- vgg: kuangliu/pytorch-cifar + chengyangfu/pytorch-vgg-cifar10 classifier --------------------
cfg = {
    "VGG-tiny": [8, "M", 16, "M", 32, 32, "M", 32, "M"],
}


class VGG(nn.Module):
    def __init__(self, vgg_name="VGG-tiny", num_classes=10):
        super().__init__()
        self.features = self._make_layers(cfg[vgg_name])
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(32 * 2 * 2, 32),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(32, num_classes),
        )

    def forward(self, x):
        out = self.features(x)
        out = out.view(out.size(0), -1)
        out = self.classifier(out)
        return out

    def _make_layers(self, cfg):
        layers = []
        in_channels = 3
        for x in cfg:
            if x == "M":
                layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
            else:
                layers += [nn.Conv2d(in_channels, x, kernel_size=3, padding=1),
                           nn.BatchNorm2d(x),
                           nn.ReLU(inplace=True)]
                in_channels = x
        layers += [nn.AvgPool2d(kernel_size=1, stride=1)]
        return nn.Sequential(*layers)


# --- mobilenetv2: torchvision ---------------------------------------------------------------------
class ConvBNReLU(nn.Sequential):
    def __init__(self, in_planes, out_planes, kernel_size=3, stride=1, groups=1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        self.stride = stride
        assert stride in [1, 2]

        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup

        layers = []
        if expand_ratio != 1:
            # pw
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers.extend([
            # dw
            ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            # pw-linear
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        else:
            return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=10, width_mult=1.0):
        super().__init__()
        input_channel = 8
        last_channel = 32
        # t, c, n, s (CIFAR: the first stride is 1)
        inverted_residual_setting = [
            [1, 8, 1, 1],
            [4, 12, 2, 2],
            [4, 16, 2, 2],
        ]
        features = [ConvBNReLU(3, input_channel, stride=1)]
        for t, c, n, s in inverted_residual_setting:
            output_channel = int(c * width_mult)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, expand_ratio=t))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(0.2),
            nn.Linear(last_channel, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        x = F.avg_pool2d(x, x.shape[-1])
        x = x.reshape(x.shape[0], -1)
        x = self.classifier(x)
        return x


# --- shufflenetv2: torchvision ------------------------------------------------------------------
def channel_shuffle(x, groups):
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups

    # reshape
    x = x.view(batchsize, groups, channels_per_group, height, width)

    x = torch.transpose(x, 1, 2).contiguous()

    # flatten
    x = x.view(batchsize, -1, height, width)

    return x


class ShuffleUnit(nn.Module):
    def __init__(self, inp, oup, stride):
        super().__init__()
        self.stride = stride
        branch_features = oup // 2
        assert (self.stride != 1) or (inp == branch_features << 1)

        if self.stride > 1:
            self.branch1 = nn.Sequential(
                self.depthwise_conv(inp, inp, kernel_size=3, stride=self.stride, padding=1),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()

        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if (self.stride > 1) else branch_features, branch_features, kernel_size=1, stride=1,
                      padding=0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            self.depthwise_conv(branch_features, branch_features, kernel_size=3, stride=self.stride, padding=1),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    @staticmethod
    def depthwise_conv(i, o, kernel_size, stride=1, padding=0, bias=False):
        return nn.Conv2d(i, o, kernel_size, stride, padding, bias=bias, groups=i)

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)

        out = channel_shuffle(out, 2)

        return out


class ShuffleNetV2(nn.Module):
    def __init__(self, stages_repeats=(2, 2), stages_out_channels=(8, 16, 32, 64), num_classes=10):
        super().__init__()
        input_channels = 3
        output_channels = stages_out_channels[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(input_channels, output_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(output_channels),
            nn.ReLU(inplace=True),
        )
        input_channels = output_channels
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        stage_names = [f"stage{i}" for i in [2, 3]]
        for name, repeats, output_channels in zip(stage_names, stages_repeats, stages_out_channels[1:]):
            seq = [ShuffleUnit(input_channels, output_channels, 2)]
            for i in range(repeats - 1):
                seq.append(ShuffleUnit(output_channels, output_channels, 1))
            setattr(self, name, nn.Sequential(*seq))
            input_channels = output_channels

        output_channels = stages_out_channels[-1]
        self.conv5 = nn.Sequential(
            nn.Conv2d(input_channels, output_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(output_channels),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(output_channels, num_classes)

    def forward(self, x):
        x = self.conv1(x)
        x = self.maxpool(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.conv5(x)
        x = x.mean([2, 3])  # globalpool
        x = self.fc(x)
        return x


# --- biasnet: tutorial style, biased convs, no batch norm ----------------------------------------
class BiasNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(32 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.pool(F.relu(self.conv3(x)))
        x = torch.flatten(x, 1)  # flatten all dimensions except batch
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return x


# --- lenet: the PyTorch CIFAR-10 tutorial ---------------------------------------------------------
class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


# --- upsample: an FPN top-down path ---------------------------------------------------------------
class TinyFPN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.c3 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.c4 = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        # lateral layers
        self.latlayer2 = nn.Conv2d(16, 16, kernel_size=1, stride=1, padding=0)
        self.latlayer3 = nn.Conv2d(32, 16, kernel_size=1, stride=1, padding=0)
        self.toplayer = nn.Conv2d(32, 16, kernel_size=1, stride=1, padding=0)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.smooth = nn.Conv2d(24, 16, kernel_size=3, stride=1, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def _upsample_add(self, x, y):
        """Upsample ``x`` to the size of ``y`` and add them (kuangliu fpn.py; nearest here)."""
        _, _, H, W = y.size()
        return F.interpolate(x, size=(H, W), mode="nearest") + y

    def forward(self, x):
        c1 = F.relu(self.bn1(self.conv1(x)))      # 8 x 32 x 32
        c2 = self.c2(c1)                          # 16 x 16 x 16
        c3 = self.c3(c2)                          # 32 x 8 x 8
        c4 = self.c4(c3)                          # 32 x 4 x 4
        p4 = self.toplayer(c4)                    # 16 x 4 x 4
        p3 = self.up(p4) + self.latlayer3(c3)     # 16 x 8 x 8
        p2 = self._upsample_add(p3, self.latlayer2(c2))                               # 16 x 16 x 16
        p1 = F.interpolate(p2, scale_factor=2, mode="bilinear", align_corners=False)  # 16 x 32 x 32
        out = torch.cat([p1, c1], dim=1)          # 24 x 32 x 32
        out = F.relu(self.smooth(out))
        out = F.adaptive_avg_pool2d(out, 1)
        out = out.view(out.size(0), -1)
        return self.fc(out)


# --- se_hardswish: MobileNetV3-style blocks, two squeeze-excitation idioms -------------------------
class SELayer(nn.Module):
    """moskomule/senet.pytorch."""

    def __init__(self, channel, reduction=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid()
        )

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


class SEBlock(nn.Module):
    """kuangliu/pytorch-cifar senet.py (BasicBlock), with hard-swish."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = nn.Hardswish()

        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes)
            )

        # SE layers
        self.fc1 = nn.Conv2d(planes, planes // 4, kernel_size=1)  # Use nn.Conv2d instead of nn.Linear
        self.fc2 = nn.Conv2d(planes // 4, planes, kernel_size=1)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))

        # Squeeze
        w = F.avg_pool2d(out, out.size(2))
        w = F.relu(self.fc1(w))
        w = self.fc2(w)
        # Excitation
        out = out * torch.sigmoid(w)

        out += self.shortcut(x)
        out = self.act(out)
        return out


class SEHardswishNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.hs1 = nn.Hardswish(inplace=True)
        self.layer1 = SEBlock(8, 16, stride=2)
        self.se = SELayer(16)
        self.layer2 = SEBlock(16, 32, stride=2)
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        out = self.hs1(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.se(out)
        out = self.layer2(out)
        out = F.adaptive_avg_pool2d(out, 1)
        out = out.view(out.size(0), -1)
        return self.linear(out)


# --- dead_ops: a ResNet-20 fork with debug leftovers -----------------------------------------------
class TinyResNet(nn.Module):
    """A small option-B ResNet; ``DeadOpsResNet`` is the same net with unused ops in forward."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlockB(8, 8))
        self.layer2 = nn.Sequential(BasicBlockB(8, 16, 2, nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16))))
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        return self.linear(out)


class DeadOpsResNet(TinyResNet):
    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        feat = out.view(out.size(0), -1)       # noqa: F841  (kept from a feature-dump experiment)
        shape = x.size()                       # noqa: F841
        out = self.layer1(out)
        flat = torch.flatten(out, 1)           # noqa: F841
        act = F.relu(out * 2.0)                # noqa: F841
        out = self.layer2(out)
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        return self.linear(out)


# --- construction ---------------------------------------------------------------------------------
_BUILDERS = {
    "resnet_a": lambda: ResNetA(BasicBlockA, [2, 1, 1]),
    "resnet_b": lambda: ResNetB(),
    "vgg": lambda: VGG("VGG-tiny"),
    "mobilenetv2": lambda: MobileNetV2(),
    "shufflenetv2": lambda: ShuffleNetV2(),
    "biasnet": lambda: BiasNet(),
    "lenet": lambda: LeNet(),
    "upsample": lambda: TinyFPN(),
    "se_hardswish": lambda: SEHardswishNet(),
    "dead_ops": lambda: DeadOpsResNet(),
}


def _batchnorm_statistics(model: nn.Module, gen: torch.Generator) -> None:
    """Give every batch norm measured running statistics (the cumulative mean and variance over
    three train-mode passes of seeded random images) and a seeded random gamma in [0.5, 1.5] and
    beta in [-0.25, 0.25], so folding them into the convs is a real test."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None   # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, 32, 32, generator=gen) * 1.5 - 0.25)
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.bias.copy_((torch.rand(bn.num_features, generator=gen) - 0.5) * 0.5)


def make(name: str, seed: int = 0) -> nn.Module:
    """The zoo net ``name`` (one of ARCHITECTURES + EXTRAS), random-initialised from ``seed``,
    with non-trivial batch-norm statistics, in eval mode. The same (name, seed) gives the same
    weights every time; the caller's global RNG state is left as it was."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown zoo net {name!r}; known: {', '.join(ARCHITECTURES + EXTRAS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _BUILDERS[name]()
        _batchnorm_statistics(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()
