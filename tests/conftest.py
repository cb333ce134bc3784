"""Shared fixtures: compose the real config tree with tiny overrides."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# A run that trains in about a second: generated data, a thin ConvNet, three epochs.
TINY = [
    "defense=[]",
    "analysis=[]",
    "dataset=synthetic",
    "dataset.train_size=256",
    "dataset.test_size=96",
    "model.width=0.5",
    "train.epochs=3",
    "train.batch_size=32",
    "train.lr=0.1",
    "progress=false",
    "device=cpu",
]


def with_tiny(*overrides: str) -> list[str]:
    """TINY plus `overrides`; an override replaces TINY's entry for the same key."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [t for t in TINY if t.split("=", 1)[0] not in keys] + list(overrides)


def compose_cfg(overrides: list[str], cache_dir: Path | None = None, as_is: bool = False):
    """The composed config; the model cache is off unless `cache_dir` is given (or `as_is`)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="bdexp.conf", version_base="1.3"):
        extra = [f"cache.dir={cache_dir}"] if cache_dir is not None else ["cache.enabled=false"]
        extra = [] if as_is else extra
        return compose("config", overrides=[*overrides, *extra])


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*overrides: str, cache: bool = False):
        return compose_cfg(with_tiny(*overrides), tmp_path / "cache" if cache else None)

    return make


def as_foreground() -> None:
    """`preexec_fn` of a CLI child that a test signals as a terminal would: SIGINT at its default,
    so Python turns it into KeyboardInterrupt. A shell without job control starts `cmd &` with
    SIGINT ignored and every child inherits that, so without this a suite run in the background
    (`bash .ci/run &`) sees Ctrl-C do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
