"""Image datasets, all held in memory as uint8 NCHW tensors with int64 labels.

Names (``load_dataset(name, split, root)``):
  mnist, fashion-mnist, cifar10, cifar100, svhn   torchvision's datasets under ``root`` (downloaded only
                                                  when ``download=True``)
  digits      scikit-learn's bundled handwritten digits (1 797 8x8 images, no download). Served at 28x28
              so the MNIST models apply. Fixed splits from one seeded shuffle: train (1 000 images),
              public (400: unlabelled-style images an attacker may own), test (397).
  folder:DIR  an ImageFolder directory (one sub-folder per class); needs ``image_size``
  a file      an HDF5 sample set or a kdtools stream file with x and label
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import KdError, KdUsageError, counted

TORCHVISION_SETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "fmnist": "FashionMNIST",
                    "cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN"}
DATASETS = ["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "folder:DIR", "FILE.h5"]
DIGITS_SPLITS = {"train": (0, 1000), "public": (1000, 1400), "test": (1400, 1797)}


@dataclass
class ImageSet:
    name: str
    split: str
    x: torch.Tensor  # uint8 (N, C, H, W), or float32 in [0, 1]
    y: Optional[torch.Tensor]  # int64 (N,), None when the source has no labels
    num_classes: Optional[int]
    classes: list = field(default_factory=list)

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple:
        return tuple(self.x.shape[1:])

    @property
    def title(self) -> str:
        """How reports name it: "mnist (test)"; a file or stream has no splits, so just its name."""
        return f"{self.name} ({self.split})" if self.split else self.name


def load_dataset(name: str, split: str = "train", root: Optional[str | Path] = None, download: bool = False,
                 image_size: Optional[int] = None, channels: Optional[int] = None,
                 also_accepted: tuple[str, ...] = (), stdin=None) -> ImageSet:
    """An image set by name. ``also_accepted``: names the caller handles itself, listed when ``name`` is unknown.
    ``-`` reads a labelled stream from ``stdin`` (a binary file object the CLI passes in)."""
    key = name.lower()
    if name == "-" and stdin is not None:
        data = _from_file(None, split, stdin)
    elif key == "digits":
        data = _digits(split)
    elif key in TORCHVISION_SETS:
        data = _torchvision(key, split, root, download)
    elif key.startswith("folder:"):
        data = _folder(name.split(":", 1)[1], split, image_size)
    elif Path(name).is_file():
        data = _from_file(name, split)
    elif Path(name).is_dir():
        data = _folder(name, split, image_size)
    elif Path(name).suffix.lower() in (".h5", ".hdf5", ".kds") or "/" in name:
        raise KdError(f"{name}: no such file")  # a file name, not a misspelt dataset
    else:
        raise KdUsageError(f"unknown dataset {name!r}; choose one of {', '.join((*DATASETS, *also_accepted))}")
    return adapt_images(data, image_size=image_size, channels=channels)


def adapt_images(data: ImageSet, image_size: Optional[int] = None, channels: Optional[int] = None) -> ImageSet:
    """Resize to ``image_size`` (square) and convert to ``channels`` (1 <-> 3), keeping the dtype."""
    x = data.x
    if channels and channels != x.shape[1]:
        x = convert_channels(x, channels)
    if image_size and (x.shape[2] != image_size or x.shape[3] != image_size):
        x = resize(x, image_size)
    return ImageSet(data.name, data.split, x, data.y, data.num_classes, data.classes)


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    c = x.shape[1]
    if c == 1 and channels == 3:
        return x.repeat(1, 3, 1, 1)
    if c == 3 and channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        g = (x.float() * w).sum(1, keepdim=True)
        return g.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else g
    raise KdUsageError(f"cannot convert {c}-channel images to {channels} channels")


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    out = []
    for i in range(0, x.shape[0], 4096):  # in slices, so big sets do not need a float copy at once
        xi = x[i:i + 4096].float()
        yi = F.interpolate(xi, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(yi.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else yi.clamp(0, 1))
    return torch.cat(out)


def _digits(split: str) -> ImageSet:
    from sklearn.datasets import load_digits

    if split not in DIGITS_SPLITS:
        raise KdUsageError(f"digits has splits {', '.join(DIGITS_SPLITS)}, not {split!r}")
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))  # fixed: every user gets the same splits
    lo, hi = DIGITS_SPLITS[split]
    idx = order[lo:hi]
    x = torch.from_numpy(d.images[idx]).float().unsqueeze(1) / 16.0  # pixel values are 0..16
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    return ImageSet("digits", split, x, torch.from_numpy(d.target[idx]).long(), 10, [str(i) for i in range(10)])


def _torchvision(key: str, split: str, root, download: bool) -> ImageSet:
    import torchvision.datasets as tvd

    if root is None:
        raise KdUsageError(f"--data {key} needs a data root: pass --data-root DIR or set KD_DATA (images under $KD_DATA/vision)")
    if split not in ("train", "test"):
        raise KdUsageError(f"{key} has splits train and test, not {split!r}")
    cls = getattr(tvd, TORCHVISION_SETS[key])
    try:
        if key == "svhn":
            ds = cls(str(root), split=split, download=download)
            x = torch.from_numpy(ds.data)
            y = torch.from_numpy(ds.labels).long()
            classes = [str(i) for i in range(10)]
        else:
            ds = cls(str(root), train=(split == "train"), download=download)
            data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(np.asarray(ds.data))
            x = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
            y = torch.as_tensor(ds.targets).long()
            classes = list(ds.classes)
    except RuntimeError as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not download and "not found" in why.lower():
            # torchvision's own words advise "download=True", a keyword our users never see
            where = Path(root) / ("" if key == "svhn" else getattr(cls, "base_folder", cls.__name__))
            found = "an incomplete copy of it" if where.exists() and key != "svhn" else "no copy of it"
            raise KdError(f"cannot load {key}: {found} in torchvision's layout under {root} (looked in {where}); "
                          "point --data-root (or KD_DATA, whose vision/ folder is used) at a complete one, or add "
                          "--download when online") from None
        raise KdError(f"cannot load {key} from {root}: {why}") from None
    return ImageSet(key, split, x.contiguous(), y, len(classes), classes)


def _folder(path: str, split: str, image_size: Optional[int]) -> ImageSet:
    import torchvision.datasets as tvd
    from torchvision.transforms.functional import pil_to_tensor, resize as tv_resize

    if not image_size:
        raise KdUsageError("an image folder needs --image-size")
    try:
        ds = tvd.ImageFolder(path)
    except (FileNotFoundError, RuntimeError) as e:
        raise KdError(f"{path}: not an image folder ({e})") from None
    xs, ys = [], []
    for img, label in ds:
        t = pil_to_tensor(img.convert("RGB"))
        xs.append(tv_resize(t, [image_size, image_size], antialias=True))
        ys.append(label)
    return ImageSet(f"folder:{path}", split, torch.stack(xs), torch.tensor(ys), len(ds.classes), list(ds.classes))


def _from_file(path: Optional[str], split: str, stdin=None) -> ImageSet:
    from .sources import read_all

    from .oracle import without_rejected

    header, batch = read_all(path, stdin)
    name = path or "stdin"
    if batch["x"].shape[0] == 0:
        raise KdError(f"{name}: holds no samples (a log stopped before its first answer?)")
    batch, refused = without_rejected(batch)  # rows a query defence refused hold no label
    if batch["x"].shape[0] == 0:
        raise KdError(f"{name}: all {refused} rows are queries a defence refused: no answer to use")
    if "label" not in batch:
        if "probs" in batch:
            y = batch["probs"].argmax(1)
        elif "logits" in batch:
            y = batch["logits"].argmax(1)
        else:
            y = None
    else:
        y = batch["label"].long()
    return ImageSet(name, "", batch["x"], y, header.num_classes, [])  # a file has no splits: --split does not apply


def check_finite_rows(x: torch.Tensor, what: str) -> None:
    """Refuse float rows holding NaN or infinity, naming how many and the first: trained on, they surface only
    as a NaN loss (blamed on the learning rate), and cast to uint8 they silently become 0."""
    if x.is_floating_point():
        bad = ~torch.isfinite(x).flatten(1).all(1)
        if bad.any():
            raise KdError(f"{what}: NaN or infinite values in {counted(int(bad.sum()), 'row')} (first at row {int(bad.nonzero()[0])})")


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1], whatever their stored dtype."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def data_root_from(option: Optional[str], kd_data_env: Optional[str]) -> Optional[Path]:
    """The image-data root: the option if given, else $KD_DATA/vision (the CLI passes the variable in)."""
    if option:
        return Path(option)
    if kd_data_env:
        return Path(kd_data_env) / "vision"
    return None


def describe_splits(name: str) -> Sequence[str]:
    return list(DIGITS_SPLITS) if name == "digits" else ["train", "test"]
