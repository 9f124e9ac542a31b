"""The derivatives writer (docs/DESIGN.md, "Derivatives") as every stage uses it.

Ownership, the write order, the up-to-date rule (a moved data root stays up to date), a manual correction in
``reg-labels`` surviving an input change, ``--output-dir`` on a read-only raw dataset (run as the unprivileged
user ``nobody``: root ignores file modes), and bad input as one line.
"""

from __future__ import annotations

import doctest
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from sacrum_masks import derivatives
from sacrum_masks.cli import main
from sacrum_masks.errors import InputError
from sacrum_masks.predict import Settings, items_from_bids, run_predict, select_items
from sacrum_masks.register import register_dataset
from test_predict import Loads, fake_model_dir, small_dataset
from test_register import make_bids

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = "predict: {} written, {} up to date, {} kept, {} failed"


def test_doctests():
    result = doctest.testmod(derivatives)
    assert result.attempted > 0 and result.failed == 0


def tree(root: Path) -> dict[str, int]:
    """Every path below ``root`` with its modification time (what 'nothing changed' means)."""
    return {p.relative_to(root).as_posix(): p.lstat().st_mtime_ns for p in sorted(root.rglob("*"))}


def folder_for(tmp_path):
    ds = small_dataset(tmp_path)
    return ds, derivatives.prepare(ds, "labels", program="sacrum-masks")


def test_plan_statuses_ownership_and_one_write_order(tmp_path):
    ds, folder = folder_for(tmp_path)
    image = ds / "sub-01/anat/sub-01_T2w.nii.gz"
    out = folder.output_path(image, "label-sacrum", "seg")
    side = out.with_name("sub-01_T2w_label-sacrum_seg.json")
    inputs = {folder.uri(image): image}
    assert folder.uri(image) == "bids:raw:sub-01/anat/sub-01_T2w.nii.gz"
    img = nib.load(str(image))
    mask = nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine)

    plan = folder.plan(image, [out], inputs, {"a": 1})
    assert plan.status == "write"
    seen = []
    real_save = derivatives.save_nifti_atomic

    def spy(obj, path):   # the sidecar on disk at the moment the mask is written
        seen.append(json.loads(side.read_text()))
        return real_save(obj, path)

    derivatives.save_nifti_atomic = spy
    try:
        written = folder.write({out: mask}, {"X": 1}, plan)
    finally:
        derivatives.save_nifti_atomic = real_save
    # pending sidecar first (ours, no checksums: never up to date), then the mask, then the final sidecar
    assert seen[0]["Pending"] is True and seen[0]["SourcesSHA256"] == {}
    assert derivatives.is_ours(seen[0], "sacrum-masks")
    assert json.loads(side.read_text()) == written and "Pending" not in written
    assert folder.plan(image, [out], inputs, {"a": 1}).status == "up to date"
    assert folder.plan(image, [out], inputs, {"a": 2}).status == "write"          # a setting changed
    assert folder.plan(image, [out], inputs, {"a": 1}, force=True).status == "write"
    # a killed write (pending sidecar left) is redone
    side.write_text(json.dumps({**written, "Pending": True}))
    assert folder.plan(image, [out], inputs, {"a": 1}).status == "write"
    # SCT's manual-correction appends its entry: no longer ours, kept even with --force
    side.write_text(json.dumps({**written, "GeneratedBy": [*written["GeneratedBy"], {"Name": "manual-correction"}]}))
    assert folder.plan(image, [out], inputs, {"a": 1}, force=True).status == "kept"
    # no sidecar at all: kept
    side.unlink()
    assert folder.plan(image, [out], inputs, {"a": 1}, force=True).status == "kept"
    with pytest.raises(ValueError):
        folder.write({out: mask}, {}, derivatives.Plan("kept"))


def test_bad_input_is_one_line_and_nothing_half_written(tmp_path):
    ds, folder = folder_for(tmp_path)
    image = ds / "sub-01/anat/sub-01_T2w.nii.gz"
    out = folder.output_path(image, "label-sacrum", "seg")
    out.parent.mkdir(parents=True)
    # a manual mask whose image was replaced by one on another grid
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), np.eye(4)), str(out))
    with pytest.raises(InputError, match="no longer on the grid of sub-01_T2w.nii.gz"):
        folder.plan(image, [out], {folder.uri(image): image}, {})
    # a derivatives folder that is a file
    shutil.rmtree(ds / "derivatives")
    (ds / "derivatives").write_text("not a folder")
    with pytest.raises(InputError, match="is a file, not a folder"):
        folder.ensure()
    r = CliRunner().invoke(main, ["predict", "--bids", str(ds), "--model", str(fake_model_dir(tmp_path)), "--device", "cpu"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == (
        f"sacrum-masks: error: {ds / 'derivatives'}: is a file, not a folder: cannot write derivatives below it")
    # --output-dir inside the raw dataset's sub-* folders
    (ds / "derivatives").unlink()
    before = tree(ds)
    r = CliRunner().invoke(main, ["predict", "--bids", str(ds), "--model", str(fake_model_dir(tmp_path / "m")),
                                  "--output-dir", str(ds / "sub-01" / "out"), "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        f"sacrum-masks: error: {ds / 'sub-01' / 'out'}: --output-dir is inside the raw dataset {ds.resolve()} "
        f"(inside its sub-* folders): it must be elsewhere (leave it out to write {ds.resolve()}/derivatives)"]
    assert tree(ds) == before


def test_bids_folder_without_subjects_is_one_line_exit_2(tmp_path):
    small_dataset(tmp_path)   # tmp_path/bids/ds: pass the parent of the datasets by mistake
    r = CliRunner().invoke(main, ["predict", "--bids", str(tmp_path / "bids"), "--model", str(fake_model_dir(tmp_path)), "--device", "cpu"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        f"sacrum-masks: error: {tmp_path / 'bids'}: --bids: not a BIDS dataset, no sub-* folder "
        "(its folders ds are: pass each with --bids)"]


def test_contrasts_default_to_the_models_and_others_are_listed(tmp_path, capsys):
    ds = small_dataset(tmp_path)   # sub-01 T2w, sub-02 T1w, sub-03 T2w
    model = fake_model_dir(tmp_path)
    (model / "dataset.json").write_text(json.dumps({"sacrum_masks_contrasts": ["T2w"]}))
    assert run_predict(select_items(items_from_bids(ds)), Settings(model), model_factory=Loads()) == 0
    out = capsys.readouterr().out
    t1 = ds / "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"
    assert f"predict: skipped (contrast)  {t1}: T1w (segmenting T2w)" in out
    assert out.strip().splitlines()[-1] == SUMMARY.format(2, 0, 0, 0) + ", 1 skipped (contrast)"
    assert run_predict(select_items(items_from_bids(ds)), Settings(model, contrasts=("T1w", "T2w")),
                       model_factory=Loads()) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == SUMMARY.format(1, 2, 0, 0)


def test_moved_data_root_leaves_every_output_up_to_date(tmp_path, capsys):
    data = tmp_path / "data"
    ds = small_dataset(data)
    reg = make_bids(data / "reg")
    model = fake_model_dir(tmp_path)
    assert run_predict(select_items(items_from_bids(ds)), Settings(model), model_factory=Loads()) == 0
    assert register_dataset(reg).exit_code == 0
    moved = tmp_path / "remounted"
    shutil.move(str(data), str(moved))   # mv keeps bytes, not the path: nothing must be redone
    loads = Loads()
    capsys.readouterr()
    assert run_predict(select_items(items_from_bids(moved / "bids" / "ds")), Settings(model), model_factory=loads) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == SUMMARY.format(0, 3, 0, 0) and loads.count == 0
    batch = register_dataset(moved / "reg")
    assert batch.summary(["written", "up to date", "failed"]) == "register-ct: 0 written, 3 up to date, 0 failed"


def test_manual_correction_in_reg_labels_survives_an_input_change(tmp_path):
    bids = make_bids(tmp_path / "ds")
    assert register_dataset(bids).exit_code == 0
    out = bids / "derivatives/reg-labels/sub-02/anat/sub-02_T2w_seg.nii.gz"
    side = out.with_name("sub-02_T2w_seg.json")
    # a correction as SCT's manual-correction leaves it: new voxels, its GeneratedBy entry appended
    corrected = nib.load(str(out))
    data = np.asanyarray(corrected.dataobj).copy()
    data[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(data, corrected.affine, corrected.header), str(out))
    meta = json.loads(side.read_text())
    meta["GeneratedBy"].append({"Name": "manual-correction", "Author": "a rater"})
    side.write_text(json.dumps(meta))
    corrected_bytes, side_text = out.read_bytes(), side.read_text()
    # the input label changes, then --force: the correction is kept both times
    label = bids / "derivatives/labels/sub-02/anat/sub-02_T2w_seg.nii.gz"
    img = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine, img.header), str(label))
    for force in (False, True):
        batch = register_dataset(bids, force=force)
        assert batch.counts["kept"] == 1 and batch.counts["written"] == (2 if force else 0)
        assert out.read_bytes() == corrected_bytes and side.read_text() == side_text


def _without_privileges(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -c script`` with every capability dropped (``setpriv --bounding-set=-all``): even as
    uid 0 the kernel then checks file modes (no CAP_DAC_OVERRIDE), as for any unprivileged user."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'py'}:{ROOT / 'tests'}"}
    return subprocess.run([shutil.which("setpriv"), "--bounding-set=-all", "--inh-caps=-all", "--",
                           sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to drop privileges")
def test_output_dir_on_a_read_only_raw_dataset(tmp_path):
    """chmod a-w on the raw dataset, then stages 1 and 4 and QC with --output-dir, run without privileges:
    the same layout under the other root, DatasetLinks back to the raw dataset, up to date on a re-run,
    nothing created inside the raw dataset."""
    base = tmp_path
    try:
        ds = make_bids(base / "ds")
        model = fake_model_dir(base / "m")
        out = base / "out"
        out.mkdir()
        for p in [ds, *ds.rglob("*")]:
            os.chmod(p, 0o555 if p.is_dir() else 0o444)
        before = tree(ds)
        script = (
            "import sys; from pathlib import Path\n"
            "from sacrum_masks.predict import Settings, items_from_bids, run_predict, select_items\n"
            "from sacrum_masks.register import register_dataset\n"
            "from sacrum_masks.qc import run_qc\n"
            "from test_predict import Loads\n"
            "ds, model, out = map(Path, sys.argv[1:4])\n"
            "for _ in range(2):\n"
            "    b = register_dataset(ds, output_dir=out)\n"
            "    print(b.summary(['written', 'up to date', 'failed']))\n"
            "    rc = run_predict(select_items(items_from_bids(ds)), Settings(model, output_dir=out),"
            " model_factory=Loads())\n"
            "    assert rc == 0\n"
            "run_qc(out / 'ds/derivatives/reg-labels', command_line='t')\n")
        probe = _without_privileges(f"open({str(ds / 'probe')!r}, 'w')")
        assert probe.returncode != 0 and "Permission denied" in probe.stderr   # the dataset really is read-only
        proc = _without_privileges(script, str(ds), str(model), str(out))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert lines.index("register-ct: 3 written, 0 up to date, 0 failed") < lines.index(
            "register-ct: 0 written, 3 up to date, 0 failed")
        assert "register-ct: 0 written, 3 up to date, 0 failed" in lines
        summaries = [line.split(";")[0] for line in lines if line.startswith("predict: ") and " written, " in line]
        assert summaries == [SUMMARY.format(3, 0, 0, 0), SUMMARY.format(0, 3, 0, 0)]
        assert tree(ds) == before                                # nothing created inside the raw dataset
        for pipeline in ("labels", "reg-labels", "qc-sacrum-reg-labels"):
            desc = json.loads((out / "ds/derivatives" / pipeline / "dataset_description.json").read_text())
            assert desc["DatasetLinks"]["raw"] == ds.resolve().as_uri()
            assert derivatives.raw_dataset_of(out / "ds/derivatives" / pipeline) == ds.resolve()
        assert (out / "ds/derivatives/labels/sub-01/anat/sub-01_T2w_label-sacrum_seg.nii.gz").is_file()
        assert (out / "ds/derivatives/qc-sacrum-reg-labels/index.html").is_file()
    finally:
        for p in [ds, *ds.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                os.chmod(p, 0o755)
