"""Dataset sources and load_dataset: shapes, splits, limits, caching and clear failures.

Configs are the real YAMLs from conf/dataset, loaded with OmegaConf and overridden.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from bdexp.data import DATASETS, cache_path, convert_channels, dataset_options, load_dataset
from bdexp.errors import ConfigError, DatasetUnavailable
from tests.conftest import CONF_DIR

CONF = CONF_DIR / "dataset"
YAMLS = sorted(p.stem for p in CONF.glob("[!_]*.yaml"))
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"


def conf(name: str, **overrides):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def class_counts(y: torch.Tensor, k: int) -> np.ndarray:
    return torch.bincount(y, minlength=k).numpy()


@pytest.mark.parametrize("name", YAMLS)
def test_every_yaml_has_the_common_keys(name):
    cfg = conf(name)
    assert cfg.name == name and name in DATASETS
    for key in ("root", "image_size", "channels", "train_limit", "test_limit"):
        assert key in cfg, f"{name}.yaml lacks {key}"
    assert cfg.train_limit is None and cfg.test_limit is None
    assert isinstance(cfg.augment.crop_padding, int) and isinstance(cfg.augment.flip, bool)
    assert isinstance(cfg.root, str) and cfg.root  # the oc.env default resolves
    assert {"digits": 1, "mnist": 1, "fashion_mnist": 1}.get(name, 3) == cfg.channels


@pytest.mark.parametrize("size", [16, 32])
def test_digits_shapes_dtypes_classes(size):
    ds = load_dataset(conf("digits", image_size=size), seed=0)
    assert ds.x_train.shape == (1437, 1, size, size) and ds.x_test.shape == (360, 1, size, size)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert ds.classes == [str(i) for i in range(10)]
    assert int(ds.x_train.max()) == 255 and int(ds.x_train.min()) == 0
    assert set(ds.y_test.tolist()) == set(range(10))


def test_digits_split_is_fixed_across_run_seeds_but_follows_split_seed():
    a, b = load_dataset(conf("digits"), seed=0), load_dataset(conf("digits"), seed=123)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    c = load_dataset(conf("digits", split_seed=1), seed=0)
    assert not torch.equal(a.x_test, c.x_test)


def test_channel_conversion():
    ds = load_dataset(conf("digits", channels=3), seed=0)
    assert ds.x_train.shape[1] == 3 and torch.equal(ds.x_train[:, 0], ds.x_train[:, 2])
    rgb = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    pil = [np.asarray(Image.fromarray(x.permute(1, 2, 0).numpy()).convert("L")) for x in rgb]
    diff = convert_channels(rgb, 1)[:, 0].int() - torch.as_tensor(np.stack(pil)).int()
    assert diff.abs().max() <= 1  # BT.601 luma, as PIL


def test_stratified_limits_keep_proportions_and_follow_the_seed():
    full = load_dataset(conf("digits"), seed=0)
    cfg = conf("digits", train_limit=200, test_limit=50)
    a, b, a2 = load_dataset(cfg, seed=0), load_dataset(cfg, seed=1), load_dataset(cfg, seed=0)
    assert len(a.y_train) == 200 and len(a.y_test) == 50
    for split, limit in (("train", 200), ("test", 50)):
        y_full = getattr(full, f"y_{split}")
        expected = class_counts(y_full, 10) * limit / len(y_full)
        got = class_counts(getattr(a, f"y_{split}"), 10)
        assert np.all(np.abs(got - expected) <= 1), (split, got, expected)
    assert torch.equal(a.x_train, a2.x_train)  # same seed, same subset
    assert not torch.equal(a.x_train, b.x_train)  # another seed, another subset
    with pytest.raises(ConfigError, match="train_limit"):
        load_dataset(conf("digits", train_limit=5), seed=0)


def test_synthetic_is_deterministic_and_learnable():
    a, b = load_dataset(conf("synthetic"), seed=0), load_dataset(conf("synthetic"), seed=7)
    assert a.x_train.shape == (512, 3, 16, 16) and a.x_test.shape == (128, 3, 16, 16)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert class_counts(a.y_train, 4).tolist() == [128] * 4
    c = load_dataset(conf("synthetic", split_seed=1), seed=0)
    assert not torch.equal(a.x_train, c.x_train)
    # Nearest class mean already separates the classes, so a ConvNet will too.
    means = torch.stack([a.x_train[a.y_train == k].float().mean(0) for k in range(4)])
    dist = torch.cdist(a.x_test.float().flatten(1), means.flatten(1))
    assert (dist.argmin(1) == a.y_test).float().mean() > 0.95


def test_fashion_mnist_from_debian_files(tmp_path):
    files = [f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    missing = [f for f in files if not os.path.isfile(os.path.join(DEBIAN_FASHION, f))]
    assert not missing, (
        f"Fashion-MNIST files {missing} are missing from {DEBIAN_FASHION}; "
        "install them with `apt-get install dataset-fashion-mnist` (or `make data-fashion-mnist`)"
    )
    # An empty root and no download: the data can only come from the Debian files.
    cfg = conf("fashion_mnist", root=str(tmp_path), download=False)
    _, source, opts = dataset_options(cfg)
    full = source(opts)
    assert full.x_train.shape == (60000, 1, 28, 28) and full.x_test.shape == (10000, 1, 28, 28)
    assert full.classes[0] == "T-shirt/top" and full.classes[9] == "Ankle boot"
    assert class_counts(full.y_train, 10).tolist() == [6000] * 10
    cfg.train_limit = 1000
    ds = load_dataset(cfg, seed=0)
    assert ds.x_train.shape == (1000, 1, 28, 28) and len(ds.y_test) == 10000
    assert class_counts(ds.y_train, 10).tolist() == [100] * 10
    assert 50 < ds.x_train.float().mean() < 100  # real images, mostly dark background


def write_image_tree(root: Path, classes=("cat", "dog", "fox"), n_train=4, n_test=2) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for k, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                h, w = 20 + 7 * i, 30 - 3 * i  # mixed sizes and aspect ratios
                if i % 2:  # some grayscale JPEGs
                    gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
                    Image.fromarray(gray, "L").save(root / split / cls / f"{i}.jpg")
                else:  # a class-coloured RGB image
                    arr = np.full((h, w, 3), 40, np.uint8)
                    arr[..., k] = 220
                    Image.fromarray(arr).save(root / split / cls / f"{i}.{'png' if i == 2 else 'jpg'}")


def test_imagefolder_tree(tmp_path):
    write_image_tree(tmp_path)
    ds = load_dataset(conf("imagefolder", root=str(tmp_path), image_size=16, channels=3), seed=0)
    assert ds.classes == ["cat", "dog", "fox"]
    assert ds.x_train.shape == (12, 3, 16, 16) and ds.x_test.shape == (6, 3, 16, 16)
    assert ds.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and ds.y_test.tolist() == [0, 0, 1, 1, 2, 2]
    # The RGB images keep their class colour; grayscale ones become 3 equal channels.
    assert int(ds.x_train[4, 1].float().mean()) > 180 and int(ds.x_train[4, 0].float().mean()) < 80
    assert torch.equal(ds.x_train[1, 0], ds.x_train[1, 2])
    gray = load_dataset(conf("imagefolder", root=str(tmp_path), image_size=16, channels=1), seed=0)
    assert gray.x_test.shape == (6, 1, 16, 16)


def test_imagefolder_class_mismatch_and_missing_root(tmp_path):
    write_image_tree(tmp_path / "a")
    shutil.rmtree(tmp_path / "a" / "test" / "fox")
    with pytest.raises(DatasetUnavailable, match="only in train: \\['fox'\\]"):
        load_dataset(conf("imagefolder", root=str(tmp_path / "a")), seed=0)
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset(conf("imagefolder", root=str(missing)), seed=0)
    assert "imagefolder" in str(err.value) and str(missing) in str(err.value)


def test_cifar10_without_files_or_download_says_where_and_how(tmp_path):
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset(conf("cifar10", root=str(tmp_path), download=False), seed=0)
    msg = str(err.value)
    assert "cifar10" in msg and str(tmp_path) in msg and "dataset.download=true" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__  # `from None`


def _no_decoding(monkeypatch):
    import bdexp.data.imagefolder as imagefolder

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again although the cache holds these files")

    monkeypatch.setattr(imagefolder, "decode_all", refuse)


def test_disk_cache_round_trips(tmp_path, monkeypatch):
    write_image_tree(tmp_path / "tree")
    cfg = conf("imagefolder", root=str(tmp_path / "tree"), image_size=16)
    cache = tmp_path / "cache"
    first = load_dataset(cfg, seed=0, cache_dir=str(cache))
    path = Path(cache_path(cfg, str(cache)))
    assert path.parent == cache / "datasets" and path.is_file() and len(path.stem) == 64
    _no_decoding(monkeypatch)  # from now on only the cache can answer
    second = load_dataset(cfg, seed=0, cache_dir=str(cache))
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert second.classes == first.classes
    limited_cfg = conf("imagefolder", root=str(tmp_path / "tree"), image_size=16, train_limit=6)
    limited = load_dataset(limited_cfg, seed=0, cache_dir=str(cache))
    assert class_counts(limited.y_train, 3).tolist() == [2, 2, 2]  # limits apply after the cache
    assert cache_path(conf("imagefolder", root=cfg.root, image_size=32), str(cache)) != str(path)


def test_gtsrb_decodes_torchvision_layout(tmp_path):
    rng = np.random.default_rng(0)
    train = tmp_path / "gtsrb" / "GTSRB" / "Training"
    for c in range(43):
        (train / f"{c:05d}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (20 + c % 5, 25, 3), dtype=np.uint8)).save(train / f"{c:05d}" / "0.ppm")
    test = tmp_path / "gtsrb" / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, c in enumerate([42, 7]):
        Image.fromarray(rng.integers(0, 256, (40, 31, 3), dtype=np.uint8)).save(test / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;31;40;1;1;30;39;{c}")
    (tmp_path / "gtsrb" / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(conf("gtsrb", root=str(tmp_path), download=False), seed=0)
    assert ds.x_train.shape == (43, 3, 32, 32) and ds.y_train.tolist() == list(range(43))
    assert ds.y_test.tolist() == [42, 7] and ds.num_classes == 43


def test_celeba_attribute_code():
    from bdexp.data.torchvision_sets import _attribute_code, _code_names

    names = ["Bald", "Heavy_Makeup", "Mouth_Slightly_Open", "Smiling"]
    attr = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]])
    chosen = ["Heavy_Makeup", "Smiling", "Mouth_Slightly_Open"]
    assert _attribute_code(attr, names, chosen).tolist() == [6, 1, 0, 7]
    assert _code_names(chosen)[6] == "Heavy_Makeup+Smiling" and _code_names(chosen)[0] == "none"
    with pytest.raises(ConfigError, match="Smilling"):
        _attribute_code(attr, names, ["Smilling"])


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ConfigError, match="digits"):
        load_dataset(OmegaConf.create({"name": "nope", "image_size": 8}), seed=0)


def test_disk_cache_follows_edits_to_the_files(tmp_path):
    """Keyed by the file listing (path, size, mtime): an added class folder or a replaced image
    is decoded again, an untouched tree is read from the cache."""
    root = tmp_path / "tree"
    write_image_tree(root)
    cfg, cache = conf("imagefolder", root=str(root), image_size=16), str(tmp_path / "cache")
    first = load_dataset(cfg, seed=0, cache_dir=cache)
    assert first.num_classes == 3 and Path(cache_path(cfg, cache)).is_file()
    write_image_tree(root, classes=("gnu",), n_train=4, n_test=2)
    second = load_dataset(cfg, seed=0, cache_dir=cache)
    assert second.classes == ["cat", "dog", "fox", "gnu"] and len(second.y_train) == 16
    assert torch.equal(second.x_train[:12], first.x_train[:12])
    arr = np.zeros((20, 30, 3), np.uint8)  # cat/0.jpg becomes black
    Image.fromarray(arr).save(root / "train" / "cat" / "0.jpg")
    os.utime(root / "train" / "cat" / "0.jpg", ns=(1, 1))  # another mtime even on a coarse clock
    third = load_dataset(cfg, seed=0, cache_dir=cache)
    assert int(third.x_train[0].max()) < 10 and int(second.x_train[0].max()) > 200
    assert len(list((tmp_path / "cache" / "datasets").glob("*.pt"))) == 3


def test_unreadable_image_names_the_file_or_is_skipped(tmp_path, caplog):
    root = tmp_path / "tree"
    write_image_tree(root)
    (root / "train" / "dog" / "9.jpg").write_bytes(b"not an image at all")
    (root / "test" / "fox" / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset(conf("imagefolder", root=str(root), image_size=16), seed=0)
    msg = str(err.value)
    assert str(root / "train" / "dog" / "9.jpg") in msg and "dataset.skip_bad_files=true" in msg
    assert "\n" not in msg
    cfg = conf("imagefolder", root=str(root), image_size=16, skip_bad_files=True)
    for _ in range(2):  # decoded, then read from the cache: the same count both times
        caplog.clear()
        ds = load_dataset(cfg, seed=0, cache_dir=str(tmp_path / "cache"))
        assert ds.skipped == [os.path.join("train", "dog", "9.jpg"), os.path.join("test", "fox", "7.png")]
        assert len(ds.y_train) == 12 and len(ds.y_test) == 6
        assert ds.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert "skipped 2 unreadable files" in caplog.text


def test_a_single_class_is_refused_with_the_reason(tmp_path):
    write_image_tree(tmp_path, classes=("cat",))
    with pytest.raises(ConfigError, match=">= 2 classes") as err:
        load_dataset(conf("imagefolder", root=str(tmp_path), image_size=16), seed=0)
    assert "'cat'" in str(err.value) and "poison_rate" not in str(err.value)


def test_train_limit_above_the_size_warns_and_changes_nothing(caplog):
    full = load_dataset(conf("digits"), seed=0)
    big = load_dataset(conf("digits", train_limit=5000, test_limit=360), seed=0)
    assert torch.equal(full.x_train, big.x_train) and torch.equal(full.y_test, big.y_test)
    assert "train_limit=5000 is larger than the 1437 train images" in caplog.text
    assert "test_limit" not in caplog.text  # equal to the size: nothing to say


@pytest.mark.parametrize("key, value, message", [
    ("image_size", 4, "dataset.image_size=4 is not allowed: use an integer >= 8"),
    ("channels", 2, "dataset.channels=2 is not allowed: use one of 1, 3"),
    ("train_limit", 0, "dataset.train_limit=0 is not allowed: use an integer or null >= 1"),
    ("test_fraction", 1.0, "dataset.test_fraction=1.0 is not allowed: use a finite number > 0 and < 1"),
    ("augment.crop_padding", -1, "dataset.augment.crop_padding=-1 is not allowed: use an integer >= 0"),
    ("bogus", 1, "dataset: unknown key(s) bogus"),
])
def test_a_bad_option_names_the_key_and_what_is_allowed(key, value, message):
    """Every source reads its declared options (DataOptions subclasses), checked before any data is read."""
    with pytest.raises(ConfigError) as err:
        load_dataset(conf("digits", **{key: value}), seed=0)
    assert message in str(err.value)
