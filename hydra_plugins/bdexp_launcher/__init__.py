"""`hydra/launcher=slurm`: submitit's SLURM launcher (installed as `hydra_plugins.bdexp_launcher`: Hydra
loads launchers only from its plugin namespace) with two things a sweep on a real cluster needs.

1. **Only what is missing is submitted.** Before submitting, each job's config is composed and
   its run directory checked: a job whose `results.json` is complete for the same config hash
   (jobs.config_hash) is not submitted at all; its record stays and the sweep summary counts it
   as skipped. Re-running a sweep with `hydra.sweep.dir=<that sweep>` therefore resubmits only
   the failed, interrupted or changed jobs (the job itself checks again, for other launchers).
2. **A job that ends without a result is a failed job, not a crashed sweep.** A job cancelled or
   killed by SLURM, timed out more often than `max_num_timeout` allows, or lost with its node
   leaves no result for submitit to return, and submitit raises. The launcher catches that per
   job, writes the job's `results.json` with status "failed", SLURM's final state and what
   submitit said (unless the job wrote complete results before it died), and goes on, so every
   other job's results and the sweep summary (exit status 1) survive.

Preemption and time limits are SLURM's and submitit's: a job requeued by SLURM (`scontrol
requeue`, preemption) runs again under the same job id, and a job near its time limit gets
SIGUSR2 (`signal_delay_s` before it) and requeues itself up to `max_num_timeout` times; either
way bdexp's training resumes from its last epoch checkpoint (training/loop.py) and finished
defenses come from the run's partial records (results.PartialRecords).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


class LostJob(RuntimeError):
    """A SLURM job that ended without a result (its record's error type)."""


class SlurmLauncher(SubmititSlurmLauncher):
    def job_config(self, overrides: Sequence[str], idx: int) -> tuple[DictConfig, DictConfig, Path]:
        """(the config sweep job `idx` will run, without the `hydra` node; that node; its run directory)."""
        full = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(full.hydra.job):
            full.hydra.job.num = idx
        run_dir = Path(str(full.hydra.sweep.dir)) / str(full.hydra.sweep.subdir)
        return OmegaConf.masked_copy(full, [k for k in full if k != "hydra"]), full.hydra, run_dir

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from bdexp import jobs, objective

        assert self.config is not None and self.hydra_context is not None
        configs = [self.job_config(o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
        returns: dict[int, JobReturn] = {}
        todo = []
        for i, (overrides, (cfg, hydra, run_dir)) in enumerate(zip(job_overrides, configs)):
            if jobs.completed(run_dir, jobs.config_hash(cfg)):
                log.info("\t#%d : complete in %s; not submitted", initial_job_idx + i, run_dir)
                returns[i] = self._done(overrides, cfg, hydra, run_dir, objective.run_objective(cfg, run_dir))
            else:
                todo.append(i)
        if todo:
            submitted = self._submit([(initial_job_idx + i, job_overrides[i]) for i in todo])
            for i, job in zip(todo, submitted):
                returns[i] = self._collect(job, job_overrides[i], *configs[i])
        return [returns[i] for i in range(len(job_overrides))]

    def _submit(self, numbered: list[tuple[int, Sequence[str]]]) -> list[Any]:
        """Submit sweep jobs (number, overrides) as one SLURM array, as submitit's launcher does."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        params = dict(self.params)
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=params.pop("submitit_folder"),
                                         **{f"{self._EXECUTOR}_max_num_timeout": params.pop("max_num_timeout", 0)})
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in generic else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Submitit '%s' sweep output dir : %s", self._EXECUTOR, sweep_dir)
        args = []
        for idx, overrides in numbered:
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        return executor.map_array(self, *zip(*args))

    def _collect(self, job, overrides: Sequence[str], cfg: DictConfig, hydra: DictConfig, run_dir: Path) -> JobReturn:
        """The job's own return, or, when SLURM ended it without one, a failed record of its own."""
        from bdexp import jobs

        try:
            return job.results()[0]
        except Exception as err:  # submitit's UncompletedJobError / FailedJobError
            state = job.state
            first = (str(err).strip().splitlines() or [""])[0]
            lost = LostJob(f"SLURM job {job.job_id} ended {state} without a result ({first}); its log: "
                           f"{job.paths.stderr}")
            log.error("#%s: %s", hydra.job.num, lost)
            digest = jobs.config_hash(cfg)
            if not jobs.completed(run_dir, digest):
                self._record_lost(run_dir, overrides, cfg, digest, lost)
            return self._done(overrides, cfg, hydra, run_dir, None)

    @staticmethod
    def _record_lost(run_dir: Path, overrides: Sequence[str], cfg: DictConfig, digest: str, lost: LostJob) -> None:
        """The job's results.json becomes "failed" with SLURM's reason. A job that caught the signal
        first (scancel and preemption send SIGTERM) left an "interrupted" record with what it had
        computed: that stays in it, with the reason added."""
        from bdexp import jobs
        from bdexp.results import RESULTS_FILE, read_status, write_results

        hydra_dir = run_dir / ".hydra"
        hydra_dir.mkdir(parents=True, exist_ok=True)  # so the sweep summary finds the job
        if not (hydra_dir / "overrides.yaml").exists():
            (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
        status, payload = read_status(run_dir / RESULTS_FILE)
        if status == "interrupted":
            run = {**payload.get("run", {}), "error": {"type": type(lost).__name__, "message": str(lost)}}
            write_results(run_dir, run, payload.get("metrics", []), status="failed")
        else:
            jobs.write_failure(run_dir, cfg, digest, lost)

    @staticmethod
    def _done(overrides: Sequence[str], cfg: DictConfig, hydra: DictConfig, run_dir: Path, value: Any) -> JobReturn:
        """A job the sweep goes on from: its record says how it ended (as a job that fails records
        its error and returns, jobs.py)."""
        return JobReturn(overrides=list(overrides), cfg=cfg, hydra_cfg=OmegaConf.create({"hydra": hydra}),
                         working_dir=str(run_dir), task_name=str(hydra.job.name), status=JobStatus.COMPLETED,
                         _return_value=value)
