"""`train=standard`: plain cross-entropy; its options are the shared `Schedule` (conf/train/_schedule.yaml)."""
from bdexp.training.base import REGIMES, Regime

REGIMES.register("standard")(Regime)
