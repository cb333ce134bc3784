"""The dataset contract: the options every dataset takes, uint8 NCHW tensors in memory, plus the
shared post-processing."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from bdexp.data.common import DEFAULT_ROOT
from bdexp.options import Options, option
from bdexp.registry import Registry

# name -> function(opts: its DataOptions) -> ImageDataset at its native size, full (no limits
# applied); registered with its options, `@DATASETS.register("name", options=...)`.
DATASETS: Registry = Registry("dataset")


@dataclass(frozen=True)
class Augment(Options):
    """Train-time augmentation of the on-device loader (bdexp/data/loader.py): a random shift of up
    to `crop_padding` px (pad + random crop, zero fill) and a random horizontal flip. These are the
    natural-image defaults; a dataset whose defaults differ declares a subclass."""

    crop_padding: int = option(4, lo=0)
    flip: bool = True


@dataclass(frozen=True)
class DigitAugment(Augment):
    """Handwritten digits: shifts of up to 2 px, no flip (digits are not mirror-symmetric)."""

    crop_padding: int = option(2, lo=0)
    flip: bool = False


Channels = Literal[1, 3]
Fit = Literal["stretch", "center_crop"]  # how a non-square image becomes a square (common.FitSquare)


@dataclass(frozen=True)
class DataOptions(Options):
    """The keys every dataset takes (conf/dataset/<name>.yaml); each source declares a subclass
    with its own keys and defaults."""

    root: str = DEFAULT_ROOT  # where the files are (or are downloaded to); `~` is expanded
    image_size: int = option(32, lo=8)  # every image is resized to image_size² (digits' native 8 px is the smallest)
    channels: Channels = 3  # converted to (1 -> 3 by repetition, 3 -> 1 by luminance)
    train_limit: int | None = option(None, lo=1)  # class-stratified subset drawn with the run seed; null = all
    test_limit: int | None = option(None, lo=1)
    augment: Augment = Augment()


@dataclass(frozen=True)
class DownloadOptions(DataOptions):
    """A dataset torchvision can fetch into `root`."""

    download: bool = True


@dataclass
class ImageDataset:
    """Images as uint8 (N, C, H, W) tensors with int64 labels; `classes` names each label.
    `skipped`: source entries left out (results.json `skipped_files`): files that could not be
    decoded (dataset.skip_bad_files) and `not_regular`, entries that are not regular files
    (symbolic links, FIFOs, sockets, devices), which are never opened. `files_key`: the fingerprint
    of the files decoded, from their bytes, when the source computes it (common.cache_on_disk)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    skipped: list[str] = field(default_factory=list)
    not_regular: list[str] = field(default_factory=list)
    files_key: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def __post_init__(self) -> None:
        for split in ("x_train", "x_test"):
            x = getattr(self, split)
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise TypeError(f"{self.name}.{split} must be uint8 NCHW, got {x.dtype} {tuple(x.shape)}")
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError(f"{self.name}: images and labels differ in length")


def resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 NCHW images to size×size (bilinear, antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    out = []
    for chunk in x.split(4096):  # bounded memory for large sets
        f = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(f.round().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def stratified_subset(y: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor:
    """Indices of a class-stratified random subset of size `limit` (all indices if None)."""
    n = len(y)
    if limit is None or limit >= n:
        return torch.arange(n)
    if limit <= 0:
        raise ValueError(f"a dataset limit must be positive, got {limit}")
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(
        torch.arange(n).numpy(), train_size=int(limit), stratify=y.numpy(), random_state=seed
    )
    return torch.as_tensor(sorted(keep))
