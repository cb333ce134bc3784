"""The model cache: keyed by content, atomic, weights-only."""
import torch
from omegaconf import OmegaConf

from bdexp.cache import ModelCache, model_key


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


def test_round_trip_and_corrupt_file(tmp_path):
    cache = ModelCache(tmp_path)
    assert cache.get("k") is None
    sd = {"w": torch.arange(4.0)}
    cache.put("k", sd, {"history": {"loss": [1.0, 0.5]}})
    got = cache.get("k")
    assert torch.equal(got["state_dict"]["w"], sd["w"]) and got["meta"]["history"]["loss"] == [1.0, 0.5]
    assert not list(cache.root.glob(".*tmp"))  # no temp files left behind
    cache.path("k").write_bytes(b"garbage")
    assert cache.get("k") is None  # a corrupt file is a miss, not a crash


def test_disabled_cache_stores_nothing(tmp_path):
    cache = ModelCache(tmp_path, enabled=False)
    assert cache.put("k", {"w": torch.zeros(1)}, {}) is None and cache.get("k") is None
    assert not cache.root.exists()
