"""The repair kinds' contract (bdexp/defenses/repair.py, mitigation.py, training_time.py): one
scorer with RA and DER, the defender's clean data, the run's model untouched, repaired models
cached and verified, interrupted repairs resumed."""
from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bdexp import metrics
from bdexp.cache import weights_digest
from bdexp.defenses import DEFENSES, run_defense
from bdexp.defenses.contexts import Kind
from bdexp.defenses.mitigation import MitigationOptions, clean_data
from bdexp.defenses.repair import Repair
from bdexp.evaluate import backdoor_metrics, score_model, subset_backdoor
from bdexp.attacks.base import BackdoorTestSet
from bdexp.jobs import Interrupted
from bdexp.options import yaml_node
from bdexp.pipeline import build_experiment
from bdexp.results import inconsistencies
from tests.conftest import compose_cfg, with_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = compose_cfg(with_tiny("train.epochs=4", "sanitizer_reference_epochs=4", "eval_batch_size=64",
                                "screening.reserve_per_class=8"), cache)
    exp, _ = build_experiment(cfg, torch.device("cpu"), None)
    return exp


def values(rows, **tags) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in rows if all(r.get(k) == v for k, v in tags.items())}


# ---- DER (BackdoorBench's definition, with the sign of ΔC-Acc it means) ---------------------------
@pytest.mark.parametrize("ba, asr", [(0.9, 1.0), (0.5, 0.3), (1.0, 0.0)])
def test_der_is_one_half_when_nothing_changes(ba, asr):
    assert metrics.defense_effectiveness_rating(ba, asr, ba, asr) == 0.5


def test_der_known_answers():
    der = metrics.defense_effectiveness_rating
    assert der(0.9, 1.0, 0.9, 0.0) == 1.0  # ASR 1 -> 0 at no cost
    assert der(1.0, 1.0, 0.0, 1.0) == 0.0  # only the clean accuracy fell
    assert der(0.9, 1.0, 0.8, 0.2) == pytest.approx((0.8 - 0.1 + 1) / 2)  # a C-Acc loss lowers it
    # BackdoorBench's utils/metric.py adds ΔC-Acc: losing 0.1 would then *raise* DER to 0.95
    assert der(0.9, 1.0, 0.8, 0.2) < (0.8 + 0.1 + 1) / 2
    assert der(0.8, 0.5, 0.9, 0.6) == 0.5  # gains in C-Acc and ASR count as no change (max(0, ·))


# ---- one scorer -----------------------------------------------------------------------------------
def test_ra_and_asr_never_count_one_triggered_image_twice():
    y_true = torch.tensor([1, 2, 3, 1, 2, 3])
    target = torch.zeros(6, dtype=torch.long)
    bd = BackdoorTestSet(torch.zeros(6, 1, 2, 2), target, y_true, torch.arange(6))
    pred_bd = torch.tensor([0, 2, 0, 1, 3, 0])  # 3 to the target, 2 to their true class, 1 elsewhere
    got = values(backdoor_metrics(torch.arange(6) % 4, torch.arange(6) % 4, pred_bd, bd))
    assert got["asr"] == pytest.approx(3 / 6) and got["ra"] == pytest.approx(2 / 6)
    assert got["asr"] + got["ra"] <= 1
    assert not inconsistencies(backdoor_metrics(torch.arange(6) % 4, torch.arange(6) % 4, pred_bd, bd))
    assert inconsistencies([{"metric": "asr", "value": 0.7}, {"metric": "ra", "value": 0.4}])


def test_the_run_scores_ra_with_the_same_scorer(run):
    rows = score_model(run.model, run.data.x_test, run.data.y_test, run.backdoor_test, run.device, 64)
    same = backdoor_metrics(run.pred_test, run.data.y_test, run.pred_backdoor, run.backdoor_test)
    assert values(rows) == values(same) and set(values(rows)) == {"ba", "asr", "tmr", "ra"}


def test_a_part_of_the_test_set_keeps_the_triggered_copies_of_its_images(run):
    rows = torch.arange(0, len(run.data.y_test), 3)
    sub = subset_backdoor(run.backdoor_test, rows)
    wanted = np.isin(run.backdoor_test.index.numpy(), rows.numpy())
    assert len(sub.y_target) == int(wanted.sum()) > 0
    assert torch.equal(rows[sub.index], run.backdoor_test.index[torch.from_numpy(wanted)])


# ---- the defender's clean data --------------------------------------------------------------------
def test_clean_data_is_five_percent_of_the_training_set_stratified_and_never_poisoned(run):
    x, y, scored = clean_data(run, MitigationOptions())
    ts = run.train_set
    assert len(y) == round(0.05 * len(ts.y)) and scored is None
    clean_rows = {tuple(r.flatten().tolist()) for r in ts.x[~ts.poison]}
    assert all(tuple(img.flatten().tolist()) in clean_rows for img in x)
    share = torch.bincount(ts.y[~ts.poison], minlength=4).float() / int((~ts.poison).sum())
    assert (torch.bincount(y, minlength=4).float() - share * len(y)).abs().max() <= 1  # stratified
    again = clean_data(run, MitigationOptions())
    assert torch.equal(again[0], x)  # seeded


def test_the_reserve_as_clean_data_is_disjoint_from_the_scored_images(run):
    x, y, scored = clean_data(run, MitigationOptions(clean_source="reserve"))
    reserve = set(run.reserve_index.tolist())
    assert len(y) == len(reserve) and not reserve & set(scored.tolist())
    assert len(reserve) + len(scored) == len(run.data.y_test)


def test_a_clean_ratio_that_leaves_no_image_is_refused(run):
    from bdexp.errors import ConfigError

    with pytest.raises(ConfigError, match="clean_ratio"):
        clean_data(run, MitigationOptions(clean_ratio=1e-6))


@pytest.mark.parametrize("source, clean_acc, test_acc, warned", [
    ("train", 1.0, 0.59, True),     # CIFAR-10 subset, ResNet-18/4 trained 20 epochs without augmentation
    ("train", 0.95, 0.90, False),   # a model that generalizes: the clean rows are not special
    ("train", 0.80, 0.70, True),    # the gap, not the accuracy, tells
    ("reserve", 1.0, 0.59, False),  # unseen test images: nothing was memorized
])
def test_memorized_clean_data_are_warned_about_once_per_run(source, clean_acc, test_acc, warned, caplog):
    from types import SimpleNamespace

    from bdexp.defenses.mitigation import warn_if_memorized

    exp = SimpleNamespace(info={})
    opts = MitigationOptions(clean_source=source)
    assert [warn_if_memorized(exp, name, opts, clean_acc, test_acc) for name in ("ft", "nad")] == [warned, warned]
    assert caplog.text.count("clean_source=reserve") == int(warned)


# ---- a mitigation end to end: records, the run's model, the cache ----------------------------------
def ft_node(**more):
    return OmegaConf.create({**yaml_node("defense", "ft"), "epochs": 2, **more})


def test_ft_records_and_a_cache_hit_on_a_rerun(run):
    before = weights_digest(run.model.state_dict())
    first = run_defense(run, "ft", ft_node())
    got = values(first)
    assert {"ba", "asr", "ra", "der", "wall_s", "model_epochs", "repair_cache", "clean_n"} <= set(got)
    assert got["repair_cache"] == 0 and got["model_epochs"] == 2 and all(r["defense"] == "ft" for r in first)
    want = metrics.defense_effectiveness_rating(got["ba_undefended"], got["asr_undefended"], got["ba"], got["asr"])
    assert got["der"] == pytest.approx(want)
    assert not inconsistencies(first)
    assert weights_digest(run.model.state_dict()) == before
    x, y, _ = clean_data(run, DEFENSES.options("ft").parse(ft_node()))
    assert got["clean_acc_undefended"] == pytest.approx(float((run.model(x.float() / 255).argmax(1) == y).float().mean()))
    second = values(run_defense(run, "ft", ft_node()))
    assert second["repair_cache"] == 1
    assert {k: v for k, v in second.items() if k != "repair_cache"} == {k: v for k, v in got.items() if k != "repair_cache"}
    other = values(run_defense(run, "ft", ft_node(lr=0.02)))  # another option: another repaired model
    assert other["repair_cache"] == 0


def test_a_tampered_repaired_model_is_set_aside_and_repaired_again(run):
    from bdexp.cache import key_of
    from bdexp.defenses.mitigation import clean_data as data_of
    from bdexp.defenses.repair import repair_identity
    from bdexp.cache import data_fingerprint

    run_defense(run, "ft", ft_node(epochs=3))
    opts = DEFENSES.options("ft").parse(ft_node(epochs=3))
    x, y, _ = data_of(run, opts)
    path = run.cache.path(key_of(repair_identity(run, Kind.mitigation, "ft", opts, data_fingerprint(x, y))))
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["fc.weight"].neg_()
    torch.save(blob, path)
    got = values(run_defense(run, "ft", ft_node(epochs=3)))
    assert got["repair_cache"] == 0 and path.with_name(path.name + ".bad").exists()


def test_a_mitigation_that_changes_the_runs_model_is_stopped_and_the_model_restored(run):
    before = weights_digest(run.model.state_dict())
    model = run.model  # a closure holding the run's live model (the model is not sealed: a defender has it)

    def vandal(ctx, opts):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        return Repair(ctx.model)

    refused(run, vandal, RuntimeError, "changed the run's own model")
    assert weights_digest(run.model.state_dict()) == before


def test_a_returned_model_of_another_architecture_is_refused(run):
    def swap(ctx, opts):
        return Repair(torch.nn.Linear(3, 2))

    refused(run, swap, ValueError, "does not fit the run's architecture")


def refused(run, repair, error: type, message: str) -> None:
    """The mitigation `repair`, registered for the duration, raises `error` matching `message`."""
    DEFENSES.register(repair.__name__, options=MitigationOptions, kind=Kind.mitigation)(repair)
    try:
        with pytest.raises(error, match=message):
            run_defense(run, repair.__name__, OmegaConf.create({"name": repair.__name__}))
    finally:
        DEFENSES.unregister(repair.__name__)


def test_an_interrupted_repair_resumes_after_its_last_epoch(run):
    """A custom loop through `ctx.epochs`: interrupted in epoch 3, the re-run starts at epoch 3 with
    the weights and optimizer the first run saved, and ends where an uninterrupted run ends."""
    seen: list[int] = []
    state = {"interrupt": True}

    def loop(ctx, opts):
        model = ctx.model
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loader = ctx.loader("loop", 16)
        for epoch in ctx.epochs("loop", 5, model, opt, loader):
            if epoch == 3 and state["interrupt"]:
                state["interrupt"] = False
                raise Interrupted(signal.SIGTERM)
            seen.append(epoch)
            model.train()
            for batch in loader:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(batch.x), batch.y).backward()
                opt.step()
        return Repair(model.eval(), model_epochs=5)

    DEFENSES.register("loop", options=MitigationOptions, kind=Kind.mitigation)(loop)
    try:
        with pytest.raises(Interrupted):
            run_defense(run, "loop", OmegaConf.create({"name": "loop", "clean_ratio": 0.3}))
        resumed = values(run_defense(run, "loop", OmegaConf.create({"name": "loop", "clean_ratio": 0.3})))
        assert seen == [0, 1, 2, 3, 4]
        # the same repair without an interruption (another seed tag would differ: same options, fresh cache)
        seen.clear()
        run.cache.root = run.cache.root.parent / "fresh" / "models"
        straight = values(run_defense(run, "loop", OmegaConf.create({"name": "loop", "clean_ratio": 0.3})))
        assert seen == [0, 1, 2, 3, 4]
        assert resumed["ba"] == straight["ba"] and resumed["asr"] == straight["asr"]
    finally:
        DEFENSES.unregister("loop")


# ---- the training-time kind -------------------------------------------------------------------------
def test_a_training_time_defense_is_scored_with_its_isolated_rows(run):
    """A defense that isolates the rows whose label its own fresh model gets wrong after training on
    the rest is scored against the flags it never saw."""
    from bdexp.options import NoOptions

    def isolate_first_quarter(ctx, opts):
        model = ctx.make_model("iso")
        ctx.finetune(model, 2, "iso", lr=0.05)
        isolated = torch.zeros(len(ctx.y), dtype=torch.bool)
        isolated[: len(ctx.y) // 4] = True
        return Repair(model, model_epochs=2, isolated=isolated)

    DEFENSES.register("iso", options=NoOptions, kind=Kind.training_time)(isolate_first_quarter)
    try:
        got = values(run_defense(run, "iso", OmegaConf.create({"name": "iso"})))
    finally:
        DEFENSES.unregister("iso")
    poison = run.train_set.poison
    quarter = len(poison) // 4
    assert got["n_isolated"] == quarter
    assert got["isolation_precision"] == pytest.approx(float(poison[:quarter].sum()) / quarter)
    assert got["isolation_recall"] == pytest.approx(float(poison[:quarter].sum()) / float(poison.sum()))
    assert {"ba", "asr", "ra", "der"} <= set(got)


def test_ft_lowers_a_patched_digits_models_asr_at_a_bounded_clean_cost():
    """The default run's data (digits, patched, target 0) trained 20 epochs: ASR 1.0. Fine-tuning
    on 20 % of the training set's clean rows at lr 0.1 (BackdoorBench's FT at a larger step) cuts
    the ASR by more than half (measured: 1.00 -> 0.04) while C-Acc stays within 10 points."""
    cfg = compose_cfg(["defense=[]", "analysis=[]", "train.epochs=20", "progress=false", "device=cpu",
                       "sanitizer_reference_epochs=20"])
    exp, _ = build_experiment(cfg, torch.device("cpu"), None)
    got = values(run_defense(exp, "ft", ft_node(epochs=20, lr=0.1, clean_ratio=0.2)))
    assert got["asr_undefended"] >= 0.9
    assert got["asr"] <= got["asr_undefended"] / 2
    assert got["ba"] >= got["ba_undefended"] - 0.10
    assert got["der"] > 0.7 and got["asr"] + got["ra"] <= 1
