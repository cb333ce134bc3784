"""`train=standard`: plain cross-entropy (schedule in conf/train/standard.yaml)."""
from bdexp.training.base import REGIMES, Regime

REGIMES.register("standard")(Regime)
