"""A real one-node SLURM cluster for the tests (Debian's slurmctld + slurmd + munge, started as root).

``slurm_cluster`` (session fixture, used by tests/test_slurm.py):

* installs ``slurmctld slurmd slurm-client munge`` with ``apt-get install --no-install-recommends`` when
  they are absent (one ``apt-get update``; a ``policy-rc.d`` stops the packages from starting their own
  daemons). It skips, saying why, only where apt cannot reach its registry (or this is not root);
* starts munged (``runuser -u munge`` after creating /run/munge) unless one already answers, then
  ``slurmctld -D`` and ``slurmd -D`` as root with a generated slurm.conf in a temporary folder;
* waits for the node to be idle, and at the end stops every daemon it started, by recorded PID.

The slurm.conf is the measured one of issue 13 (bookworm, SLURM 22.05): no accounting (job states via
``scontrol show job``), ``kill_invalid_depend`` (an ``afterok`` on a failed job is cancelled rather than
pending forever), ``MinJobAge=600`` (records stay to be read), ``batch_sched_delay=0``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import types
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
TOOLS = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "munged"]

SLURM_CONF = """\
ClusterName=sacrumtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
DependencyParameters=kill_invalid_depend
MinJobAge=600
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _which_missing() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]


def install_packages() -> None:
    """apt-get install the SLURM packages when absent; pytest.skip only when apt cannot reach its registry."""
    if not _which_missing():
        return
    if os.geteuid() != 0:
        pytest.skip(f"SLURM tools {' '.join(_which_missing())} absent and not root: cannot apt-get install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    upd = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
    if upd.returncode != 0 or "Err:" in upd.stdout and "Hit:" not in upd.stdout and "Get:" not in upd.stdout:
        pytest.skip(f"apt cannot reach its registry (apt-get update: {(upd.stdout + upd.stderr).strip()[-300:]})")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:   # invoke-rc.d asks it: 101 = do not start the package's daemons
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        inst = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
                              env=env, capture_output=True, text=True)
    finally:
        if made_policy:
            policy.unlink()
    if inst.returncode != 0:
        if "Could not resolve" in inst.stdout + inst.stderr or "Failed to fetch" in inst.stdout + inst.stderr:
            pytest.skip(f"apt cannot reach its registry: {(inst.stdout + inst.stderr).strip()[-300:]}")
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{inst.stdout[-2000:]}{inst.stderr[-2000:]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_munge() -> int | None:
    """Start munged as user munge; its PID, or None when a munged already answers (not ours to stop)."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return None
    run = Path("/run/munge")
    run.mkdir(parents=True, exist_ok=True)
    shutil.chown(run, "munge", "munge")
    run.chmod(0o755)
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
    pidfile = run / "munged.pid"
    pidfile.unlink(missing_ok=True)
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)   # daemonizes, writes its pid file
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            return int(pidfile.read_text().strip())
        time.sleep(0.1)
    raise RuntimeError("munged did not write /run/munge/munged.pid")


def _stop(pid: int, timeout: float = 5) -> None:
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while time.monotonic() < end and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    start = time.monotonic()
    install_packages()
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(d=d, cpus=os.cpu_count() or 2))
    env = dict(os.environ, SLURM_CONF=str(conf))
    started: list[tuple[str, int, subprocess.Popen | None]] = []
    try:
        munged = start_munge()
        if munged is not None:
            started.append(("munged", munged, None))
        for daemon in (["slurmctld", "-D", "-c", "-f", str(conf)], ["slurmd", "-D", "-f", str(conf)]):
            proc = subprocess.Popen(daemon, env=env, stdout=open(d / f"{daemon[0]}.out", "w"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
            started.append((daemon[0], proc.pid, proc))
            time.sleep(0.5)
        state = ""
        for _ in range(120):
            for name, pid, proc in started:
                if proc is not None and proc.poll() is not None:
                    logs = [d / f"{name}.out", d / f"{name}.log"]
                    raise RuntimeError(f"{name} exited ({proc.returncode}):\n"
                                       + "".join(p.read_text()[-1500:] for p in logs if p.exists()))
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
            state = out.stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"node not idle after 60 s (sinfo: {state!r}); logs in {d}")
        yield types.SimpleNamespace(env=env, dir=d, conf=conf, start_s=time.monotonic() - start)
    finally:
        if any(name == "slurmctld" for name, _, _ in started):
            # jobs first, then `scontrol shutdown` (slurmctld and slurmd stop at once; SIGTERM takes ~10 s)
            subprocess.run(["scancel", "--full", "--state=RUNNING"], env=env, capture_output=True)
            subprocess.run(["scancel", "--state=PENDING"], env=env, capture_output=True)
            subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
            for name, pid, proc in started:
                if proc is not None:
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        pass
        for name, pid, proc in reversed(started):
            _stop(pid)
            if proc is not None:
                proc.wait(5)


def wait_job(env: dict, job_id: str, timeout: float = 900) -> dict[str, str]:
    """Wait until every task of ``job_id`` has ended; their JobState values (by JobId) as scontrol gives them."""
    from sacrum_masks.slurm import parse_job_records

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True)
        recs = parse_job_records(out.stdout)
        if recs and all(r["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") for r in recs):
            return {r["JobId"]: r["JobState"] for r in recs}
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still running after {timeout} s")
