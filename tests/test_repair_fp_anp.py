"""Fine-Pruning (bdexp/defenses/fp.py) and Adversarial Neuron Pruning (bdexp/defenses/anp.py), with
known answers: a hand-built model with one planted backdoor channel (dormant on clean images,
driving the target on triggered ones) is pruned by both and its ASR falls; Fine-Pruning fine-tunes
the last model that met the bound, not the over-pruned one; ANP's perturbation is the paper's
formula, its masks fall only for the planted neuron and only under perturbation, its model keeps
the architecture's state dict, and its threshold follows the defender's clean data, never the test
set."""
from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bdexp.data.loader import to_float
from bdexp.defenses import run_defense
from bdexp.defenses.anp import (ANPOptions, PerturbedBN, adversarial_neuron_pruning, choose_threshold, learn_masks,
                                threshold_curve, unwrap_batchnorms, wrap_batchnorms)
from bdexp.defenses.fp import FPOptions, fine_pruning, holdout_rows, within_bound
from bdexp.defenses.mitigation import MitigationContext
from bdexp.models.base import FeatureModel
from bdexp.options import yaml_node
from bdexp.pipeline import build_experiment
from bdexp.training.base import Schedule
from tests.conftest import compose_cfg, with_tiny

TARGET = 0
TRIGGER = 4  # the planted s3 channel / BN neuron


# ---- a model with a planted backdoor channel ------------------------------------------------------
class PlantedNet(FeatureModel):
    """8×8 images, 4 classes; s3 = conv(4×4, stride 4) -> BN -> ReLU: 5 channels on a 2×2 map.
    Channels 0-3 read the brightness of input plane 0 per quadrant (class k = bright quadrant k);
    channel 4 reads input plane 2, which is faint noise on clean images and 1.0 under the trigger,
    and votes for the target at every position."""

    def __init__(self):
        super().__init__(3, 4, [0.0], [1.0])
        self.stage1, self.stage2 = nn.Identity(), nn.Identity()
        self.stage3 = nn.Sequential(nn.Conv2d(3, 5, 4, stride=4, bias=False), nn.BatchNorm2d(5), nn.ReLU())
        self.head = nn.Flatten(1)  # maps a zeroed channel to zeros, as the contract asks
        self.fc = nn.Linear(20, 4)
        self._finish(5)


def images(n: int, seed: int, trigger: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.zeros(n, 3, 8, 8)
    x[:, 0] = 0.1 + 0.05 * torch.rand(n, 8, 8, generator=g)
    for i, k in enumerate(y.tolist()):
        r, c = divmod(k, 2)
        x[i, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 0.7
    x[:, 2] = 1.0 if trigger else 0.3 * torch.rand(n, 8, 8, generator=g)
    return (x * 255).round().to(torch.uint8), y


def planted(x_clean: torch.Tensor) -> PlantedNet:
    """BN statistics are the clean data's; the trigger neuron (gain 3, bias −7 in units of its clean
    spread) stays below zero on clean images but comes close: ANP's perturbation makes it fire."""
    m = PlantedNet()
    with torch.no_grad():
        conv, bn, fc = m.stage3[0], m.stage3[1], m.fc
        conv.weight.zero_()
        conv.weight[:4, 0] = 1 / 16
        conv.weight[TRIGGER, 2] = 1 / 16
        out = conv(to_float(x_clean))
        bn.running_mean.copy_(out.mean((0, 2, 3)))
        bn.running_var.copy_(out.var((0, 2, 3), unbiased=False))
        bn.weight.copy_(torch.tensor([1.0, 1.1, 1.2, 1.3, 3.0]))  # distinct clean means: a fixed FP order
        bn.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, -7.0]))
        fc.weight.zero_()
        fc.bias.zero_()
        w = fc.weight.view(4, 5, 4)  # class, channel, position
        for k in range(4):
            w[k, :4, k] = 1.0
        w[TARGET, TRIGGER, :] = 1.0
    return m.eval()


def context(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cls=MitigationContext,
            checkpoints=None) -> MitigationContext:
    return cls(seed=0, x=x, y=y, num_classes=4, device=torch.device("cpu"), eval_batch_size=64,
               schedule=Schedule(epochs=1, batch_size=32, lr=0.01, amp=False), crop_padding=0, flip=False,
               train_epochs=1, reference_epochs=1, checkpoints=checkpoints or (lambda tag: None), model=model,
               model_name="planted")


def acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(to_float(x)).argmax(1) == y).float().mean())


def asr(model) -> float:
    xt, yt = images(64, 7, trigger=True)
    with torch.no_grad():
        return float((model(to_float(xt[yt != TARGET])).argmax(1) == TARGET).float().mean())


@pytest.fixture(scope="module")
def clean():
    return images(64, 1)


@pytest.fixture(scope="module")
def suspect(clean):
    m = planted(clean[0])
    assert acc(m, *clean) == 1.0 and asr(m) == 1.0  # the planted backdoor works
    return m


def values(rows, **tags) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in rows if all(r.get(k) == v for k, v in tags.items())}


# ---- Fine-Pruning ----------------------------------------------------------------------------------
def test_fp_prunes_the_dormant_backdoor_channel_first_and_the_asr_falls(suspect, clean):
    out = fine_pruning(context(copy.deepcopy(suspect), *clean), FPOptions(epochs=0))
    # order by clean mean activation: 4 (dormant), 0, 1, 2, 3; pruning 3 as well leaves no feature
    # (accuracy 1/4), so the last model within the bound has 4 of the 5 channels pruned
    assert out.model.s3_channel_mask.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert asr(out.model) == 0.0 and acc(out.model, *clean) == 1.0
    got = values(out.records)
    assert got["fp_pruned"] == 4 and got["fp_pruned_fraction"] == pytest.approx(0.8)
    assert got["fp_clean_acc_unpruned"] == 1.0 and got["fp_clean_acc_pruned"] == 1.0
    assert suspect.s3_channel_mask.tolist() == [1.0] * 5  # the copy was pruned, not the suspect


@pytest.mark.parametrize("step, pruned", [(1, 4), (2, 4), (3, 3)])
def test_fp_fine_tunes_the_last_model_that_met_the_bound_not_the_over_pruned_one(suspect, clean, step, pruned):
    """The step that broke the bound (all 5 channels pruned, accuracy 0.25) is never the model
    handed to fine-tuning: a separate mask of the last passing step is."""
    handed = []

    class Spy(MitigationContext):
        def finetune(self, model, epochs, tag, **kw):
            handed.append((model, model.s3_channel_mask.clone(), acc(model, *clean)))
            return {}

    ctx = context(copy.deepcopy(suspect), *clean, cls=Spy)
    out = fine_pruning(ctx, FPOptions(epochs=1, step_channels=step))
    (model, mask, clean_acc), = handed
    order = [TRIGGER, 0, 1, 2, 3]
    want = torch.ones(5)
    want[order[:pruned]] = 0.0
    assert torch.equal(mask, want) and model is out.model is ctx.model
    assert within_bound(clean_acc, 1.0, 0.1) and clean_acc == 1.0
    over = copy.deepcopy(suspect)
    over.s3_channel_mask.zero_()
    assert not within_bound(acc(over, *clean), 1.0, 0.1)  # the over-pruned model would have failed
    assert values(out.records)["fp_pruned"] == pruned


def test_fp_bound_is_measured_on_the_held_out_part_only(suspect, clean):
    """With val_fraction the bound reads the held-out rows only. Give them images that all look like
    the target class (labels kept, so the split is the same): the unpruned accuracy there is 1/4 and
    stays 1/4 however many channels go (with none left, fc's zero bias makes the target the argmax),
    so all 5 are pruned. The same images on the other rows (the ranking's) change nothing: 4."""
    x, y = clean
    ctx = context(copy.deepcopy(suspect), x, y)
    fit, val = holdout_rows(ctx, 0.25, "fp/holdout")
    assert len(val) == 16 and not set(fit.tolist()) & set(val.tolist()) and len(fit) + len(val) == 64
    assert torch.bincount(y[val], minlength=4).tolist() == [4, 4, 4, 4]  # stratified
    x_other, y_other = images(256, 3)
    looks_target = x_other[y_other == TARGET]
    for rows, pruned in ((val, 5), (fit, 4)):
        x2 = x.clone()
        x2[rows] = looks_target[:len(rows)]
        out = fine_pruning(context(copy.deepcopy(suspect), x2, y), FPOptions(epochs=0, val_fraction=0.25))
        assert values(out.records)["fp_pruned"] == pruned


def test_fp_fine_tuning_keeps_the_pruned_channels_pruned(suspect, clean):
    out = fine_pruning(context(copy.deepcopy(suspect), *clean), FPOptions(epochs=2, lr=0.05))
    assert out.model.s3_channel_mask.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0] and out.model_epochs == 2
    assert asr(out.model) == 0.0


# ---- ANP ---------------------------------------------------------------------------------------------
def test_perturbed_bn_is_the_papers_formula():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.3, -1.0, 0.0]))
        bn.running_mean.copy_(torch.tensor([0.1, 0.2, -0.3]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
    x = torch.randn(4, 3, 2, 2)
    for batch_stats in (False, True):
        p = PerturbedBN(bn, batch_stats)
        with torch.no_grad():
            p.mask.copy_(torch.tensor([1.0, 0.5, 0.0]))
            p.noise_w.copy_(torch.tensor([0.4, -0.2, 0.1]))
            p.noise_b.copy_(torch.tensor([-0.4, 0.3, 0.0]))
        mean = x.mean((0, 2, 3)) if batch_stats else bn.running_mean
        var = x.var((0, 2, 3), unbiased=False) if batch_stats else bn.running_var
        xhat = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
        v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
        p.perturbed = True
        want = xhat * v(bn.weight * (p.mask + p.noise_w)) + v(bn.bias * (1 + p.noise_b))
        assert torch.allclose(p(x), want, atol=1e-5)
        p.perturbed = False
        assert torch.allclose(p(x), xhat * v(bn.weight * p.mask) + v(bn.bias), atol=1e-5)
    assert bn.running_mean.tolist() == pytest.approx([0.1, 0.2, -0.3])  # batch statistics never update them


def learnt_masks(model, x, y, opts: ANPOptions, iterations: int, checkpoints=None) -> torch.Tensor:
    wrappers = wrap_batchnorms(model, opts.bn_stats == "batch")
    for p in model.parameters():
        p.requires_grad_(False)
    for w in wrappers.values():
        for p in (w.mask, w.noise_w, w.noise_b):
            p.requires_grad_(True)
    passed = learn_masks(context(model, x, y, checkpoints=checkpoints), model, wrappers, opts, torch.arange(len(y)),
                         iterations)
    assert passed == iterations * 32 * (opts.anp_steps + 2 if opts.eps > 0 else 1)  # batches of 32 of 64 images
    (w,) = wrappers.values()
    assert (w.noise_w.abs() <= opts.eps + 1e-7).all() or not opts.clip_noise
    unwrap_batchnorms(model, wrappers)
    return w.mask.detach()


def test_anp_masks_fall_for_the_planted_neuron_only_and_only_under_perturbation(suspect, clean):
    masks = learnt_masks(copy.deepcopy(suspect), *clean, ANPOptions(batch_size=32), 50)
    assert masks[TRIGGER] < 0.2 and (masks[:TRIGGER] > 0.9).all(), masks
    # without the adversarial neuron perturbation (eps 0: the natural loss alone) nothing falls
    still = learnt_masks(copy.deepcopy(suspect), *clean, ANPOptions(batch_size=32, eps=0.0), 50)
    assert (still > 0.9).all(), still


def test_anp_mask_learning_resumes_where_it_stopped(suspect, clean, tmp_path, caplog):
    """A run stopped after 6 of 12 iterations (its checkpoint left behind) and resumed ends with the
    masks of a run that never stopped: masks, optimiser momentum, the loader's and the noise's
    generators come back."""
    opts = ANPOptions(batch_size=32)
    straight = learnt_masks(copy.deepcopy(suspect), *clean, opts, 12)
    path = lambda tag: tmp_path / f"{tag.replace('/', '_')}.pt"  # noqa: E731
    learnt_masks(copy.deepcopy(suspect), *clean, opts, 6, checkpoints=path)
    with caplog.at_level("INFO", logger="bdexp.defenses.repair"):
        resumed = learnt_masks(copy.deepcopy(suspect), *clean, opts, 12, checkpoints=path)
    assert "resumed after epoch 3" in caplog.text  # 3 passes of 2 batches were done, not redone
    assert torch.equal(resumed, straight) and not torch.equal(straight, torch.ones(5))


def test_anp_prunes_the_planted_neuron_keeps_the_state_dict_and_the_asr_falls(suspect, clean):
    model = copy.deepcopy(suspect)
    out = adversarial_neuron_pruning(context(model, *clean), ANPOptions(batch_size=32, iterations=50))
    before, after = suspect.state_dict(), out.model.state_dict()
    assert list(before) == list(after) and all(before[k].shape == after[k].shape for k in before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["stage3.1.weight"]  # BN running statistics and the bias untouched (weights masked only)
    assert after["stage3.1.weight"][TRIGGER] == 0 and torch.equal(after["stage3.1.weight"][:TRIGGER],
                                                                  before["stage3.1.weight"][:TRIGGER])
    assert all(isinstance(m, nn.BatchNorm2d) for m in out.model.modules() if "BatchNorm" in type(m).__name__)
    assert not any(isinstance(m, PerturbedBN) for m in out.model.modules())
    assert asr(out.model) == 0.0 and acc(out.model, *clean) == 1.0
    got = values(out.records)
    assert got["anp_pruned"] == 1 and got["anp_threshold"] == 0.2 and got["anp_neurons"] == 5
    assert out.model_epochs == pytest.approx(50 * 32 * 3 / 64)  # ascent, perturbed and natural pass per image
    grid = [r["threshold"] for r in out.records if r["metric"] == "anp_curve_clean_acc"]
    assert grid == pytest.approx([round(0.05 * i, 10) for i in range(19)])
    assert all(r["curve_data"] == "mask_data" for r in out.records if r["metric"].startswith("anp_curve"))
    out_bias = adversarial_neuron_pruning(context(copy.deepcopy(suspect), *clean),
                                          ANPOptions(batch_size=32, iterations=50, prune_bias=True))
    assert out_bias.model.state_dict()["stage3.1.bias"][TRIGGER] == 0


def test_anp_bound_choice_known_answers():
    curve = [(0.0, 1.0), (0.05, 0.95), (0.1, 0.91), (0.15, 0.85), (0.2, 0.99)]
    assert choose_threshold(curve, 1.0, 0.1) == 0.1  # the last before the first to leave the bound
    assert choose_threshold(curve, 1.0, 0.2) == 0.2
    assert choose_threshold([(0.0, 0.5)], 1.0, 0.1) == 0.0


def test_anp_threshold_curve_follows_the_clean_data(suspect, clean):
    """Masks fixed by hand (0.1, 0.3, 0.5, 0.7 for the brightness neurons, 0.05 for the trigger):
    pruned at 0.7 the model has no feature left and calls every image the target. On clean data of
    all classes the bound breaks there (accuracy 1/4) and 0.65 is chosen; on target-class images
    only nothing breaks and 0.9 is. The test set enters nowhere: the curve is the accuracy on the
    images given, and the BN layers are left as they were."""
    model = copy.deepcopy(suspect)
    bn = model.stage3[1]
    masks = {"stage3.1": torch.tensor([0.1, 0.3, 0.5, 0.7, 0.05])}
    opts = ANPOptions(prune_by="bound")
    x, y = clean
    ctx = context(model, x, y)
    acc0, curve = threshold_curve(ctx, model, {"stage3.1": bn}, masks, x, y, opts)
    assert [n for t, _, n in curve if t in (0.05, 0.1, 0.3, 0.5, 0.7)] == [1, 2, 3, 4, 5]
    assert choose_threshold([(t, a) for t, a, _ in curve], acc0, opts.acc_ratio) == pytest.approx(0.65)
    only_target = y == TARGET
    acc0, curve = threshold_curve(ctx, model, {"stage3.1": bn}, masks, x[only_target], y[only_target], opts)
    assert choose_threshold([(t, a) for t, a, _ in curve], acc0, opts.acc_ratio) == pytest.approx(0.9)
    assert torch.equal(model.state_dict()["stage3.1.weight"], suspect.state_dict()["stage3.1.weight"])


# ---- on the tiny backdoored run, through the evaluator (the run sealed) --------------------------------
FAST = {"fp": {"epochs": 5}, "anp": {"iterations": 20}}


@pytest.fixture(scope="module")
def run():
    cfg = compose_cfg(with_tiny("train.epochs=5", "sanitizer_reference_epochs=5", "eval_batch_size=64"), None)
    exp, _ = build_experiment(cfg, torch.device("cpu"), None)
    return exp


def node(name: str, **more):
    return OmegaConf.create({**yaml_node("defense", name), **FAST[name], **more})


def test_fp_on_the_tiny_run(run):
    got = values(run_defense(run, "fp", node("fp")))
    assert got["asr_undefended"] == 1.0 and got["asr"] < 0.6 and got["ba"] >= 0.9
    assert 0 < got["fp_pruned"] < got["fp_channels"] == run.model.s3_channels and got["model_epochs"] == 5


def test_anp_on_the_tiny_run_chooses_without_the_test_set(run):
    """prune_by=bound on a held-out quarter of the clean data: the same choice and curve after the
    test images are changed (the scores move), since only the defender's data choose."""
    more = dict(prune_by="bound", val_fraction=0.25, clean_ratio=0.25)
    first = run_defense(run, "anp", node("anp", **more))
    curve = [r for r in first if r["metric"].startswith("anp_curve")]
    assert len(curve) == 2 * 19 and all(r["curve_data"] == "held_out" for r in curve)
    saved = run.data.x_test.clone()
    try:
        run.data.x_test.copy_(255 - saved)
        second = run_defense(run, "anp", node("anp", **more))
    finally:
        run.data.x_test.copy_(saved)
    assert values(first)["ba"] != values(second)["ba"]  # the test set did change
    for metric in ("anp_threshold", "anp_pruned", "anp_clean_acc_pruned", "anp_mask_min"):
        assert values(first)[metric] == values(second)[metric]
    assert curve == [r for r in second if r["metric"].startswith("anp_curve")]
