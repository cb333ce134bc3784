"""A defense of each kind that goes looking for the run's ground truth while it runs, the way a
leaky defense would: up its caller's frames (every thread's), and through every object the garbage
collector tracks and what those hold. Run as a script (`python -m tests.snoop_run TMP_DIR`) by
tests/test_defender_view.py, in a fresh interpreter so no other test's run is in memory; prints
one JSON object: kind -> what it found while sealed (empty lists when nothing is within reach),
and "unsealed" -> what the same search finds from outside a defense (it must find the truth).
Hydra's own record of the command line (sys.argv, its override lists, the copy of its `hydra` node
it keeps for the run's .hydra/ files) is not looked for: docs/defenses.md says why.

What counts as found, for the run this script builds (and no other):
- an object that carries the truth: the run's data, attack, poisoned training set, backdoor test
  set, screening or input pools, an Experiment whose parts are not sealed, the run's config (or
  Hydra's job config), or a config node of the attack;
- an array or tensor equal to the poison flags, to a screening pool's labels, to an input pool's
  labels, or to the sanitizer's row order of an appended-row run (compared by digest, so this
  script holds no copy the search could find).
"""
from __future__ import annotations

import gc
import hashlib
import json
import sys

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bdexp.attacks.base import Attack, BackdoorTestSet, PoisonedTrainSet
from bdexp.data.base import ImageDataset
from bdexp.defenses import DEFENSES, contexts, run_defense
from bdexp.defenses.input_pools import InputPool, input_pool
from bdexp.defenses.sanitize import ORDER_KEY, SanitizerOptions
from bdexp.defenses.screening import Pool, ScreeningPools, screening_pools
from bdexp.experiment import Experiment, _Sealed
from bdexp.pipeline import build_experiment
from tests.conftest import compose_cfg, with_tiny

CARRIERS = (PoisonedTrainSet, BackdoorTestSet, Attack, ImageDataset, ScreeningPools, Pool, InputPool)


def digest(a) -> str:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return hashlib.sha256(np.ascontiguousarray(a.astype(np.int64)).tobytes()).hexdigest()


class Search:
    """What to look for: digests of the truth arrays by length, and the run's own objects by id."""

    def __init__(self, truth: dict[str, list[str]], lengths: set[int]):
        self.truth, self.lengths = truth, lengths

    def look(self, obj, where: str, found: list[str]) -> None:
        kind = type(obj)  # not isinstance: some objects answer __class__ with a warning
        if issubclass(kind, CARRIERS):
            found.append(f"{kind.__name__} at {where}")
        elif issubclass(kind, Experiment) and not isinstance(obj.__dict__.get("train_set"), _Sealed):
            found.append(f"an unsealed Experiment at {where}")
        elif issubclass(kind, DictConfig) and {"attack", "seed"} <= set(obj.__dict__.get("_content") or ()):
            found.append(f"the run's config at {where}")  # the run's, or Hydra's job config
        elif issubclass(kind, DictConfig) and {"poison_rate", "target"} <= set(obj.__dict__.get("_content") or ()):
            found.append(f"the attack's config at {where}")
        elif issubclass(kind, (np.ndarray, torch.Tensor)) and obj.ndim == 1 and len(obj) in self.lengths:
            if obj.dtype in (np.float32, np.float64, torch.float32, torch.float64):
                return
            d = digest(obj)
            for what, ds in self.truth.items():
                if d in ds:
                    found.append(f"{what} at {where}")

    def run(self) -> list[str]:
        found: list[str] = []
        me = sys._getframe()
        for frame in sys._current_frames().values():
            while frame is not None:
                if frame is not me:
                    for name, value in list(frame.f_locals.items()):
                        self.look(value, f"{frame.f_code.co_name}:{name}", found)
                frame = frame.f_back
        for obj in gc.get_objects():
            self.look(obj, "gc", found)
            for ref in gc.get_referents(obj):  # arrays are not tracked by gc: find them in what holds them
                if issubclass(type(ref), np.ndarray):
                    self.look(ref, f"held by a {type(obj).__name__}", found)
        return sorted(set(found))


def build(append: bool):
    extra = ["attack.inject=append"] if append else []
    cfg = compose_cfg(with_tiny("screening.sizes=[10,40]", "screening.reserve_per_class=8", "eval_batch_size=64",
                                "sanitizer_reference_epochs=3", *extra))
    exp, _ = build_experiment(cfg, torch.device("cpu"), None)
    truth = {"the poison flags": [digest(exp.train_set.poison)]}
    sp = screening_pools(exp)
    truth["a screening pool's labels"] = [digest(p.labels) for p in sp.pools]
    truth["an input pool's labels"] = [digest(input_pool(exp, name, 40).labels) for name in ("train", "test")]
    lengths = {len(exp.train_set.poison), *(len(p.labels) for p in sp.pools), 40}
    del sp
    return exp, Search(truth, lengths)


def snoopers(search: Search, found: dict[str, list[str]]):
    """kind -> (a defense of that kind that searches the process where it runs, its options): each
    kind's probe (contexts.KindSpec.probe), searching once per stage (the first pool, say)."""
    def act(kind: str):
        def search_once(stage: str) -> None:
            key = f"{kind} ({stage})" if stage else kind
            if key not in found:
                found[key] = search.run()
        return search_once

    return {kind: (contexts.KINDS.get(kind).probe(act(kind)), contexts.KINDS.get(kind).options)
            for kind in contexts.KINDS.names()}


def snoop_one_run(append: bool, kinds) -> dict[str, list[str]]:
    """Build one run and let a snooping defense of each of `kinds` search it while it runs; with
    append=False also search it from here, unsealed first (the search itself must find the truth)."""
    exp, search = build(append)
    found = {} if append else {"unsealed": search.run()}
    if append:  # the sanitizer's row order: set by its context, sealed away while it runs
        from bdexp.defenses.sanitize import sanitizer_context

        from bdexp.defenses.training_time import ORDER_TAG, _defender_rows

        sanitizer_context(exp, "probe", SanitizerOptions(), {})
        search.truth["the sanitizer's row order"] = [digest(exp.info.pop(ORDER_KEY))]
        _defender_rows(exp)
        search.truth["the training-time defense's row order"] = [digest(exp.info.pop(ORDER_TAG))]
        search.lengths.add(len(exp.train_set.poison))
    seen: dict[str, list[str]] = {}
    for kind, (fn, options) in snoopers(search, seen).items():
        if kind not in kinds:
            continue
        name = f"snoop_{kind}"
        DEFENSES.register(name, options=options, kind=kind)(fn)
        try:
            run_defense(exp, name, OmegaConf.create({"name": name, **contexts.KINDS.get(kind).probe_node}))
        finally:
            DEFENSES.unregister(name)
    return {**found, **{f"{kind} (append={append})": what for kind, what in seen.items()}}


def snoop_under_the_cli(tmp: str) -> dict[str, list[str]]:
    """The same search inside `bdexp` itself, where Hydra's frames and its HydraConfig hold the config
    too: the snoopers are registered here and selected through YAMLs on Hydra's search path."""
    import os
    from pathlib import Path

    from bdexp.cli import main as bdexp_main

    search = Search({"the poison flags": []}, set())  # carriers only: the truth arrays are the run's own
    seen: dict[str, list[str]] = {}
    names = []
    for kind, (fn, options) in snoopers(search, seen).items():
        if kind not in (contexts.Kind.pool_detector, contexts.Kind.sanitizer):  # the frames above are the same
            continue
        name = f"snoop_{kind}"
        DEFENSES.register(name, options=options, kind=kind)(fn)
        names.append(name)
        node = f"{name}:\n  name: {name}\n" + "".join(f"  {k}: {v}\n" for k, v in contexts.KINDS.get(kind).probe_node.items())
        (Path(tmp) / "defense").mkdir(parents=True, exist_ok=True)
        (Path(tmp) / "defense" / f"{name}.yaml").write_text(node)
    sys.argv = ["bdexp", *with_tiny("screening.sizes=[10]", "screening.reserve_per_class=8", "eval_batch_size=64",
                                    "sanitizer_reference_epochs=3", "cache.enabled=false", f"defense=[{','.join(names)}]"),
                f"hydra.run.dir={os.path.join(tmp, 'run')}", f"hydra.searchpath=[file://{tmp}]"]
    bdexp_main()
    return {f"{kind} (cli)": what for kind, what in seen.items()}


def main() -> None:
    found = snoop_one_run(False, contexts.KINDS.names())
    gc.collect()  # the first run is gone before the second is searched
    # rows appended: the row order is truth too
    found.update(snoop_one_run(True, [contexts.Kind.sanitizer, contexts.Kind.training_time]))
    gc.collect()
    found.update(snoop_under_the_cli(sys.argv[1]))
    print(json.dumps(found))


if __name__ == "__main__":
    main()
