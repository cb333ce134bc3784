"""`train=mlmmdr` / `train=slmmdr`: backdoor training with multi-level MMD regularization
(ML-MMDR Algorithm 1, eq. 6).

Per mini-batch: X1 = benign rows, X2 = malicious (poisoned) rows, X3 = benign rows labelled t.
    L = CE_mean(X1) + CE_mean(X2) + λ · (1/|I|) Σ_{i∈I} MMD²(Z_i(X2), Z_i(X3))   (Alg. 1, lines 9-12)
with all features from one forward pass. λ = 0 is the paper's regular backdoor training (RBT).
The groups are selected with masks (weighted means), not boolean indexing, so a step never waits
for the device: an empty CE group contributes 0, and a level's MMD term is 0 unless both X2 and
X3 have at least 2 rows (our choice: a level term is 0 when a group is empty).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bdexp.analysis.kernels import Kernel, mmd2_masked
from bdexp.attacks import has_backdoor
from bdexp.data.loader import Batch
from bdexp.errors import ConfigError
from bdexp.models.base import Level
from bdexp.options import option
from bdexp.training.base import REGIMES, Regime, Schedule

MIN_GROUP = 2  # rows each of X2 and X3 need for a level's MMD term to count


def _enough(in_x: torch.Tensor, in_y: torch.Tensor) -> torch.Tensor:
    """1.0 when X2 and X3 both have at least MIN_GROUP rows (the MMD term counts), else 0.0."""
    return ((in_x.sum() >= MIN_GROUP) & (in_y.sum() >= MIN_GROUP)).float()


def _masked_ce(ce: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-sample losses `ce` over `mask`; 0 when the mask is empty (Alg. 1, lines 9-10)."""
    w = mask.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


@dataclass(frozen=True)
class MLMMDROptions(Schedule):
    """ML-MMDR's loss (Alg. 1, eq. 6) on the shared schedule."""

    mmd_weight: float = option(0.3, lo=0)  # λ ∈ {0, 0.1, 0.2, 0.3}; 0 = regular backdoor training (RBT), §5
    kernel: Kernel = "gmk_adaptive"  # the ML-MMDR authors' code; ablation kernels of ML-MMDR Table 3
    levels: tuple[Level, ...] = option(["s1", "s2", "s3"], nonempty=True)  # I = {s1, s2, s3}: multi-level (ML-MMDR §5)


@dataclass(frozen=True)
class SLMMDROptions(MLMMDROptions):
    """SL-MMDR: the MMD term on the last hidden stage only (ML-MMDR §5)."""

    levels: tuple[Level, ...] = option(["s3"], nonempty=True)


class MMDRegime(Regime):
    """Cross-entropy on benign and malicious rows plus λ · mean MMD² over feature levels."""

    Options = MLMMDROptions
    opts: MLMMDROptions
    reads_poison_flags = True  # X1/X2 are split by batch.poison (Alg. 1 l. 9-10): the attacker trains

    @classmethod
    def cache_identity(cls, cfg) -> dict:
        """At λ = 0 ML- and SL-MMDR are the same RBT loss: levels and kernel cannot matter, so
        both regimes share one cached model."""
        ident = super().cache_identity(cfg)
        if cls.Options.parse(cfg, "train").mmd_weight == 0.0:
            for key in ("name", "levels", "kernel"):
                ident.pop(key, None)
            ident["name"] = "rbt"
        return ident

    @classmethod
    def collapse_hint(cls, cfg) -> str:
        """The MMD term is zero when all features coincide, so too large a λ collapses training."""
        weight = cls.Options.parse(cfg, "train").mmd_weight
        return f" (train.mmd_weight={weight}: try a smaller λ)" if weight > 0 else ""

    def __init__(self, cfg, attack=None):
        super().__init__(cfg, attack=attack)
        name = type(self).__name__.lower()  # mlmmdr | slmmdr
        if not has_backdoor(attack):
            raise ConfigError(
                f"train={name} regularizes malicious vs. benign target-class features (ML-MMDR Alg. 1), "
                "so it needs a poisoning attack; attack=none has none. Use train=standard for a clean model"
            )
        if attack.mode == "all_to_all":
            raise ConfigError(
                f"train={name} needs one backdoor target class (attack.mode=all_to_one or one_to_one); "
                f"got attack.mode={attack.mode}. Use another mode or train=standard"
            )
        self.target = int(attack.target)
        self.levels: tuple[str, ...] = self.opts.levels
        self.weight = self.opts.mmd_weight
        self.kernel = self.opts.kernel
        self._sums: torch.Tensor | None = None  # per-epoch diagnostics, see epoch_stats

    def begin_epoch(self) -> None:
        self._sums = None

    def epoch_stats(self) -> dict[str, float]:
        """What the MMD term saw this epoch, per batch on average: |X2| (malicious rows), |X3|
        (benign target-class rows), the fraction of batches whose term counts (both >= MIN_GROUP)
        and the term's mean value. The estimate rests on these few rows: at batch 128 and ε = 10 %
        about 13 malicious and 12 benign target-class rows (ML-MMDR trains with batch 256)."""
        if self._sums is None:
            return {}
        batches, n_x, n_y, active, term = self._sums.tolist()
        return {"mmd_malicious_per_batch": n_x / batches, "mmd_target_per_batch": n_y / batches,
                "mmd_active_batches": active / batches, "mmd_term": term / batches}

    def _count(self, in_x: torch.Tensor, in_y: torch.Tensor, term: torch.Tensor) -> None:
        """Accumulate the epoch's diagnostics on the device (no host synchronisation per step);
        counted at λ = 0 too, so RBT's history shows the same batch make-up."""
        row = torch.stack([torch.ones((), device=in_x.device), in_x.sum().float(), in_y.sum().float(),
                           _enough(in_x, in_y), term.detach().float()])
        self._sums = row if self._sums is None else self._sums + row

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = model(batch.x, features=True)
        malicious = batch.poison  # X2
        benign = ~malicious  # X1
        benign_target = benign & (batch.y == self.target)  # X3
        ce = nn.functional.cross_entropy(logits.float(), batch.y, reduction="none")
        loss = _masked_ce(ce, benign) + _masked_ce(ce, malicious)
        term = torch.zeros((), device=ce.device)
        if self.weight > 0.0:
            term = self.mmd_term(feats, malicious, benign_target)
            loss = loss + self.weight * term
        self._count(malicious, benign_target, term)
        return loss, logits

    def mmd_term(self, feats: dict[str, torch.Tensor], in_x: torch.Tensor, in_y: torch.Tensor) -> torch.Tensor:
        """(1/|I|) Σ_{i∈I} MMD²(Z_i(X2), Z_i(X3)) (Alg. 1, line 11); 0 when a group has < 2 rows."""
        enough = _enough(in_x, in_y)
        total = sum(mmd2_masked(feats[lv], in_x, in_y, self.kernel) for lv in self.levels)
        return enough * total / len(self.levels)


@REGIMES.register("mlmmdr")
class MLMMDR(MMDRegime):
    """ML-MMDR: I = {s1, s2, s3} (ML-MMDR §5)."""


@REGIMES.register("slmmdr")
class SLMMDR(MMDRegime):
    """SL-MMDR: I = {s3}, the last hidden stage only (ML-MMDR §5)."""

    Options = SLMMDROptions
