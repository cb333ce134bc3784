"""The README's "Adding a method" example, run as written: its Python file registers a detector,
its YAML (on Hydra's search path, as a user's own conf folder would be) selects it, and the new
detector appears in `--table detect` and `--table matrix` without any other file changing."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from bdexp.defenses import DEFENSES
from tests.conftest import compose_cfg, with_tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def example(kind: str) -> str:
    """The fenced block after the `<!-- example-detector: kind -->` marker."""
    m = re.search(rf"<!-- example-detector: {kind} -->\s*```{kind}\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no example-detector {kind} block"
    return m.group(1)


@pytest.fixture
def margin(tmp_path):
    """The README's detector registered (from its code) and its YAML in a search-path folder."""
    module = types.ModuleType("bdexp_readme_margin")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(example("python"), "README.md:margin.py", "exec"), module.__dict__)
    conf = tmp_path / "conf"
    (conf / "defense").mkdir(parents=True)
    (conf / "defense" / "margin.yaml").write_text(example("yaml"))
    try:
        yield module, conf
    finally:
        DEFENSES.unregister("margin")
        sys.modules.pop(module.__name__, None)


def test_the_readme_detector_yaml_agrees_with_its_declaration(margin):
    from omegaconf import OmegaConf

    module, conf = margin
    node = OmegaConf.to_container(OmegaConf.load(conf / "defense" / "margin.yaml"))["margin"]
    declared = DEFENSES.options("margin")
    assert declared is module.MarginOptions and DEFENSES.meta("margin")["kind"] == "input_detector"
    assert declared.problems(node, "defense.margin") == []
    assert {k: v for k, v in node.items() if k != "name"} == declared.defaults()


def test_the_readme_detector_runs_and_shows_in_detect_and_matrix(margin, tmp_path):
    from bdexp.pipeline import run
    from bdexp.report.collect import collect
    from bdexp.report.tables import TABLES
    from bdexp.validation import validate_config

    _, conf = margin
    cfg = compose_cfg(with_tiny("defense=[margin]", "analysis=[]", f"hydra.searchpath=[file://{conf}]",
                                "defense.margin.max_pool=60"))
    with pytest.raises(Exception, match=r"defense\.margin\.suspicious='odd' is not allowed: use one of large, small"):
        validate_config(compose_cfg(with_tiny("defense=[margin]", f"hydra.searchpath=[file://{conf}]",
                                              "defense.margin.suspicious=odd")))
    run(cfg, tmp_path / "run")
    df = collect(tmp_path / "run")
    mine = df[df["defense"].eq("margin")]
    assert set(mine["pool"].dropna()) == {"train", "test"}
    auroc = mine[mine["metric"].eq("auroc")]["value"]
    assert len(auroc) == 2 and auroc.between(0, 1).all()
    assert any("margin" in str(c) for c in TABLES.get("detect")(df).columns)
    assert any("margin" in str(c) for c in TABLES.get("matrix")(df).columns)
