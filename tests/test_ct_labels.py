"""Stage 0 (ct-labels): TotalSegmentator labels for CT images without one.

What is mocked and why: TotalSegmentator's weights (several GB) cannot be downloaded on this network and
the main venv does not install TotalSegmentator (it is the optional ``make setup CT=1`` extra). So the
tests inject a fake ``totalsegmentator.python_api`` module whose ``totalsegmentator()`` returns what the
real call returns for ``ml=True, roi_subset=[sacrum, vertebrae_S1]`` (a multilabel image on the input's
grid with the v2 ids 25 and 26). Only that call is fake: the weight-folder check, the grid and label
checks, the writing, the sidecar and the re-run logic are the real code. The "not installed" test runs
against the real environment (it blocks the import only if TotalSegmentator happens to be installed).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from sacrum_masks import ct_labels, derivatives
from sacrum_masks.errors import InputError
from sacrum_masks.cli import main
from sacrum_masks.nifti import sha256_file

CT_SHAPE = (16, 18, 14)


def _ct(affine) -> nib.Nifti1Image:
    data = np.full(CT_SHAPE, -1000, np.int16)
    data[4:12, 5:13, 3:11] = 400
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def make_bids(root: Path) -> Path:
    """sub-01 CT (LPS) + T2w; sub-02/ses-01 CT (RAS); sub-03 CT with the dataset's own v1 label."""
    lps = np.diag([-1.5, -1.5, 2.0, 1.0])
    lps[:3, 3] = [20, 20, -10]
    for rel, aff in (("sub-01/anat/sub-01_CT.nii.gz", lps), ("sub-02/ses-01/anat/sub-02_ses-01_CT.nii.gz",
                                                           np.diag([1.0, 1.0, 1.0, 1.0])),
                     ("sub-03/anat/sub-03_CT.nii.gz", np.diag([1.0, 1.0, 1.0, 1.0]))):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(_ct(aff), str(root / rel))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(root / "sub-01/anat/sub-01_T2w.nii.gz"))
    own = root / "derivatives/labels/sub-03/anat"
    own.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.full(CT_SHAPE, 92, np.uint8), np.eye(4)), str(own / "sub-03_CT_seg.nii.gz"))
    (own / "sub-03_CT_seg.json").write_text(json.dumps({"LabelOrder": "totalsegmentator-v1", "SacrumIndices": [92]}))
    return root


def provide_weights(home: Path, fast: bool = False) -> None:
    """The folder layout TotalSegmentator's downloader leaves (checkpoint files empty here)."""
    for tid in ct_labels.TASK_WEIGHTS[fast]:
        fold = home / "nnunet/results" / ct_labels.WEIGHT_FOLDERS[tid] / "nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0"
        fold.mkdir(parents=True)
        (fold / "checkpoint_final.pth").write_bytes(b"")


@pytest.fixture
def fake_totalseg(monkeypatch):
    """Inject a fake ``totalsegmentator.python_api`` (the only mock); returns the list of its calls."""
    calls = []
    behaviour = {"labels": (25, 26)}

    def totalsegmentator(input, output=None, ml=False, task="total", roi_subset=None, fast=False,
                         device="gpu", quiet=False, **kwargs):
        calls.append({"input": str(input), "output": output, "ml": ml, "task": task,
                      "roi_subset": roi_subset, "fast": fast, "device": device})
        img = nib.load(str(input))
        seg = np.zeros(img.shape, np.uint8)
        for i, lab in enumerate(behaviour["labels"]):
            seg[5:11, 6:12, 4 + 3 * i: 7 + 3 * i] = lab
        hdr = img.header.copy()
        hdr.set_data_dtype(np.uint8)
        return nib.Nifti1Image(seg, img.affine, hdr)

    pkg = types.ModuleType("totalsegmentator")
    pkg.__version__ = "2.18.0"
    api = types.ModuleType("totalsegmentator.python_api")
    api.totalsegmentator = totalsegmentator
    pkg.python_api = api
    monkeypatch.setitem(sys.modules, "totalsegmentator", pkg)
    monkeypatch.setitem(sys.modules, "totalsegmentator.python_api", api)
    return types.SimpleNamespace(calls=calls, behaviour=behaviour)


@pytest.fixture
def totalseg_home(tmp_path, monkeypatch):
    home = tmp_path / "totalseg_home"
    home.mkdir()
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    return home


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_not_installed_one_line_nothing_written(tmp_path, monkeypatch):
    """Real environment: the main venv has no TotalSegmentator (blocked here only if it is installed)."""
    if importlib.util.find_spec("totalsegmentator") is not None:
        monkeypatch.setitem(sys.modules, "totalsegmentator", None)
        monkeypatch.setitem(sys.modules, "totalsegmentator.python_api", None)
    root = make_bids(tmp_path / "ds")
    before = _files(root)
    r = CliRunner().invoke(main, ["ct-labels", str(root)])
    assert r.exit_code == 3
    err = [line for line in r.output.splitlines() if line.startswith("ct-labels: ") and "kept" not in line]
    assert len(err) == 1 and "TotalSegmentator is not installed" in err[0] and "make setup CT=1" in err[0]
    assert _files(root) == before


def test_weights_missing_one_line_nothing_written(tmp_path, fake_totalseg, totalseg_home):
    """Fake TotalSegmentator installed, empty TOTALSEG_HOME_DIR: our own check stops before any call."""
    root = make_bids(tmp_path / "ds")
    before = _files(root)
    r = CliRunner().invoke(main, ["ct-labels", str(root)])
    assert r.exit_code == 3
    err = [line for line in r.output.splitlines() if "weights missing" in line]
    assert len(err) == 1
    assert "TOTALSEG_HOME_DIR" in err[0] and "`totalseg_download_weights -t total`" in err[0]
    assert str(totalseg_home / "nnunet" / "results") in err[0]
    assert fake_totalseg.calls == [] and _files(root) == before
    # a half-copied weight folder (no checkpoint) still counts as missing; --fast names its own task
    provide_weights(totalseg_home)
    ckpt = next((totalseg_home / "nnunet/results").glob("Dataset292_*/*/fold_0/checkpoint_final.pth"))
    ckpt.unlink()
    assert ct_labels.missing_weights() == ["Dataset292_TotalSegmentator_part2_vertebrae_1532subj"]
    r = CliRunner().invoke(main, ["ct-labels", "--fast", str(root)])
    assert r.exit_code == 3 and "`totalseg_download_weights -t total_fast`" in r.output
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj" in r.output


def test_weights_path_variable_wins(tmp_path, totalseg_home, monkeypatch):
    other = tmp_path / "weights"
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(other))
    assert ct_labels.totalseg_weights_dir() == other
    assert ct_labels.totalseg_weights_dir({}) == Path.home() / ".totalsegmentator/nnunet/results"


def test_writes_labels_and_sidecars_then_keeps_them(tmp_path, fake_totalseg, totalseg_home):
    """TotalSegmentator call faked (see module docstring); everything else real."""
    provide_weights(totalseg_home)
    root = make_bids(tmp_path / "ds")
    own_before = (root / "derivatives/labels/sub-03/anat/sub-03_CT_seg.nii.gz").read_bytes()
    r = CliRunner().invoke(main, ["ct-labels", "--device", "cpu", str(root)])
    assert r.exit_code == 0, r.output
    assert "ct-labels: 2 written, 1 kept, 0 failed" in r.output
    assert [c["input"] for c in fake_totalseg.calls] == [
        str(root / "sub-01/anat/sub-01_CT.nii.gz"), str(root / "sub-02/ses-01/anat/sub-02_ses-01_CT.nii.gz")]
    assert all(c["ml"] is True and c["task"] == "total" and c["roi_subset"] == ["sacrum", "vertebrae_S1"]
               and c["device"] == "cpu" and c["output"] is None for c in fake_totalseg.calls)

    for rel in ("sub-01/anat/sub-01_CT", "sub-02/ses-01/anat/sub-02_ses-01_CT"):
        ct = nib.load(str(root / f"{rel}.nii.gz"))
        lab = nib.load(str(root / f"derivatives/labels/{rel}_seg.nii.gz"))
        data = np.asanyarray(lab.dataobj)
        assert lab.get_data_dtype() == np.uint8 and data.shape == CT_SHAPE
        np.testing.assert_array_equal(lab.affine, ct.affine)
        np.testing.assert_array_equal(lab.get_qform(), ct.affine)
        np.testing.assert_array_equal(lab.get_sform(), ct.affine)
        assert sorted(np.unique(data).tolist()) == [0, 25, 26]
        assert int((data == 25).sum()) == 6 * 6 * 3 and int((data == 26).sum()) == 6 * 6 * 3
        side = json.loads((root / f"derivatives/labels/{rel}_seg.json").read_text())
        assert side["LabelOrder"] == "totalsegmentator-v2" and side["SacrumIndices"] == [25, 26]
        ts, ours = side["GeneratedBy"]
        assert ts == {"Name": "TotalSegmentator", "Version": "2.18.0", "Task": "total",
                      "RoiSubset": ["sacrum", "vertebrae_S1"], "Multilabel": True, "Fast": False, "Device": "cpu"}
        assert ours["Name"] == "sacrum-masks ct-labels"
        assert side["Sources"] == [f"bids:raw:{rel}.nii.gz"]
        assert side["Settings"] == {"Task": "total", "RoiSubset": ["sacrum", "vertebrae_S1"], "Fast": False}
    assert (root / "derivatives/labels/dataset_description.json").is_file()
    assert (root / "derivatives/labels/sub-03/anat/sub-03_CT_seg.nii.gz").read_bytes() == own_before
    assert not [p for p in (root / "derivatives").rglob(".*tmp*")]

    # re-run: nothing to do, TotalSegmentator not even imported
    n = len(fake_totalseg.calls)
    r = CliRunner().invoke(main, ["ct-labels", str(root)])
    assert r.exit_code == 0 and "0 written, 3 kept, 0 failed" in r.output and len(fake_totalseg.calls) == n
    # --force redoes ours only, never the dataset's own label
    r = CliRunner().invoke(main, ["ct-labels", "--force", str(root)])
    assert "2 written, 1 kept, 0 failed" in r.output and len(fake_totalseg.calls) == n + 2
    assert (root / "derivatives/labels/sub-03/anat/sub-03_CT_seg.nii.gz").read_bytes() == own_before
    # a changed CT makes our label out of date
    ct_path = root / "sub-01/anat/sub-01_CT.nii.gz"
    changed = _ct(nib.load(str(ct_path)).affine)
    changed.dataobj[0, 0, 0] = 7
    nib.save(changed, str(ct_path))
    r = CliRunner().invoke(main, ["ct-labels", str(root)])
    assert "1 written, 2 kept, 0 failed" in r.output and fake_totalseg.calls[-1]["input"] == str(ct_path)


def test_no_sacrum_found_fails_that_ct_only(tmp_path, fake_totalseg, totalseg_home):
    """Fake TotalSegmentator returning only S1, then nothing: indices claimed = indices present."""
    provide_weights(totalseg_home)
    root = make_bids(tmp_path / "ds")
    fake_totalseg.behaviour["labels"] = (26,)
    batch = ct_labels.run_ct_labels(root, device="cpu", command_line="test")
    assert dict(batch.counts) == {"kept": 1, "written": 2}
    side = json.loads((root / "derivatives/labels/sub-01/anat/sub-01_CT_seg.json").read_text())
    assert side["SacrumIndices"] == [26] and side["Labels"] == {"26": "vertebrae_S1"}

    root2 = make_bids(tmp_path / "ds2")
    fake_totalseg.behaviour["labels"] = ()
    batch = ct_labels.run_ct_labels(root2, device="cpu", command_line="test")
    assert dict(batch.counts) == {"kept": 1, "failed": 2} and batch.exit_code == 1
    assert "no sacrum (25) or vertebrae_S1 (26)" in batch.failures[0]
    assert {p.name for p in (root2 / "derivatives/labels").rglob("*CT_seg*")} == {"sub-03_CT_seg.nii.gz",
                                                                                  "sub-03_CT_seg.json"}


class _Killed(BaseException):
    """Stands for a SIGKILL between two writes (nothing of the run after it happens)."""


@pytest.mark.parametrize("killed_write", ["save_nifti_atomic", "write_json_atomic"])
@pytest.mark.parametrize("case", ["new label", "stale label"])
def test_run_killed_between_label_and_sidecar_is_redone(tmp_path, fake_totalseg, totalseg_home, monkeypatch,
                                                        killed_write, case):
    """TotalSegmentator call faked (see module docstring). Whichever write a kill interrupts, the next
    run redoes that CT: never a label without sidecar taken for foreign, never an old label beside a
    new sidecar taken for current."""
    provide_weights(totalseg_home)
    root = make_bids(tmp_path / "ds")
    ct_path = root / "sub-01/anat/sub-01_CT.nii.gz"
    if case == "stale label":
        assert dict(ct_labels.run_ct_labels(root, device="cpu", command_line="t").counts) == {"written": 2, "kept": 1}
        changed = _ct(nib.load(str(ct_path)).affine)
        changed.dataobj[0, 0, 0] = 7
        nib.save(changed, str(ct_path))
    real = getattr(derivatives, killed_write)   # the writer's atomic writes

    def kill_on_first_output(obj, path):
        if Path(path).parent.name == "anat":
            raise _Killed()
        return real(obj, path)

    with monkeypatch.context() as m:
        m.setattr(derivatives, killed_write, kill_on_first_output)
        with pytest.raises(_Killed):
            ct_labels.run_ct_labels(root, device="cpu", command_line="t")
    batch = ct_labels.run_ct_labels(root, device="cpu", command_line="t")
    expected = {"written": 2, "kept": 1} if case == "new label" else {"written": 1, "kept": 2}
    assert dict(batch.counts) == expected
    redone = [c["input"] for c in fake_totalseg.calls[-expected["written"]:]]
    assert redone[0] == str(ct_path)
    side = json.loads((root / "derivatives/labels/sub-01/anat/sub-01_CT_seg.json").read_text())
    assert side["SourcesSHA256"] == {"bids:raw:sub-01/anat/sub-01_CT.nii.gz": sha256_file(ct_path)}
    assert label_status(root, ct_path) == "up to date"


def label_status(root: Path, ct: Path, force: bool = False) -> str:
    """The writer's plan for a CT's label, as run_ct_labels asks it."""
    folder = ct_labels.labels_folder(root)
    out = folder.output_path(ct, "seg")
    return folder.plan(ct, [out], {folder.uri(ct): ct}, ct_labels.label_settings(False), force, clean=False).status


def test_sidecar_without_label_is_absent_unless_foreign(tmp_path):
    root = tmp_path / "ds"
    ct = root / "sub-01/anat/sub-01_CT.nii.gz"
    ct.parent.mkdir(parents=True)
    ct.write_bytes(b"ct")
    label = root / "derivatives/labels/sub-01/anat/sub-01_CT_seg.nii.gz"
    side = label.with_name("sub-01_CT_seg.json")
    label.parent.mkdir(parents=True)
    assert label_status(root, ct) == "write"
    side.write_text(json.dumps({"GeneratedBy": [{"Name": "TotalSegmentator"}, {"Name": "sacrum-masks ct-labels"}]}))
    assert label_status(root, ct) == "write"                         # ours: a killed run, redo it
    side.write_text(json.dumps({"LabelOrder": "totalsegmentator-v1", "SacrumIndices": [92]}))
    assert label_status(root, ct, force=True) == "kept"              # the dataset's own: never overwritten
    side.write_text(json.dumps({"GeneratedBy": [{"Name": "sacrum-masks ct-labels"}, {"Name": "manual-correction"}]}))
    label.write_bytes(b"x")
    assert label_status(root, ct, force=True) == "kept"              # corrected after us: no longer ours
    side.write_text("[1, 2]")
    with pytest.raises(InputError, match="sidecar is an array, not a JSON object"):   # one line, left alone
        label_status(root, ct)


def test_stale_temporaries_are_removed_under_the_lock(tmp_path, fake_totalseg, totalseg_home):
    """TotalSegmentator call faked (see module docstring)."""
    provide_weights(totalseg_home)
    root = make_bids(tmp_path / "ds")
    folder = root / "derivatives/labels/sub-01/anat"
    folder.mkdir(parents=True)
    leftovers = [folder / ".sub-01_CT_seg.nii.gz.abc123.tmp.nii.gz", folder / ".sub-01_CT_seg.json.abc123.tmp.json"]
    for p in leftovers:
        p.write_bytes(b"half")
    batch = ct_labels.run_ct_labels(root, device="cpu", command_line="t")
    assert dict(batch.counts) == {"written": 2, "kept": 1}
    assert not any(p.exists() for p in leftovers)


def test_unreadable_ct_is_one_failure_line(tmp_path, fake_totalseg, totalseg_home, monkeypatch):
    """TotalSegmentator call faked (see module docstring). The OS refusing to read a CT is simulated by
    making the checksum's read fail (the tests run as root, where file modes do not stop reads)."""
    provide_weights(totalseg_home)
    root = make_bids(tmp_path / "ds")
    real = derivatives.sha256_file

    def refuse_sub01(path, *args, **kwargs):
        if Path(path).name == "sub-01_CT.nii.gz":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(derivatives, "sha256_file", refuse_sub01)
    batch = ct_labels.run_ct_labels(root, device="cpu", command_line="t")     # no label yet: read in the loop
    assert dict(batch.counts) == {"written": 1, "kept": 1, "failed": 1} and batch.exit_code == 1
    assert batch.failures == ["sub-01/anat/sub-01_CT.nii.gz: cannot read (Permission denied)"]
    monkeypatch.setattr(derivatives, "sha256_file", real)
    assert dict(ct_labels.run_ct_labels(root, device="cpu", command_line="t").counts) == {"written": 1, "kept": 2}
    monkeypatch.setattr(derivatives, "sha256_file", refuse_sub01)
    batch = ct_labels.run_ct_labels(root, device="cpu", command_line="t")     # our label: read for its plan
    assert dict(batch.counts) == {"kept": 2, "failed": 1}
    assert len(batch.failures) == 1 and "cannot read (Permission denied)" in batch.failures[0]


def test_label_on_grid_refuses_wrong_grid_and_foreign_values():
    ct = _ct(np.eye(4))
    ok = nib.Nifti1Image(np.pad(np.full((2, 2, 2), 25, np.uint8), 3)[:16, :18, :14].copy(), np.eye(4))
    with pytest.raises(ValueError, match="not on the CT grid"):
        ct_labels.label_on_grid(ok, _ct(np.diag([2.0, 1.0, 1.0, 1.0])))
    bad = np.zeros(CT_SHAPE, np.uint8)
    bad[1, 1, 1], bad[2, 2, 2] = 25, 92
    with pytest.raises(ValueError, match=r"values \[92\]"):
        ct_labels.label_on_grid(nib.Nifti1Image(bad, np.eye(4)), ct)


def test_tables_match_installed_totalsegmentator():
    """Only when the real TotalSegmentator is installed (make setup CT=1): our copies of its tables agree."""
    pytest.importorskip("totalsegmentator.map_to_binary")
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.map_to_binary import class_map

    assert {k: class_map["total"][k] for k in ct_labels.V2_CLASSES} == ct_labels.V2_CLASSES
    assert {k: TASK_ID_WEIGHTS_CONFIGS[k]["foldername"] for k in ct_labels.WEIGHT_FOLDERS} == ct_labels.WEIGHT_FOLDERS
