"""bin/slurm_masks.sh and bin/slurm_train.sh on a real one-node SLURM (tests/slurm_cluster.py), demo model.

The oracle is SLURM itself (job states from scontrol) and the one-machine run of bin/demo.sh: the
3-shard array's masks must have the same voxel data as the masks demo.sh wrote on one machine.
The stage 4 and training tests are slow (they predict and train with nnU-Net): one array submission is
shared by three tests.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from slurm_cluster import slurm_cluster, wait_job  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
TEST_SETS = ("whole-spine", "spider-challenge-2023")
MASK = "*_label-sacrum_seg.nii.gz"
CORRUPT = "sub-99/anat/sub-99_T2w.nii.gz"

def copy_raw(src: Path, dst: Path) -> Path:
    """A copy of a BIDS dataset without its derivatives (a dataset nobody has run stage 4 on)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("derivatives"))
    return dst


def job_env(cluster, demo_run) -> dict[str, str]:
    env = dict(demo_run.env, SLURM_CONF=cluster.env["SLURM_CONF"], PYTHONPATH=str(ROOT / "py"),
               CPUS="1", GPUS="0", TIME="00:30:00")
    for var in ("N", "PARTITION", "ACCOUNT", "SLURM_RUN_DIR", "SACRUM_REPORT", "SACRUM_LOCK_DIR"):
        env.pop(var, None)
    return env


def masks(ds: Path) -> dict[str, Path]:
    deriv = ds / "derivatives" / "labels"
    return {p.relative_to(deriv).as_posix(): p for p in sorted(deriv.rglob(MASK))}


def demo_settings(demo_run) -> list[str]:
    """generate_sacrum.sh options that repeat the one-machine run of demo.sh (read from a mask's sidecar)."""
    side = next((demo_run.bids / TEST_SETS[0] / "derivatives" / "labels").rglob("*_label-sacrum_seg.json"))
    made = json.loads(side.read_text())["GeneratedBy"][0]
    return ["--model", str(demo_run.model_dir), "--fold", str(made["Fold"]), "--checkpoint", made["Checkpoint"]]


def submit_masks(env, run_dir: Path, datasets: list[Path], *extra: str) -> subprocess.CompletedProcess:
    args = ["bash", str(ROOT / "bin" / "slurm_masks.sh"), "--shards", "3", "--run-dir", str(run_dir), "--wait"]
    for ds in datasets:
        args += ["--bids", str(ds)]
    args += ["--", *env["SACRUM_TEST_SETTINGS"].split("\n"), *extra]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=1500)


# ------------------------------------------------------------------ job states (fast: no nnU-Net)

def _sbatch(env, *args) -> str:
    out = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", *args], env=env, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip().split(";")[0]


def _check_array(env, job, expect):
    return subprocess.run(["sacrum-masks", "slurm-check-array", job, "--expect", expect, "--name", "fold {}"],
                          env=env, capture_output=True, text=True)


def test_check_array_names_the_failed_fold_and_a_cancelled_one(slurm_cluster, tmp_path):  # noqa: F811
    env = dict(slurm_cluster.env, PYTHONPATH=str(ROOT / "py"),
               PATH=f"{ROOT / '.venv' / 'bin'}:{slurm_cluster.env['PATH']}")
    array = _sbatch(env, "--array", "0,1", "--wrap", "exit ${SLURM_ARRAY_TASK_ID}")
    wait_job(env, array, 120)
    res = _check_array(env, array, "0 1")
    assert res.returncode == 1
    assert res.stderr.splitlines() == ["slurm-check-array: fold 1 FAILED (exit 1:0)",
                                       f"slurm-check-array: array job {array}: 1 of 2 did not complete; stopping"]
    assert _check_array(env, array, "0").returncode == 0
    # an array after a failed job (afterok): cancelled at once (kill_invalid_depend), never left pending
    failed = _sbatch(env, "--wrap", "exit 3")
    after = _sbatch(env, "--array", "0,1", "--dependency", f"afterok:{failed}", "--wrap", "true")
    wait_job(env, after, 120)
    res = _check_array(env, after, "0 1")
    assert res.returncode == 1 and "fold 0 CANCELLED" in res.stderr and "fold 1 CANCELLED" in res.stderr


# ------------------------------------------------------------------------------ stage 4 as an array

@pytest.fixture(scope="module")
def array_run(slurm_cluster, demo_run, tmp_path_factory):  # noqa: F811
    """The test datasets (raw copies, one corrupt image added) through a 3-shard array and its summary."""
    top = tmp_path_factory.mktemp("slurm_masks")
    datasets = [copy_raw(demo_run.bids / name, top / name) for name in TEST_SETS]
    bad = datasets[0] / CORRUPT
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x1f\x8b not really gzip")
    env = dict(job_env(slurm_cluster, demo_run), SACRUM_TEST_SETTINGS="\n".join(demo_settings(demo_run)))
    start = time.monotonic()
    proc = submit_masks(env, top / "run1", datasets)
    took = time.monotonic() - start
    print(f"\nSLURM cluster start {slurm_cluster.start_s:.1f} s; 3-shard array + summary {took:.1f} s")
    return types.SimpleNamespace(top=top, datasets=datasets, proc=proc, env=env, bad=bad, seconds=took,
                                 run_dir=top / "run1", demo_run=demo_run)


@pytest.mark.slow
def test_array_masks_equal_one_machine_run(array_run):
    assert "array job" in array_run.proc.stdout and "squeue -j" in array_run.proc.stdout, array_run.proc.stdout
    for ds in array_run.datasets:
        ours, one_machine = masks(ds), masks(array_run.demo_run.bids / ds.name)
        assert ours.keys() == one_machine.keys() and len(ours) > 0
        for rel, path in ours.items():
            a, b = nib.load(path), nib.load(one_machine[rel])
            assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), rel
            assert np.array_equal(a.affine, b.affine), rel


@pytest.mark.slow
def test_summary_names_the_corrupt_image_and_fails(array_run):
    proc = array_run.proc
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads((array_run.run_dir / "summary.json").read_text())
    assert [f["image"] for f in summary["failed_images"]] == [str(array_run.bad)]
    n_images = sum(len(masks(ds)) for ds in array_run.datasets)
    assert summary["totals"]["written"] == n_images == 24 and summary["totals"]["failed"] == 1
    # the corrupt image's shard exits 1 (its task FAILED), the two others COMPLETED
    assert sorted(s["state"] for s in summary["shards"]) == ["COMPLETED", "COMPLETED", "FAILED (exit 1:0)"]
    text = (array_run.run_dir / "summary.txt").read_text()
    assert f"  {array_run.bad}: " in text and "total: 24 written, 0 up to date, 0 kept, 1 failed" in text
    assert proc.stdout.endswith(text)
    # the summary job ran QC on each output folder
    for ds in array_run.datasets:
        assert (ds / "derivatives" / "qc-sacrum" / "index.html").is_file()


@pytest.mark.slow
def test_resubmit_writes_nothing_new(array_run):
    before = {p: p.stat().st_mtime_ns for ds in array_run.datasets for p in masks(ds).values()}
    proc = submit_masks(array_run.env, array_run.top / "run2", array_run.datasets)
    assert proc.returncode == 1, proc.stdout + proc.stderr   # the corrupt image still fails
    summary = json.loads((array_run.top / "run2" / "summary.json").read_text())
    assert summary["totals"] == {"written": 0, "up to date": 24, "kept": 0, "failed": 1}
    after = {p: p.stat().st_mtime_ns for ds in array_run.datasets for p in masks(ds).values()}
    assert after == before


@pytest.mark.slow
def test_shards_1_of_2_and_1_of_3_together_never_write_one_image_twice(slurm_cluster, demo_run, tmp_path):  # noqa: F811
    ds = copy_raw(demo_run.bids / "whole-spine", tmp_path / "whole-spine")
    images = sorted(str(p) for p in ds.rglob("*.nii.gz"))   # the sorted list every shard cuts
    assert len(images) == 8
    env = job_env(slurm_cluster, demo_run)
    jobs = []
    for shard in ("1/2", "1/3"):
        report = tmp_path / f"report-{shard.replace('/', '-of-')}.json"
        cmd = (f"cd {ROOT} && SACRUM_REPORT={report} exec bash bin/generate_sacrum.sh --bids {ds} --gpu cpu "
               f"{shlex.join(demo_settings(demo_run))} --wait --shard {shard}")
        out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task", "1", "-o", str(tmp_path / f"{shard[-1]}.log"),
                              "--wrap", cmd], env=env, capture_output=True, text=True, check=True)
        jobs.append((out.stdout.strip(), report))
    for job, _ in jobs:
        assert set(wait_job(env, job).values()) == {"COMPLETED"}
    reports = [json.loads(r.read_text()) for _, r in jobs]
    written = [it["item"] for rep in reports for it in rep["items"] if it["status"] == "written"]
    assert len(written) == len(set(written)) == 5   # images 0 2 4 6 and 0 3 6 of 8: five distinct, once each
    assert set(written) == {images[i] for i in (0, 2, 3, 4, 6)}
    for rep in reports:
        assert set(it["status"] for it in rep["items"]) <= {"written", "busy", "up to date"}


# --------------------------------------------------------------------------- summary (fast, no cluster)

def test_summary_counts_names_failures_and_missing_reports(tmp_path):
    from sacrum_masks.slurm import report_path, summarise, summary_text

    def report(i, counts, items=(), **extra):
        p = report_path(tmp_path, i, 3)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"command": "predict", "counts": counts, "items": list(items),
                                 "exit_status": 1 if counts.get("failed") else 0, "folders": ["/d/derivatives/labels"],
                                 **extra}))
    report(1, {"written": 2, "up to date": 1, "kept": 0, "failed": 0})
    report(2, {"written": 1, "up to date": 0, "kept": 1, "failed": 1, "busy": 1},
           [{"item": "/d/sub-9/anat/sub-9_T2w.nii.gz", "status": "failed", "detail": "not a gzip file"}])
    tasks = {1: {"JobState": "COMPLETED"}, 2: {"JobState": "FAILED", "Reason": "NonZeroExitCode", "ExitCode": "1:0"},
             3: {"JobState": "TIMEOUT", "Reason": "TimeLimit"}}
    s = summarise(tmp_path, 3, tasks)
    assert s["exit_status"] == 1 and s["failed_shards"] == ["2/3", "3/3"]
    assert s["totals"] == {"written": 3, "up to date": 1, "kept": 1, "failed": 1, "busy": 1}
    text = summary_text(s, "41")
    assert text.splitlines() == [
        f"slurm-summary: {tmp_path} (array job 41, 3 shards)",
        "shard 1/3: 2 written, 1 up to date, 0 kept, 0 failed  [COMPLETED]",
        "shard 2/3: 1 written, 0 up to date, 1 kept, 1 failed, 1 busy  [FAILED (exit 1:0)]",
        f"shard 3/3: -  [TIMEOUT (TimeLimit)]  FAILED: no report (log: {tmp_path}/logs/shard-3.log)",
        "failed images (1):",
        "  /d/sub-9/anat/sub-9_T2w.nii.gz: not a gzip file (shard 2/3)",
        "total: 3 written, 1 up to date, 1 kept, 1 failed, 1 busy; 2 of 3 shards failed: 2/3 3/3"]
    report(3, {"written": 0, "up to date": 3, "kept": 0, "failed": 0})
    tasks[2] = tasks[3] = tasks[1]
    report(2, {"written": 1, "up to date": 0, "kept": 0, "failed": 0})
    assert summarise(tmp_path, 3, tasks)["exit_status"] == 0
    tasks[3] = {"JobState": "CANCELLED", "Reason": "None", "ExitCode": "0:15"}   # killed after its report
    assert summarise(tmp_path, 3, tasks)["failed_shards"] == ["3/3"]


# ------------------------------------------------------------------------------ stage 3 as an array

@pytest.mark.slow
def test_slurm_train_runs_two_folds_as_an_array_and_exports_a_zip(slurm_cluster, demo_run, tmp_path):  # noqa: F811
    """prepare job, folds 0 and 1 as array tasks (1 epoch of 2 iterations of the small CPU trainer), finish
    job that evaluates and exports: a zip with both folds. Needs `sacrum-masks train --stage` (issue 10)."""
    import zipfile

    nn = tmp_path / "nnUNet"
    for sub in ("raw", "preprocessed"):   # the demo's dataset, planned and preprocessed: prepare finds it up to date
        shutil.copytree(demo_run.data / "nnUNet" / sub, nn / sub)
    env = dict(job_env(slurm_cluster, demo_run), nnUNet_raw=str(nn / "raw"), nnUNet_preprocessed=str(nn / "preprocessed"),
               nnUNet_results=str(nn / "results"), DNUM="300", TRAINER="nnUNetTrainer_SacrumCPU",
               CONFIGURATION="3d_fullres_small", SACRUM_CPU_EPOCHS="1", SACRUM_CPU_ITERS="2", FOLDS="0 1",
               TIME="00:30:00")
    start = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "bin" / "slurm_train.sh"), "--run-dir", str(tmp_path / "run"), "--wait"],
                          env=env, capture_output=True, text=True, timeout=1500)
    print(f"\nslurm-train, 2 folds x 1 epoch: {time.monotonic() - start:.1f} s")
    logs = "".join(f"\n== {p.name}\n" + p.read_text()[-3000:] for p in sorted((tmp_path / "run" / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert "folds array job" in proc.stdout and "squeue -j" in proc.stdout
    zips = list((nn / "results").glob("Dataset300_*__nnUNetTrainer_SacrumCPU__nnUNetPlans__3d_fullres_small.zip"))
    assert len(zips) == 1, logs
    names = zipfile.ZipFile(zips[0]).namelist()
    for fold in (0, 1):
        assert any(n.endswith(f"fold_{fold}/checkpoint_final.pth") for n in names), names
    assert "slurm-check-array: array job" in (tmp_path / "run" / "logs" / "finish.log").read_text()
