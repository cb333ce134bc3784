"""Sweeps through a real SLURM scheduler (hydra/launcher=slurm, hydra_plugins/bdexp_launcher): jobs complete and
the report reads them, a failing job is recorded while the others finish, a requeued (preempted)
job and a timed-out one resume from their checkpoints, max_num_timeout is honoured, two jobs that
need one model train it once, and a re-run submits only what failed.

They need `sbatch` and a cluster that answers: `scripts/local_slurm.sh up` starts a single-node
one (.ci/run does). Where `sbatch` is absent they are skipped, saying so; where it is present but
the cluster does not answer, they fail.

SLURM holds a requeued job for 120 s before it may start again (its EligibleTime); the tests release
such holds at once (`scontrol update StartTime=now`), as an operator can, to keep them short.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

SBATCH = shutil.which("sbatch")
pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(SBATCH is None, reason="no SLURM on this machine (sbatch is not on PATH); "
                                                        "scripts/local_slurm.sh up starts a single-node cluster")]

TINY = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=96", "model.width=0.5", "train.epochs=3",
        "train.batch_size=32", "train.lr=0.1", "defense=[]", "analysis=[]", "progress=false", "device=cpu", "threads=1"]
# about 2 s per epoch on one core: long enough to interrupt mid-training
SLOW = ["dataset.train_size=8192", "train.batch_size=64"]


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def partition() -> str:
    try:
        names = sh("sinfo", "-h", "-o", "%P").split()
    except (subprocess.CalledProcessError, OSError) as err:
        pytest.fail(f"sbatch is here but the cluster does not answer (sinfo: {err}); scripts/local_slurm.sh up")
    assert names, "sinfo lists no partition"
    return os.environ.get("BDEXP_TEST_SLURM_PARTITION", names[0].rstrip("*"))


class Sweep:
    """One `bdexp -m hydra/launcher=slurm ...` in a subprocess; the model cache is set by the
    launcher's `setup` line (the controller's own BDEXP_CACHE_DIR points elsewhere)."""

    def __init__(self, tmp_path: Path, partition: str, name: str, *overrides: str, cache: str = "cache"):
        self.dir, self.cache, self.name = tmp_path / name, tmp_path / cache, f"bdexp-test-{name}"
        self.cmd = [sys.executable, "-m", "bdexp", "-m", "hydra/launcher=slurm",
                    f"hydra.launcher.partition={partition}", "hydra.launcher.gpus_per_node=0",
                    "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10",
                    f"hydra.launcher.setup=[\"export BDEXP_CACHE_DIR={self.cache}\"]",
                    f"hydra.launcher.name={self.name}", f"hydra.sweep.dir={self.dir}", *TINY, *overrides]
        self.env = {**os.environ, "BDEXP_CACHE_DIR": str(tmp_path / "controller-cache")}

    def start(self) -> subprocess.Popen:
        return subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run(self, timeout: float = 300) -> tuple[int, str]:
        proc = self.start()
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out

    def results(self, job: int) -> dict:
        return json.loads((self.dir / str(job) / "results.json").read_text())

    def job_ids(self) -> list[str]:
        """The SLURM ids (an array's `<job>_<task>`, or a single job's id) of every job this sweep
        submitted so far: the submitit folders that hold a job's log."""
        return sorted(p.name for p in (self.dir / ".submitit").iterdir() if p.is_dir() and any(p.glob("*_log.out")))


# A requeued job released at once can start while its previous step is still being torn down
# (srun waits up to 12 s for it) and then fails at once (a CI run: requeued attempt FAILED, exit 1,
# in the second it started); release it only after it has waited this long.
RELEASE_AFTER_S = 15.0


def release_holds(name: str, stop: threading.Event) -> None:
    """Make the requeued jobs of `name` eligible RELEASE_AFTER_S after they are requeued (SLURM holds them 120 s)."""
    seen: dict[str, float] = {}
    while not stop.wait(1.0):
        out = subprocess.run(["squeue", "-h", "-n", name, "-t", "PD", "-o", "%i %r"], capture_output=True, text=True)
        held = {job: reason.strip() for job, _, reason in (line.partition(" ") for line in out.stdout.splitlines())}
        for job in [j for j in seen if held.get(j) != "BeginTime"]:
            del seen[job]  # started again (or gone): a later requeue waits its own delay
        for job, reason in held.items():
            if reason != "BeginTime":
                continue
            first = seen.setdefault(job, time.time())
            if time.time() - first >= RELEASE_AFTER_S:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)


def holds_released(name: str):
    stop = threading.Event()
    thread = threading.Thread(target=release_holds, args=(name, stop), daemon=True)
    thread.start()
    return stop


def sacct(job: str, fields: str, *flags: str, settle_s: float = 60) -> list[dict]:
    """sacct's rows for `job` once none is still running (a job's result file is written just
    before SLURM sees its step end)."""
    deadline = time.time() + settle_s
    while True:
        rows = sh("sacct", "-n", "-P", *flags, "-j", job, "-o", f"{fields},State").splitlines()
        rows = [dict(zip([*fields.split(","), "_state"], r.split("|"))) for r in rows if r]
        if not any(r["_state"] in ("RUNNING", "COMPLETING", "PENDING") for r in rows) or time.time() > deadline:
            return [{k: v for k, v in r.items() if k != "_state"} for r in rows]
        time.sleep(1)


def final_weights(cache: Path, results: dict) -> dict[str, torch.Tensor]:
    blob = torch.load(cache / "models" / f"{results['run']['model_key']}.pt", weights_only=True, map_location="cpu")
    return blob["state_dict"] if "state_dict" in blob else blob


def test_a_sweep_runs_through_sbatch_with_the_site_keys_and_the_report_reads_it(tmp_path, partition):
    sweep = Sweep(tmp_path, partition, "basic", "attack=patched,blended", "hydra.launcher.account=bdexp",
                  "hydra.launcher.qos=normal", "hydra.launcher.constraint=bdexp", "hydra.launcher.array_parallelism=1",
                  "hydra.launcher.timeout_min=5", "+hydra.launcher.additional_parameters.comment=bdexp-ci")
    rc, out = sweep.run()
    assert rc == 0, out[-3000:]
    assert "2 complete" in out and "Bypassing sacct" not in out  # accounting answers submitit's polls
    assert all(sweep.results(j)["status"] == "complete" for j in (0, 1))
    # `setup` ran in each job: the models went to its cache, not the controller's
    assert len(list((sweep.cache / "models").glob("*.pt"))) == 2
    assert not (tmp_path / "controller-cache" / "models").exists()
    array = sweep.job_ids()[0].split("_")[0]
    rows = sacct(array, "JobID,State,Account,QOS,AllocCPUS,ReqMem,Comment,Constraints,TimelimitRaw,Start,End", "-X")
    assert [r["State"] for r in rows] == ["COMPLETED", "COMPLETED"], rows
    for r in rows:
        assert (r["Account"], r["QOS"], r["AllocCPUS"], r["Comment"], r["Constraints"], r["TimelimitRaw"]) == \
            ("bdexp", "normal", "1", "bdexp-ci", "bdexp", "5"), r
        assert r["ReqMem"] in ("1G", "1024M"), r
    assert rows[1]["Start"] >= rows[0]["End"]  # array_parallelism=1: one after the other
    report = subprocess.run([sys.executable, "-m", "bdexp.report.cli", str(sweep.dir)], capture_output=True, text=True,
                            cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "patched" in report.stdout and "blended" in report.stdout


def test_a_failing_job_is_recorded_and_a_rerun_submits_only_it(tmp_path, partition):
    sweep = Sweep(tmp_path, partition, "fail", "train.lr=0.1,-1")
    rc, out = sweep.run()
    assert rc == 1, out[-3000:]
    assert "1 complete, 1 failed" in out
    assert sweep.results(0)["status"] == "complete"
    failed = sweep.results(1)
    assert failed["status"] == "failed" and "train.lr=-1" in failed["run"]["error"]["message"]
    first = set(sweep.job_ids())
    assert len(first) == 2
    rc, out = sweep.run()  # the same command again
    assert rc == 1 and "not submitted" in out, out[-3000:]
    assert len(set(sweep.job_ids()) - first) == 1  # only the failed job went to SLURM again
    assert sweep.results(0)["status"] == "complete"


def test_a_requeued_job_resumes_from_its_checkpoint_to_the_weights_of_an_uninterrupted_run(tmp_path, partition):
    settings = [*SLOW, "train.epochs=8"]
    sweep = Sweep(tmp_path, partition, "requeue", *settings)
    proc = sweep.start()
    stop = holds_released(sweep.name)
    try:
        deadline = time.time() + 120
        while not list((sweep.cache / "checkpoints").glob("*.pt")):  # the first epoch's checkpoint
            assert time.time() < deadline and proc.poll() is None, "no checkpoint appeared"
            time.sleep(0.5)
        job = sh("squeue", "-h", "-n", sweep.name, "-o", "%i").split()[0]
        sh("scontrol", "requeue", job)  # what preemption does to a job
        out, _ = proc.communicate(timeout=300)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert sweep.results(0)["status"] == "complete"
    log = (sweep.dir / "0" / "cli.log").read_text()
    assert "resumed from" in log, log[-2000:]
    # the same config, never interrupted, outside SLURM
    ref_cache = tmp_path / "ref-cache"
    ref = subprocess.run([sys.executable, "-m", "bdexp", *TINY, *settings, f"hydra.run.dir={tmp_path / 'ref'}"],
                         env={**os.environ, "BDEXP_CACHE_DIR": str(ref_cache)}, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_results = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert ref_results["run"]["model_key"] == sweep.results(0)["run"]["model_key"]
    got, want = final_weights(sweep.cache, sweep.results(0)), final_weights(ref_cache, ref_results)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_timeouts_requeue_and_resume_until_max_num_timeout_is_used_up(tmp_path, partition):
    """timeout_min=1: SIGUSR2 arrives before the limit and submitit requeues the job while
    max_num_timeout allows. Jobs that never finish in time: with max_num_timeout=1 the job is
    requeued once, resumes from its checkpoint, and stops at its second timeout; with 0 it stops at
    the first. (That a resumed job ends with the weights of an uninterrupted run is the requeue
    test's.) slurmctld sends the signal at its first 30-second check past limit − signal_delay_s −
    30 s; with signal_delay_s=5 that is 25-55 s into the job, after its first epoch checkpoint
    (signal_delay_s=30 sent it anywhere in the first 30 s, sometimes before any checkpoint).
    The two sweeps train the same model (launcher keys do not identify a run), so each has its own
    cache: with one, a job would wait on the other's model lock instead of training."""
    endless = [*SLOW, "train.epochs=1000", "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=5"]
    once = Sweep(tmp_path, partition, "timeout1", *endless, "hydra.launcher.max_num_timeout=1", cache="cache1")
    never = Sweep(tmp_path, partition, "timeout0", *endless, "hydra.launcher.max_num_timeout=0", cache="cache0")
    procs = [once.start(), never.start()]
    stops = [holds_released(once.name), holds_released(never.name)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for s in stops:
            s.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
    for sweep, proc, out, attempts in ((once, procs[0], outs[0], 2), (never, procs[1], outs[1], 1)):
        assert proc.returncode == 1, out[-3000:]
        failed = sweep.results(0)
        assert failed["status"] == "failed" and "timed-out too many times" in failed["run"]["error"]["message"]
        log = (sweep.dir / "0" / "cli.log").read_text()
        assert ("resumed from" in log) == (attempts == 2), log[-2000:]
        runs = sacct(sweep.job_ids()[0], "JobID,State", "-X", "-D")
        assert len(runs) == attempts, runs


def test_two_jobs_that_need_one_model_train_it_once(tmp_path, partition):
    """Two jobs differing only in a defense setting share the model: the file lock on its key
    works across SLURM jobs (one trains, the other waits and loads it)."""
    sweep = Sweep(tmp_path, partition, "shared", *SLOW, "train.epochs=4", "defense=[ss]", "defense.ss.removal_factor=1.0,1.5")
    rc, out = sweep.run()
    assert rc == 0, out[-3000:]
    runs = [sweep.results(j)["run"] for j in (0, 1)]
    assert runs[0]["model_key"] == runs[1]["model_key"]
    assert sorted(r["model_cache"] for r in runs) == ["hit", "miss"], runs
    assert len(list((sweep.cache / "models").glob("*.pt"))) == 1


def test_a_cancelled_job_is_recorded_and_a_rerun_resumes_it(tmp_path, partition):
    """scancel (SIGTERM, then SIGKILL) leaves submitit without a result: the launcher records the
    job as failed with SLURM's state, keeping what its interrupted record held, the other job
    finishes, and the same command resubmits only the cancelled one, which resumes."""
    sweep = Sweep(tmp_path, partition, "cancel", *SLOW, "train.epochs=20", "attack=patched,blended")
    proc = sweep.start()
    try:
        deadline = time.time() + 120
        while len(list((sweep.cache / "checkpoints").glob("*.pt"))) < 2:  # both jobs are training
            assert time.time() < deadline and proc.poll() is None, "no checkpoints appeared"
            time.sleep(0.5)
        first = sorted(sh("squeue", "-h", "-n", sweep.name, "-o", "%i").split())[0]
        sh("scancel", first)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "1 complete, 1 failed" in out, out[-3000:]
    failed = sweep.results(0)
    assert failed["status"] == "failed" and "ended CANCELLED" in failed["run"]["error"]["message"]
    assert failed["run"]["interrupted"]["signal"] == "SIGTERM"  # the job's own record of where it stopped
    assert sweep.results(1)["status"] == "complete"
    rc, out = sweep.run()
    assert rc == 0 and "#1 : complete in" in out and "1 complete, 1 skipped" in out, out[-3000:]
    assert "resumed from" in (sweep.dir / "0" / "cli.log").read_text()
