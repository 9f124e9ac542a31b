"""Metrics and the evaluation table on hand-made grids with known answers."""

from __future__ import annotations

import csv
import math

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from sacrum_masks.evaluate import evaluate_command, evaluate_folders, summarize
from sacrum_masks.metrics import dice, hd95, surface, volume_ml


def test_dice_known_overlap():
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros((4, 4, 4), np.uint8)
    a[0, 0, :3] = 1          # 3 voxels
    b[0, 0, 1:] = 1          # 3 voxels, 2 shared
    assert dice(a, b) == pytest.approx(4 / 6)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0


def test_dice_both_empty_is_one_and_labels_count_as_foreground():
    z = np.zeros((2, 2, 2))
    assert dice(z, z) == 1.0
    assert dice(np.full((2, 2), 3), np.ones((2, 2))) == 1.0


def test_dice_refuses_different_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))


def test_surface_of_a_cube_is_its_shell():
    m = np.zeros((5, 5, 5), bool)
    m[1:4, 1:4, 1:4] = True
    s = surface(m)
    assert s.sum() == 27 - 1 and not s[2, 2, 2]


def test_hd95_single_voxels_with_anisotropic_spacing():
    a = np.zeros((3, 10, 1), np.uint8)
    b = np.zeros((3, 10, 1), np.uint8)
    a[1, 2, 0] = 1
    b[1, 6, 0] = 1
    assert hd95(a, b, (1.0, 2.5, 7.0)) == pytest.approx(10.0)   # 4 voxels x 2.5 mm
    assert hd95(a, b) == pytest.approx(4.0)                      # default 1 mm


def test_hd95_shifted_block_is_the_shift():
    a = np.zeros((12, 6, 6), np.uint8)
    a[2:6, 1:5, 1:5] = 1
    b = np.roll(a, 3, axis=0)  # every surface voxel of one is at most 3 voxels from the other's surface
    d = hd95(a, b, (2.0, 1.0, 1.0))
    assert d == pytest.approx(6.0)
    assert hd95(a, a, (2.0, 1.0, 1.0)) == 0.0


def test_hd95_empty_conventions():
    z = np.zeros((3, 3, 3))
    one = z.copy()
    one[1, 1, 1] = 1
    assert hd95(z, z, (1, 1, 1)) == 0.0
    assert math.isinf(hd95(one, z, (1, 1, 1)))
    assert math.isinf(hd95(z, one, (1, 1, 1)))


def test_volume_ml():
    m = np.zeros((10, 10, 10))
    m[:5] = 1   # 500 voxels of 2 x 1 x 1 mm = 1000 mm^3
    assert volume_ml(m, (2.0, 1.0, 1.0)) == pytest.approx(1.0)


def _save(path, data, spacing=(1.0, 1.0, 2.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.uint8), np.diag([*spacing, 1.0])), str(path))


def _cases(tmp_path):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    t = np.zeros((6, 6, 4), np.uint8)
    t[1:4, 1:4, 1:3] = 1                        # 18 voxels of 2 mm^3
    _save(truth / "a.nii.gz", t)
    _save(pred / "a.nii.gz", t)                 # perfect
    p = t.copy()
    p[1:4, 1:4, 2] = 0                           # half of it: Dice 2*9/(18+9) = 2/3
    _save(truth / "b.nii.gz", t)
    _save(pred / "b.nii.gz", p)
    return truth, pred


def test_evaluate_folders_rows(tmp_path):
    truth, pred = _cases(tmp_path)
    rows = evaluate_folders(pred, truth)
    assert [r["case"] for r in rows] == ["a", "b"]
    assert rows[0]["dice"] == 1.0 and rows[0]["hd95_mm"] == 0.0
    assert rows[1]["dice"] == pytest.approx(2 / 3)
    assert rows[1]["volume_truth_ml"] == pytest.approx(0.036) and rows[1]["volume_pred_ml"] == pytest.approx(0.018)
    assert summarize(rows) == "evaluate: 2 cases, mean Dice 0.8333, worst Dice 0.6667 (b), 0 missing, 0 failed"


def test_evaluate_command_table_and_missing_prediction(tmp_path):
    truth, pred = _cases(tmp_path)
    _save(truth / "c.nii.gz", np.zeros((6, 6, 4)))           # no prediction for c
    _save(truth / "d.nii.gz", np.zeros((6, 6, 4)))
    _save(pred / "d.nii.gz", np.zeros((5, 6, 4)))             # wrong grid
    out = tmp_path / "table.csv"
    res = CliRunner().invoke(evaluate_command, ["--pred", str(pred), "--truth", str(truth), "-o", str(out),
                                                "--summary", str(tmp_path / "summary.txt")])
    assert res.exit_code == 1
    rows = list(csv.DictReader(out.open()))
    assert [(r["case"], r["status"]) for r in rows] == [("a", "ok"), ("b", "ok"), ("c", "missing"), ("d", "failed")]
    assert rows[1]["dice"] == "0.666667"
    line = "evaluate: 4 cases, mean Dice 0.8333, worst Dice 0.6667 (b), 1 missing, 1 failed"
    assert line in res.output
    assert (tmp_path / "summary.txt").read_text() == line + "\n"


def test_evaluate_command_bids_layout(tmp_path):
    truth = tmp_path / "truth"
    ds = tmp_path / "whole-spine"
    m = np.zeros((4, 4, 4))
    m[1:3, 1:3, 1:3] = 1
    rel = "sub-01/anat/sub-01_T2w_label-sacrum_seg.nii.gz"
    _save(truth / "whole-spine" / rel, m)
    _save(ds / "derivatives" / "labels" / rel, m)
    out = tmp_path / "t.csv"
    res = CliRunner().invoke(evaluate_command, ["--truth", str(truth), "--pred-bids", str(ds), "-o", str(out)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert [(r["case"], r["dice"]) for r in rows] == [("whole-spine/sub-01/anat/sub-01_T2w_label-sacrum_seg", "1")]
