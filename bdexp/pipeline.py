"""One run, top to bottom: data -> poison -> train (cached) -> evaluate -> defenses -> analyses
-> results. Every step is a function of the composed config; nothing here is method-specific:
methods come from their registries, and an attack that needs more than the data (clbd's clean
reference model) asks for it through `Attack.attach`."""
from __future__ import annotations

import copy
import logging
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from bdexp.attacks import build_attack
from bdexp.attacks.base import Attack, AttackServices, BackdoorTestSet, PoisonedTrainSet
from bdexp.cache import ModelCache
from bdexp.data import load_dataset
from bdexp.data.base import ImageDataset
from bdexp.data.loader import to_float, to_uint8
from bdexp.errors import ConfigError
from bdexp.evaluate import backdoor_metrics
from bdexp.experiment import Experiment
from bdexp.report.summary import print_summary
from bdexp import progress as progress_bars
from bdexp.jobs import Interrupted
from bdexp.results import PartialRecords, run_identity, write_results
from bdexp.training.defender import regime_train_cfg
from bdexp.training import REGIMES
from bdexp.training.fit import FitRequest, fit
from bdexp.validation import check_run

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"device={name!r} is not one of auto, cpu, cuda, cuda:N")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(cfg: DictConfig, device: torch.device | None = None, cache: ModelCache | None = None
            ) -> tuple[ImageDataset, Attack, PoisonedTrainSet, BackdoorTestSet]:
    """Load the dataset and poison it; pure function of the config and seed. `device`/`cache`
    (default: from cfg) serve what an attack asks for through `Attack.attach` (clbd: a clean
    reference model). An attack that trains with the model (iad) has no sets before training:
    use `build_experiment`."""
    data, attack, train = poison(cfg, device, cache)
    if attack.co_trained:
        raise ConfigError(f"attack={attack.name} trains its trigger with the model, so its poisoned sets exist only "
                          "after training: use bdexp.pipeline.build_experiment (or bdexp.api), not prepare")
    return data, attack, train, backdoor_test_set(attack, data)


def backdoor_test_set(attack: Attack, data: ImageDataset) -> BackdoorTestSet:
    """The backdoor test set from the attack's final trigger (uint8 images)."""
    bd = attack.backdoor_test(to_float(data.x_test), data.y_test)
    bd.x = to_uint8(bd.x)
    return bd


def poison(cfg: DictConfig, device: torch.device | None = None, cache: ModelCache | None = None
           ) -> tuple[ImageDataset, Attack, PoisonedTrainSet]:
    """The dataset, the attack (attached to what it asks for) and the training set the model
    trains on: poisoned, or for an attack that poisons per batch (iad) the clean set."""
    seed = int(cfg.seed)
    cache_dir = cfg.cache.dir if cfg.cache.enabled else None
    data = load_dataset(cfg.dataset, seed=seed, cache_dir=cache_dir)
    attack = build_attack(cfg.attack, num_classes=data.num_classes, image_shape=data.image_shape, seed=seed)

    def run_device() -> torch.device:
        return device if device is not None else resolve_device(str(cfg.device))

    store = cache if cache is not None else ModelCache(cfg.cache.dir, enabled=bool(cfg.cache.enabled))
    attack.attach(AttackServices(
        device=run_device,
        clean_model=lambda: clean_reference_model(cfg, data, run_device(), store),
        train_data=lambda: (data.x_train, data.y_train),
        trigger_cache=lambda: ModelCache(store.root.parent, enabled=store.enabled, kind="triggers")))
    if attack.co_trained:
        return data, attack, attack.training_set(data.x_train, data.y_train)
    return data, attack, poisoned_training_set(attack, data)


def poisoned_training_set(attack: Attack, data: ImageDataset) -> PoisonedTrainSet:
    """The attack's poisoned training set (uint8 images): `poison_train`, or for a co-trained
    attack after training the set `materialize`d from its final state."""
    make = attack.materialize if attack.co_trained else attack.poison_train
    train = make(to_float(data.x_train), data.y_train)
    train.x = to_uint8(train.x)
    return train


def clean_reference_model(cfg: DictConfig, data: ImageDataset, device: torch.device, cache: ModelCache):
    """A model trained on the unpoisoned training set (what `AttackServices.clean_model` gives; clbd:
    Turner et al. / ISPL App. B perturb with PGD against "a reference model trained on clean
    data"), with train=standard and the run's schedule, or loaded from the cache. Its key has
    attack=none and a role tag, so every run that asks for it on the same data shares it."""
    ref_cfg = copy.deepcopy(cfg)
    with open_dict(ref_cfg):
        ref_cfg.attack = {"name": "none"}
    ref_train = regime_train_cfg(cfg.train, "standard")
    clean_attack = build_attack(ref_cfg.attack, data.num_classes, data.image_shape, int(cfg.seed))
    clean = poisoned_training_set(clean_attack, data)
    reference, _ = fit(ref_cfg, data, clean_attack, clean, device, cache,
                       FitRequest(train_cfg=ref_train, key_extra={"role": "clean_reference"}, describe="clean reference"))
    return reference


def run(cfg: DictConfig, run_dir: str | Path, config_hash: str | None = None) -> dict:
    """Execute one experiment and write `run_dir/results.json`; returns the results payload.
    `config_hash` (jobs.config_hash, computed by the CLI) lets a re-run sweep skip this job."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    check_run(cfg, run_dir)  # types and ranges of every value, writable run and cache dirs (validation.py)
    seed_everything(int(cfg.seed))
    progress_bars.set_enabled(bool(cfg.progress))
    device = resolve_device(str(cfg.device))
    log.info("device %s, output %s", device, run_dir)

    # What an interrupt leaves in results.json (jobs.Interrupted): the step running, the run's
    # identity and every record computed so far; finished defenses/analyses are also in `store`.
    done = {"where": "data preparation", "run": {**run_identity(cfg), "config_hash": config_hash}, "metrics": []}
    store = PartialRecords.for_run(cfg, run_dir, config_hash) if config_hash else None
    try:
        payload = _run(cfg, run_dir, device, start, config_hash, done, store)
    except Interrupted as err:
        err.where = err.where or done["where"]
        if done.get("complete"):  # results.json is already whole: keep it
            raise
        run_info = {**done["run"], "interrupted": {"where": err.where, "signal": str(err)},
                    "wall_s": time.perf_counter() - start, "config": OmegaConf.to_container(cfg, resolve=True)}
        write_results(run_dir, run_info, done["metrics"] + err.records, status="interrupted")
        raise
    return payload


def build_experiment(cfg: DictConfig, device: torch.device, run_dir: Path | None, done: dict | None = None,
                     store: PartialRecords | None = None) -> tuple[Experiment, dict]:
    """Data, poison and the trained (or cached) model of a run: the `Experiment` the evaluator,
    the defenses' evaluators and the analyses work on, and the training's info. `done` (when
    given) tracks the step running, for an interrupt's record."""
    done = {"run": {}} if done is None else done
    cache = ModelCache(cfg.cache.dir, enabled=bool(cfg.cache.enabled))
    data, attack, train = poison(cfg, device, cache)
    done["where"] = "training"
    model, fit_info = fit(cfg, data, attack, train, device, cache)
    done["where"] = "building the poisoned sets from the attack's final state"
    if attack.co_trained:  # its sets come from the final networks (bdexp/attacks/cotrained.py)
        train = poisoned_training_set(attack, data)
    bd = backdoor_test_set(attack, data)
    log.info("%s: %d train (%d poisoned) / %d test images %s, %d classes; backdoor test set %d",
             data.name, len(train.y), int(train.poison.sum()), len(data.y_test), data.image_shape,
             data.num_classes, len(bd.y_target))
    done["run"].update(model_cache=fit_info["cache"], model_key=fit_info["key"])
    if store is not None and store.bind(fit_info["key"]):
        log.info("records of %d defense(s)/analysis(es) finished by an earlier run of this config: %s",
                 len(store.steps), store.path)
    done["where"] = "evaluation"
    exp = Experiment(cfg, device, data, attack, train, bd, model, cache,
                     info={"run_dir": run_dir, "partial_records": store, "model_key": fit_info["key"]})
    return exp, fit_info


def _run(cfg: DictConfig, run_dir: Path, device: torch.device, start: float, config_hash: str | None,
         done: dict, store: PartialRecords | None) -> dict:
    exp, fit_info = build_experiment(cfg, device, run_dir, done, store)
    # No local of this frame holds the run's parts: while a defense runs they are sealed away
    # (Experiment.sealed), and a frame up the stack must not keep them within reach.
    metrics = backdoor_metrics(exp.pred_test, exp.data.y_test, exp.pred_backdoor, exp.backdoor_test)
    done["metrics"] = list(metrics)
    warn_if_collapsed(exp.pred_test, exp.data.num_classes, cfg)
    metrics += run_extensions(exp)

    data, attack, train = exp.data, exp.attack, exp.train_set
    history = fit_info.get("history", {})
    run_info = {
        **run_identity(cfg),
        "source": getattr(attack, "source", None),
        "target": getattr(attack, "target", None),
        "poison_budget": getattr(attack, "budget_rule", None),  # which samples count toward ε (attacks/base.py)
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_version": torch.__version__,
        "model_cache": fit_info["cache"],
        "model_key": fit_info["key"],
        "train_wall_s": history.get("wall_s"),
        "train_images_per_s": (sum(history["images_per_s"]) / len(history["images_per_s"])
                               if history.get("images_per_s") else None),
        # Per-epoch loss/acc/lr and the regime's diagnostics (e.g. the MMD term's batch make-up).
        "train_history": {k: v for k, v in history.items() if isinstance(v, list)},
        "n_train": len(train.y),
        "n_poison": int(train.poison.sum()),
        "n_cover": int(train.cover.sum()) if train.cover is not None else 0,  # Adap-*: trigger, true label
        # What the attack drew or optimized (a learned trigger's digest and cache use; docs/attacks.md)
        "attack_state": attack.state_record(),
        "n_skipped_files": len(data.skipped), "skipped_files": data.skipped,  # dataset.skip_bad_files
        "wall_s": time.perf_counter() - start,
        "config_hash": config_hash,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    done["where"], done["metrics"] = "writing results", metrics
    bd = exp.backdoor_test
    run_info["attack_images"] = save_attack_images(attack, run_dir, exp.data.x_test[bd.index[:8]], bd.x[:8])
    path = write_results(run_dir, run_info, metrics)
    done["where"], done["complete"] = "the summary (results.json is complete)", True
    if store is not None:
        store.clear()
    if cfg.progress:
        print_summary(run_info, metrics)
    log.info("results written to %s", path)
    return {"run": run_info, "metrics": metrics}


def save_attack_images(attack: Attack, run_dir: Path, clean: torch.Tensor | None = None,
                       triggered: torch.Tensor | None = None) -> list[str]:
    """Write each of the attack's `state_images` (an optimized trigger, say) as
    `attack_<name>.png` in the run directory, and `attack_examples.png`: up to 8 clean test images
    over their backdoor-test versions (uint8 `clean` / `triggered`); returns the file names."""
    from torchvision.utils import save_image

    from bdexp.atomic import atomic_write

    images = dict(attack.state_images())
    if clean is not None and triggered is not None and len(triggered):
        images["examples"] = torch.cat([to_float(clean), to_float(triggered)])  # to_float copies
    names = []
    for name, image in images.items():
        path = run_dir / f"attack_{name}.png"
        nrow = len(image) // 2 if image.dim() == 4 else 8  # examples: clean row over triggered row
        atomic_write(path, lambda tmp, im=image, n=nrow: save_image(im.float().clamp(0, 1), tmp, format="png",
                                                                       nrow=max(n, 1)))
        names.append(path.name)
    return names


def warn_if_collapsed(pred_test: torch.Tensor, num_classes: int, cfg) -> None:
    """One warning when the trained model predicts (nearly) one class for every clean test image:
    its ASR then means nothing, and every detector number of the run is about a broken model. The
    regime says what to try (`Regime.collapse_hint`; ML-/SL-MMDR: a smaller λ)."""
    if len(pred_test) == 0:
        return
    top = torch.bincount(pred_test.cpu(), minlength=num_classes).max().item() / len(pred_test)
    if top >= 0.9:
        hint = REGIMES.get(str(cfg.train.name)).collapse_hint(cfg.train)
        log.warning("the model predicts one class for %.0f %% of the clean test images: training collapsed%s; "
                    "its BA, ASR and every detector result of this run describe a broken model", 100 * top, hint)


def run_extensions(exp: Experiment) -> list[dict]:
    """Defenses and analyses selected in the config (conf/config.yaml: defense=[ac, ss, sr],
    analysis=[distances]). The run's
    results.PartialRecords (exp.info["partial_records"]) keeps the records of each as it finishes
    and serves them to a re-run."""
    from bdexp.analysis import run_analyses
    from bdexp.defenses import run_defenses

    store = exp.info.get("partial_records")
    rows = run_defenses(exp, store)
    try:
        return rows + run_analyses(exp, store)
    except Interrupted as err:
        err.records[:0] = rows
        raise
