"""Helpers shared by the dataset sources: the data root, IDX files, image decoding, clear errors.

No source is registered here; the sources import what they need.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bdexp.errors import DatasetUnavailable

F = TypeVar("F", bound=Callable[..., Any])

# The `root` of every dataset (base.DataOptions) when BDEXP_DATA is unset (conf/dataset/*.yaml).
DEFAULT_ROOT = "~/.cache/bdexp/data"


def data_root(opts: Any) -> str:
    """`opts.root` (a dataset's parsed options) as an absolute path with `~` expanded."""
    return os.path.abspath(os.path.expanduser(opts.root))


def cache_on_disk(fn: F | None = None, *, files: Callable[[Any], Sequence[str]] | None = None):
    """Mark a source as slow to decode: `load_dataset` then keeps its sized tensors in cache_dir.
    `files(opts)` names the directories the source reads; the listing of the files under them
    (relative path, size, mtime) enters the cache key (`files_fingerprint`), so editing the data
    (a class folder added, an image replaced) decodes it again instead of reading stale tensors.
    Use as `@cache_on_disk` or `@cache_on_disk(files=...)`."""

    def mark(f: F) -> F:
        f.cache_on_disk = True  # type: ignore[attr-defined]
        f.cache_files = files  # type: ignore[attr-defined]
        return f

    return mark(fn) if fn is not None else mark


def files_fingerprint(dirs: Sequence[str]) -> str:
    """sha256 over every file and directory under `dirs` (sorted): relative path, size and
    modification time in ns. A directory that does not exist counts as such."""
    h = hashlib.sha256()
    for top in dirs:
        top = os.path.abspath(os.path.expanduser(str(top)))
        h.update(f"{top}\0".encode())
        if not os.path.isdir(top):
            h.update(b"absent\0")
            continue
        for here, subdirs, names in os.walk(top, followlinks=True):
            subdirs.sort()
            rel = os.path.relpath(here, top)
            h.update(f"d {rel}\0".encode())
            for name in sorted(names):
                try:
                    st = os.stat(os.path.join(here, name))
                except OSError:  # a dangling link: listed, without size
                    h.update(f"f {rel}/{name} ?\0".encode())
                    continue
                h.update(f"f {rel}/{name} {st.st_size} {st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format, optionally gzipped) into a uint8 array.

    Format (yann.lecun.com/exdb/mnist): two zero bytes, a type byte (0x08 = unsigned byte), the
    number of dimensions, one big-endian uint32 per dimension, then the data in C order.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DatasetUnavailable(f"{path} is not an unsigned-byte IDX file (corrupted download?)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DatasetUnavailable(f"{path} is truncated: header says {dims}, file has {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def find_idx(dirs: Sequence[str]) -> str | None:
    """The first of `dirs` holding all four MNIST-format files, `{train,t10k}-{images-idx3,
    labels-idx1}-ubyte`, gzipped or not (None if none does)."""
    for d in dirs:
        if all(idx_path(d, split, kind) for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")):
            return d
    return None


def idx_path(directory: str, split: str, kind: str) -> str | None:
    """Path of e.g. `train-images-idx3-ubyte.gz` (or the uncompressed file) in `directory`."""
    for suffix in (".gz", ""):
        path = os.path.join(directory, f"{split}-{kind}-ubyte{suffix}")
        if os.path.isfile(path):
            return path
    return None


class FitSquare:
    """PIL image -> uint8 array (H, W) or (H, W, 3) of size×size, done while decoding so that
    sets of mixed-size images (GTSRB, image folders) never exist in memory at full size.

    fit="stretch" squashes the whole image (as WaNet's loaders do for GTSRB and CelebA:
    `transforms.Resize((h, w))`); fit="center_crop" keeps the aspect ratio and crops the
    central square first (the usual ImageNet-style evaluation crop).
    """

    def __init__(self, size: int, channels: int, fit: str):  # dataset.channels / dataset.fit (base.DataOptions)
        self.size, self.mode, self.fit = int(size), ("L" if channels == 1 else "RGB"), fit

    def __call__(self, img: Image.Image) -> np.ndarray:
        img = img.convert(self.mode)
        if self.fit == "center_crop":
            w, h = img.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            img = img.crop((left, top, left + s, top + s))
        if img.size != (self.size, self.size):
            # PIL's bilinear filter widens its support when shrinking, i.e. it is antialiased.
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


# What PIL (and the files it reads) raise for a file that is not a decodable image: not an
# image at all, truncated, a broken chunk, a "decompression bomb".
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error,
              Image.DecompressionBombError)
SKIP_HINT = "set dataset.skip_bad_files=true to leave unreadable images out (they are counted in the log and results.json)"


def decode_all(
    n: int, get: Callable[[int], tuple[np.ndarray, int]], desc: str,
    name_of: Callable[[int], str] | None = None, skipped: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode samples 0..n-1 (`get(i) -> (HW or HWC uint8 array, label)`) into uint8 NCHW + int64.

    A sample that cannot be decoded stops with a DatasetUnavailable naming its file
    (`name_of(i)`), unless `skipped` is a list: then its name is appended there and the sample
    left out. A thread pool is enough: PIL releases the GIL while decoding and resizing. Output
    is preallocated from the first readable sample, so peak memory is one copy of the result.
    """
    if n == 0:
        raise DatasetUnavailable(f"{desc}: no images found")
    name = name_of or (lambda i: f"image {i}")

    def bad(i: int, err: BaseException) -> None:
        if skipped is None:
            hint = f"; fix or remove it, or {SKIP_HINT}" if name_of is not None else ""
            raise DatasetUnavailable(
                f"{desc}: cannot decode {name(i)} ({_why(err)}){hint}") from None
        skipped.append(name(i))

    def safe_get(i: int):
        try:
            return get(i)
        except UNREADABLE as err:
            return err

    start = 0
    while True:  # the first readable sample fixes the shape
        got = safe_get(start)
        if not isinstance(got, BaseException):
            break
        bad(start, got)
        start += 1
        if start == n:
            raise DatasetUnavailable(f"{desc}: none of the {n} images could be decoded (first: {skipped[0]})")
    first, y0 = got
    x = np.empty((n, *first.shape), dtype=np.uint8)
    y = np.empty(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    x[start], y[start], ok[start] = first, y0, True

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=n < 2000) as progress, ThreadPoolExecutor(
        max_workers=min(16, os.cpu_count() or 1)
    ) as pool:
        task = progress.add_task(desc, total=n, completed=start + 1)
        for lo in range(start + 1, n, 1024):
            idx = range(lo, min(n, lo + 1024))
            for i, got in zip(idx, pool.map(safe_get, idx)):
                if isinstance(got, BaseException):
                    bad(i, got)
                    continue
                img, label = got
                if img.shape != first.shape:
                    raise DatasetUnavailable(f"{desc}: {name(i)} decoded to {img.shape}, expected {first.shape}")
                x[i], y[i], ok[i] = img, label, True
            progress.advance(task, len(idx))
    if not ok.all():
        x, y = x[ok], y[ok]
    xt = torch.from_numpy(x)
    xt = xt.unsqueeze(1) if xt.dim() == 3 else xt.permute(0, 3, 1, 2).contiguous()
    return xt, torch.from_numpy(y)


def _why(err: BaseException) -> str:
    if isinstance(err, UnidentifiedImageError):  # PIL's message repeats the path
        return "not an image file PIL can identify"
    return f"{type(err).__name__}: {_one_line(err)}"


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no message"


def open_or_unavailable(
    make: Callable[[], Any], dataset: str, looked_in: Sequence[str], download: bool, how: str
) -> Any:
    """Call a torchvision constructor; turn *any* failure to find or fetch the files
    (URLError, RuntimeError "Dataset not found", OSError, bad checksum, ...) into one
    DatasetUnavailable that says what was looked for, where, and how to get it."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - torchvision raises many types here; all mean "not available"
        reason = f"download failed ({type(e).__name__}: {e})" if download else (
            f"dataset.download=false (torchvision: {e})"
        )
        where = ", ".join(looked_in)
        raise DatasetUnavailable(f"dataset {dataset!r} is not available: looked in {where}; {reason}. {how}") from None
