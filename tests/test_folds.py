"""Folds as nnU-Net knows them, end to end on the demo dataset (slow: real CPU training with the small trainer).

* ``demo_run`` (bin/demo.sh, FOLD=0): splits_final.json fold 0 is the config, no person on both sides,
  and nnU-Net validated exactly that fold's val list.
* ``two_folds`` (one session fixture): folds 0 and 1 of a copy of the demo trained side by side on the
  CPU (``GPU=cpu,cpu FOLD="0 1"``), then evaluated as one ensemble and exported. The tests check the
  export (zip contents, install with nnU-Net's own installer and with ``--model-zip``, stage 4 defaults),
  the evaluation (independent Dice; nnU-Net's ``compute_metrics_on_folder``), our prediction against
  ``nnUNetv2_predict`` voxel for voxel (one fold, and the ensemble ``-f 0 1``), and stage 4's ensemble.

Oracles are nnU-Net's own CLIs and metrics; nothing is mocked.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import zipfile
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT

MODEL_NAME = "nnUNetTrainer_SacrumCPU__nnUNetPlans__3d_fullres_small"
DNAME = "Dataset300_SacrumDataset"
SMALL = {"DNUM": "300", "TRAINER": "nnUNetTrainer_SacrumCPU", "CONFIGURATION": "3d_fullres_small"}


def nnunet_env(env: dict, data: Path, **extra) -> dict:
    """``env`` with the nnU-Net folders of ``data`` and the small trainer's folder (as env.sh sets them)."""
    return {**env, "nnUNet_raw": str(data / "nnUNet" / "raw"),
            "nnUNet_preprocessed": str(data / "nnUNet" / "preprocessed"),
            "nnUNet_results": str(data / "nnUNet" / "results"),
            "nnUNet_extTrainer": str(ROOT / "py" / "sacrum_masks" / "nnunet_trainers"),
            "PYTHONPATH": str(ROOT / "py"), **extra}


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def log_times(fold_dir: Path) -> tuple[datetime, datetime]:
    """First and last time stamp of a fold's nnU-Net training log."""
    text = sorted(fold_dir.glob("training_log_*.txt"))[-1].read_text()
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+):", text, flags=re.M)
    return (datetime.strptime(stamps[0], "%Y-%m-%d %H:%M:%S.%f"),
            datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S.%f"))


@pytest.fixture(scope="session")
def two_folds(demo_run, tmp_path_factory):
    """Folds 0 and 1 trained side by side on the CPU in a copy of the demo's nnU-Net folders."""
    data = tmp_path_factory.mktemp("two_folds")
    for sub in ("raw", "preprocessed"):
        shutil.copytree(demo_run.data / "nnUNet" / sub, data / "nnUNet" / sub, symlinks=True)
    (data / "nnUNet" / "results").mkdir(parents=True)
    env = nnunet_env(demo_run.env, data, **SMALL, GPU="cpu,cpu", FOLD="0 1",
                     SACRUM_CPU_EPOCHS="3", SACRUM_CPU_ITERS="10")
    env["SACRUM_DATA"] = str(data)
    proc = subprocess.run(["bash", str(ROOT / "bin" / "train.sh")], env=env, capture_output=True, text=True)
    model = data / "nnUNet" / "results" / DNAME / MODEL_NAME
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:] + "".join(
        p.read_text()[-3000:] for p in model.glob("train_fold_*.log"))
    return type("TwoFolds", (), {"data": data, "env": env, "model": model, "out": proc.stdout + proc.stderr,
                                 "demo": demo_run})


# ------------------------------------------------------------------------------------------- splits


@pytest.mark.slow
def test_demo_split_is_the_config_and_nnunet_trained_on_it(demo_run):
    from sacrum_masks.splits import person_of

    pp = demo_run.data / "nnUNet" / "preprocessed" / DNAME
    raw = demo_run.data / "nnUNet" / "raw" / DNAME
    splits = json.loads((pp / "splits_final.json").read_text())
    cases = json.loads((raw / "conversion.json").read_text())["Cases"]
    config = json.loads((demo_run.data / "demo_split.json").read_text())
    by_label = {rec["label"]: cid for cid, rec in cases.items()}
    assert len(splits) == 5
    assert splits[0]["train"] == sorted(by_label[e] for e in config["TRAINING"])
    assert splits[0]["val"] == sorted(by_label[e] for e in config["VALIDATION"])
    person = {cid: person_of(rec["image"]) for cid, rec in cases.items()}
    for fold in splits:
        assert not {person[c] for c in fold["train"]} & {person[c] for c in fold["val"]}
    assert sorted(c for f in splits for c in f["val"]) == sorted(c for c, r in cases.items() if r["split"] == "Tr")
    # what nnU-Net really did: its log names the split file, and it validated exactly fold 0's val cases
    log = sorted((demo_run.model_dir / "fold_0").glob("training_log_*.txt"))[-1].read_text()
    assert f"Using splits from existing split file: {pp / 'splits_final.json'}" in log
    assert (f"This split has {len(splits[0]['train'])} training and {len(splits[0]['val'])} validation cases"
            in log)
    summary = json.loads((demo_run.model_dir / "fold_0" / "validation" / "summary.json").read_text())
    validated = sorted(Path(m["reference_file"]).name[:-len(".nii.gz")] for m in summary["metric_per_case"])
    assert validated == splits[0]["val"]


# ------------------------------------------------------------------------------- folds side by side


@pytest.mark.slow
def test_two_folds_trained_side_by_side_on_the_cpu(two_folds):
    model, out = two_folds.model, two_folds.out
    assert "fold 0 on the CPU" in out and "fold 1 on the CPU" in out
    (s0, e0), (s1, e1) = log_times(model / "fold_0"), log_times(model / "fold_1")
    assert s1 < e0 and s0 < e1, "the two trainings did not overlap"
    for f in (0, 1):
        assert (model / f"fold_{f}" / "checkpoint_final.pth").is_file()
        assert (model / f"fold_{f}" / "checkpoint_best.pth").is_file()
        assert "nnU-Net validated exactly the val cases of splits_final.json fold " + str(f) in \
            (model / f"train_fold_{f}.log").read_text()
    # each fold has its own lock; the dataset lock was shared
    results = model.parent.parent
    assert (results / f".Dataset300.{MODEL_NAME}.fold_0.lock").is_file()
    assert (results / f".Dataset300.{MODEL_NAME}.fold_1.lock").is_file()


@pytest.mark.slow
def test_a_missing_fold_is_one_line_naming_the_folds_there(two_folds, tmp_path):
    env = {**two_folds.env, "FOLD": "0 3", "TRAIN_STAGE": "finish", "GPU": "cpu"}
    res = subprocess.run(["bash", str(ROOT / "bin" / "train.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        f"train: {two_folds.model}: fold 3 not there (folds with checkpoint_final.pth: 0 1); train them first "
        f"(--stage fold)")


# ------------------------------------------------------------------------------------------- export


@pytest.mark.slow
def test_zip_holds_both_checkpoints_and_installs_for_stage_4_defaults(two_folds, tmp_path):
    results = two_folds.data / "nnUNet" / "results"
    zip_path = results / f"{DNAME}__{MODEL_NAME}.zip"
    names = set(zipfile.ZipFile(zip_path).namelist())
    base = f"{DNAME}/{MODEL_NAME}"
    for f in (0, 1):
        assert {f"{base}/fold_{f}/checkpoint_final.pth", f"{base}/fold_{f}/checkpoint_best.pth"} <= names
    assert {f"{base}/plans.json", f"{base}/dataset.json", f"{base}/dataset_fingerprint.json"} <= names

    # nnU-Net's installer, into an empty nnUNet_results
    empty = tmp_path / "nnunet_results"
    empty.mkdir()
    env = {**two_folds.env, "nnUNet_results": str(empty)}
    res = subprocess.run(["nnUNetv2_install_pretrained_model_from_zip", str(zip_path)], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (empty / base / "fold_1" / "checkpoint_best.pth").is_file()

    # ours: generate_sacrum.sh with its defaults (fold 0, checkpoint best) installs from --model-zip
    ws = tmp_path / "whole-spine"
    shutil.copytree(two_folds.demo.bids / "whole-spine", ws, ignore=shutil.ignore_patterns("derivatives"))
    env = {k: v for k, v in two_folds.env.items() if k not in ("FOLD", "GPU", "nnUNet_results")}
    env.update(SACRUM_DATA=str(tmp_path / "fresh"), MODEL_ZIP=str(zip_path))
    res = subprocess.run(["bash", str(ROOT / "bin" / "generate_sacrum.sh"), "--bids", str(ws), "--gpu", "cpu"],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    n = len(list(ws.glob("sub-*/anat/*.nii.gz")))
    assert n and len(list((ws / "derivatives" / "labels").rglob("*_label-sacrum_seg.nii.gz"))) == n
    side = json.loads(next((ws / "derivatives" / "labels").rglob("*_label-sacrum_seg.json")).read_text())
    assert side["GeneratedBy"][0]["Fold"] == "0" and side["GeneratedBy"][0]["Checkpoint"] == "best"


# --------------------------------------------------------------------------------------- evaluation


@pytest.mark.slow
def test_evaluation_is_the_dice_of_stage_4_masks(two_folds, tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from sacrum_masks.model_eval import held_out_cases

    model = two_folds.model
    rows = read_rows(model / "evaluation_fold0-1.csv")
    summary = (model / "evaluation_fold0-1.txt").read_text()
    assert ("folds 0 1, checkpoint best, mirroring off, tile step 0.5, largest component (26-connected), "
            "original grids") in summary
    assert {r["checkpoint"] for r in rows} == {"best"} and {r["folds"] for r in rows} == {"0 1"}
    cases = {tc.case: tc for tc in held_out_cases(two_folds.data / "nnUNet" / "raw" / DNAME)}
    assert sorted(r["case"] for r in rows) == sorted(cases) and all(r["status"] == "ok" for r in rows)

    # the masks are stage 4's: generate_sacrum.sh --fold "0 1" on the same original images writes the same
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    for case, tc in cases.items():
        shutil.copy(tc.label, truth_dir / f"{case}.nii.gz")
        shutil.copy(model / "evaluation_fold0-1" / f"{case}.nii.gz", pred_dir / f"{case}.nii.gz")
        mask = np.asanyarray(nib.load(pred_dir / f"{case}.nii.gz").dataobj)
        img = nib.load(tc.image)
        assert mask.shape == img.shape and np.allclose(nib.load(pred_dir / f"{case}.nii.gz").affine, img.affine,
                                                       atol=1e-5)
        truth = np.asanyarray(nib.load(tc.label).dataobj) != 0
        independent = 2 * np.logical_and(mask != 0, truth).sum() / ((mask != 0).sum() + truth.sum())
        row = next(r for r in rows if r["case"] == case)
        assert abs(float(row["dice"]) - independent) < 1e-5, case

    # nnU-Net's own metrics on the same files
    out = compute_metrics_on_folder(str(truth_dir), str(pred_dir), str(tmp_path / "summary.json"), SimpleITKIO(),
                                    ".nii.gz", [1], None, 1)
    theirs = {Path(m["reference_file"]).name[:-len(".nii.gz")]: m["metrics"][1]["Dice"]
              for m in out["metric_per_case"]}
    ours = {r["case"]: float(r["dice"]) for r in rows}
    assert theirs.keys() == ours.keys()
    for case in ours:
        assert abs(ours[case] - theirs[case]) <= 1e-6, (case, ours[case], theirs[case])


@pytest.mark.slow
def test_stage_4_ensemble_writes_the_evaluated_masks(two_folds, tmp_path):
    """generate_sacrum.sh --fold "0 1" (one ensemble) on the test images: the evaluation's masks exactly."""
    from sacrum_masks.model_eval import held_out_cases

    model = two_folds.model
    raw = two_folds.data / "nnUNet" / "raw" / DNAME
    cases = held_out_cases(raw)
    datasets_path = Path(json.loads((raw / "conversion.json").read_text())["DatasetsPath"])
    root = tmp_path / "datasets"
    cfg = {"TYPE": "IMAGE", "CONTRASTS": "t1_t2", "DATASETS_PATH": str(root), "TESTING": []}
    copies = {}
    for tc in cases:
        rel = tc.image.relative_to(datasets_path)           # <dataset>/sub-*/[ses-*/]anat/<image>
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tc.image, dst)
        cfg["TESTING"].append(rel.as_posix())
        copies[tc.case] = dst
    (tmp_path / "test.json").write_text(json.dumps(cfg))
    res = subprocess.run(["bash", str(ROOT / "bin" / "generate_sacrum.sh"), "--config", str(tmp_path / "test.json"),
                          "--model", str(model), "--fold", "0 1", "--gpu", "cpu"], env=two_folds.env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for case, image in copies.items():
        rel = image.relative_to(root)
        mask = root / rel.parts[0] / "derivatives" / "labels" / Path(*rel.parts[1:]).parent / \
            image.name.replace(".nii.gz", "_label-sacrum_seg.nii.gz")
        side = json.loads(mask.with_name(mask.name.replace(".nii.gz", ".json")).read_text())
        assert side["GeneratedBy"][0]["Fold"] == "0 1"
        np.testing.assert_array_equal(np.asanyarray(nib.load(mask).dataobj),
                                      np.asanyarray(nib.load(model / "evaluation_fold0-1" / f"{case}.nii.gz").dataobj))


@pytest.mark.parametrize("folds", ["0", "0 1"])
@pytest.mark.slow
def test_in_process_prediction_equals_nnunetv2_predict(two_folds, tmp_path, folds):
    """Before the largest-component step, our prediction from the original image equals nnUNetv2_predict on the
    RPI file (the converted imagesTs case) with the same checkpoint, no test-time mirroring and tile step."""
    import SimpleITK as sitk

    from sacrum_masks.model_eval import held_out_cases
    from sacrum_masks.nifti import load_image, to_rpi
    from sacrum_masks.predict import NnunetModel, Settings, nnunet_input

    raw = two_folds.data / "nnUNet" / "raw" / DNAME
    cases = held_out_cases(raw)[:2]
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for tc in cases:
        shutil.copy(raw / "imagesTs" / f"{tc.case}_0000.nii.gz", inp)
    s = Settings(model_dir=two_folds.model, fold=folds)
    res = subprocess.run(["nnUNetv2_predict", "-i", str(inp), "-o", str(out), "-d", DNAME, "-c", "3d_fullres_small",
                          "-tr", "nnUNetTrainer_SacrumCPU", "-f", *folds.split(), "-chk", f"checkpoint_{s.checkpoint}.pth",
                          "-step_size", str(s.tile_step), "--disable_tta", "-device", "cpu", "-npp", "1", "-nps", "1"],
                         env=two_folds.env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not s.mirroring
    model = NnunetModel(two_folds.model, folds, s.checkpoint, "cpu", s.tile_step, s.mirroring)
    for tc in cases:
        img, data = load_image(tc.image)                     # the original file, as stage 4 reads it
        rpi = to_rpi(img, data)
        array, spacing = nnunet_input(rpi, np.asanyarray(rpi.dataobj))
        ours = np.asarray(model.predict(array, spacing))
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{tc.case}.nii.gz")))
        assert ours.shape == theirs.shape
        assert ours.any()
        np.testing.assert_array_equal(ours, theirs)
