"""Helpers shared by the dataset sources: the data root, IDX files, image decoding, clear errors.

No source is registered here; the sources import what they need.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import os
import stat
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bdexp.errors import DatasetUnavailable

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)

# The `root` of every dataset (base.DataOptions) when BDEXP_DATA is unset (conf/dataset/*.yaml).
DEFAULT_ROOT = "~/.cache/bdexp/data"


def data_root(opts: Any) -> str:
    """`opts.root` (a dataset's parsed options) as an absolute path with `~` expanded."""
    return os.path.abspath(os.path.expanduser(opts.root))


def cache_on_disk(fn: F | None = None, *, files: Callable[[Any], Sequence[str]] | None = None,
                  fingerprint: Callable[[Any, "DigestIndex | None"], str] | None = None):
    """Mark a source as slow to decode: `load_dataset` then keeps its sized tensors in cache_dir,
    keyed by the contents of what the source reads, so edited data is decoded again even when an
    edit keeps the files' sizes and mtimes (`cp -p`, `rsync -a`, `tar`). Either `files(opts)` names
    the directories (or files) the source reads, and every entry under them enters the key
    (`files_fingerprint`), or a source that lists its own inputs gives `fingerprint(opts, index)`,
    the same fingerprint it sets as `ImageDataset.files_key` from the bytes it decodes.
    Use as `@cache_on_disk`, `@cache_on_disk(files=...)` or `@cache_on_disk(fingerprint=...)`."""

    def of_files(opts: Any, index: DigestIndex | None) -> str:
        return files_fingerprint(files(opts), index)  # type: ignore[misc]

    def mark(f: F) -> F:
        f.cache_on_disk = True  # type: ignore[attr-defined]
        f.cache_fingerprint = fingerprint or (of_files if files is not None else None)  # type: ignore[attr-defined]
        return f

    return mark(fn) if fn is not None else mark


# A file hashed while its mtime or ctime is younger than this is hashed again next time rather than
# trusted from the DigestIndex: a write in the same clock tick as the hashing could leave its size
# and times unchanged (Git's "racy clean" entries, Documentation/technical/racy-git.txt).
SETTLED_NS = 2_000_000_000


def open_regular(path: str, follow_links: bool = True) -> BinaryIO:
    """`path` opened for reading, or an OSError unless it is a regular file: a FIFO is never waited
    on (O_NONBLOCK) and, with follow_links=False, a symbolic link is refused (O_NOFOLLOW)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_digest(path: str) -> str:
    """sha256 of the bytes of the regular file `path` (hex)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unreadable_token(err: OSError) -> str:
    """A file that cannot be read, in a cache key: by its error, so a fixed file changes the key."""
    return f"unreadable: {errno.errorcode.get(err.errno or 0, err.errno)}"


def content_token(path: str, index: "DigestIndex | None" = None) -> str:
    """The digest of the file `path` (through `index` when given), or `unreadable_token`."""
    try:
        return index.digest(path) if index is not None else file_digest(path)
    except OSError as err:
        return unreadable_token(err)


class DigestIndex:
    """File digests remembered by (device, inode, size, mtime_ns, ctime_ns) in a JSON file, so a
    key over an unchanged tree reads no file. An edit that keeps size and mtime (`cp -p`, `touch -r`,
    `rsync -a`) still moves the ctime, which no user can set, and a replaced file has another inode;
    files changed within SETTLED_NS of their hashing are not remembered. `path=None`: nothing is
    remembered. The file is a cache too: unreadable, it is ignored; lost entries are hashed again."""

    def __init__(self, path: str | None):
        self.path, self.used = path, {}
        self.known = self._load() if path else {}

    def _load(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:  # type: ignore[arg-type]
                known = json.load(f)["files"]
            return known if isinstance(known, dict) else {}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def digest(self, path: str) -> str:
        started = time.time_ns()
        st = os.stat(path)
        sig = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        entry = self.known.get(path)
        if isinstance(entry, list) and entry[:5] == sig and len(entry) == 6:
            self.used[path] = entry
            return str(entry[5])
        digest = file_digest(path)
        if max(st.st_mtime_ns, st.st_ctime_ns) < started - SETTLED_NS:
            self.used[path] = [*sig, digest]
        return digest

    def save(self) -> None:
        """Keep the entries used since loading (those of files gone are dropped); best effort."""
        if not self.path or self.used == self.known:
            return
        from bdexp.atomic import atomic_write_text

        try:
            atomic_write_text(self.path, json.dumps({"files": self.used}))
        except OSError as err:  # a read-only cache still serves its datasets
            log.debug("digest index %s not written (%s)", self.path, err)


def pairs_fingerprint(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 over (path, token) pairs, in order."""
    h = hashlib.sha256()
    for path, token in pairs:
        h.update(f"{path}\0{token}\0".encode())
    return h.hexdigest()


def entry_kind(mode: int) -> str:
    """What an `os.stat` st_mode is, in words."""
    for test, kind in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"),
                       (stat.S_ISBLK, "device")):
        if test(mode):
            return kind
    return "special file"


def entry_token(path: str, index: DigestIndex | None = None) -> str:
    """What `path` holds, for a cache key: the digest of a regular file (through a symbolic link),
    else what it is ("directory", "FIFO", "absent", ...); nothing but a regular file is opened."""
    try:
        link = "link to " if os.path.islink(path) else ""
        st = os.stat(path)
    except OSError as err:
        return "dangling link" if os.path.islink(path) else f"absent ({errno.errorcode.get(err.errno or 0)})"
    kind = entry_kind(st.st_mode)
    return link + (content_token(path, index) if kind == "file" else kind)


@dataclass(frozen=True)
class Directory:
    """One directory as listed without following links (`scan_directory`)."""

    files: list[str]  # names of the regular files
    subdirs: list[str]  # paths of the real (not linked) sub-directories


def scan_directory(path: str, not_regular: list[str]) -> Directory:
    """The regular files and sub-directories of `path`; everything else is added to `not_regular`."""
    files, subdirs = [], []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                files.append(entry.name)
            else:  # a symbolic link (to anything), a FIFO, a socket, a device
                not_regular.append(entry.path)
    return Directory(sorted(files), sorted(subdirs))


def walk_without_links(top: str, not_regular: list[str]) -> Iterator[tuple[str, list[str]]]:
    """(directory, its regular files) for `top` and every real directory under it, as os.walk
    without following links (real directories cannot form a loop)."""
    here = scan_directory(top, not_regular)
    yield top, here.files
    for sub in here.subdirs:
        yield from walk_without_links(sub, not_regular)


def _entries_under(top: str) -> Iterator[str]:
    """Every entry under the directory `top` (its real sub-directories, their regular files, and
    what is neither: links, FIFOs, ...), without entering linked directories; an unreadable
    directory ends the listing (its top-level token says so)."""
    not_regular: list[str] = []
    try:
        for here, names in walk_without_links(top, not_regular):
            if here != top:
                yield here
            yield from (os.path.join(here, name) for name in names)
    except OSError:
        return
    yield from not_regular


def files_fingerprint(paths: Sequence[str], index: DigestIndex | None = None) -> str:
    """sha256 over each of `paths` and, for a directory, every entry under it (sorted; linked
    directories below it are not entered), each with its `entry_token`: the sha256 of a file's
    bytes. A path that does not exist counts as such."""

    def pairs() -> Iterator[tuple[str, str]]:
        for top in paths:
            top = os.path.abspath(os.path.expanduser(str(top)))
            yield top, entry_token(top, index)
            if os.path.isdir(top):
                yield from ((path, entry_token(path, index)) for path in _entries_under(top))

    return pairs_fingerprint(pairs())


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


def convert_8bit(img: Image.Image, mode: str) -> Image.Image:
    """`img` (any mode PIL opens, first frame) as 8-bit `mode`, "L" or "RGB" (docs/datasets_models.md,
    "Image folders"). PIL's own `convert` clips 16-bit and float images to 0..255 (every 16-bit
    value above 255 becomes white), so those are scaled here: 16-bit (I;16*, and I, which PIL
    gives 16-bit PGMs) keeps its top 8 bits, float (F) is read as [0, 1]; other values stop with
    a ValueError. Alpha is dropped, as torchvision's ImageFolder loader does (`convert("RGB")`);
    colour modes (P, CMYK, YCbCr, LAB, ...) become RGB by PIL's conversions before "L"."""
    if img.mode.startswith("I") or img.mode == "F":
        img = Image.fromarray(_grey_8bit(np.asarray(img), img.mode))
    elif img.mode not in ("1", "L", "LA", "RGB"):
        # RGBA first where PIL keeps a palette's transparency that way (then dropped, no warning)
        img = img.convert("RGBA" if img.mode == "P" and "transparency" in img.info else "RGB")
    return img.convert(mode)


def _grey_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """16-bit samples -> their top 8 bits, as PIL decodes 16-bit colour PNG and TIFF and as
    torchvision's `to_dtype(uint8, scale=True)` does; float in [0, 1] -> round(255 v)."""
    if mode == "F":
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise ValueError(f"a float (mode F) image with values outside [0, 1] (min {a.min():g}, max "
                             f"{a.max():g}); bdexp reads float images as [0, 1]: rescale it or save it as 8 or 16 bit")
        return np.round(a.astype(np.float64) * 255).astype(np.uint8)
    if a.min() < 0 or a.max() > 65535:
        raise ValueError(f"a mode {mode} image with values outside 0..65535 (min {a.min()}, max {a.max()}); "
                         "bdexp reads integer images as 16 bit: save it as 8 or 16 bit")
    return (a.astype(np.uint32) >> 8).astype(np.uint8)


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
        img = convert_8bit(img, self.mode)
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
