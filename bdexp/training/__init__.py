"""Training regimes and the shared loop."""
from bdexp.registry import import_submodules
from bdexp.training.base import REGIMES, Regime
from bdexp.training.loop import train_model

import_submodules(__name__, __path__)

__all__ = ["REGIMES", "Regime", "train_model"]
