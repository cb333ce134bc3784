"""Caches that cannot serve the wrong model, and bad data files, through the `bdexp` CLI.

- the model key follows the training data, not its path: two image folders at different roots,
  or one folder edited between runs, never share a model;
- the decoded-dataset cache follows the files: an added class folder is decoded again;
- a stored model that is truncated, random bytes, another model's valid checkpoint, a pickle
  that would run code, a one-epoch model copied over a longer-trained model's key or a model whose
  classifier weights were sign-flipped after storing is set aside (`<key>.pt.bad`) and the model retrains from its fresh, seeded
  initialization: the run's metrics equal those of the first, clean run exactly, and the code in
  the pickle never runs; a corrupt resume checkpoint likewise trains from scratch;
- an unreadable image names its file and offers dataset.skip_bad_files=true (which skips and
  counts it); a single-class folder says backdoor experiments need >= 2 classes; a train_limit
  above the dataset's size warns with both sizes and reuses the unlimited run's model.

Every run is tiny (synthetic data or 8x8 image folders, 3 epochs, CPU): a few seconds each.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


def _cli(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bdexp", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _ok(res):
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return res


def _error_line(res) -> str:
    """The one `bdexp error:` message of a failed run (exit 2, no traceback), with all whitespace
    removed: a console that wraps long lines then reads the same as one that does not. Compare
    with `_squeeze(expected)`."""
    assert res.returncode == 2, (res.stdout[-2000:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    for stream in (res.stderr, res.stdout):
        if "bdexp error:" in stream:
            assert stream.count("bdexp error:") == 1, stream[-3000:]
            return _squeeze(stream[stream.index("bdexp error:"):])
    raise AssertionError(f"no 'bdexp error:' line: {res.stderr[-3000:]}")


def _squeeze(text) -> str:
    return "".join(str(text).split())


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _metrics(payload: dict) -> dict:
    return {r["metric"]: r["value"] for r in payload["metrics"] if "defense" not in r and "analysis" not in r}


def _tree(root: Path, classes, n_train=16, n_test=8, seed=0) -> None:
    """root/{train,test}/<class>/<i>.png: 8x8 images of one colour per class plus noise."""
    rng = np.random.default_rng(seed)
    palette = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40)]
    for split, n in (("train", n_train), ("test", n_test)):
        for k, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(np.array(palette[k % 4]) + rng.normal(0, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{i}.png")


def _folder_args(root: Path, tmp: Path, run: str, *extra: str) -> list[str]:
    tiny = [t for t in TINY if not t.startswith("dataset")]  # TINY's synthetic sizes
    return [*tiny, "dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=8",
            "dataset.augment.crop_padding=0", "dataset.augment.flip=false", *extra,
            f"cache.dir={tmp / 'cache'}", f"hydra.run.dir={tmp / run}"]


def test_model_key_follows_the_images_not_the_path(tmp_path):
    """Two folders with the same layout but other images: no shared model. The same images at
    another path: the same model. One folder edited (a class added): the data cache and the
    model are both rebuilt."""
    a, b = tmp_path / "a", tmp_path / "b"
    _tree(a, ["cat", "dog"], seed=0)
    _tree(b, ["cat", "dog"], seed=1)
    _ok(_cli(_folder_args(a, tmp_path, "r1"), tmp_path))
    first = _results(tmp_path / "r1")
    assert first["run"]["model_cache"] == "miss"
    other = _ok(_cli(_folder_args(b, tmp_path, "r2"), tmp_path))
    second = _results(tmp_path / "r2")
    assert second["run"]["model_cache"] == "miss" and "loaded cached model" not in other.stdout + other.stderr
    assert second["run"]["model_key"] != first["run"]["model_key"]

    shutil.copytree(a, tmp_path / "a_copy", copy_function=shutil.copy2)  # same bytes, other root
    _ok(_cli(_folder_args(tmp_path / "a_copy", tmp_path, "r3"), tmp_path))
    assert _results(tmp_path / "r3")["run"]["model_cache"] == "hit"
    assert _results(tmp_path / "r3")["run"]["model_key"] == first["run"]["model_key"]

    before = (tmp_path / "r1" / "results.json").read_bytes()
    _tree(a, ["cat", "dog", "emu"], seed=2)  # rewrites a's images too; emu is new
    edited = _ok(_cli(_folder_args(a, tmp_path, "r4"), tmp_path))
    fourth = _results(tmp_path / "r4")
    assert "3 classes" in edited.stdout + edited.stderr and fourth["run"]["model_cache"] == "miss"
    assert fourth["run"]["n_train"] == 48
    assert (tmp_path / "r1" / "results.json").read_bytes() == before  # earlier results untouched


# --- a stored model that does not fit ---------------------------------------------------------

@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """One clean run on synthetic data: its results and its stored model file."""
    tmp = tmp_path_factory.mktemp("clean")
    _ok(_cli([*TINY, f"cache.dir={tmp / 'cache'}", f"hydra.run.dir={tmp / 'r0'}"], tmp))
    payload = _results(tmp / "r0")
    model = tmp / "cache" / "models" / f"{payload['run']['model_key']}.pt"
    assert model.is_file() and payload["run"]["model_cache"] == "miss"
    return tmp, payload, model.read_bytes()


class _RunsCode:
    """Unpickling this calls open(path, "w"): a marker file appears if the load executes code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def one_epoch_model(tmp_path_factory) -> bytes:
    """The stored model file of the same run trained for one epoch instead of three."""
    import bdexp

    tmp = tmp_path_factory.mktemp("one_epoch")
    res = bdexp.run([*TINY, "train.epochs=1", f"cache.dir={tmp / 'cache'}"], run_dir=tmp / "r0")  # in-process: sooner
    return (tmp / "cache" / "models" / f"{res.run['model_key']}.pt").read_bytes()


def _corrupt(kind: str, good: bytes, tmp: Path, request) -> bytes:
    if kind == "one_epoch_model":  # a whole, valid model file of another key, copied over this one
        return request.getfixturevalue("one_epoch_model")
    if kind == "sign_flipped":  # the classifier's weights negated, every other field kept
        import io

        record = torch.load(io.BytesIO(good), weights_only=True)
        last = [k for k in record["state_dict"] if k.endswith("weight")][-1]
        record["state_dict"][last] = -record["state_dict"][last]
        torch.save(record, tmp / "flipped.pt")
        return (tmp / "flipped.pt").read_bytes()
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "random_bytes":
        return np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    buf = tmp / f"{kind}.pt"
    if kind == "other_model":  # a valid checkpoint of the same architecture with 5 classes
        from bdexp.models import build_model
        from tests.conftest import compose_cfg

        torch.manual_seed(1)
        other = build_model(compose_cfg(TINY).model, in_channels=3, num_classes=5, image_size=16,
                            mean=[0.5] * 3, std=[0.25] * 3)
        torch.save({"state_dict": other.state_dict(), "meta": {"history": {}}}, buf)
    elif kind == "malicious_pickle":
        torch.save({"state_dict": {}, "meta": _RunsCode(str(tmp / "code_ran"))}, buf)
    return buf.read_bytes()


@pytest.mark.parametrize("kind", ["truncated", "random_bytes", "other_model", "malicious_pickle", "one_epoch_model",
                                  "sign_flipped"])
def test_a_stored_model_that_does_not_fit_is_set_aside_and_retrained_from_scratch(clean_run, kind, tmp_path,
                                                                                   request):
    src, clean, good = clean_run
    cache = tmp_path / "cache"
    shutil.copytree(src / "cache", cache)
    path = cache / "models" / f"{clean['run']['model_key']}.pt"
    bad = _corrupt(kind, good, tmp_path, request)
    path.write_bytes(bad)
    res = _ok(_cli([*TINY, f"cache.dir={cache}", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path))
    out = _results(tmp_path / "r")
    assert out["run"]["model_cache"] == "miss" and out["run"]["model_key"] == clean["run"]["model_key"]
    # The same metrics as the clean run: the retrain started from the fresh, seeded init, not
    # from a half-loaded model.
    assert _metrics(out) == _metrics(clean)
    assert (path.parent / (path.name + ".bad")).read_bytes() == bad  # kept for inspection
    stored = torch.load(path, weights_only=True)["state_dict"]
    reference = torch.load(src / "cache" / "models" / path.name, weights_only=True)["state_dict"]
    assert stored.keys() == reference.keys() and all(torch.equal(stored[k], reference[k]) for k in stored)
    warned = [ln for ln in (res.stdout + res.stderr).splitlines() if "is not usable" in ln]
    assert len(warned) == 1 and "training a fresh model" in warned[0]
    assert not (tmp_path / "code_ran").exists()  # weights_only=True: the pickle's code never ran
    assert _results(src / "r0") == clean  # the first run's results are unchanged


def test_a_corrupt_resume_checkpoint_trains_from_scratch(clean_run, tmp_path):
    src, clean, _ = clean_run
    cache = tmp_path / "cache"
    (cache / "checkpoints").mkdir(parents=True)
    (cache / "checkpoints" / f"{clean['run']['model_key']}.pt").write_bytes(b"PK\x03\x04 truncated")
    _ok(_cli([*TINY, f"cache.dir={cache}", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path))
    out = _results(tmp_path / "r")
    assert out["run"]["model_cache"] == "miss" and _metrics(out) == _metrics(clean)


def test_train_limit_above_the_size_warns_and_reuses_the_unlimited_model(clean_run, tmp_path):
    src, clean, _ = clean_run
    cache = tmp_path / "cache"
    shutil.copytree(src / "cache", cache)
    res = _ok(_cli([*TINY, "dataset.train_limit=100000", f"cache.dir={cache}", f"hydra.run.dir={tmp_path / 'r'}"],
                   tmp_path))
    assert "train_limit=100000 is larger than the 256 train images" in res.stdout + res.stderr
    out = _results(tmp_path / "r")
    assert out["run"]["model_cache"] == "hit" and out["run"]["model_key"] == clean["run"]["model_key"]
    assert _metrics(out) == _metrics(clean)


# --- bad data files -----------------------------------------------------------------------------

def test_an_unreadable_image_is_named_or_skipped_and_counted(tmp_path):
    root = tmp_path / "tree"
    _tree(root, ["cat", "dog"])
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"this is not a JPEG")
    line = _error_line(_cli(_folder_args(root, tmp_path, "r1"), tmp_path))
    assert _squeeze(root / "train" / "dog" / "broken.jpg") in line and "dataset.skip_bad_files=true" in line
    assert not (tmp_path / "cache" / "models").exists()  # stopped before any training

    res = _ok(_cli(_folder_args(root, tmp_path, "r2", "dataset.skip_bad_files=true"), tmp_path))
    assert "skipped 1 unreadable file" in res.stdout + res.stderr
    out = _results(tmp_path / "r2")
    assert out["run"]["n_skipped_files"] == 1 and out["run"]["n_train"] == 32
    assert out["run"]["skipped_files"] == [os.path.join("train", "dog", "broken.jpg")]


def test_a_single_class_folder_says_two_classes_are_needed(tmp_path):
    root = tmp_path / "tree"
    _tree(root, ["cat"])
    line = _error_line(_cli(_folder_args(root, tmp_path, "r"), tmp_path))
    assert _squeeze("need >= 2 classes") in line and "'cat'" in line and "poison_rate" not in line
