"""Options are declared once (bdexp/options.py): every registered method has an Options dataclass,
every YAML of the config tree agrees with it, and a bad value is refused at compose time with a
message naming the key and what is allowed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
from omegaconf import OmegaConf

from bdexp.errors import ConfigError
from bdexp.options import Options, option
from tests.conftest import CONF_DIR, compose_cfg

# group -> (registry import path, how a YAML of the group is selected on the command line)
GROUPS = {
    "dataset": ("bdexp.data", "DATASETS", "dataset={}"),
    "model": ("bdexp.models", "MODELS", "model={}"),
    "attack": ("bdexp.attacks", "ATTACKS", "attack={}"),
    "train": ("bdexp.training", "REGIMES", "train={}"),
    "defense": ("bdexp.defenses", "DEFENSES", "defense=[{}]"),
    "analysis": ("bdexp.analysis", "ANALYSES", "analysis=[{}]"),
}


def registry(group):
    import importlib

    module, attr, _ = GROUPS[group]
    return getattr(importlib.import_module(module), attr)


def yaml_files(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


CASES = [(g, stem) for g in GROUPS for stem in yaml_files(g)]


def composed_node(group, stem):
    """The node `group=stem` puts in the composed config (bases of its defaults list included)."""
    cfg = compose_cfg([GROUPS[group][2].format(stem)])
    node = cfg[group][stem] if group in ("defense", "analysis") else cfg[group]
    return OmegaConf.to_container(node, resolve=True)


@pytest.mark.parametrize("group", list(GROUPS))
def test_every_registered_method_declares_its_options(group):
    reg = registry(group)
    missing = [name for name in reg.names() if reg.options(name) is None]
    assert not missing, f"{group}: no Options declared for {missing}"


@pytest.mark.parametrize("group,stem", CASES, ids=[f"{g}/{s}" for g, s in CASES])
def test_yaml_agrees_with_the_declaration(group, stem, monkeypatch):
    """A method's own file (conf/<group>/<name>.yaml) lists every option with the declared default;
    a variant file (another stem, same `name`) sets a subset, each value allowed."""
    monkeypatch.delenv("BDEXP_DATA", raising=False)  # dataset roots default to ~/.cache/bdexp/data
    node = composed_node(group, stem)
    reg = registry(group)
    name = node.get("name")
    assert name in reg, f"conf/{group}/{stem}.yaml: name={name!r} is not a registered {reg.kind}"
    options = reg.options(name)
    assert options is not None, f"{group} {name!r} declares no Options"
    assert options.problems(node, f"{group}.{stem}") == []
    values = {k: v for k, v in node.items() if k != "name"}
    if stem == name:
        assert values == options.defaults(), (
            f"conf/{group}/{stem}.yaml and {options.__name__} disagree: "
            f"{ {k: (values.get(k), options.defaults().get(k)) for k in set(values) | set(options.defaults()) if values.get(k) != options.defaults().get(k)} }")


def test_config_yaml_agrees_with_the_run_options(monkeypatch):
    """conf/config.yaml's own keys (seed, screening, cache, ...) are RunOptions' defaults."""
    from bdexp.validation import RunOptions

    monkeypatch.delenv("BDEXP_CACHE_DIR", raising=False)
    cfg = OmegaConf.to_container(compose_cfg([], as_is=True), resolve=True)
    assert {k: cfg[k] for k in RunOptions.fields()} == RunOptions.defaults()


# ---- the mechanism itself, on a throwaway declaration ------------------------------------------
@dataclass(frozen=True)
class Toy(Options):
    k: int = option(3, lo=1)
    rate: float = option(0.5, lo=0, hi=1)
    rule: Literal["a", "b"] = "a"
    levels: tuple[str, ...] = option(["s1", "s2"])
    cap: int | None = option(None, lo=2)


def test_parse_takes_declared_defaults_and_converts_lists():
    opts = Toy.parse({"k": 5, "levels": ["s3"]})
    assert (opts.k, opts.rate, opts.rule, opts.levels, opts.cap) == (5, 0.5, "a", ("s3",), None)
    assert Toy.parse(None) == Toy()
    assert Toy.parse({"rate": 1}).rate == 1.0 and isinstance(Toy.parse({"rate": 1}).rate, float)


@pytest.mark.parametrize("node,message", [
    ({"kk": 1}, "toy: unknown key(s) kk; allowed: cap, k, levels, rate, rule"),
    ({"k": "abc"}, "toy.k='abc' is not allowed: use an integer >= 1"),
    ({"k": 0}, "toy.k=0 is not allowed: use an integer >= 1"),
    ({"k": True}, "toy.k=true is not allowed: use an integer"),
    ({"rate": 1.5}, "toy.rate=1.5 is not allowed: use a finite number >= 0 and <= 1"),
    ({"rule": "c"}, "toy.rule='c' is not allowed: use one of a, b"),
    ({"levels": "s1"}, "toy.levels='s1' is not allowed: use a list of strings"),
    ({"cap": 1}, "toy.cap=1 is not allowed: use an integer or null >= 2"),
])
def test_a_bad_node_names_the_key_and_what_is_allowed(node, message):
    with pytest.raises(ConfigError) as err:
        Toy.parse(node, "toy")
    assert message in str(err.value)


def test_a_bad_value_is_refused_at_compose_time():
    from bdexp.validation import validate_config

    with pytest.raises(ConfigError, match=r"defense\.ac\.n_init='many' is not allowed"):
        validate_config(compose_cfg(["defense.ac.n_init=many"]))


@pytest.mark.parametrize("overrides,key", [
    (["analysis=[distances]", "analysis.distances.levels=[]"], "analysis.distances.levels"),
    (["analysis=[shift]", "analysis.shift.norms=[]"], "analysis.shift.norms"),
    (["train=mlmmdr", "train.levels=[]"], "train.levels"),
    (["defense=[cd]", "defense.cd.pools=[]"], "defense.cd.pools"),
])
def test_an_empty_list_is_refused_at_compose_time(overrides, key):
    from bdexp.validation import validate_config

    with pytest.raises(ConfigError, match=rf"{key}=\[\] is not allowed: use a non-empty list"):
        validate_config(compose_cfg(overrides))
