"""The checks find implanted faults in real demo masks, leave clean ones alone, and pass real sacrum labels.

* Faults (tests/qc_faults.py) implanted in copies of stage 4's demo masks (``demo_run`` fixture): a hole, a
  cut at the FOV's inferior border, a large extra component, a half-size mask, a left half shifted superior.
  Each is flagged with the right reason and ranked above every clean mask, in a derivatives report and in a
  config report spanning both test datasets; at most one of the 24 clean demo masks is flagged.
* The real sacrum labels of ../shared/data/real (a manual reference on a real sagittal lumbar MRI grid,
  panoptica_spine_ref label 26; TotalSegmentator's CT sacrum) pass the shape checks (their images are not
  public / not MRI, so the per-mask checks are run on the arrays).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import qc_faults
from sacrum_masks import qc_checks
from sacrum_masks.config import make_config
from sacrum_masks.nifti import to_rpi, voxel_volume_ml
from sacrum_masks.qc import mask_measures, run_qc, run_qc_config, shape_checks

TEST_SETS = ("whole-spine", "spider-challenge-2023")


@pytest.fixture(scope="module")
def faulty(demo_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("qc_faults") / "bids"
    sets = qc_faults.copy_datasets(demo_run.bids, TEST_SETS, root)
    ds = sets["spider-challenge-2023"]
    clean = sorted((ds / "derivatives" / "labels").rglob("*_label-sacrum_seg.nii.gz"))
    implanted = {fault: qc_faults.implant(ds, mask, fault) for fault, mask in zip(qc_faults.FAULTS, clean)}
    return root, sets, implanted


def _clean_masks(sets) -> list:
    return sorted(p for name in TEST_SETS for p in (sets[name] / "derivatives" / "labels").rglob(
        "*_label-sacrum_seg.nii.gz") if "sub-f" not in p.name)


@pytest.mark.slow
def test_faults_flagged_with_reason_and_ranked_first(faulty):
    root, sets, implanted = faulty
    entries, index = run_qc(sets["spider-challenge-2023"] / "derivatives" / "labels")
    assert len(entries) == 16 + len(qc_faults.FAULTS)
    by_name = {e.mask.rsplit("/", 1)[-1]: e for e in entries}
    for fault, path in implanted.items():
        e = by_name[path.name]
        assert qc_faults.FAULTS[fault] in e.flags, (fault, e.flags, e.reasons)
        assert e.reasons[e.flags.index(qc_faults.FAULTS[fault])], fault
    faulty_rank = max(i for i, e in enumerate(entries) if "sub-f" in e.mask)
    assert faulty_rank == len(qc_faults.FAULTS) - 1, [(e.mask, e.score) for e in entries[:8]]
    clean_flagged = [e for e in entries if "sub-f" not in e.mask and e.flags]
    assert len(clean_flagged) <= 1, [(e.mask, e.reasons) for e in clean_flagged]
    # the reasons are on the page and in qc.json
    page = index.read_text()
    summary = json.loads((index.parent / "qc.json").read_text())
    for e in entries[:len(qc_faults.FAULTS)]:
        assert all(r.replace("<", "&lt;") in page for r in e.reasons)
    assert [m["mask"] for m in summary["masks"]] == [e.mask for e in entries]


@pytest.mark.slow
def test_clean_demo_masks_and_a_config_report(faulty, tmp_path):
    root, sets, implanted = faulty
    clean = _clean_masks(sets)
    assert len(clean) == 24
    whole, _ = run_qc(sets["whole-spine"] / "derivatives" / "labels", tmp_path / "ws")
    # the config: 24 clean + 5 faulty masks of two datasets; the cohort checks run per dataset
    config = make_config(clean + sorted(implanted.values()), "LABEL", 0.2, 0.2, 0)
    cfg = tmp_path / "round1.json"
    cfg.write_text(json.dumps(config))
    entries, index = run_qc_config(cfg)
    assert index == tmp_path / "round1_qc" / "index.html"
    assert len(entries) == 29
    flagged_clean = [e for e in entries if "sub-f" not in e.mask and e.flags]
    flagged_clean += [e for e in whole if e.flags]
    assert len({e.mask for e in flagged_clean}) <= 1, [(e.mask, e.reasons) for e in flagged_clean]
    assert all("sub-f" in e.mask for e in entries[:5]) and all(e.flags for e in entries[:5])


@pytest.mark.real
def test_real_sacrum_labels_pass_the_shape_checks(real_dir):
    cases = [("panoptica_spine_ref.nii.gz", 26), ("totalseg_ct_sacrum_v1.nii.gz", None)]
    for name, label in cases:
        img = nib.load(real_dir / name)
        data = np.asanyarray(img.dataobj)
        fg = (data == label) if label is not None else (data != 0)
        rpi = to_rpi(img, fg.astype(np.uint8))
        spacing = nib.affines.voxel_sizes(rpi.affine)
        m = mask_measures(np.asanyarray(rpi.dataobj), spacing, voxel_volume_ml(img))
        checks = shape_checks(m, voxel_volume_ml(img))
        failed = [c.reason for c in checks if c.failed]
        assert not failed, (name, failed)
        assert {c.flag for c in checks} == {"empty", "extra_components", "touches_border", "holes", "asymmetry"}
        assert m["asymmetry"] < qc_checks.T("asymmetry") / 2, (name, m["asymmetry"])
