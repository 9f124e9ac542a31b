"""Stage 3 (bin/train.sh): plans, device check, the small CPU trainer, resume, up-to-date re-runs, evaluation.

The slow tests train for real on the CPU: on the demo chain (the session's ``demo_run`` fixture, which runs
bin/demo.sh once) and on a tiny blob dataset written here in nnU-Net raw format (interrupt and resume).
No GPU exists in CI: "GPU=0 without CUDA" is the real situation there; the test skips where CUDA exists.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT, demo_env
from sacrum_masks.device import device_problem, parse_gpu
from sacrum_masks.errors import InputError
from sacrum_masks.plans import add_small_plans, small_configuration, with_small_configuration
from sacrum_masks.train import (ProcessGroups, TrainStop, dataset_prefix, evaluation_up_to_date, find_dataset,
                                fold_state, newer, plans_up_to_date, raw_fingerprint, zip_up_to_date)

TRAIN = ROOT / "bin" / "train.sh"
CPU = {"GPU": "cpu", "TRAINER": "nnUNetTrainer_SacrumCPU", "CONFIGURATION": "3d_fullres_small", "FOLD": "0"}


def _plans(n_stages=5):
    return {"configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2,
        "architecture": {"network_class_name": "PlainConvUNet",
                         "arch_kwargs": {"n_stages": n_stages, "features_per_stage": [32, 64, 128, 256, 320][:n_stages],
                                         "conv_op": "torch.nn.modules.conv.Conv3d"}}}}}


def test_small_configuration_inherits_and_keeps_the_parent():
    plans = _plans()
    before = json.dumps(plans)
    new = with_small_configuration(plans)
    assert json.dumps(plans) == before                       # input untouched
    small = new["configurations"]["3d_fullres_small"]
    assert small["inherits_from"] == "3d_fullres"
    assert small["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 64, 64]
    assert small["architecture"]["arch_kwargs"]["conv_op"] == "torch.nn.modules.conv.Conv3d"
    assert "data_identifier" not in small                   # inherited: 3d_fullres's preprocessed data is reused
    assert new["configurations"]["3d_fullres"] == plans["configurations"]["3d_fullres"]
    assert small_configuration(_plans(4))["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 64]


def test_small_configuration_resolves_in_nnunet():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = with_small_configuration(_plans())
    plans.update(dataset_name="Dataset999_X", plans_name="nnUNetPlans")
    cm = PlansManager(plans).get_configuration("3d_fullres_small")
    assert cm.data_identifier == "nnUNetPlans_3d_fullres"
    assert list(cm.network_arch_init_kwargs["features_per_stage"]) == [8, 16, 32, 64, 64]


def test_add_small_plans_file_is_idempotent(tmp_path):
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps(_plans()))
    assert add_small_plans(path) is True
    mtime = path.stat().st_mtime_ns
    assert add_small_plans(path) is False
    assert path.stat().st_mtime_ns == mtime
    assert "3d_fullres_small" in json.loads(path.read_text())["configurations"]


def test_gpu_request_parsing():
    assert parse_gpu("cpu") == "cpu" and parse_gpu("1") == "1"
    with pytest.raises(ValueError, match="GPU='cuda:0'"):
        parse_gpu("cuda:0")
    assert device_problem("0", True, 1) is None
    assert "only 1 of the 2" in device_problem("0,1", True, 1)


def _run_train(env, **extra):
    return subprocess.run(["bash", str(TRAIN)], cwd=ROOT, env={**env, **extra}, capture_output=True, text=True)


def test_gpu_without_cuda_stops_before_any_work(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the test is for machines without it")
    data = tmp_path / "data"
    res = _run_train(demo_env(data), DNUM="300", GPU="0", CONFIG=str(tmp_path / "split.json"))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPU=0: CUDA is not available" in lines[0] and "GPU=cpu" in lines[0]
    assert not data.exists()


def test_missing_dataset_without_config_says_what_to_give(tmp_path):
    data = tmp_path / "data"
    res = _run_train(demo_env(data), DNUM="301", GPU="cpu")
    assert res.returncode == 1
    assert "no Dataset301_* in" in res.stderr and "CONFIG=" in res.stderr
    assert not (data / "nnUNet" / "preprocessed").exists()


# ---------------------------------------------------------------- slow: real CPU training

def write_blob_dataset(raw: Path, dnum: int, name: str = "Blob", n_train: int = 6, n_test: int = 1,
                       shape=(40, 48, 32), seed: int = 0) -> Path:
    """A tiny nnU-Net raw dataset: noisy images with one bright ellipsoid each, labelled 1."""
    rng = np.random.default_rng(seed)
    root = raw / f"Dataset{dnum:03d}_{name}"
    grid = np.indices(shape).astype(np.float32)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    for i in range(n_train + n_test):
        centre = [rng.uniform(0.4, 0.6) * s for s in shape]
        radii = [rng.uniform(0.15, 0.22) * s for s in shape]
        label = (sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1).astype(np.uint8)
        image = (100 + 80 * label + rng.normal(0, 15, shape)).astype(np.float32)
        split = "Tr" if i < n_train else "Ts"
        for sub in (f"images{split}", f"labels{split}"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, affine), str(root / f"images{split}" / f"{name}_{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / f"labels{split}" / f"{name}_{i:03d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "sacrum": 1},
        "numTraining": n_train, "file_ending": ".nii.gz"}))
    return root


def _read_table(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_demo_training_evaluation_table(demo_run):
    table = demo_run.model_dir / "evaluation_fold0.csv"
    rows = _read_table(table)
    assert rows and all(r["status"] == "ok" for r in rows)
    mean = float(np.mean([float(r["dice"]) for r in rows]))
    assert mean >= 0.7, f"mean Dice {mean:.3f} on the demo test split"
    assert all(float(r["hd95_mm"]) >= 0 and float(r["volume_truth_ml"]) > 0 for r in rows)
    summary = (demo_run.model_dir / "evaluation_fold0.txt").read_text()
    assert summary.startswith(f"evaluate: {len(rows)} cases, mean Dice ")
    assert (demo_run.model_dir / "fold_0" / "checkpoint_final.pth").is_file()
    zips = list((demo_run.data / "nnUNet" / "results").glob(
        "Dataset300_*__nnUNetTrainer_SacrumCPU__nnUNetPlans__3d_fullres_small.zip"))
    assert len(zips) == 1


@pytest.mark.slow
def test_demo_second_train_does_nothing(demo_run):
    model = demo_run.model_dir
    watched = [model / "fold_0" / "checkpoint_final.pth", model / "evaluation_fold0.csv",
               *(demo_run.data / "nnUNet" / "results").glob("*.zip"),
               *(demo_run.data / "nnUNet" / "preprocessed").glob("Dataset300_*/nnUNetPlans.json")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    res = _run_train(demo_run.env, DNUM="300", **CPU)
    assert res.returncode == 0, res.stdout + res.stderr
    for step in ("up to date: plan and preprocess", "up to date: fold 0", "up to date: evaluate:",
                 "up to date: model zip"):
        assert step in res.stdout
    assert "training fold" not in res.stdout and "predicting" not in res.stdout
    assert {p: p.stat().st_mtime_ns for p in watched} == before


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"train.sh ended ({proc.returncode}) before {path} appeared")
        if time.monotonic() > end:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(1)


@pytest.mark.slow
def test_interrupted_training_resumes(tmp_path):
    data = tmp_path / "data"
    write_blob_dataset(data / "nnUNet" / "raw", 911)
    env = {**demo_env(data), "DNUM": "911", **CPU, "SACRUM_CPU_EPOCHS": "3", "SACRUM_CPU_ITERS": "5"}
    model = data / "nnUNet" / "results" / "Dataset911_Blob" / "nnUNetTrainer_SacrumCPU__nnUNetPlans__3d_fullres_small"
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(["bash", str(TRAIN)], cwd=ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_for(model / "fold_0" / "checkpoint_latest.pth", proc, timeout=900)
        time.sleep(1)  # let torch.save finish writing
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log1.close()
    first = (tmp_path / "run1.log").read_text()
    assert rc != 0 and "interrupted by SIGTERM" in first
    assert not (model / "fold_0" / "checkpoint_final.pth").exists()

    res = _run_train(env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "up to date: plan and preprocess" in res.stdout
    assert "resuming fold 0" in res.stdout
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    assert not (model / "fold_0" / "checkpoint_latest.pth").exists()
    logs = sorted((model / "fold_0").glob("training_log_*.txt"))
    epochs_run_again = re.findall(r": Epoch (\d+)\s*$", logs[-1].read_text(), flags=re.M)
    assert epochs_run_again and epochs_run_again[0] != "0"      # continued, not restarted
    assert epochs_run_again[-1] == "2"
    rows = _read_table(model / "evaluation_fold0.csv")
    assert [r["case"] for r in rows] == ["Blob_006"] and rows[0]["status"] == "ok"


# ---------------------------------------------------------------- sacrum_masks.train: decisions and processes

def test_folds_and_dataset_prefix():
    from sacrum_masks.folds import parse_folds
    from sacrum_masks.train import gpu_slots

    # FOLD=all is nnU-Net's fold_all, not folds 0-4; a list is each fold (and one ensemble in stage 4)
    assert parse_folds("all") == ("all",) and parse_folds("3") == (3,) and parse_folds("0 1") == (0, 1)
    for bad in ("", "0-1", "-1", "ALL"):
        with pytest.raises(ValueError, match="expected fold numbers"):
            parse_folds(bad)
    assert gpu_slots("0,1") == ["0", "1"] and gpu_slots("cpu,cpu") == ["cpu", "cpu"]
    assert dataset_prefix("7") == "Dataset007" and dataset_prefix("042") == "Dataset042"
    for bad in ("", "1000", "3a", "300\n"):
        with pytest.raises(ValueError, match="expected a dataset number from 1 to 999"):
            dataset_prefix(bad)


def test_raw_fingerprint_is_the_find_sort_sha256_of_bash(tmp_path):
    raw = tmp_path / "Dataset001_X"
    (raw / "imagesTr" / ".hidden_dir").mkdir(parents=True)
    (raw / "imagesTr" / "a b_0000.nii.gz").write_bytes(b"12345")
    (raw / "imagesTr" / ".hidden_dir" / "c.nii.gz").write_bytes(b"1")   # counted: only file names are filtered
    (raw / "imagesTr" / ".DS_Store").write_bytes(b"xx")                 # not counted
    (raw / "dataset.json").write_text("{}")
    (raw / "link.json").symlink_to(raw / "dataset.json")               # links: not counted, not followed
    (raw / "linked_dir").symlink_to(raw / "imagesTr")
    os.utime(raw / "dataset.json", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    pipeline = ("cd \"$1\" && find . -type f ! -name '.*' -printf '%P %s %T@\\n' "
                "| LC_ALL=C sort | sha256sum | cut -d' ' -f1")
    bash = subprocess.run(["bash", "-c", pipeline, "_", str(raw)],
                          capture_output=True, text=True, check=True).stdout.strip()
    before = raw_fingerprint(raw)
    assert before == bash
    os.utime(raw / "dataset.json", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_790))
    assert raw_fingerprint(raw) != before                                # one nanosecond later
    (tmp_path / "empty").mkdir()
    assert raw_fingerprint(tmp_path / "empty") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_fold_state(tmp_path):
    fold = tmp_path / "fold_0"
    assert fold_state(fold, "abc") == "new"                               # nothing yet
    fold.mkdir()
    (fold / "checkpoint_latest.pth").write_bytes(b"")
    assert fold_state(fold, "abc") == "new"                               # no stamp: not ours to resume
    (fold / ".sacrum-raw-fingerprint").write_text("abc\n")
    assert fold_state(fold, "abc") == "resume"
    assert fold_state(fold, "abc", force=True) == "new"
    assert fold_state(fold, "changed") == "new"                           # other raw data: from scratch
    (fold / "checkpoint_final.pth").write_bytes(b"")
    assert fold_state(fold, "abc") == "done"
    assert fold_state(fold, "changed") == "new"
    assert fold_state(fold, "abc", force=True) == "new"
    (fold / ".sacrum-raw-fingerprint").unlink()
    assert fold_state(fold, "anything") == "done"                         # finished before stamps existed


def test_plans_and_outputs_up_to_date(tmp_path):
    pp = tmp_path / "pp"
    pp.mkdir()
    (pp / ".sacrum-raw-fingerprint-3d_fullres").write_text("abc\n")
    assert not plans_up_to_date(pp, "3d_fullres", "abc", False)          # no nnUNetPlans.json
    (pp / "nnUNetPlans.json").write_text("{}")
    assert plans_up_to_date(pp, "3d_fullres", "abc", False)
    assert not plans_up_to_date(pp, "3d_fullres", "abc", True)
    assert not plans_up_to_date(pp, "3d_fullres", "other", False)
    assert not plans_up_to_date(pp, "2d", "abc", False)

    model = tmp_path / "model"
    for f in (0, 2):
        (model / f"fold_{f}").mkdir(parents=True)
        for ckpt in ("final", "best"):   # the zip carries both
            (model / f"fold_{f}" / f"checkpoint_{ckpt}.pth").write_bytes(b"")
            os.utime(model / f"fold_{f}" / f"checkpoint_{ckpt}.pth", ns=(10**18, 10**18 + f))
    zip_path = tmp_path / "model.zip"
    assert not zip_up_to_date(model, zip_path)
    zip_path.write_bytes(b"")
    os.utime(zip_path, ns=(10**18, 10**18 + 2))
    assert zip_up_to_date(model, zip_path)                                  # same time is not newer
    os.utime(zip_path, ns=(10**18, 10**18 + 1))
    assert not zip_up_to_date(model, zip_path)                              # fold 2 is newer

    chk, table, preds = model / "fold_0" / "checkpoint_final.pth", model / "evaluation_fold0.csv", model / "preds"
    assert newer(chk, tmp_path / "absent") and not newer(tmp_path / "absent", chk)
    table.write_text("case\n")
    assert not evaluation_up_to_date(table, chk, preds)                     # no predictions folder
    preds.mkdir()
    assert evaluation_up_to_date(table, chk, preds)
    os.utime(chk, ns=(2 * 10**18, 2 * 10**18))
    assert not evaluation_up_to_date(table, chk, preds)                     # retrained since


def test_find_dataset(tmp_path):
    assert find_dataset(tmp_path / "absent", "Dataset300") is None
    (tmp_path / "Dataset300_A").mkdir()
    (tmp_path / "Dataset3000_B").mkdir()
    (tmp_path / "Dataset300_file").write_text("")
    (tmp_path / "Dataset300_link").symlink_to(tmp_path / "Dataset3000_B")
    assert find_dataset(tmp_path, "Dataset300") == "Dataset300_A"
    (tmp_path / "Dataset300_C").mkdir()
    with pytest.raises(TrainStop, match=r"several datasets numbered Dataset300 \(Dataset300_A Dataset300_C\)"):
        find_dataset(tmp_path, "Dataset300")


_GROUP_SCRIPT = """
import sys
from sacrum_masks.train import ProcessGroups
groups = ProcessGroups()
groups.install()
groups.run(["bash", "-c", 'echo $$ > "$1"; sleep 300 & sleep 300 & wait', "_", sys.argv[1]])
"""


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    out = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat_file.parent.name))
    return out


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_kills_the_child_process_group(tmp_path, sig, code):
    """The running command's whole group (here two background sleeps) dies; exit 128 + signal number."""
    pid_file = tmp_path / "pid"
    proc = subprocess.Popen([sys.executable, "-c", _GROUP_SCRIPT, str(pid_file)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text().strip()) or len(
                _group_members(int(pid_file.read_text()))) < 3:
            assert proc.poll() is None and time.monotonic() < end
            time.sleep(0.1)
        group = int(pid_file.read_text())
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code
    assert stderr.strip() == f"train: interrupted by {sig.name}; run the same command again to resume"
    end = time.monotonic() + 10
    while _group_members(group) and time.monotonic() < end:
        time.sleep(0.1)
    assert _group_members(group) == []


def test_failed_command_status_is_kept():
    with pytest.raises(TrainStop) as stop:
        ProcessGroups().run(["bash", "-c", "exit 3"])
    assert stop.value.code == 3 and str(stop.value) == ""
    with pytest.raises(TrainStop) as stop:
        ProcessGroups().run(["bash", "-c", "kill -KILL $$"])
    assert stop.value.code == 128 + 9


def _empty_raw(data: Path, name: str) -> Path:
    root = data / "nnUNet" / "raw" / name
    (root / "imagesTr").mkdir(parents=True)
    return root


def test_dataset_number_conflicts_and_busy_lock_stop_before_planning(tmp_path):
    data = tmp_path / "data"
    env = demo_env(data)
    _empty_raw(data, "Dataset302_A")
    (data / "nnUNet" / "results" / "Dataset302_B").mkdir(parents=True)
    res = _run_train(env, DNUM="302", GPU="cpu", TRAINER="nnUNetTrainer_SacrumCPU")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        f"train: {data}/nnUNet/results/Dataset302_B has the number of {data}/nnUNet/raw/Dataset302_A; "
        f"nnU-Net refuses to run: remove or renumber one")
    _empty_raw(data, "Dataset302_C")
    res = _run_train(env, DNUM="302", GPU="cpu")
    assert res.returncode == 1
    assert "has several datasets numbered Dataset302 (Dataset302_A Dataset302_C)" in res.stderr

    _empty_raw(data, "Dataset303_A")
    results = data / "nnUNet" / "results"
    fd = os.open(results / ".Dataset303.train.lock", os.O_WRONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = _run_train(env, DNUM="303", GPU="cpu")
    finally:
        os.close(fd)
    assert res.returncode == 75  # EX_TEMPFAIL, as the other stages
    assert res.stderr.strip().splitlines()[-1] == (
        f"train: another training of Dataset303_A is running (lock {results}/.Dataset303.train.lock)")
    assert not (data / "nnUNet" / "preprocessed" / "Dataset303_A").exists()


@pytest.mark.parametrize("text, reason", [("[1, 2]", "not a JSON object"), ("{broken", "not valid JSON")])
def test_add_small_plans_refuses_a_file_that_is_not_a_json_object(tmp_path, text, reason):
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(text)
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: {reason}"):
        add_small_plans(path)
    assert path.read_text() == text


def test_cuda_env_stays_inside_an_existing_allocation():
    """GPU indexes an existing CUDA_VISIBLE_DEVICES (SLURM) instead of replacing it; the CPU env is untouched."""
    from sacrum_masks.train import _with_device

    assert _with_device({"A": "1"}, "cuda", "1") == {"A": "1", "CUDA_VISIBLE_DEVICES": "1"}
    assert _with_device({"CUDA_VISIBLE_DEVICES": "2,3"}, "cuda", "1") == {"CUDA_VISIBLE_DEVICES": "3"}
    assert _with_device({"CUDA_VISIBLE_DEVICES": "2,3"}, "cpu", "cpu") == {"CUDA_VISIBLE_DEVICES": "2,3"}
