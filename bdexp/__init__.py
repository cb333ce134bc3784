"""bdexp: a config-driven experiment runner for backdoor research on image classifiers.

From Python (bdexp/api.py): `bdexp.compose(overrides)` gives the CLI's config, `bdexp.run(...)` runs
one experiment and returns its Result, `bdexp.load(run)` and `bdexp.collect(sweep)` give the
DataFrame `bdexp-report` builds. Importing bdexp loads none of torch, pandas or Hydra."""

__version__ = "0.1.0"

from bdexp.api import Result, collect, compose, load, run  # noqa: E402  (cheap: imports inside)

__all__ = ["__version__", "compose", "run", "load", "collect", "Result"]
