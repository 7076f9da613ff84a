"""The model zoo: the classifier architectures the papers use, plus any torchvision model.

Every classifier kdtools builds is an ``ImageClassifier``: a fixed input normalisation followed by a
network. Queries, datasets and generators all live in image space ([0, 1] pixels, NCHW), so a model
file carries its own normalisation and no command has to know how a victim was trained.

Architectures (``build_network(name, ...)``):
  mlp            two hidden layers (``hidden=[256, 128]`` by default)
  lenet5         LeNet-5 (6-16 conv, 120-84 fc); 28x28 inputs are padded as in the original 32x32 design
  lenet5-half    LeNet-5 with every width halved (3-8 conv, 60-42 fc): the classic student
  alexnet        CIFAR-form AlexNet (3x3 convs, no 11x11 stem)
  vgg11, vgg13, vgg16, vgg19   CIFAR-form VGG with batch norm
  resnet18, resnet34           CIFAR-form ResNet (3x3 stem, no max-pool)
  torchvision:<name>           any torchvision classification model, e.g. torchvision:mobilenet_v3_small
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import KdUsageError


class MLP(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, input_size: Sequence[int], hidden: Sequence[int] = (256, 128)):
        super().__init__()
        width = in_channels * int(input_size[0]) * int(input_size[1])
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling, as used by DAFL/DFAD/IDEAL; ``width`` 0.5 gives LeNet-5-half."""

    def __init__(self, in_channels: int, num_classes: int, input_size: Sequence[int], width: float = 1.0):
        super().__init__()
        c1, c2, f1, f2 = (max(1, round(n * width)) for n in (6, 16, 120, 84))
        # LeNet-5 was designed for 32x32; smaller inputs get zero padding so the feature map stays 5x5
        pad = max(0, (32 - int(input_size[0])) // 2)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        with torch.no_grad():
            n = self.features(torch.zeros(1, in_channels, *input_size)).numel()
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(n, f1), nn.ReLU(inplace=True),
                                        nn.Linear(f1, f2), nn.ReLU(inplace=True), nn.Linear(f2, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class AlexNetCifar(nn.Module):
    """AlexNet in the small-image form used for CIFAR: 3x3 convolutions, three max-pools."""

    def __init__(self, in_channels: int, num_classes: int, input_size: Sequence[int]):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 192, 3, padding=1), nn.BatchNorm2d(192), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(192, 384, 3, padding=1), nn.BatchNorm2d(384), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(256 * 4, 1024), nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(1024, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGGCifar(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, input_size: Sequence[int], depth: str = "vgg11"):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        size = min(int(input_size[0]), int(input_size[1]))
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                if size >= 2:  # small inputs (e.g. 28x28) run out of resolution before the last pool
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet for small images: 3x3 stem with stride 1 and no max-pool, four stages of basic blocks."""

    def __init__(self, in_channels: int, num_classes: int, input_size: Sequence[int], blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        stages, cin = [], 64
        for i, (cout, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            for j in range(n):
                stages.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


ARCHITECTURES = ["mlp", "lenet5", "lenet5-half", "alexnet", "vgg11", "vgg13", "vgg16", "vgg19", "resnet18", "resnet34"]


def build_network(arch: str, in_channels: int, num_classes: int, input_size: Sequence[int], **kwargs) -> nn.Module:
    """Build an untrained network by name. ``kwargs`` are architecture arguments (e.g. ``hidden`` for mlp)."""
    input_size = tuple(int(s) for s in input_size)
    zoo = {"mlp": (MLP, ()), "lenet5": (LeNet5, ()), "lenet5-half": (LeNet5, ("width",)), "alexnet": (AlexNetCifar, ()),
           "resnet18": (ResNetCifar, ("blocks",)), "resnet34": (ResNetCifar, ("blocks",)),
           **{name: (VGGCifar, ("depth",)) for name in VGG_CONFIGS}}
    if arch in zoo:
        _check_arch_args(arch, *zoo[arch], kwargs)
    try:
        return _build_network(arch, in_channels, num_classes, input_size, **kwargs)
    except (TypeError, ValueError) as e:
        if not kwargs:  # not the user's arguments: a real bug, keep its traceback
            raise
        # e.g. {"width": "2"}: the argument's name is right, its value is not
        raise KdUsageError(f"architecture {arch} cannot be built with arguments {kwargs}: {e}") from None


def _build_network(arch: str, in_channels: int, num_classes: int, input_size: tuple, **kwargs) -> nn.Module:
    if arch == "mlp":
        return MLP(in_channels, num_classes, input_size, **kwargs)
    if arch == "lenet5":
        return LeNet5(in_channels, num_classes, input_size, **kwargs)
    if arch == "lenet5-half":
        return LeNet5(in_channels, num_classes, input_size, width=0.5, **kwargs)
    if arch == "alexnet":
        return AlexNetCifar(in_channels, num_classes, input_size, **kwargs)
    if arch in VGG_CONFIGS:
        return VGGCifar(in_channels, num_classes, input_size, depth=arch, **kwargs)
    if arch == "resnet18":
        return ResNetCifar(in_channels, num_classes, input_size, blocks=(2, 2, 2, 2), **kwargs)
    if arch == "resnet34":
        return ResNetCifar(in_channels, num_classes, input_size, blocks=(3, 4, 6, 3), **kwargs)
    if arch.startswith("torchvision:"):
        return _torchvision_network(arch.split(":", 1)[1], in_channels, num_classes, **kwargs)
    raise KdUsageError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)} or torchvision:<name>")


def _check_arch_args(arch: str, cls: type, fixed: Sequence[str], kwargs: dict) -> None:
    """Name an argument the architecture does not take (else a TypeError from deep inside reads like a bug)."""
    import inspect

    taken = [k for k in list(inspect.signature(cls).parameters)[3:] if k not in fixed]  # after channels, classes, size
    unknown = [k for k in kwargs if k not in taken]
    if unknown:
        raise KdUsageError(f"architecture {arch} takes no argument {', '.join(map(repr, unknown))} "
                           f"(its arguments: {', '.join(taken) or 'none'})")


def _torchvision_network(name: str, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    import torchvision

    try:
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (ValueError, KeyError) as e:
        raise KdUsageError(f"torchvision has no classification model {name!r} ({e})") from None
    if in_channels != 3:
        # torchvision models take RGB; grey inputs are repeated to three channels rather than
        # rewriting each model's stem
        return nn.Sequential(_RepeatChannels(3 // in_channels if 3 % in_channels == 0 else 1, in_channels), net)
    return net


class _RepeatChannels(nn.Module):
    def __init__(self, times: int, in_channels: int):
        super().__init__()
        if in_channels * times != 3:
            raise KdUsageError(f"torchvision models take 3 channels; cannot adapt {in_channels}-channel inputs")
        self.times = times

    def forward(self, x):
        return x.repeat(1, self.times, 1, 1)


class ImageClassifier(nn.Module):
    """A network plus its input normalisation and the facts needed to rebuild it from a file.

    Inputs are images in [0, 1], shape (N, C, H, W); outputs are logits (N, num_classes).
    """

    def __init__(self, arch: str, input_shape: Sequence[int], num_classes: int, arch_args: dict | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.arch = arch
        self.arch_args = dict(arch_args or {})
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        c = self.input_shape[0]
        mean = list(mean) if mean is not None else [0.5] * c
        std = list(std) if std is not None else [0.5] * c
        if len(mean) != c or len(std) != c:
            raise KdUsageError(f"normalisation has {len(mean)} means / {len(std)} stds for {c} channels")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.net = build_network(arch, c, self.num_classes, self.input_shape[1:], **self.arch_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def spec(self) -> dict:
        """Everything (but the weights) needed to rebuild this model."""
        return {"arch": self.arch, "arch_args": self.arch_args, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
