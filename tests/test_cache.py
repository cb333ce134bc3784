"""The model cache: keyed by content, atomic, weights-only, verified on load."""
import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bdexp.cache import ModelCache, data_fingerprint, key_of, model_identity, model_key


def _cfg(**over):
    cfg = OmegaConf.create({"dataset": {"name": "digits", "root": "/a"}, "model": {"name": "convnet"},
                            "attack": {"name": "patched"}, "train": {"name": "standard", "epochs": 3}, "seed": 0})
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def test_key_depends_on_what_the_model_depends_on():
    base = model_key(_cfg())
    assert model_key(_cfg()) == base
    assert model_key(_cfg(**{"train.epochs": 4})) != base
    assert model_key(_cfg(seed=1)) != base
    assert model_key(_cfg(**{"attack.name": "blended"})) != base
    assert model_key(_cfg(**{"dataset.root": "/elsewhere"})) == base  # where data lives is not what it is
    assert model_key(_cfg(), extra={"keep": "abc"}) != base


def test_key_holds_the_training_data_not_its_selection():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    y = torch.tensor([0, 1])
    fp = data_fingerprint(x, y)
    assert fp == data_fingerprint(x.clone(), y.clone()) and len(fp) == 64
    x2 = x.clone()
    x2[1, 2, 3, 3] += 1  # one pixel
    assert data_fingerprint(x2, y) != fp
    assert data_fingerprint(x, torch.tensor([1, 0])) != fp
    assert data_fingerprint(x.view(2, 3, 2, 8), y) != fp  # same bytes, other shape
    assert data_fingerprint(x, y, None) != fp  # an absent tensor counts
    base = model_key(_cfg(), data=fp)
    assert model_key(_cfg(), data=data_fingerprint(x2, y)) != base  # other images at the same root
    assert model_key(_cfg(**{"dataset.root": "/elsewhere"}), data=fp) == base
    # Data selection keys are what the fingerprint already covers: train_limit >= the data's size
    # gives the unlimited run's key (the limited run's data differs, and so does its fingerprint).
    assert model_key(_cfg(**{"dataset.train_limit": 10**6, "dataset.test_limit": 5}), data=fp) == base
    assert model_key(_cfg(**{"dataset.augment": {"flip": True}}), data=fp) != base  # augmentation is not data
    assert model_key(_cfg(**{"dataset.train_limit": 7})) != model_key(_cfg())  # without a fingerprint: kept


def test_unusable_files_are_set_aside(tmp_path, caplog):
    cache = ModelCache(tmp_path)
    good = {"state_dict": {"w": torch.ones(2)}, "meta": {}}
    cases = {
        "truncated": None,  # filled below
        "random": bytes(range(256)) * 8,
        "not_a_record": {"model": {"w": torch.ones(2)}, "optim": {}},  # a resume checkpoint, say
        "bad_state": {"state_dict": {"w": [1.0, 2.0]}, "meta": {}},
    }
    torch.save(good, tmp_path / "full.pt")
    cases["truncated"] = (tmp_path / "full.pt").read_bytes()[:50]
    for key, content in cases.items():
        cache.root.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            cache.path(key).write_bytes(content)
        else:
            torch.save(content, cache.path(key))
        original = cache.path(key).read_bytes()
        assert cache.get(key) is None, key
        assert not cache.path(key).exists() and (cache.root / f"{key}.pt.bad").read_bytes() == original
    assert caplog.text.count("moved it to") == len(cases)
    cache.put({"ok": 1}, good["state_dict"], {})
    assert torch.equal(cache.get(key_of({"ok": 1}))["state_dict"]["w"], torch.ones(2))


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    cache = ModelCache(tmp_path)
    cache.root.mkdir(parents=True)
    torch.save({"state_dict": {}, "meta": _Evil(str(marker))}, cache.path("k"))
    assert cache.get("k") is None and not marker.exists()
    assert (cache.root / "k.pt.bad").exists()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling would call open(path, "w"), creating the marker file
        return (open, (self.path, "w"))


def test_load_strictly_is_all_or_nothing():
    from bdexp.training.fit import load_strictly

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 5)).state_dict()  # another head
    half = {k: v + 1 for k, v in init.items()}
    half["1.bias"] = torch.zeros(3)
    nan = {k: v.clone() for k, v in init.items()}
    nan["0.weight"][0, 0] = float("nan")
    for bad, why in ((other, "1.weight"), (half, "1.bias"), ({"0.weight": init["0.weight"]}, "missing"),
                     ({**init, "extra": torch.zeros(1)}, "unexpected"), (nan, "non-finite"),
                     ({**init, "0.bias": init["0.bias"].double()}, "float64")):
        problem = load_strictly(model, bad)
        assert problem is not None and why in problem
        assert all(torch.equal(model.state_dict()[k], v) for k, v in init.items())  # nothing copied
    assert load_strictly(model, half | {"1.bias": init["1.bias"] + 1}) is None
    assert torch.equal(model.state_dict()["0.weight"], init["0.weight"] + 1)


def test_round_trip_and_corrupt_file(tmp_path):
    cache = ModelCache(tmp_path)
    identity = model_identity(_cfg(), data="abc")
    k = key_of(identity)
    assert k == model_key(_cfg(), data="abc") and cache.get(k) is None
    sd = {"w": torch.arange(4.0)}
    cache.put(identity, sd, {"history": {"loss": [1.0, 0.5]}})
    got = cache.get(k)
    assert torch.equal(got["state_dict"]["w"], sd["w"]) and got["meta"]["history"]["loss"] == [1.0, 0.5]
    assert got["key"] == k and key_of(json.loads(got["identity"])) == k  # it says what it was trained for
    assert not list(cache.root.glob(".*tmp"))  # no temp files left behind
    cache.path(k).write_bytes(b"garbage")
    assert cache.get(k) is None  # a corrupt file is a miss, not a crash
    assert (cache.root / f"{k}.pt.bad").read_bytes() == b"garbage"  # kept for inspection, never loaded


def _stored(cache, identity, **weights):
    cache.put(identity, {"fc.weight": torch.tensor([[1.0, -2.0], [0.5, 3.0]]), **weights}, {"history": {}})
    return key_of(identity), torch.load(cache.path(key_of(identity)), weights_only=True)


def test_a_stored_model_is_served_only_for_what_it_was_trained_for(tmp_path, caplog):
    """A file under a key must carry that key, an identity hashing to it and weights matching their
    digest: a model copied over another key, edited weights or an edited identity are set aside."""
    cache = ModelCache(tmp_path)
    long_id, short_id = model_identity(_cfg(**{"train.epochs": 20})), model_identity(_cfg(**{"train.epochs": 1}))
    long_key, _ = _stored(cache, long_id)
    short_key, short = _stored(cache, short_id)
    assert cache.get(long_key) is not None and cache.get(short_key) is not None

    cases = {  # what is written under long_key -> the reason given when it is refused
        "copied over": (short, "stored for model"),
        "sign-flipped": ({**short, "key": long_key, "identity": json.dumps(long_id),
                          "state_dict": {"fc.weight": -short["state_dict"]["fc.weight"]}}, "stored digest"),
        "identity edited": ({**short, "key": long_key}, "hashes to"),
        "no provenance": ({"state_dict": short["state_dict"], "meta": {}}, "carries no key"),
    }
    for name, (record, reason) in cases.items():
        caplog.clear()
        torch.save(record, cache.path(long_key))
        assert cache.get(long_key) is None, name
        assert (cache.root / f"{long_key}.pt.bad").exists() and not cache.path(long_key).exists(), name
        assert reason in caplog.text and "moved it to" in caplog.text, (name, caplog.text)
    # a sign flip that keeps the digest field is caught whatever the weights' layout
    _, good = _stored(cache, long_id)
    flipped = {k: v.clone() for k, v in good["state_dict"].items()}
    flipped["fc.weight"][0, 1] *= -1
    torch.save({**good, "state_dict": flipped}, cache.path(long_key))
    assert cache.get(long_key) is None


def test_disabled_cache_stores_nothing(tmp_path):
    cache = ModelCache(tmp_path, enabled=False)
    assert cache.put({"k": 1}, {"w": torch.zeros(1)}, {}) is None and cache.get(key_of({"k": 1})) is None
    assert not cache.root.exists()


def test_every_writer_goes_through_one_atomic_write(tmp_path, monkeypatch):
    """results.json, report tables, cached models and datasets all rename a temporary written in the
    same directory; a write that fails leaves the old file whole and no temporary."""
    import bdexp.atomic as atomic
    from bdexp.atomic import atomic_write
    from bdexp.cache import atomic_torch_save
    from bdexp.results import write_results

    renames = []
    real = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (renames.append((Path(a), Path(b))), real(a, b))[1])
    write_results(tmp_path / "run", {"attack": "patched"}, [])
    atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "m.pt")
    assert [b.name for _, b in renames] == ["results.json", "m.pt"]
    assert all(a.parent == b.parent and a.name.startswith(f".{b.name}.") for a, b in renames)

    def half(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "m.pt", half)
    assert torch.load(tmp_path / "m.pt", weights_only=True)["w"].tolist() == [0.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "run"]
