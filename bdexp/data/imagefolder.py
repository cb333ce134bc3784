"""`imagefolder`: any `root/train/<class>/*` + `root/test/<class>/*` tree of image files.

Listing (`list_split`) keeps torchvision's ImageFolder rules: classes are the sorted
sub-directory names of the split, images the files with torchvision's IMG_EXTENSIONS (jpg, jpeg,
png, ppm, bmp, pgm, tif, tiff, webp) anywhere under a class folder, in torchvision's order. Unlike
torchvision (`os.walk(followlinks=True)`, then `open`), it never follows a symbolic link (a loop
`c0/up -> ..` would list other classes' images as c0, again and again) and never opens anything
but a regular file (a FIFO named *.png would block forever): such entries are left out, named in
one warning line and in `skipped_files` of results.json (ImageDataset.not_regular).

Each file is read once: its bytes are hashed (the cache key, `files_key`, the same fingerprint
`_fingerprint` computes from the files through the digest index) and decoded from memory, every PIL
mode to the right 8-bit values (common.convert_8bit) and resized to `image_size`
(common.FitSquare), so the files may have any size and mode. docs/datasets_models.md, "Image
folders", says what each mode, alpha, EXIF orientation and ICC profiles become.

A file that is not a decodable image stops the run with its path, or, with
`dataset.skip_bad_files=true`, is left out and counted (ImageDataset.skipped, the log line of
`load_dataset` and `n_skipped_files` in results.json).
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from bdexp.data.base import DATASETS, DataOptions, Fit, ImageDataset
from bdexp.data.common import (DigestIndex, FitSquare, cache_on_disk, content_token, data_root, decode_all,
                               open_regular, pairs_fingerprint, scan_directory, unreadable_token,
                               walk_without_links)
from bdexp.errors import DatasetUnavailable


@dataclass(frozen=True)
class ImageFolderOptions(DataOptions):
    fit: Fit = "stretch"
    skip_bad_files: bool = False  # true: leave out files that are not decodable images (counted)


@dataclass(frozen=True)
class SplitListing:
    """One split of the tree: its classes, its images as (path, class index) in torchvision's
    order, and the entries under it that are not regular files or directories (never opened)."""

    classes: list[str]
    samples: list[tuple[str, int]]
    not_regular: list[str]


def list_split(split_dir: str) -> SplitListing:
    """The classes and images of `split_dir` by torchvision's ImageFolder rules (`find_classes`,
    `make_dataset`: sorted class folders, IMG_EXTENSIONS, `sorted(os.walk(class_dir))`), without
    following symbolic links; an OSError if a directory cannot be listed."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    not_regular: list[str] = []
    top = scan_directory(split_dir, not_regular)
    classes = sorted(os.path.basename(d) for d in top.subdirs)
    samples = []
    for k, cls in enumerate(classes):
        for here, names in sorted(walk_without_links(os.path.join(split_dir, cls), not_regular)):
            samples += [(os.path.join(here, n), k) for n in names if has_file_allowed_extension(n, IMG_EXTENSIONS)]
    return SplitListing(classes, samples, sorted(not_regular))


def list_folder(opts: ImageFolderOptions) -> dict[str, SplitListing]:
    """`list_split` of root/train and root/test, or a DatasetUnavailable naming what is missing:
    a split, a class folder's images, a class present in one split only."""
    root = data_root(opts)
    layout = (
        f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image>; "
        "set dataset.root to such a directory"
    )
    dirs = {split: os.path.join(root, split) for split in ("train", "test")}
    missing = [d for d in dirs.values() if not os.path.isdir(d)]
    if missing:
        raise DatasetUnavailable(f"dataset 'imagefolder': {' and '.join(missing)} not found; {layout}.")
    listings = {}
    for split, path in dirs.items():
        try:
            listings[split] = listing = list_split(path)
        except OSError as e:
            raise DatasetUnavailable(f"dataset 'imagefolder': cannot list {e.filename or path} "
                                     f"({type(e).__name__}: {e.strerror or e}).") from None
        if not listing.classes:
            raise DatasetUnavailable(f"dataset 'imagefolder': no class folder in {path} ({layout}).")
        _check_no_empty_class(listing, path, layout)

    train_classes, test_classes = listings["train"].classes, listings["test"].classes
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DatasetUnavailable(
            f"dataset 'imagefolder' at {root}: train/ and test/ must have the same class folders; "
            f"only in train: {only_train or '-'}, only in test: {only_test or '-'}."
        )
    return listings


def _check_no_empty_class(listing: SplitListing, path: str, layout: str) -> None:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    found = {k for _, k in listing.samples}
    empty = [c for k, c in enumerate(listing.classes) if k not in found]
    if empty:
        where = os.path.join(path, empty[0])
        links = sum(p.startswith(where + os.sep) for p in listing.not_regular)
        not_read = f"; {links} symbolic link(s) or special file(s) there are not read" if links else ""
        raise DatasetUnavailable(
            f"dataset 'imagefolder': no image file in {where}"
            f"{f' (and {len(empty) - 1} more class folders)' if len(empty) > 1 else ''} "
            f"(extensions {', '.join(IMG_EXTENSIONS)}{not_read}); {layout}.")


def _fingerprint(listings: dict[str, SplitListing], token_of: Callable[[str], str]) -> str:
    """The files' share of the cache key: each image with `token_of(path)` (the digest of its
    bytes), each entry that is not read by name, in listing order. The lookup and the decoder
    compute it over the same listing, so the key cannot disagree with the data."""
    return pairs_fingerprint(pair for listing in listings.values() for pair in (
        *((path, token_of(path)) for path, _ in listing.samples),
        *((path, "not read") for path in listing.not_regular)))


def _files_key(opts: ImageFolderOptions, index: DigestIndex | None) -> str:
    return _fingerprint(list_folder(opts), lambda path: content_token(path, index))


def read_image(path: str, fit: FitSquare, tokens: dict[str, str]) -> np.ndarray:
    """Decode the image file `path` with `fit`, reading it once: the digest of the bytes decoded
    (or `unreadable_token`) goes to `tokens[path]`."""
    try:
        with open_regular(path, follow_links=False) as f:
            data = f.read()
    except OSError as err:
        tokens[path] = unreadable_token(err)
        raise
    tokens[path] = hashlib.sha256(data).hexdigest()
    with Image.open(io.BytesIO(data)) as img:
        return fit(img)


@DATASETS.register("imagefolder", options=ImageFolderOptions)
@cache_on_disk(fingerprint=_files_key)
def imagefolder(opts: ImageFolderOptions) -> ImageDataset:
    root = data_root(opts)
    listings = list_folder(opts)
    classes = listings["train"].classes
    fit = FitSquare(opts.image_size, opts.channels, opts.fit)
    tokens: dict[str, str] = {}
    skipped: list[str] = []
    splits = []
    for split, listing in listings.items():
        samples = listing.samples

        def get(i: int, samples=samples) -> tuple[np.ndarray, int]:
            return read_image(samples[i][0], fit, tokens), samples[i][1]

        def name_of(i: int, samples=samples) -> str:
            return samples[i][0]

        x, y = decode_all(len(samples), get, f"dataset 'imagefolder' {split}", name_of=name_of,
                          skipped=skipped if opts.skip_bad_files else None)
        empty = [c for k, c in enumerate(classes) if not bool((y == k).any())]
        if empty:
            raise DatasetUnavailable(
                f"dataset 'imagefolder' at {root}: no readable image left in {split}/{empty[0]}"
                f"{f' (and {len(empty) - 1} more classes)' if len(empty) > 1 else ''} after skipping "
                f"{len(skipped)} unreadable file(s).")
        splits += [x, y]
    not_regular = [os.path.relpath(p, root) for listing in listings.values() for p in listing.not_regular]
    return ImageDataset("imagefolder", *splits, list(classes),
                        skipped=not_regular + [os.path.relpath(f, root) for f in skipped],
                        not_regular=not_regular, files_key=_fingerprint(listings, tokens.__getitem__))
