"""A defense sees only what a defender has (bdexp/defenses/contexts.py), and the code enforces it:
every registered defense runs on a tiny poisoned run while the run's ground truth is sealed
(reading it raises GroundTruthRead), a defense that reaches for it anyway is stopped, and no
context can be built around the run itself."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from bdexp.defenses import DEFENSES, contexts, run_defense
from bdexp.options import yaml_node
from bdexp.pipeline import build_experiment
from tests.conftest import compose_cfg, with_tiny

# Settings that keep each defense to a second or two on the tiny run (their YAMLs are paper-sized).
FAST = {
    "cd": {"steps": 3, "max_pool": 40}, "strip": {"n_overlay": 4, "max_pool": 40},
    "overlap": {"max_pool": 40, "num_radii": 3}, "msp": {"max_pool": 40}, "energy": {"max_pool": 40},
    "mahalanobis": {"max_pool": 40},
    "nc": {"steps": 3, "num_images": 20, "figure": False, "prune_images": 20, "eval_images": 40},
    "ispl": {"rounds": 1, "num_clusters": 2, "warmup_epochs": 1, "iter_epochs": 1, "learner_epochs": 1,
             "st_epochs": 2, "st_interval": 1},
    "itlm": {"rounds": 1, "first_epochs": 1, "next_epochs": 1},
    "ft": {"epochs": 2}, "fp": {"epochs": 5}, "anp": {"iterations": 20}, "nad": {"te_epochs": 2, "epochs": 2},
    "ftsam": {"epochs": 2}, "rnp": {"unlearn_epochs": 2, "recover_epochs": 2},
    "abl": {"isolation_epochs": 1, "finetune_epochs": 1, "unlearning_epochs": 1}, "ibau": {"rounds": 1},
    "sau": {"epochs": 1},
}


@pytest.fixture(scope="module")
def exp():
    cfg = compose_cfg(with_tiny("screening.sizes=[10]", "screening.reserve_per_class=8", "eval_batch_size=64",
                                "sanitizer_reference_epochs=3"))
    run, _ = build_experiment(cfg, torch.device("cpu"), None)
    return run


def defense_node(name: str):
    """conf/defense/<name>.yaml with the FAST settings."""
    return OmegaConf.create({**yaml_node("defense", name), **FAST.get(name, {})})


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_runs_with_the_ground_truth_sealed(exp, name):
    """The evaluator of each kind seals the run while the defense runs, so a defense that read
    the poison flags, the attack or the backdoor test set would raise here."""
    from bdexp.cache import weights_digest

    before = weights_digest(exp.model.state_dict())
    rows = run_defense(exp, name, defense_node(name))
    assert rows, f"{name} returned no records"
    assert weights_digest(exp.model.state_dict()) == before, f"{name} changed the run's model"
    assert not any(r["metric"] == "skipped" for r in rows) or name in ("ss", "sr", "ac"), rows[:3]
    assert exp.train_set.poison.any()  # unsealed again afterwards


# ---- a defense that reaches for the truth is stopped, whatever its kind -------------------------
READS = (lambda run: run.train_set.poison, lambda run: run.attack.target, lambda run: run.backdoor_test.x,
         lambda run: run.cfg.attack, lambda run: run.data.y_test)


@pytest.mark.parametrize("kind", contexts.KINDS.names())
def test_a_defense_that_reads_the_ground_truth_raises(exp, kind):
    """Every registered kind, through its probe (a no-op defense of its signature), reading one of
    the run's truths while it runs."""
    spec = contexts.KINDS.get(kind)
    read = READS[contexts.KINDS.names().index(kind) % len(READS)]
    name = f"leaky_{kind}"
    DEFENSES.register(name, options=spec.options, kind=kind)(spec.probe(lambda stage: read(exp)))
    try:
        with pytest.raises(contexts.GroundTruthRead, match=f"defense '{name}' read the run's"):
            run_defense(exp, name, OmegaConf.create({"name": name, **spec.probe_node}))
    finally:
        DEFENSES.unregister(name)
    assert len(exp.train_set.poison) == len(exp.train_set.y)  # restored after the failure too


def test_every_registered_defense_has_a_registered_kind():
    kinds = set(contexts.KINDS.names())
    assert {DEFENSES.meta(n)["kind"] for n in DEFENSES.names()} <= kinds
    assert {contexts.Kind.mitigation, contexts.Kind.training_time} <= kinds


def test_only_the_oracle_is_handed_the_poison_flags():
    readers = [n for n in DEFENSES.names() if DEFENSES.meta(n).get("reads_ground_truth")]
    assert readers == ["oracle"]


def test_a_context_cannot_hold_the_run(exp):
    view = contexts.ModelView(exp.model, exp.device, 64)
    reserve = contexts.Reserve(exp.data.x_test[:2], exp.data.y_test[:2], exp.reserve_index.numpy()[:2])
    ok = contexts.DetectorContext(seed=0, view=view, reserve=reserve, num_classes=exp.data.num_classes)
    contexts.check_context(ok)
    for bad in (exp, exp.attack, exp.train_set, exp.cfg):
        with pytest.raises(TypeError, match="must not reach the run"):
            contexts.check_context(contexts.InspectorContext(seed=0, view=view, reserve=reserve, num_classes=3,
                                                             out_dir=bad))


def test_the_sealed_run_raises_on_every_use(exp):
    with exp.sealed("probe"):
        for read in (lambda: exp.train_set.poison, lambda: exp.attack.target, lambda: len(exp.backdoor_test),
                     lambda: exp.cfg.attack, lambda: exp.info["screening_pools"], lambda: exp.data.y_test,
                     lambda: exp.target):
            with pytest.raises(contexts.GroundTruthRead, match="defense 'probe'"):
                read()
        assert exp.model is not None and exp.device.type == "cpu"  # what a defender has stays


# ---- nothing of the truth is within reach while a defense runs ----------------------------------
def test_no_ground_truth_is_reachable_from_inside_a_defense(tmp_path):
    """A defense of each kind searches its callers' frames (every thread's) and every object the
    garbage collector tracks, with what they hold, for the run's truth: the carriers (the data, the
    attack, the poisoned sets, the pools, an unsealed run, the run's config) and arrays equal to
    the poison flags, a pool's labels or the sanitizer's row order of an appended-row run. It finds
    nothing, from Python and inside `bdexp` (where Hydra's frames and HydraConfig hold the config
    too); the same search from outside a defense finds them all (tests/snoop_run.py, in a fresh
    interpreter so that no other test's run is in memory)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "tests.snoop_run", str(tmp_path)], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout.strip().splitlines()[-1])
    unsealed = found.pop("unsealed")
    for carrier in ("PoisonedTrainSet", "BackdoorTestSet", "ScreeningPools", "InputPool", "the poison flags",
                    "a screening pool's labels", "an input pool's labels", "the run's config"):
        assert any(carrier in line for line in unsealed), (carrier, unsealed)
    # every kind searched from Python (the input detector also when it scores), the two that order
    # rows again with appended rows, and two under the CLI
    searched = {key.split(" ")[0] for key in found}
    assert searched == set(contexts.KINDS.names()), found
    assert len(found) == len(contexts.KINDS.names()) + 1 + 2 + 2, sorted(found)
    assert all(what == [] for what in found.values()), found
