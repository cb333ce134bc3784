"""`bdexp`: a thin Hydra entry point around pipeline.run, wrapped by jobs.py (skip a job that is
already complete, record one that fails, pin a sweep job to its GPU and CPU share)."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    # Imports live inside: process launchers (joblib, submitit) pickle this function by value,
    # so it must not capture module globals such as the rich console (it holds a lock).
    import logging
    import os
    from pathlib import Path

    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from bdexp import jobs, pipeline
    from bdexp.console import console
    from bdexp.errors import BdexpError

    log = logging.getLogger("bdexp.cli")
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    in_sweep = hc.mode == RunMode.MULTIRUN
    digest = jobs.config_hash(cfg)
    if jobs.completed(run_dir, digest):
        log.info("skipped: %s already holds complete results for this config (hash %s)", run_dir, digest)
        return
    n_jobs = hc.launcher.get("n_jobs") if in_sweep else None
    if n_jobs is not None and int(n_jobs) < 0:  # joblib: -1 = all cores
        n_jobs = os.cpu_count()
    threads = jobs.job_threads(cfg.get("threads"), int(n_jobs) if n_jobs else None)
    if threads is not None:
        torch.set_num_threads(threads)
    with open_dict(cfg):
        cfg.device = jobs.pinned_device(str(cfg.device), hc.job.num if in_sweep else None)
    try:
        pipeline.run(cfg, run_dir, config_hash=digest)
    except BdexpError as err:
        jobs.write_failure(run_dir, cfg, digest, err)
        console.print(f"[bold red]bdexp error:[/] {err}")
        if not in_sweep:
            sys.exit(2)
    except Exception as err:  # a bug or an environment failure: keep the record, then fail loudly
        path = jobs.write_failure(run_dir, cfg, digest, err)
        log.exception("job failed; error record in %s", path)
        if not in_sweep:
            raise


def main() -> None:
    _main()
