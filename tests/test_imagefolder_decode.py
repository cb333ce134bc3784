"""`dataset=imagefolder`: every image mode PIL opens decodes to the right 8-bit values, the listing
never follows a symbolic link or opens a FIFO, odd entries stop with one line (or are skipped and
counted), and the decoded-dataset cache is keyed by the files' contents (docs/datasets_models.md,
"Image folders").

Trees are tiny (8x8 images, two classes) and built under tmp_path; expected values come from the
formulas the docs name (16-bit: the top 8 bits; float: [0, 1] x 255; CMYK, YCbCr, CIELAB -> sRGB)."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from bdexp.data import cache_path, common, load_dataset
from bdexp.errors import DatasetUnavailable
from tests.test_datasets import conf

SIZE = 8  # dataset.image_size's minimum: images of this size are decoded without resizing
RNG = np.random.default_rng(0)


def _tree(root: Path, write, classes=("a", "b"), n_train=1, n_test=1, name="0.{ext}", ext="png") -> None:
    """root/{train,test}/<class>/<name>, each written by `write(path, class_index, i)`."""
    for split, n in (("train", n_train), ("test", n_test)):
        for k, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write(root / split / cls / name.format(i=i, ext=ext), k, i)


def _gray_png(path: Path, k: int, i: int) -> None:
    Image.fromarray(np.full((SIZE, SIZE), 20 + 100 * k + i, np.uint8)).save(path)


def _load(root: Path, channels=3, cache=None, **keys):
    return load_dataset(conf("imagefolder", root=str(root), image_size=SIZE, channels=channels, **keys),
                        seed=0, cache_dir=None if cache is None else str(cache))


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


# --- every mode PIL writes to PNG or TIFF -----------------------------------------------------------

def _u8(*shape):
    return RNG.integers(0, 256, (SIZE, SIZE, *shape), dtype=np.uint8)


def _gray(v):
    return np.repeat(np.asarray(v)[..., None], 3, axis=2)


def _frombytes(mode: str, arr: np.ndarray) -> Image.Image:
    return Image.frombytes(mode, (SIZE, SIZE), np.ascontiguousarray(arr).tobytes())


def _mode_1():
    bits = RNG.integers(0, 2, (SIZE, SIZE)).astype(bool)
    return Image.fromarray(bits), _gray(np.where(bits, 255, 0))


def _mode_l():
    v = _u8()
    return Image.fromarray(v), _gray(v)


def _mode_la():
    v = _u8()
    return Image.fromarray(np.dstack([v, _u8()])), _gray(v)  # alpha dropped


def _palette(mode: str, transparency: bool = False):
    colours, idx = RNG.integers(0, 256, (256, 3), dtype=np.uint8), _u8()
    img = _frombytes(mode, idx if mode == "P" else np.dstack([idx, _u8()]))
    img.putpalette(colours.reshape(-1).tolist())
    if transparency:
        img.info["transparency"] = int(idx[0, 0])
    return img, colours[idx]  # the palette's colours, alpha dropped


def _mode_rgb(mode: str):
    rgb = _u8(3)
    channels = {"RGB": [rgb], "RGBA": [rgb, _u8()], "RGBX": [rgb, _u8()]}[mode]
    return _frombytes(mode, np.dstack(channels)), rgb  # alpha (padding) dropped


def _mode_cmyk():
    cmyk = _u8(4)
    c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
    return _frombytes("CMYK", cmyk), (255 - c) * (255 - k) / 255


def _mode_ycbcr():
    y, cb, cr = (RNG.integers(40, 216, (SIZE, SIZE)).astype(float) for _ in range(3))
    rgb = np.dstack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                     y + 1.772 * (cb - 128)])  # JFIF (ITU-T T.871) full-range BT.601
    return _frombytes("YCbCr", np.dstack([y, cb, cr]).astype(np.uint8)), np.clip(rgb, 0, 255)


def _mode_lab():
    """Neutral CIELAB greys (a* = b* = 0, stored as signed bytes): sRGB from L* through CIE Y
    (CIE 15:2004, eq. 8.1) and the sRGB transfer curve (IEC 61966-2-1)."""
    stored = RNG.integers(0, 256, (SIZE, SIZE)).astype(np.uint8)
    lightness = stored.astype(float) * 100 / 255
    y = np.where(lightness > 8, ((lightness + 16) / 116) ** 3, lightness / 903.3)
    srgb = np.where(y > 0.0031308, 1.055 * y ** (1 / 2.4) - 0.055, 12.92 * y) * 255
    zero = np.zeros_like(stored)
    return _frombytes("LAB", np.dstack([stored, zero, zero])), _gray(srgb)


def _mode_16(mode: str):
    v = RNG.integers(0, 65536, (SIZE, SIZE)).astype(np.uint16)
    v[0, :2] = 0, 65535
    order = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2"}[mode]
    return _frombytes(mode, v.astype(order)), _gray(v >> 8)


def _mode_i():
    v = RNG.integers(0, 65536, (SIZE, SIZE)).astype(np.int32)
    return Image.fromarray(v), _gray(v >> 8)


def _mode_f():
    v = RNG.uniform(0, 1, (SIZE, SIZE)).astype(np.float32)
    v[0, :2] = 0.0, 1.0
    return Image.fromarray(v), _gray(v.astype(np.float64) * 255)


MODES = {  # (format, mode) -> (image, expected RGB, tolerance)
    "1": (_mode_1, 0), "L": (_mode_l, 0), "LA": (_mode_la, 0), "P": (lambda: _palette("P"), 0),
    "P+transparency": (lambda: _palette("P", True), 0), "PA": (lambda: _palette("PA"), 0),
    "RGB": (lambda: _mode_rgb("RGB"), 0), "RGBA": (lambda: _mode_rgb("RGBA"), 0),
    "RGBX": (lambda: _mode_rgb("RGBX"), 0), "CMYK": (_mode_cmyk, 1), "YCbCr": (_mode_ycbcr, 1),
    "LAB": (_mode_lab, 2), "I;16": (lambda: _mode_16("I;16"), 0), "I;16B": (lambda: _mode_16("I;16B"), 0),
    "I;16L": (lambda: _mode_16("I;16L"), 0), "I": (_mode_i, 0), "F": (_mode_f, 0),
}
PNG_MODES = ["1", "L", "LA", "P", "P+transparency", "RGB", "RGBA", "I;16", "I;16B"]
CASES = [("png", m) for m in PNG_MODES] + [("tiff", m) for m in MODES if m != "P+transparency"]


def test_the_cases_cover_every_mode_pil_writes_to_png_and_tiff(tmp_path):
    """The table below is complete: every mode PIL knows that it can write as PNG or TIFF is a case
    (P+transparency is P with a tRNS chunk; the rest cannot be written to either format)."""
    writable = set()
    for mode in ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB",
                 "HSV", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        for ext in ("png", "tiff"):
            try:
                Image.new(mode, (2, 2)).save(tmp_path / f"x.{ext}")
            except (OSError, ValueError, KeyError):
                continue
            writable.add((ext, mode))
    assert writable <= set(CASES)


@pytest.mark.parametrize("ext, mode", CASES, ids=[f"{e}-{m}" for e, m in CASES])
def test_every_mode_decodes_to_its_8bit_values(tmp_path, ext, mode):
    make, tol = MODES[mode]
    img, expected = make()
    _tree(tmp_path, lambda path, k, i: img.save(path), ext=ext)
    ds = _load(tmp_path)
    got, want = _hwc(ds.x_train[0]).astype(int), np.round(expected).astype(int)
    assert np.abs(got - want).max() <= tol, f"{mode}: got {got[0, :4].tolist()}, want {want[0, :4].tolist()}"
    if expected.shape[-1] == 3 and np.array_equal(expected[..., 0], expected[..., 2]):  # grey: the same in 1 channel
        one = _load(tmp_path, channels=1)
        assert np.abs(one.x_train[0, 0].numpy().astype(int) - np.round(expected[..., 0])).max() <= tol


def _png16(path: Path, samples: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (PNG spec, section 11.2.2: IHDR; colour type 0 grey, 2 RGB),
    since PIL writes 16-bit only for grey."""
    h, w = samples.shape[:2]
    raw = b"".join(b"\0" + samples[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_sixteen_bit_grey_and_colour_agree_and_sixty_images_stay_sixty(tmp_path):
    """60 distinct 16-bit grey PNGs decode to 60 distinct images (not 60 white ones), each the top 8
    bits of its samples, as PIL decodes 16-bit colour PNGs and 16-bit PGMs read as mode I."""
    levels = {}

    def write(path, k, i):
        v = np.full((SIZE, SIZE), (k * 30 + i) * 1000 + 0x80, np.uint16)
        levels[str(path)] = int(v[0, 0]) >> 8
        _png16(path, v, 0)

    _tree(tmp_path / "grey", write, n_train=30, n_test=2, name="{i:02d}.png")
    ds = _load(tmp_path / "grey")
    assert len(torch.unique(ds.x_train.flatten(1), dim=0)) == 60
    train = sorted(p for p in levels if "/train/" in p)
    assert ds.x_train[:, 0, 0, 0].tolist() == [levels[p] for p in train]

    v = RNG.integers(0, 65536, (SIZE, SIZE, 3)).astype(np.uint16)
    _tree(tmp_path / "rgb", lambda path, k, i: _png16(path, v, 2))
    _tree(tmp_path / "pgm", lambda path, k, i: path.write_bytes(
        b"P5 8 8 65535\n" + v[..., 0].astype(">u2").tobytes()), ext="pgm")
    assert np.array_equal(_hwc(_load(tmp_path / "rgb").x_train[0]), v >> 8)
    assert np.array_equal(_load(tmp_path / "pgm").x_train[0, 0].numpy(), v[..., 0] >> 8)


@pytest.mark.parametrize("mode, values, needle", [
    ("F", [0.0, 255.0], "outside [0, 1]"),
    ("F", [0.0, float("nan")], "outside [0, 1]"),
    ("I", [-1, 100], "outside 0..65535"),
    ("I", [0, 70000], "outside 0..65535"),
])
def test_out_of_range_float_and_32bit_images_stop_with_one_line(tmp_path, mode, values, needle):
    arr = np.resize(np.array(values, np.float32 if mode == "F" else np.int32), (SIZE, SIZE))
    _tree(tmp_path, lambda path, k, i: Image.fromarray(arr, mode).save(path), ext="tiff")
    with pytest.raises(DatasetUnavailable) as err:
        _load(tmp_path)
    msg = str(err.value)
    assert needle in msg and str(tmp_path / "train" / "a" / "0.tiff") in msg and "\n" not in msg


def test_first_frame_no_exif_rotation_no_colour_management(tmp_path):
    """Multi-frame TIFF and APNG: the first frame. EXIF orientation and ICC profiles: the stored
    pixels, as torchvision's ImageFolder loader reads them."""
    first, second = _u8(3), _u8(3)
    frames = [Image.fromarray(first), Image.fromarray(second)]
    _tree(tmp_path / "tiff", lambda p, k, i: frames[0].save(p, save_all=True, append_images=frames[1:]), ext="tiff")
    _tree(tmp_path / "apng", lambda p, k, i: frames[0].save(p, save_all=True, append_images=frames[1:]))
    for kind in ("tiff", "apng"):
        assert np.array_equal(_hwc(_load(tmp_path / kind).x_train[0]), first), kind

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("XYZ")).tobytes()
    _tree(tmp_path / "tagged", lambda p, k, i: frames[0].save(p, exif=exif, icc_profile=icc))
    with Image.open(tmp_path / "tagged" / "train" / "a" / "0.png") as img:
        assert img.getexif()[0x0112] == 6 and img.info["icc_profile"] == icc
    assert np.array_equal(_hwc(_load(tmp_path / "tagged").x_train[0]), first)


# --- the listing ------------------------------------------------------------------------------------

def test_listing_keeps_torchvisions_classes_extensions_and_order(tmp_path):
    from torchvision.datasets import ImageFolder

    from bdexp.data.imagefolder import list_split

    _tree(tmp_path, _gray_png, classes=("b", "a", "a-x"), n_train=2, name="{i}.PNG")
    for sub in ("a/x", "a/x/y", "a/x-z", "a/x.png"):  # nested folders, one named like an image
        (tmp_path / "train" / sub).mkdir(parents=True)
        _gray_png(tmp_path / "train" / sub / "n.jpeg", 0, 0)
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    listing = list_split(str(tmp_path / "train"))
    ours = [(os.path.relpath(p, tmp_path), k) for p, k in listing.samples]
    theirs = ImageFolder(str(tmp_path / "train"))
    assert listing.classes == theirs.classes == ["a", "a-x", "b"]
    assert ours == [(os.path.relpath(p, tmp_path), k) for p, k in theirs.samples]
    assert listing.not_regular == []


def test_links_are_never_followed(tmp_path, caplog):
    """A loop (c0/up -> ..), a link to another class's image, a dangling link and a linked class
    folder: none is followed, so every image keeps its own class and appears once."""
    _tree(tmp_path, _gray_png, classes=("c0", "c1"), n_train=3, n_test=1, name="{i}.png")
    train = tmp_path / "train"
    (train / "c0" / "up").symlink_to("..")
    (train / "c0" / "other.png").symlink_to(train / "c1" / "0.png")
    (train / "c0" / "dead.png").symlink_to(tmp_path / "nowhere.png")
    (train / "c2").symlink_to(train / "c1")
    caplog.set_level(logging.WARNING)
    ds = _load(tmp_path, cache=tmp_path / "cache")
    assert ds.classes == ["c0", "c1"] and ds.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.x_train[:, 0, 0, 0].tolist() == [20, 21, 22, 120, 121, 122]
    links = sorted(os.path.join("train", *p) for p in (("c0", "dead.png"), ("c0", "other.png"), ("c0", "up"), ("c2",)))
    assert sorted(ds.not_regular) == sorted(ds.skipped) == links
    warned = [r.getMessage() for r in caplog.records if "not regular files" in r.getMessage()]
    assert len(warned) == 1 and "skipped 4 entries" in warned[0]


def test_fifos_and_sockets_are_skipped_without_being_opened(tmp_path, monkeypatch, caplog):
    """A FIFO named *.png would block the reader forever: it is listed as not regular, counted,
    and never opened. A watcher thread opens the FIFO's write end if a reader ever waits on it (so
    this test fails instead of hanging)."""
    _tree(tmp_path, _gray_png, classes=("c0", "c1"), n_train=2, n_test=1, name="{i}.png")
    fifo = tmp_path / "train" / "c0" / "pipe.png"
    os.mkfifo(fifo)
    monkeypatch.chdir(tmp_path)  # a socket path must be short: bind a relative one
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.path.join("test", "c1", "sock.jpg"))
    opened, done = [], threading.Event()

    def watch():
        while not done.wait(0.05):
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader waits
            except OSError:
                continue
            opened.append(True)
            os.close(fd)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # decoded, decoded and cached, read back
            caplog.clear()
            ds = _load(tmp_path, cache=cache)
            assert ds.y_train.tolist() == [0, 0, 1, 1] and len(ds.y_test) == 2
            assert ds.not_regular == [os.path.join("train", "c0", "pipe.png"), os.path.join("test", "c1", "sock.jpg")]
            assert [r.getMessage() for r in caplog.records if "not regular" in r.getMessage()] == [
                "dataset imagefolder: skipped 2 entries that are not regular files (symbolic links are not "
                "followed; FIFOs, sockets and devices are not read): train/c0/pipe.png, test/c1/sock.jpg"]
    finally:
        done.set()
        watcher.join()
        sock.close()
    assert not opened


def _unreadable(path: Path, monkeypatch) -> None:
    """chmod 000; as root (who reads it anyway) the open is refused the same way, by patching."""
    path.chmod(0)
    if os.geteuid() != 0:
        return
    real_open = os.open

    def refuse(p, *args, **kwargs):
        if os.fspath(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)


def _bomb(path: Path) -> None:
    """A PNG whose header claims 40 000 x 40 000 pixels: over PIL's decompression-bomb limit."""
    _png16(path, np.zeros((1, 1), np.uint16), 0)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 40000, 40000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind, needle", [
    ("empty", "not an image file PIL can identify"),
    ("unreadable", "Permission denied"),
    ("bomb", "DecompressionBombError"),
])
def test_bad_files_stop_with_one_line_or_are_skipped(tmp_path, monkeypatch, kind, needle):
    _tree(tmp_path, _gray_png, classes=("c0", "c1"), n_train=2, n_test=1, name="{i}.png")
    bad = tmp_path / "train" / "c1" / "bad.png"
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "bomb":
        _bomb(bad)
    else:
        _gray_png(bad, 1, 0)
        _unreadable(bad, monkeypatch)
    with pytest.raises(DatasetUnavailable) as err:
        _load(tmp_path, cache=tmp_path / "cache")
    msg = str(err.value)
    assert str(bad) in msg and needle in msg and "dataset.skip_bad_files=true" in msg and "\n" not in msg
    ds = _load(tmp_path, cache=tmp_path / "cache", skip_bad_files=True)
    assert ds.skipped == [os.path.join("train", "c1", "bad.png")] and ds.not_regular == []
    assert ds.y_train.tolist() == [0, 0, 1, 1]


# --- the cache: keyed by content, verified on load ---------------------------------------------------

def _bmp_tree(root: Path) -> None:
    """BMP files: their size depends only on the dimensions, so an edit keeps it."""
    _tree(root, lambda p, k, i: Image.fromarray(np.full((SIZE, SIZE, 3), 30 + 40 * k + i, np.uint8)).save(p),
          n_train=2, n_test=1, name="{i}.bmp")


def _rewrite_keeping_size_and_times(path: Path) -> None:
    """What `cp -p`, `rsync -a` or `tar x` of an edited file leave: other bytes, the same size and
    mtime (the ctime moves: no user can set it)."""
    st = path.stat()
    with Image.open(path) as img:
        inverted = 255 - np.asarray(img)
    Image.fromarray(inverted).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _no_decoding(monkeypatch):
    import bdexp.data.imagefolder as imagefolder

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again although the cache holds these files")

    monkeypatch.setattr(imagefolder, "decode_all", refuse)


def test_an_edit_that_keeps_size_and_mtime_is_decoded_again(tmp_path):
    root, cache = tmp_path / "tree", tmp_path / "cache"
    _bmp_tree(root)
    first = _load(root, cache=cache)
    _rewrite_keeping_size_and_times(root / "train" / "a" / "0.bmp")
    second = _load(root, cache=cache)
    assert int(first.x_train[0, 0, 0, 0]) == 30 and int(second.x_train[0, 0, 0, 0]) == 255 - 30
    assert torch.equal(first.x_train[1:], second.x_train[1:])


def test_the_key_lists_what_the_decoder_reads(tmp_path, monkeypatch):
    """A file the decoder does not read (notes.txt, an unknown extension) leaves the key alone; the
    key written after decoding is the one the next run computes from the files."""
    root, cache = tmp_path / "tree", tmp_path / "cache"
    _bmp_tree(root)
    first = _load(root, cache=cache)
    cfg = conf("imagefolder", root=str(root), image_size=SIZE)
    assert Path(cache_path(cfg, str(cache))).is_file()
    (root / "train" / "a" / "notes.txt").write_text("how these images were made")
    (root / "train" / "b" / "raw.cr2").write_bytes(b"raw camera data")
    _no_decoding(monkeypatch)
    assert torch.equal(_load(root, cache=cache).x_train, first.x_train)


def test_a_cache_file_under_another_key_or_damaged_is_rebuilt_with_a_warning(tmp_path, caplog):
    cache = tmp_path / "cache"
    _bmp_tree(tmp_path / "a")
    _tree(tmp_path / "b", _gray_png, n_train=2, n_test=1, name="{i}.png")
    a = _load(tmp_path / "a", cache=cache)
    path_a = cache_path(conf("imagefolder", root=str(tmp_path / "a"), image_size=SIZE), str(cache))
    path_b = cache_path(conf("imagefolder", root=str(tmp_path / "b"), image_size=SIZE), str(cache))
    shutil.copy(path_a, path_b)  # a copied or renamed cache file: b's name, a's tensors
    b = _load(tmp_path / "b", cache=cache)
    assert "dataset cache" in caplog.text and "another key" in caplog.text
    assert b.x_train[:, 0, 0, 0].tolist() == [20, 21, 120, 121] and not torch.equal(a.x_train, b.x_train)
    caplog.clear()
    assert torch.equal(_load(tmp_path / "b", cache=cache).x_train, b.x_train) and not caplog.text  # rebuilt
    Path(path_b).write_bytes(b"torn")
    assert torch.equal(_load(tmp_path / "b", cache=cache).x_train, b.x_train)
    assert "ignoring unreadable dataset cache" in caplog.text


def test_a_cache_file_whose_tensors_changed_is_rebuilt(tmp_path, caplog):
    """The stored tensors must still match their digest: inverted images under the right key (the
    file edited after writing) are not served."""
    cache = tmp_path / "cache"
    _bmp_tree(tmp_path / "a")
    a = _load(tmp_path / "a", cache=cache)
    path = cache_path(conf("imagefolder", root=str(tmp_path / "a"), image_size=SIZE), str(cache))
    stored = torch.load(path, weights_only=True)
    stored["x_train"] = 255 - stored["x_train"]  # key and digest kept, images inverted
    torch.save(stored, path)
    again = _load(tmp_path / "a", cache=cache)
    assert "do not match the digest" in caplog.text and torch.equal(again.x_train, a.x_train)


def test_the_digest_index_skips_rehashing_only_settled_unchanged_files(tmp_path, monkeypatch):
    """(path, device, inode, size, mtime, ctime) -> digest. A file is trusted only when its times are
    SETTLED_NS older than the hashing; an edit that keeps size and mtime moves the ctime."""
    root, cache = tmp_path / "tree", tmp_path / "cache"
    _bmp_tree(root)
    cfg = conf("imagefolder", root=str(root), image_size=SIZE)
    hashed = []
    real = common.file_digest
    monkeypatch.setattr(common, "file_digest", lambda path: hashed.append(path) or real(path))
    monkeypatch.setattr(common, "SETTLED_NS", 10 ** 18)  # every file is "just written"
    first = cache_path(cfg, str(cache))
    assert len(hashed) == 6
    hashed.clear()
    assert cache_path(cfg, str(cache)) == first and len(hashed) == 6  # not trusted yet: hashed again
    monkeypatch.setattr(common, "SETTLED_NS", 0)
    cache_path(cfg, str(cache))
    hashed.clear()
    assert cache_path(cfg, str(cache)) == first and hashed == []  # settled and unchanged: from the index
    time.sleep(0.05)  # past the clock tick of the write, so the rewrite moves the ctime
    _rewrite_keeping_size_and_times(root / "test" / "b" / "0.bmp")
    assert cache_path(cfg, str(cache)) != first and hashed == [str(root / "test" / "b" / "0.bmp")]
