"""One sweep job around pipeline.run: skip it when it is already done, record it when it fails,
and give it its own GPU and CPU share (issue 7: "nothing lost").

- **Skip**: a job whose run directory holds a complete results.json with the same config hash is
  not run again, so `bdexp -m ... hydra.sweep.dir=DIR` over an existing sweep only runs what is
  missing or failed (or what changed).
- **Error record**: an exception in a job writes results.json with status "failed", the error
  type, message and traceback, and the run's identity, so `bdexp-report` lists it; in a sweep the
  other jobs go on and the sweep callback (callbacks.py) reports the failure at the end.
- **Pinning**: with `device=auto` and several visible GPUs, job k of a sweep runs on GPU
  k mod #GPUs (joblib/local launchers on one node; under SLURM each job sees only its own GPU).
  With joblib's n_jobs > 1 each job gets cpu_count / n_jobs torch threads, so jobs on a CPU node
  do not oversubscribe the cores (concurrent OpenMP pools spin and slow each other down).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import bdexp
from bdexp.results import HASH_EXCLUDED, RESULTS_FILE, read_status, run_identity, write_results

log = logging.getLogger(__name__)


def config_hash(cfg: DictConfig) -> str:
    """Hash of the resolved config minus HASH_EXCLUDED (and the bdexp version)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in HASH_EXCLUDED:
        plain.pop(key, None)
    plain.pop("hydra", None)
    blob = json.dumps({"cfg": plain, "version": bdexp.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def completed(run_dir: Path, digest: str) -> bool:
    """True if run_dir/results.json is complete and was computed from the same config."""
    status, payload = read_status(Path(run_dir) / RESULTS_FILE)
    return status == "complete" and payload.get("run", {}).get("config_hash") == digest


def write_failure(run_dir: Path, cfg: DictConfig, digest: str, err: BaseException) -> Path:
    run = {**run_identity(cfg), "config_hash": digest,
           "error": {"type": type(err).__name__, "message": str(err),
                     "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))}}
    try:
        run["config"] = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an unresolvable interpolation may be the error itself
        run["config"] = OmegaConf.to_container(cfg, resolve=False)
    return write_results(run_dir, run, [], status="failed")


def pinned_device(name: str, job_num: int | None) -> str:
    """`device=auto` in sweep job k with several visible GPUs -> "cuda:<k mod n>"."""
    if name != "auto" or job_num is None or not torch.cuda.is_available():
        return name
    count = torch.cuda.device_count()
    return f"cuda:{job_num % count}" if count > 1 else name


def job_threads(threads, parallel_jobs: int | None) -> int | None:
    """Torch intra-op threads for one job: `threads` if set, else cpu_count / parallel jobs."""
    if threads is not None:
        return max(1, int(threads))
    if parallel_jobs is None or parallel_jobs <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // parallel_jobs)
