"""Query generators of the data-free attacks. Every generator maps noise z to images in [0, 1].

The victims and substitutes take [0, 1] images and normalise themselves, so generators end in
``(tanh(.) + 1) / 2`` (after a batch norm without affine parameters, as in DFME and TandemGAN).

  tandem        TandemGAN's G = Ge(Gx(z)) (chapter 3). Gx explores: z -> latent feature map; Ge exploits:
                one convolution + batch norm turning the feature map into an image. For 28x28 grey
                images Gx is Linear(z -> 80 x 7 x 7) then two transposed convolutions (7 -> 14 -> 28);
                for 32x32 colour images Gx is the DFME generator without its last convolution and Ge is
                Conv(64 -> 3) + BN (no affine) + tanh.
  dfme          DFME's generator: Linear(z -> 128 x s x s), 2 x (upsample + conv + BN + LeakyReLU),
                conv to C channels, BN (no affine), tanh. z has 256 dimensions.
  ideal         IDEAL's generator (the paper uses StyleGAN's; kdtools uses the DFME layout with z of 100
                dimensions, widths 32/16 for 28x28 images); re-initialised every epoch by the attack.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import KdUsageError


class PixelOutput(nn.Module):
    """The last step of every generator: batch-normalised activations h (zero mean, unit variance per channel)
    to pixels in [0, 1].

    Default: (tanh(h) + 1) / 2, images centred on mid-grey. With ``mean``/``std`` set: clamp(mean + std x h),
    which is what the reference implementations of DFME/IDEAL do implicitly when they feed the normalised
    generator output straight to a victim that normalises with the data set's mean/std (for MNIST 0.1307 /
    0.3081: dark images with bright strokes). Two public constants, not data.
    """

    def __init__(self, mean: float | None = None, std: float | None = None):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return (torch.tanh(h) + 1) / 2
        return (self.mean + self.std * h).clamp(0, 1)


def _check_shape(image_shape) -> tuple:
    c, h, w = (int(v) for v in image_shape)
    if h != w or h % 4 != 0:
        raise KdUsageError(f"generators make square images with a side divisible by 4, not {c}x{h}x{w}")
    return c, h, w


class UpsampleGenerator(nn.Module):
    """DFME-style generator body. ``last_conv=False`` stops at the ``out_width``-channel feature map
    (TandemGAN's Gx). Widths: ``width`` at s/4 and s/2, ``out_width`` at full size (DFME: 128 and 64)."""

    def __init__(self, image_shape, z_dim: int = 256, width: int = 128, last_conv: bool = True, out_width: int = 64,
                 pixel_mean=None, pixel_std=None):
        super().__init__()
        self.out = PixelOutput(pixel_mean, pixel_std)
        c, h, _ = _check_shape(image_shape)
        self.init_size = h // 4
        self.z_dim = z_dim
        self.fc = nn.Linear(z_dim, width * self.init_size ** 2)
        self.width = width
        layers: list[nn.Module] = [
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, out_width, 3, padding=1), nn.BatchNorm2d(out_width), nn.LeakyReLU(0.2, inplace=True),
        ]
        if last_conv:
            # the final BN has no affine parameters: it keeps every channel at zero mean, unit variance
            layers += [nn.Conv2d(out_width, c, 3, padding=1), nn.BatchNorm2d(c, affine=False)]
        self.body = nn.Sequential(*layers)
        self.last_conv = last_conv

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.width, self.init_size, self.init_size)
        h = self.body(h)
        return self.out(h) if self.last_conv else h


class TandemGx(nn.Module):
    """TandemGAN's exploration network for small grey images: Linear(z -> 80 x s x s), two transposed convs."""

    out_channels = 32

    def __init__(self, image_shape, z_dim: int = 128):
        super().__init__()
        c, h, _ = _check_shape(image_shape)
        self.init_size = h // 4
        self.z_dim = z_dim
        self.fc = nn.Linear(z_dim, 80 * self.init_size ** 2)
        # widths after the first layer are not given in the paper; 64 then 32 keeps a CPU run affordable
        self.body = nn.Sequential(
            nn.BatchNorm2d(80),
            nn.ConvTranspose2d(80, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.LeakyReLU(0.2, inplace=True),
            nn.ConvTranspose2d(64, self.out_channels, 4, 2, 1), nn.BatchNorm2d(self.out_channels), nn.LeakyReLU(0.2, inplace=True),
        )

    def forward(self, z):
        return self.body(self.fc(z).view(z.shape[0], 80, self.init_size, self.init_size))


class TandemGe(nn.Module):
    """TandemGAN's exploitation network: one convolution + batch norm (no affine) + tanh, to [0, 1]."""

    def __init__(self, image_shape, in_channels: int = 64, pixel_mean=None, pixel_std=None):
        super().__init__()
        c = int(image_shape[0])
        self.out = PixelOutput(pixel_mean, pixel_std)
        self.conv = nn.Conv2d(in_channels, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c, affine=False)

    def forward(self, h):
        return self.out(self.bn(self.conv(h)))


class TandemGenerator(nn.Module):
    """G(z) = Ge(Gx(z)); the attack trains ``gx`` and ``ge`` with separate optimisers."""

    def __init__(self, image_shape, z_dim: int = 128, pixel_mean=None, pixel_std=None):
        super().__init__()
        c, h, _ = _check_shape(image_shape)
        self.z_dim = z_dim
        if c == 1 and h <= 28:
            self.gx = TandemGx(image_shape, z_dim)
            self.ge = TandemGe(image_shape, TandemGx.out_channels, pixel_mean, pixel_std)
        else:
            self.gx = UpsampleGenerator(image_shape, z_dim, last_conv=False)
            self.ge = TandemGe(image_shape, 64, pixel_mean, pixel_std)

    def forward(self, z):
        return self.ge(self.gx(z))


GENERATORS = ("tandem", "dfme", "ideal")
DEFAULT_Z = {"tandem": 128, "dfme": 256, "ideal": 100}


def build_generator(arch: str, image_shape, z_dim: int | None = None, pixel_mean: float | None = None,
                    pixel_std: float | None = None) -> nn.Module:
    """A fresh generator by name; ``z_dim`` defaults to the paper's value for that method; ``pixel_mean``/
    ``pixel_std`` choose the output mapping (see PixelOutput)."""
    image_shape = tuple(int(v) for v in image_shape)
    z_dim = int(z_dim or DEFAULT_Z.get(arch, 128))
    if (pixel_mean is None) != (pixel_std is None):
        raise KdUsageError("give both --pixel-mean and --pixel-std, or neither")
    px = {"pixel_mean": pixel_mean, "pixel_std": pixel_std}
    if arch == "tandem":
        return TandemGenerator(image_shape, z_dim, **px)
    if arch == "dfme":
        return UpsampleGenerator(image_shape, z_dim, width=128, **px)
    if arch == "ideal":
        # small enough to be re-initialised and trained every epoch on a CPU
        return UpsampleGenerator(image_shape, z_dim, width=32, out_width=16, **px) if image_shape[1] <= 28 else \
            UpsampleGenerator(image_shape, z_dim, width=128, **px)
    raise KdUsageError(f"unknown generator {arch!r}; expected one of {', '.join(GENERATORS)}")
