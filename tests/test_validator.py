"""The BIDS validator (``bids-validator-deno`` 3.0.2, a test dependency) on the demo's datasets and our outputs.

The demo's raw datasets (written by :mod:`sacrum_masks.synth`) get stage 1 (register-ct, real), stage 4
(predict with a stand-in network: the writer, names and sidecars are the real ones) and QC of both; then

* every raw dataset with ``-r`` has 0 errors of its own;
* every derivatives folder validated alone (as a dataset: its own ``.bidsignore`` declares NeuroPoly's
  ``_seg`` names and the report's files) has 0 errors;
* under ``-r`` the validator 3.0.2 does not read a derivative's own ``.bidsignore`` (upstream fixed it in
  bids-validator PR #331, "re-rooted subtree for derivative validation", after 3.0.2): every derivative
  error it reports there must be a file that folder's ``.bidsignore`` declares, nothing else.

The report is parsed from ``--format json`` (``issues`` and ``derivativesSummary``), and a wrongly named
file makes each check fail (so the test can fail).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sacrum_masks.predict import Settings, items_from_bids, run_predict, select_items
from sacrum_masks.qc import run_qc
from sacrum_masks.register import register_dataset
from test_predict import fake_model_dir

ROOT = Path(__file__).resolve().parents[1]
VALIDATOR = ROOT / ".venv" / "bin" / "bids-validator-deno"
TRAIN_SETS = ("goldatlas", "synthrad2023", "mrspineseg")
TEST_SETS = ("spider-challenge-2023", "whole-spine")


def validate(folder: Path, recursive: bool = False) -> dict:
    """The validator's JSON report of ``folder``."""
    exe = VALIDATOR if VALIDATOR.exists() else shutil.which("bids-validator-deno")
    assert exe, "bids-validator-deno not found: it is a test dependency (pip install -e .[test])"
    cmd = [str(exe), "--format", "json", *(["-r"] if recursive else []), str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().startswith("{"), proc.stderr[-2000:]
    return json.loads(proc.stdout)


def errors(report: dict) -> list[tuple[str, str]]:
    return [(i["code"], i.get("location", "")) for i in report["issues"]["issues"] if i["severity"] == "error"]


def declared(folder: Path, location: str) -> bool:
    """Whether ``folder/.bidsignore`` declares ``location`` (a path from the folder's root, ``/sub-01/...``)."""
    rel = location.lstrip("/")
    lines = (folder / ".bidsignore").read_text().splitlines()
    for pattern in (line.strip() for line in lines if line.strip() and not line.startswith("#")):
        target = rel if "/" in pattern.strip("/") else rel.rsplit("/", 1)[-1]
        if fnmatch.fnmatch(target, pattern.strip("/")):
            return True
    return False


def undeclared_derivative_errors(report: dict, dataset: Path) -> dict[str, list]:
    """Errors in a ``-r`` report's derivatives that the derivative's own .bidsignore does not declare."""
    out = {}
    for name, sub in report.get("derivativesSummary", {}).items():
        folder = dataset / name.strip("/")
        bad = [(code, loc) for code, loc in errors(sub)
               if not (code in ("NOT_INCLUDED", "SIDECAR_WITHOUT_DATAFILE") and declared(folder, loc))]
        if bad:
            out[name] = bad
    return out


def cube_model(settings):
    """Stand-in network: a small cube at the centre of the grid (QC of big thresholded blobs takes minutes)."""
    def predict(array, spacing):
        out = np.zeros(array.shape[1:], np.uint8)
        c = [n // 2 for n in out.shape]
        out[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 3:c[2] + 3] = 1
        return out
    return type("M", (), {"predict": staticmethod(predict)})()


@pytest.fixture(scope="module")
def outputs(demo_root, tmp_path_factory):
    data = tmp_path_factory.mktemp("validated")
    bids = data / "bids"
    shutil.copytree(demo_root, bids, ignore=shutil.ignore_patterns("truth"))
    for name in TRAIN_SETS:
        assert register_dataset(bids / name).exit_code == 0
    items = [it for name in TEST_SETS for it in items_from_bids(bids / name)]
    assert run_predict(select_items(items), Settings(fake_model_dir(data / "model")), model_factory=cube_model) == 0
    run_qc(bids / TEST_SETS[0] / "derivatives/labels", command_line="test")
    run_qc(bids / TRAIN_SETS[0] / "derivatives/reg-labels", command_line="test")
    return bids


def test_every_raw_dataset_recursively(outputs):
    seen = set()
    for name in (*TRAIN_SETS, *TEST_SETS):
        report = validate(outputs / name, recursive=True)
        assert errors(report) == [], name
        assert undeclared_derivative_errors(report, outputs / name) == {}, name
        seen |= {f"{name}{d.rstrip('/')}" for d in report["derivativesSummary"]}
    assert {"goldatlas/derivatives/reg-labels", "goldatlas/derivatives/qc-sacrum-reg-labels",
            "spider-challenge-2023/derivatives/labels", "spider-challenge-2023/derivatives/qc-sacrum",
            "whole-spine/derivatives/labels"} <= seen


def test_every_derivatives_folder_alone_has_no_error(outputs):
    folders = sorted(p for p in outputs.glob("*/derivatives/*") if p.is_dir())
    assert len(folders) == 10
    for folder in folders:
        report = validate(folder)
        assert errors(report) == [], folder
        desc = json.loads((folder / "dataset_description.json").read_text())
        assert desc["DatasetType"] == "derivative"


def test_a_wrongly_named_file_fails_each_check(outputs, tmp_path):
    ds = tmp_path / "whole-spine"
    shutil.copytree(outputs / "whole-spine", ds)
    labels = ds / "derivatives/labels"
    mask = next(labels.glob("sub-01/anat/*_label-sacrum_seg.nii.gz"))
    wrong = mask.with_name("sub-01_T2w_sacrummask.nii.gz")       # not NeuroPoly's name, not declared
    nib.save(nib.load(str(mask)), str(wrong))
    alone = validate(labels)
    assert ("NOT_INCLUDED", "/sub-01/anat/sub-01_T2w_sacrummask.nii.gz") in errors(alone)
    report = validate(ds, recursive=True)
    assert undeclared_derivative_errors(report, ds) == {
        "/derivatives/labels/": [("NOT_INCLUDED", "/sub-01/anat/sub-01_T2w_sacrummask.nii.gz")]}
    raw_wrong = ds / "sub-01/anat/sub-01_T2w_copy.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(raw_wrong))
    assert ("NOT_INCLUDED", "/sub-01/anat/sub-01_T2w_copy.nii.gz") in errors(validate(ds, recursive=True))
