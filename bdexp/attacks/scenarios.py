"""ISPL's (source, target) scenarios, shared by the `dlbd`, `watermark` and `clbd` attacks.

ISPL (App. B) reuses the eight CIFAR-10 pairs of Tran et al. (2018, Spectral Signatures):
(airplane, bird), (automobile, cat), (bird, dog), (cat, dog), (cat, horse), (horse, deer),
(ship, frog), (truck, bird), kept here as CIFAR-10 class ids in that order; the key
`scenario` (0..7) picks one. No attack is registered in this module: it only holds the table,
the options every scenario attack declares (`ScenarioOptions`), the resolution of `scenario` into
`source`/`target`, and a base class that applies it before the common validation of
``Attack.__init__`` runs.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from bdexp.attacks.base import Attack, AttackOptions, Budget, Mode
from bdexp.errors import ConfigError
from bdexp.options import option
from bdexp.seeding import derive_seed

# The eight (source, target) class pairs of ISPL App. B (Tran et al.'s): scenario k -> SCENARIOS[k].
# bdexp's own fixed order; App. B lists them as (0,2) (1,3) (2,5) (3,5) (3,7) (7,4) (8,6) (9,2).
SCENARIOS: tuple[tuple[int, int], ...] = ((0, 2), (1, 3), (3, 5), (7, 4), (2, 5), (8, 6), (9, 2), (3, 7))
# The pairs index CIFAR-10/GTSRB class ids, so they need at least this many classes.
MIN_CLASSES = 1 + max(max(pair) for pair in SCENARIOS)


@dataclass(frozen=True)
class ScenarioOptions(AttackOptions):
    """What every scenario attack declares (conf/attack/_scenario.yaml): ISPL's main setting is
    1-to-1 (ISPL §4.2), with `target`/`source` derived from the scenario (null), and ISPL's poison
    budget: ε is a fraction of a class (ISPL App. B; bdexp.attacks.base explains the rule per mode)."""

    scenario: int | None = option(0, lo=0, hi=len(SCENARIOS) - 1)
    target: int | None = option(None, lo=0)
    mode: Mode = "one_to_one"
    budget: Budget = "class"


def resolve_scenario(opts: ScenarioOptions, num_classes: int, attack: str) -> ScenarioOptions:
    """Fill `target` (and `source` for one_to_one) from `scenario`; raise on a conflict.

    - scenario null: the user's `target`/`source`/`mode` are used as given (target required);
    - scenario k: target := SCENARIOS[k][1]; for mode one_to_one also source := SCENARIOS[k][0].
      For all_to_one / all_to_all only the pair's target is used (ISPL Tables 3-4), so `source`
      must stay null there (the common validation says so).
    An explicit `target`/`source` equal to the derived one is accepted; a different one is an error.
    """
    k = opts.scenario
    if k is None:
        if opts.target is None:
            raise ConfigError(
                f"attack {attack!r}: attack.scenario=null needs an explicit attack.target "
                f"(and attack.source for one_to_one); or set attack.scenario to 0..{len(SCENARIOS) - 1}"
            )
        return opts
    if num_classes < MIN_CLASSES:
        raise ConfigError(
            f"attack.scenario={k} indexes class ids of ISPL's 10-class pairs {list(SCENARIOS)}, but the "
            f"dataset has {num_classes} classes (need >= {MIN_CLASSES}); set attack.scenario=null and "
            "give attack.target (and attack.source) explicitly"
        )
    src, tgt = SCENARIOS[k]
    if opts.target is not None and opts.target != tgt:
        raise ConfigError(
            f"attack.scenario={k} sets target={tgt} but attack.target={opts.target!r}: the keys conflict; "
            "set attack.target=null (derived from the scenario) or attack.scenario=null"
        )
    if opts.mode != "one_to_one":
        return opts.replace(target=tgt)
    if opts.source is not None and opts.source != src:
        raise ConfigError(
            f"attack.scenario={k} sets source={src} but attack.source={opts.source!r}: the keys conflict; "
            "set attack.source=null (derived from the scenario) or attack.scenario=null"
        )
    return opts.replace(target=tgt, source=src)


class ScenarioAttack(Attack):
    """An Attack whose `target`/`source` may come from ISPL's `scenario` key (not registered)."""

    Options = ScenarioOptions

    def resolve(self, opts: ScenarioOptions) -> ScenarioOptions:  # type: ignore[override]
        # Before the common validation, which needs an int target (and source for 1-to-1).
        return resolve_scenario(opts, self.num_classes, self.name)

    @property
    def scenario(self) -> int | None:
        return self.opts.scenario

    def scenario_generator(self, generator: torch.Generator) -> torch.Generator:
        """A generator determined by (run seed, scenario): mixes the build generator with the index.

        Without a scenario the explicit (source, target) pair is mixed in instead.
        """
        base = int(torch.randint(0, 2**62, (1,), generator=generator))
        tag = f"scenario/{self.scenario}" if self.scenario is not None else f"pair/{self.source}/{self.target}"
        return torch.Generator().manual_seed(derive_seed(base, tag))
