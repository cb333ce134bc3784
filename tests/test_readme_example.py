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


def test_the_readme_detector_is_one_file_and_one_yaml_in_the_package(tmp_path):
    """Drop the README's two files into a copy of the installed layout (bdexp/ with its conf as
    bdexp/conf, as a wheel installs it): the registry finds the detector with no other file
    touched, and `bdexp defense=[margin]` runs it end to end."""
    import json
    import os
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"
    shutil.copytree(root / "bdexp", site / "bdexp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "conf", site / "bdexp" / "conf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "hydra_plugins", site / "hydra_plugins", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "bdexp" / "defenses" / "margin.py").write_text(example("python"))
    (site / "bdexp" / "conf" / "defense" / "margin.yaml").write_text(example("yaml"))
    env = {**os.environ, "PYTHONPATH": str(site), "BDEXP_CACHE_DIR": str(tmp_path / "cache")}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "bdexp", *with_tiny("defense=[margin]", "defense.margin.max_pool=60"),
           f"hydra.run.dir={run}"]
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    which = subprocess.run([sys.executable, "-c", "import bdexp; print(bdexp.__file__)"], env=env, cwd=tmp_path,
                           capture_output=True, text=True).stdout
    assert which.startswith(str(site)), which  # the copy ran, not the repository
    records = json.loads((run / "results.json").read_text())["metrics"]
    assert {r["pool"] for r in records if r.get("defense") == "margin" and r["metric"] == "auroc"} == {"train", "test"}
