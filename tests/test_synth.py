"""Synthetic demo datasets (sacrum_masks.synth): layout, geometry, labels, determinism, CLI."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from sacrum_masks import bids, synth
from sacrum_masks.cli import main

DATASETS = ("goldatlas", "synthrad2023", "mrspineseg", "whole-spine", "spider-challenge-2023")

#: orientation (nibabel axis codes) and obliquity of every image of the default set, as documented
#: in the module docstring (subject -> (MRI axcodes, MRI oblique, CT axcodes, CT oblique)).
CT_LAYOUT = {
    "goldatlas": {"01": ("RAS", False, "LPS", False), "02": ("LPS", False, "RAS", True),
                  "03": ("PIR", False, "LPS", False), "04": ("LAS", True, "RAS", False),
                  "05": ("RAS", False, "LPS", True), "06": ("LPS", False, "RAS", False)},
    "synthrad2023": {"01": ("LPS", False, "RAS", False), "02": ("PIR", False, "LPS", True),
                     "03": ("LAS", False, "RAS", False), "04": ("RAS", True, "LPS", False),
                     "05": ("LPS", False, "RAS", True), "06": ("PIR", False, "LPS", False)},
}
MRI_LAYOUT = {
    "mrspineseg": {"01": "PIR", "02": "LAS", "03": "RAS", "04": "LPS", "05": "PIR", "06": "LAS"},
    "whole-spine": {"01": "LAS", "02": "RAS", "03": "LPS", "04": "PIR"},
    "spider-challenge-2023": {"001": "RAS", "002": "LPS", "003": "PIR", "004": "LAS", "005": "RAS", "006": "LPS"},
}
THICK = {"03", "06", "003", "006"}  # subjects with 4 mm sagittal slices (x)
OBLIQUE_MRI = {"04", "004"}


def _oblique(affine) -> bool:
    cols = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return not np.allclose(np.abs(cols).max(axis=0), 1.0, atol=1e-6)


def _mri_images(root: Path, dataset: str) -> list[Path]:
    return bids.find_images(root / dataset)


def _truth_of(root: Path, dataset: str, image: Path) -> Path:
    rel = image.parent.relative_to(root / dataset)
    stem = bids.BidsName.parse(image).add_suffix("label-sacrum", "seg").stem
    return root / "truth" / dataset / rel / f"{stem}.nii.gz"


def test_doctests():
    result = doctest.testmod(synth, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_default_layout_and_names(demo_root):
    for name in DATASETS:
        desc = json.loads((demo_root / name / "dataset_description.json").read_text())
        assert desc["BIDSVersion"] and desc["DatasetType"] == "raw"
    names = {name: [p.relative_to(demo_root / name).as_posix() for p in _mri_images(demo_root, name)]
             for name in DATASETS}
    both = ("T1w", "T2w")
    assert names["goldatlas"] == [f"sub-{s:02d}/anat/sub-{s:02d}_{c}.nii.gz" for s in range(1, 7) for c in both]
    assert names["synthrad2023"] == [f"sub-{s:02d}/anat/sub-{s:02d}_T1w.nii.gz" for s in range(1, 7)]
    assert names["mrspineseg"] == [f"sub-{s:02d}/anat/sub-{s:02d}_T2w.nii.gz" for s in range(1, 7)]
    assert names["whole-spine"] == [f"sub-{s:02d}/anat/sub-{s:02d}_{c}.nii.gz" for s in range(1, 5) for c in both]
    spider = []
    for s in range(1, 7):
        for ses in (("01", "02") if s in (2, 5) else (None,)):
            folder = f"sub-{s:03d}/" + (f"ses-{ses}/" if ses else "") + "anat"
            prefix = f"sub-{s:03d}_" + (f"ses-{ses}_" if ses else "")
            spider += [f"{folder}/{prefix}acq-lowresSag_{c}.nii.gz" for c in ("T1w", "T2w")]
    assert names["spider-challenge-2023"] == sorted(spider)
    assert sum(len(v) for k, v in names.items() if k in ("goldatlas", "synthrad2023", "mrspineseg")) == 24
    # CTs and labels where (and only where) the real datasets have them
    for name in ("goldatlas", "synthrad2023"):
        for s in range(1, 7):
            assert (demo_root / name / f"sub-{s:02d}/anat/sub-{s:02d}_CT.nii.gz").is_file()
            assert (demo_root / name / f"derivatives/labels/sub-{s:02d}/anat/sub-{s:02d}_CT_seg.nii.gz").is_file()
        assert not list((demo_root / name / "derivatives").rglob("*_T?w_seg.nii.gz"))  # stage 1 makes them
    for s in range(1, 7):
        assert (demo_root / f"mrspineseg/derivatives/labels/sub-{s:02d}/anat/sub-{s:02d}_T2w_seg.nii.gz").is_file()
    for name in ("whole-spine", "spider-challenge-2023"):
        assert not (demo_root / name / "derivatives").exists()
        assert not list((demo_root / name).rglob("*_CT*"))
    assert "evaluation only" in (demo_root / "truth" / "README").read_text()


def test_orientation_oblique_and_thick_slices_as_documented(demo_root):
    seen = set()
    for name, layout in CT_LAYOUT.items():
        for sub, (mri_codes, mri_obl, ct_codes, ct_obl) in layout.items():
            for img_path in (demo_root / name / f"sub-{sub}" / "anat").glob("*.nii.gz"):
                img = nib.load(img_path)
                is_ct = img_path.name.endswith("_CT.nii.gz")
                assert "".join(nib.aff2axcodes(img.affine)) == (ct_codes if is_ct else mri_codes), img_path
                assert _oblique(img.affine) == (ct_obl if is_ct else mri_obl), img_path
                seen.add(("CT" if is_ct else "MRI", "".join(nib.aff2axcodes(img.affine)), _oblique(img.affine)))
    for name, layout in MRI_LAYOUT.items():
        for sub, codes in layout.items():
            paths = list((demo_root / name / f"sub-{sub}").rglob("*.nii.gz"))
            assert paths
            for img_path in paths:
                img = nib.load(img_path)
                assert "".join(nib.aff2axcodes(img.affine)) == codes, img_path
                assert _oblique(img.affine) == (sub in OBLIQUE_MRI), img_path
    # thick sagittal slices: 4 mm along world x, whatever the storage order
    for name in DATASETS:
        for img_path in _mri_images(demo_root, name):
            img = nib.load(img_path)
            sub = bids.BidsName.parse(img_path).sub
            x_step = np.abs(img.affine[0, :3]).max()
            assert (abs(x_step - 4.0) < 0.3) == (sub in THICK), img_path
            assert 40 * 48 * 48 <= np.prod(img.shape) <= 60 * 80 * 80, img_path  # small volumes
    assert {("CT", "LPS", True), ("CT", "RAS", True), ("MRI", "PIR", False), ("MRI", "LAS", True)} <= seen


def test_dtypes_and_headers(demo_root):
    for path in sorted(demo_root.rglob("*.nii.gz")):
        img = nib.load(path)
        if path.name.endswith("_CT.nii.gz"):
            expected = np.int16
        elif path.name.endswith("_seg.nii.gz"):
            expected = np.uint8
        else:
            expected = np.float32
        assert img.get_data_dtype() == expected, path
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1, path
        assert img.ndim == 3


def _sacrum_world(label_path: Path, indices) -> tuple[np.ndarray, nib.Nifti1Image]:
    lab = nib.load(label_path)
    ijk = np.argwhere(np.isin(np.asarray(lab.dataobj), indices)).T
    return lab.affine[:3, :3] @ ijk + lab.affine[:3, 3:4], lab


@pytest.mark.parametrize("dataset, indices", [("goldatlas", [92]), ("synthrad2023", [25, 26])])
def test_ct_sacrum_through_affines_lands_on_mri_sacrum(demo_root, dataset, indices):
    """CT label voxel centres -> world -> MRI voxels: centroid within one MRI voxel of the truth; the
    nearest-neighbour resampling of the CT label onto the MRI grid overlaps the truth (Dice > 0.85)."""
    for image in _mri_images(demo_root, dataset):
        sub = bids.BidsName.parse(image).sub
        label = demo_root / dataset / f"derivatives/labels/sub-{sub}/anat/sub-{sub}_CT_seg.nii.gz"
        world, lab = _sacrum_world(label, indices)
        mri = nib.load(image)
        truth = np.asarray(nib.load(_truth_of(demo_root, dataset, image)).dataobj)
        inv = np.linalg.inv(mri.affine)
        vox = inv[:3, :3] @ world + inv[:3, 3:4]
        inside = np.all((vox > -0.5) & (vox < np.array(mri.shape)[:, None] - 0.5), axis=0)
        assert inside.all(), f"{image.name}: CT sacrum leaves the MRI field of view"
        assert np.all(np.abs(vox.mean(axis=1) - np.argwhere(truth).mean(axis=0)) < 1.0), image.name
        # nearest neighbour: MRI voxel centre -> CT voxel
        ijk = np.indices(mri.shape).reshape(3, -1)
        to_ct = np.linalg.inv(lab.affine) @ mri.affine
        c = np.rint(to_ct[:3, :3] @ ijk + to_ct[:3, 3:4]).astype(int)
        ok = np.all((c >= 0) & (c < np.array(lab.shape)[:, None]), axis=0)
        carried = np.zeros(ijk.shape[1], bool)
        carried[ok] = np.isin(np.asarray(lab.dataobj)[tuple(c[:, ok])], indices)
        carried = carried.reshape(mri.shape)
        dice = 2 * np.count_nonzero(carried & (truth > 0)) / (carried.sum() + truth.sum())
        assert dice > 0.85, f"{image.name}: Dice {dice:.3f}"


def test_label_orders_and_sidecars(demo_root):
    expect = {"goldatlas": ("totalsegmentator-v1", [92], {92, 18, 19, 90, 91}),
              "synthrad2023": ("totalsegmentator-v2", [25, 26], {25, 26, 27, 28, 77, 78})}
    for name, (order, sacrum, values) in expect.items():
        for s in range(1, 7):
            seg = demo_root / name / f"derivatives/labels/sub-{s:02d}/anat/sub-{s:02d}_CT_seg.nii.gz"
            side = json.loads(seg.with_name(seg.name.replace(".nii.gz", ".json")).read_text())
            assert side["LabelOrder"] == order and side["SacrumIndices"] == sacrum
            present = set(np.unique(np.asarray(nib.load(seg).dataobj)).tolist())
            assert values <= present, (seg, present)
            assert {int(k) for k in side["Labels"]} >= present - {0}
    # v2: S1 (26) is the top of the sacrum (25); v1: hip_left (90) at the subject's left (world -x, RAS+)
    world_s1, _ = _sacrum_world(demo_root / "synthrad2023/derivatives/labels/sub-01/anat/sub-01_CT_seg.nii.gz", [26])
    world_sac, _ = _sacrum_world(demo_root / "synthrad2023/derivatives/labels/sub-01/anat/sub-01_CT_seg.nii.gz", [25])
    assert world_s1[2].mean() > world_sac[2].mean() + 10
    left, _ = _sacrum_world(demo_root / "goldatlas/derivatives/labels/sub-01/anat/sub-01_CT_seg.nii.gz", [90])
    right, _ = _sacrum_world(demo_root / "goldatlas/derivatives/labels/sub-01/anat/sub-01_CT_seg.nii.gz", [91])
    assert left[0].mean() < -30 and right[0].mean() > 30


def test_mrspineseg_masks_headers_differ_slightly(demo_root):
    for s in range(1, 7):
        img = nib.load(demo_root / f"mrspineseg/sub-{s:02d}/anat/sub-{s:02d}_T2w.nii.gz")
        seg_path = demo_root / f"mrspineseg/derivatives/labels/sub-{s:02d}/anat/sub-{s:02d}_T2w_seg.nii.gz"
        seg = nib.load(seg_path)
        assert seg.shape == img.shape
        for get in ("get_qform", "get_sform"):
            diff = np.abs(getattr(seg, get)() - getattr(img, get)())
            assert diff[:3, :3].max() < 1e-5, (seg_path, get)  # same rotation and voxel size
            assert 5e-5 < diff[:3, 3].max() <= 0.01, (seg_path, get, diff[:3, 3])
        side = json.loads(seg_path.with_name(f"sub-{s:02d}_T2w_seg.json").read_text())
        assert side["LabelOrder"] == "mrspineseg" and side["SacrumIndices"] == [1]
        data = np.asarray(seg.dataobj)
        assert {0, 1, 2, 11, 12} <= set(np.unique(data).tolist())
        truth_path = demo_root / f"truth/mrspineseg/sub-{s:02d}/anat/sub-{s:02d}_T2w_label-sacrum_seg.nii.gz"
        truth = np.asarray(nib.load(truth_path).dataobj)
        assert np.array_equal(data == 1, truth == 1)


def test_truth_masks_binary_on_image_grid(demo_root):
    n = 0
    for name in DATASETS:
        for image in _mri_images(demo_root, name):
            img = nib.load(image)
            truth = nib.load(_truth_of(demo_root, name, image))
            data = np.asarray(truth.dataobj)
            assert truth.get_data_dtype() == np.uint8 and data.shape == img.shape
            assert set(np.unique(data).tolist()) == {0, 1}
            assert np.allclose(truth.get_qform(), img.get_qform(), rtol=0, atol=1e-6)
            assert np.array_equal(truth.get_sform(), img.get_sform())
            # the whole sacrum is in the field of view (nothing on the border)
            assert not (data[[0, -1]].any() or data[:, [0, -1]].any() or data[:, :, [0, -1]].any()), image
            n += 1
    assert n == 12 + 6 + 6 + 8 + 16
    assert not list((demo_root / "truth").rglob("*_CT*"))


def test_contrasts_differ_between_t1w_t2w_and_ct():
    anatomy = synth.Anatomy.draw(np.random.default_rng(5))
    aff, shape = synth.grid_affine("RAS", (2.0, 2.0, 2.0), (40, 56, 64), anatomy.to_world((0, -10, -14)))
    means = {}
    for contrast in ("T1w", "T2w"):
        data, struct = synth.render_mri(anatomy, aff, shape, contrast, np.random.default_rng(0))
        assert data.dtype == np.float32 and data.min() >= 0
        means[contrast] = {k: float(data[np.isin(struct, codes)].mean()) for k, codes in
                           {"disc": synth.DISCS, "bone": synth.VERTEBRAE, "csf": [synth.CSF],
                            "fat": [synth.FAT], "soft": [synth.SOFT]}.items()}
    t1, t2 = means["T1w"], means["T2w"]
    assert t1["fat"] > t1["bone"] > t1["disc"] and t1["csf"] < t1["soft"]
    assert t2["disc"] > t2["bone"] and t2["csf"] > t2["soft"]
    ct, struct = synth.render_ct(anatomy, aff, shape, np.random.default_rng(0))
    assert ct.dtype == np.int16
    assert abs(ct[np.isin(struct, (synth.SACRUM, synth.SACRUM_S1))].mean() - 700) < 5
    assert abs(ct[struct == synth.SOFT].mean() - 40) < 5
    assert abs(ct[struct == synth.AIR].mean() + 1000) < 5


def _voxels(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): np.asarray(nib.load(p).dataobj).tobytes()
            for p in sorted(root.rglob("*.nii.gz"))}


def test_same_seed_same_bytes_other_seed_differs(tmp_path, demo_root):
    a = synth.write_demo_datasets(tmp_path / "a", seed=3, subjects=2)
    synth.write_demo_datasets(tmp_path / "b", seed=3, subjects=2)
    synth.write_demo_datasets(tmp_path / "c", seed=4, subjects=2)
    assert set(a) == set(DATASETS) and a["goldatlas"] == tmp_path / "a" / "goldatlas"
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 40
    for rel in files_a:  # whole files, not just voxels: no time stamps anywhere
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    va, vc = _voxels(tmp_path / "a"), _voxels(tmp_path / "c")
    assert va.keys() == vc.keys()
    images = [k for k in va if "truth" not in k and "_seg" not in k]
    assert all(va[k] != vc[k] for k in images)
    # the first N subjects do not depend on N: sub-01 of a 2-subject set (seed 0) is the default's sub-01
    synth.write_demo_datasets(tmp_path / "d", seed=0, subjects=1)
    for rel in ("goldatlas/sub-01/anat/sub-01_CT.nii.gz", "mrspineseg/sub-01/anat/sub-01_T2w.nii.gz",
                "truth/whole-spine/sub-01/anat/sub-01_T1w_label-sacrum_seg.nii.gz"):
        assert (tmp_path / "d" / rel).read_bytes() == (demo_root / rel).read_bytes()
    assert not (tmp_path / "d" / "spider-challenge-2023" / "sub-002").exists()


def test_subjects_option_and_sessions(tmp_path):
    synth.write_demo_datasets(tmp_path, subjects=2)
    assert sorted(p.name for p in (tmp_path / "whole-spine").glob("sub-*")) == ["sub-01", "sub-02"]
    spider = [p.relative_to(tmp_path / "spider-challenge-2023").as_posix()
              for p in bids.find_images(tmp_path / "spider-challenge-2023")]
    assert "sub-002/ses-02/anat/sub-002_ses-02_acq-lowresSag_T1w.nii.gz" in spider and len(spider) == 6
    # ses-01 and ses-02: same subject, another position
    truth = tmp_path / "truth/spider-challenge-2023/sub-002"
    t1 = nib.load(truth / "ses-01/anat/sub-002_ses-01_acq-lowresSag_T1w_label-sacrum_seg.nii.gz")
    t2 = nib.load(truth / "ses-02/anat/sub-002_ses-02_acq-lowresSag_T1w_label-sacrum_seg.nii.gz")
    vol = [np.count_nonzero(np.asarray(t.dataobj)) * np.prod(t.header.get_zooms()) for t in (t1, t2)]
    assert abs(vol[0] - vol[1]) / vol[0] < 0.1  # same sacrum volume within sampling error


def test_refuses_bad_arguments(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(synth.InputError, match="not a folder"):
        synth.write_demo_datasets(tmp_path / "file")
    with pytest.raises(synth.InputError, match="--subjects"):
        synth.write_demo_datasets(tmp_path / "out", subjects=0)


def test_cli_demo_data(tmp_path):
    runner = CliRunner()
    out = tmp_path / "demo"
    result = runner.invoke(main, ["demo-data", str(out), "--seed", "2", "--subjects", "1"])
    assert result.exit_code == 0, result.output
    assert "goldatlas: 2 MRI, 1 CT" in result.output
    assert "spider-challenge-2023: 2 MRI" in result.output
    assert (out / "synthrad2023/derivatives/labels/sub-01/anat/sub-01_CT_seg.nii.gz").is_file()
    api = tmp_path / "api"
    synth.write_demo_datasets(api, seed=2, subjects=1)
    assert (out / "goldatlas/sub-01/anat/sub-01_T1w.nii.gz").read_bytes() == \
        (api / "goldatlas/sub-01/anat/sub-01_T1w.nii.gz").read_bytes()
    bad = runner.invoke(main, ["demo-data", str(tmp_path / "x"), "--subjects", "0"])
    assert bad.exit_code == 2 and "--subjects" in bad.output
