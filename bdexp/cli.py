"""`bdexp`: a thin Hydra entry point around pipeline.run."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    # Imports live inside: process launchers (joblib, submitit) pickle this function by value,
    # so it must not capture module globals such as the rich console (it holds a lock).
    from hydra.core.hydra_config import HydraConfig

    from bdexp import pipeline
    from bdexp.console import console
    from bdexp.errors import BdexpError

    try:
        pipeline.run(cfg, HydraConfig.get().runtime.output_dir)
    except BdexpError as err:
        console.print(f"[bold red]bdexp error:[/] {err}")
        sys.exit(2)


def main() -> None:
    _main()
