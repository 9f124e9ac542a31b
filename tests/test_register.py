"""Stage 1 (register-ct): labels carried onto MRI grids, identity in world space, nearest neighbour.

Tiny hand-made grids with exact expected arrays; agreement with SimpleITK's identity nearest-neighbour
resampling on random oblique grids; a small BIDS dataset built here; the package's demo datasets;
real TotalSegmentator labels from ../shared/data/real onto real MRI grids.
"""

from __future__ import annotations

import doctest
import gzip
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from scipy.spatial.transform import Rotation

from sacrum_masks import derivatives, register
from sacrum_masks.cli import main
from sacrum_masks.errors import InputError
from sacrum_masks.register import (check_volumes, fraction_outside, register_dataset, register_label, resample_mask_nn,
                                   resolve_indices, sacrum_mask)

ROOT = Path(__file__).resolve().parents[1]


def test_doctests():
    result = doctest.testmod(register, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------------------------
# Arrays: tiny grids, exact expectations
# --------------------------------------------------------------------------------------------------

def _aff(diag=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), rot=None):
    a = np.eye(4)
    a[:3, :3] = (np.eye(3) if rot is None else rot) @ np.diag(diag)
    a[:3, 3] = origin
    return a


def test_identity_grid_returns_the_mask():
    src = np.zeros((3, 4, 5), np.uint8)
    src[1, 2, 3] = 1
    src[0, 0, 0] = 7
    out = resample_mask_nn(src, _aff(), (3, 4, 5), _aff())
    np.testing.assert_array_equal(out, (src != 0).astype(np.uint8))
    assert src[0, 0, 0] == 7  # input untouched


def test_flip_and_permutation():
    src = np.zeros((2, 3, 4), np.uint8)
    src[0, 1, 3] = 1
    # destination: axes permuted (dst axis 0 = world z, 1 = world x, 2 = world y), x flipped
    perm = np.array([[0, -1, 0], [0, 0, 1], [1, 0, 0]], float)
    dst_aff = _aff(rot=perm, origin=(1.0, 0.0, 0.0))
    out = resample_mask_nn(src, _aff(), (4, 2, 3), dst_aff)
    # the foreground voxel is at world (0, 1, 3); world = dst_aff @ (i, j, k) gives x = 1 - j, y = k, z = i
    expected = np.zeros((4, 2, 3), np.uint8)
    expected[3, 1, 1] = 1
    np.testing.assert_array_equal(out, expected)


def test_coarse_to_fine_replicates_voxels_and_one_voxel_shift():
    src = np.zeros((3, 1, 1), np.uint8)
    src[1] = 1  # world x in [0.5, 1.5) with 1 mm voxels
    # 0.5 mm destination starting at x = 0: centres 0, .5, 1, 1.5, 2 -> source 0, 1 (tie up), 1, 2 (tie up), 2
    out = resample_mask_nn(src, _aff(), (5, 1, 1), _aff((0.5, 1, 1)))
    np.testing.assert_array_equal(out[:, 0, 0], [0, 1, 1, 0, 0])
    # one-voxel shift: destination voxel i sits at world i + 1
    out = resample_mask_nn(src, _aff(), (3, 1, 1), _aff(origin=(1, 0, 0)))
    np.testing.assert_array_equal(out[:, 0, 0], [1, 0, 0])


def test_empty_mask_and_no_overlap_give_zeros():
    src = np.zeros((4, 4, 4), np.uint8)
    assert resample_mask_nn(src, _aff(), (3, 3, 3), _aff()).sum() == 0
    src[1, 1, 1] = 1
    assert resample_mask_nn(src, _aff(), (3, 3, 3), _aff(origin=(100, 0, 0))).sum() == 0


def test_fraction_outside_counts_voxel_centres():
    src = np.ones((4, 2, 2), np.uint8)
    assert fraction_outside(src, _aff(), (4, 2, 2), _aff()) == 0.0
    assert fraction_outside(src, _aff(), (3, 2, 2), _aff()) == 0.25
    # destination field of view is [-0.5, n - 0.5): a centre at -0.5 is inside, one at n - 0.5 is not
    assert fraction_outside(src, _aff(), (4, 2, 2), _aff(origin=(0.5, 0, 0))) == 0.0
    assert fraction_outside(src, _aff(), (4, 2, 2), _aff(origin=(-0.5, 0, 0))) == 0.25
    assert fraction_outside(src, _aff(), (4, 2, 2), _aff(origin=(50, 0, 0))) == 1.0


def test_sacrum_mask_error_names_the_values_present():
    label = np.zeros((3, 3, 3), np.int16)
    label[0] = 25
    label[1] = 26
    np.testing.assert_array_equal(sacrum_mask(label, (25, 26)), label > 0)
    with pytest.raises(InputError) as exc:
        sacrum_mask(label, (92,), "x_seg.nii.gz")
    assert str(exc.value) == ("x_seg.nii.gz: no voxel with sacrum index 92 (values present: 25, 26); "
                              "set --sacrum-idx or --totalseg")


# --------------------------------------------------------------------------------------------------
# Agreement with SimpleITK
# --------------------------------------------------------------------------------------------------

_LPS = np.diag([-1.0, -1.0, 1.0])


def _to_sitk(arr, aff):
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr).transpose(2, 1, 0)))
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((_LPS @ aff[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin((_LPS @ aff[:3, 3]).tolist())
    return img


def sitk_identity_nn(src, src_aff, dst_shape, dst_aff):
    """SimpleITK's ResampleImageFilter, identity transform, nearest neighbour, background 0."""
    ref = _to_sitk(np.zeros(dst_shape, np.uint8), dst_aff)
    out = sitk.Resample(_to_sitk(src.astype(np.uint8), src_aff), ref, sitk.Transform(),
                        sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def _near_tie(src_aff, dst_shape, dst_aff, eps=1e-6):
    m = np.linalg.inv(src_aff) @ dst_aff
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in dst_shape], indexing="ij"), -1).reshape(-1, 3)
    c = ijk @ m[:3, :3].T + m[:3, 3]
    frac = c - np.floor(c)
    return (np.abs(frac - 0.5) < eps).any(axis=1).reshape(dst_shape)


def _random_grid_pair(seed, axis_aligned=False):
    rng = np.random.default_rng(seed)
    src_shape = tuple(int(n) for n in rng.integers(8, 24, 3))
    src = np.zeros(src_shape, np.uint8)
    # a random blob plus speckle, so boundaries are everywhere
    zz = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in src_shape], indexing="ij"))
    src[(zz ** 2).sum(0) < rng.uniform(0.3, 0.8)] = 1
    src[rng.random(src_shape) < 0.1] = 1
    if axis_aligned:
        rot_s = np.eye(3)
        perm = rng.permutation(3)
        rot_d = np.eye(3)[:, perm] @ np.diag(rng.choice([-1.0, 1.0], 3))
        sp_s = rng.choice([0.5, 1.0, 2.0, 3.0], 3)
        sp_d = rng.choice([0.5, 1.0, 1.5, 2.0], 3)
    else:
        rot_s = Rotation.random(random_state=seed).as_matrix()
        rot_d = Rotation.random(random_state=seed + 1000).as_matrix() @ np.diag([1, 1, rng.choice([-1, 1])])
        sp_s = rng.uniform(0.5, 3.0, 3)
        sp_d = rng.uniform(0.4, 2.0, 3)
    src_aff = _aff(sp_s, rng.uniform(-30, 30, 3), rot_s)
    dst_shape = tuple(int(n) for n in rng.integers(10, 40, 3))
    dst_aff = _aff(sp_d, (0, 0, 0), rot_d)
    # put the destination's centre near the source's centre (plus a random offset) so they overlap
    centre_src = src_aff[:3, :3] @ ((np.array(src_shape) - 1) / 2) + src_aff[:3, 3]
    centre_dst = dst_aff[:3, :3] @ ((np.array(dst_shape) - 1) / 2)
    offset = rng.uniform(-5, 5, 3)
    if axis_aligned:  # whole half-voxels: many exact ties
        offset = np.round(offset * 2) / 2
        centre_src = np.round(centre_src * 2) / 2
        centre_dst = np.round(centre_dst * 2) / 2
    dst_aff[:3, 3] = centre_src - centre_dst + offset
    return src, src_aff, dst_shape, dst_aff


@pytest.mark.parametrize("seed", range(12))
def test_agrees_with_simpleitk_on_random_oblique_grids(seed):
    src, src_aff, dst_shape, dst_aff = _random_grid_pair(seed)
    ours = resample_mask_nn(src, src_aff, dst_shape, dst_aff)
    ref = sitk_identity_nn(src, src_aff, dst_shape, dst_aff)
    assert ref.sum() > 0  # the grids overlap
    diff = ours != ref
    assert not (diff & ~_near_tie(src_aff, dst_shape, dst_aff)).any()
    assert diff.sum() == 0  # random float affines: no exact ties in practice


@pytest.mark.parametrize("seed", range(8))
def test_agrees_with_simpleitk_on_flipped_permuted_grids_except_exact_ties(seed):
    src, src_aff, dst_shape, dst_aff = _random_grid_pair(seed, axis_aligned=True)
    ours = resample_mask_nn(src, src_aff, dst_shape, dst_aff)
    ref = sitk_identity_nn(src, src_aff, dst_shape, dst_aff)
    assert ref.sum() > 0
    diff = ours != ref
    # only voxels whose source coordinate is an exact .5 tie may differ
    assert not (diff & ~_near_tie(src_aff, dst_shape, dst_aff)).any()


def test_general_path_equals_axis_aligned_path(monkeypatch):
    # the same flipped/permuted grid through the oblique code (scipy's affine_transform)
    src, src_aff, dst_shape, dst_aff = _random_grid_pair(3, axis_aligned=True)
    dst_aff = dst_aff.copy()
    dst_aff[:3, 3] += 0.01  # no ties
    fast = resample_mask_nn(src, src_aff, dst_shape, dst_aff)
    monkeypatch.setattr(register, "_axis_aligned", lambda m, shape: None)
    slow = resample_mask_nn(src, src_aff, dst_shape, dst_aff)
    np.testing.assert_array_equal(fast, slow)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------

def _ball(shape, aff, centre, radius, value=1, dtype=np.uint8, out=None):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = ijk @ aff[:3, :3].T + aff[:3, 3]
    inside = ((world - np.asarray(centre)) ** 2).sum(-1) <= radius ** 2
    out = np.zeros(shape, dtype) if out is None else out
    out[inside] = value
    return out


def _nifti(data, aff, qform_delta=0.0):
    img = nib.Nifti1Image(data, aff)
    q = aff.copy()
    q[:3, 3] += qform_delta
    img.set_qform(q, code=1)
    img.set_sform(aff, code=1)
    return img


def test_same_grid_copies_voxels_and_uses_the_image_header():
    aff = _aff((1.2, 1.2, 3.0), (-10, -20, 5))
    image = _nifti(np.zeros((10, 12, 8), np.int16), aff)
    label = np.zeros((10, 12, 8), np.uint8)
    label[2:5, 3:9, 1:6] = 1
    label[6:8, 3:5, 1:6] = 2
    near = aff.copy()
    near[:3] += 1e-5
    lab_img = _nifti(label, near, qform_delta=2e-4)  # "slightly different" headers
    res = register_label(lab_img, label, image, (1,))
    assert res.same_grid and res.fraction_outside == 0.0 and res.warnings == []
    np.testing.assert_array_equal(res.mask.get_fdata(), label == 1)
    assert res.mask.get_data_dtype() == np.uint8
    for a in (res.mask.affine, res.mask.get_qform(), res.mask.get_sform()):
        np.testing.assert_array_equal(a, image.affine)
    assert res.volume_after_ml == pytest.approx(3 * 6 * 5 * 1.2 * 1.2 * 3 / 1000)
    assert res.volume_before_ml == pytest.approx(res.volume_after_ml, rel=1e-4)


def test_register_label_output_grid_and_volume():
    ct_aff = _aff((2.0, 2.0, 2.0), (-40, -40, -40))
    label = _ball((40, 40, 40), ct_aff, (0, 0, 0), 16, value=92)
    label[:5] = 7
    ct = _nifti(label, ct_aff)
    mr_aff = _aff((1.5, 1.5, 2.5), (40, 45, -40), rot=np.diag([-1.0, -1.0, 1.0]))  # LPS
    mr = _nifti(np.zeros((60, 60, 32), np.float32), mr_aff)
    res = register_label(ct, label, mr, (92,))
    assert res.mask.shape == (60, 60, 32)
    for a in (res.mask.affine, res.mask.get_qform(), res.mask.get_sform()):
        np.testing.assert_array_equal(a, mr_aff)
    assert set(np.unique(res.mask.get_fdata())) == {0.0, 1.0}
    assert res.fraction_outside == 0.0 and res.warnings == []
    assert res.volume_after_ml == pytest.approx(res.volume_before_ml, rel=0.05)


def test_partly_outside_warns_and_entirely_outside_fails():
    ct_aff = _aff((2.0, 2.0, 2.0), (-40, -40, -40))
    label = _ball((40, 40, 40), ct_aff, (0, 0, 0), 16, value=92)
    ct = _nifti(label, ct_aff)
    half = _nifti(np.zeros((30, 60, 60), np.float32), _aff((1.0, 1.0, 1.0), (0.5, -30, -30)))  # x >= 0 only
    res = register_label(ct, label, half, (92,))
    assert 0.4 < res.fraction_outside < 0.6
    assert len(res.warnings) == 1 and "lies outside the image's field of view" in res.warnings[0]
    far = _nifti(np.zeros((30, 30, 30), np.float32), _aff(origin=(500, 0, 0)))
    with pytest.raises(InputError, match="lies entirely outside the image's field of view"):
        register_label(ct, label, far, (92,), name="ct_seg")


def test_volume_not_preserved_is_an_error():
    # a one-voxel-thick plate on a 1 mm grid seen by a 3 mm grid whose centres miss it: 0 mL, inside the FOV
    label = np.zeros((9, 9, 9), np.uint8)
    label[:, :, 4] = 1
    lab = _nifti(label, _aff())
    img = _nifti(np.zeros((3, 3, 3), np.float32), _aff((1.0, 1.0, 3.0), (0, 0, 2.5)))
    with pytest.raises(InputError):
        register_label(lab, label, img, (1,))
    # and a thick plate on that 3 mm grid: 9x9x2 mm -> 9x3 voxel faces of 3 mm: volume x1.5
    label[:, :, 3:5] = 1
    img = _nifti(np.zeros((9, 9, 3), np.float32), _aff((1.0, 1.0, 3.0), (0, 0, 1.0)))
    with pytest.raises(InputError, match=r"volume not preserved: 0.2 mL -> 0.2 mL \(\+50.0%, more than 25%"):
        register_label(lab, label, img, (1,))


def test_volume_change_between_5_and_25_percent_is_a_warning():
    assert check_volumes(100.0, 104.9, 0.0) == []
    assert check_volumes(100.0, 95.1, 0.0) == []
    (warning,) = check_volumes(100.0, 93.0, 0.0)
    assert warning.startswith("volume changed by -7.0%")
    (warning,) = check_volumes(100.0, 124.0, 0.0)
    assert warning.startswith("volume changed by +24.0%")
    with pytest.raises(InputError, match=r"-26.0%"):
        check_volumes(100.0, 74.0, 0.0)


# --------------------------------------------------------------------------------------------------
# A small BIDS dataset made here (CT label, MRI mask, oblique and flipped MRI grids)
# --------------------------------------------------------------------------------------------------

def _save(img, path, sidecar=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    if sidecar is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar))


def make_bids(root: Path) -> Path:
    """sub-01: CT + CT label (v1: sacrum 92), T2w (LPS) and T1w (oblique); sub-02: T2w + its own mask (1)."""
    ct_aff = _aff((2.0, 2.0, 2.0), (-40, -40, -40))
    label = _ball((40, 40, 40), ct_aff, (0, 0, 0), 16, value=92)
    label[:4] = 50
    anat = root / "sub-01" / "anat"
    _save(_nifti(np.zeros((40, 40, 40), np.int16), ct_aff), anat / "sub-01_CT.nii.gz")
    _save(_nifti(label, ct_aff), root / "derivatives/labels/sub-01/anat/sub-01_CT_seg.nii.gz")
    _save(_nifti(np.ones((60, 60, 32), np.float32), _aff((1.5, 1.5, 2.5), (40, 45, -40), np.diag([-1.0, -1, 1]))),
          anat / "sub-01_T2w.nii.gz")
    rot = Rotation.from_euler("xz", [15, 20], degrees=True).as_matrix()
    t1_aff = _aff((1.3, 1.3, 1.3), (0, 0, 0), rot)
    t1_aff[:3, 3] = -t1_aff[:3, :3] @ (np.array([50, 50, 40]) - 1) / 2
    _save(_nifti(np.ones((50, 50, 40), np.float32), t1_aff), anat / "sub-01_T1w.nii.gz")
    mr_aff = _aff((1.0, 1.0, 3.0), (-30, -30, -30))
    mask = _ball((60, 60, 20), mr_aff, (0, 0, 0), 15, value=1)
    mask[:, :, :3] = 2
    anat2 = root / "sub-02" / "anat"
    _save(_nifti(np.ones((60, 60, 20), np.float32), mr_aff), anat2 / "sub-02_T2w.nii.gz")
    _save(_nifti(mask, mr_aff, qform_delta=3e-4), root / "derivatives/labels/sub-02/anat/sub-02_T2w_seg.nii.gz",
          {"LabelOrder": "mrspineseg", "SacrumIndices": [1]})
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    return root


def _tree_digest(root: Path, exclude: str = "derivatives/reg-labels") -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.relative_to(root).as_posix().startswith(exclude)}


def _run(*args):
    return CliRunner().invoke(main, ["register-ct", *map(str, args)])


def test_cli_on_small_bids(tmp_path):
    bids = make_bids(tmp_path / "ds")
    before = _tree_digest(bids)
    r = _run(bids)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == "register-ct: 3 written, 0 up to date, 0 failed"
    assert _tree_digest(bids) == before  # inputs untouched
    out = bids / "derivatives/reg-labels"
    desc = json.loads((out / "dataset_description.json").read_text())
    # one writer for every stage (bids.ensure_dataset_description): the tool's name, the stage in Description
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "sacrum-masks"
    assert desc["GeneratedBy"][0]["Description"].startswith("register-ct: ")
    for rel, src, idx, frm in [("sub-01/anat/sub-01_T2w", "sub-01_CT_seg.nii.gz", [92], "default"),
                               ("sub-01/anat/sub-01_T1w", "sub-01_CT_seg.nii.gz", [92], "default"),
                               ("sub-02/anat/sub-02_T2w", "sub-02_T2w_seg.nii.gz", [1], "sidecar")]:
        image = nib.load(str(bids / f"{rel}.nii.gz"))
        mask = nib.load(str(out / f"{rel}_seg.nii.gz"))
        assert mask.shape == image.shape and mask.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(mask.affine, image.affine)
        np.testing.assert_array_equal(mask.get_sform(), image.affine)
        # a qform is a quaternion: exact for rotations, float32-rounded for the oblique matrix
        np.testing.assert_allclose(mask.get_qform(), image.get_qform(), rtol=0, atol=1e-6)
        assert set(np.unique(np.asanyarray(mask.dataobj))) == {0, 1}
        meta = json.loads((out / f"{rel}_seg.json").read_text())
        # BIDS URIs, relative to the raw dataset and to derivatives/labels (DatasetLinks): no absolute path
        assert meta["Sources"][0] == f"bids:raw:{rel}.nii.gz"
        assert meta["Sources"][1] == f"bids:labels:{Path(rel).parent.as_posix()}/{src}"
        assert meta["Settings"] == {"SacrumIndices": idx, "Backend": "native"}
        assert str(tmp_path) not in json.dumps(meta)
        assert meta["SacrumIndices"] == idx and meta["IndicesFrom"] == frm and meta["Backend"] == "native"
        assert meta["FractionOutsideFOV"] == 0.0
        assert meta["VolumeAfterML"] == pytest.approx(meta["VolumeBeforeML"], rel=0.05)
        assert meta["GeneratedBy"][-1]["Name"] == "sacrum-masks register-ct" and meta["GeneratedBy"][-1]["Version"]
    assert desc["DatasetLinks"] == {"raw": "../..", "labels": "../labels"}
    # the MRI mask on its own grid is copied voxel for voxel
    m = np.asanyarray(nib.load(str(out / "sub-02/anat/sub-02_T2w_seg.nii.gz")).dataobj)
    lab = np.asanyarray(nib.load(str(bids / "derivatives/labels/sub-02/anat/sub-02_T2w_seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(m, lab == 1)
    assert not list(out.rglob(".*tmp*"))  # no temporary file left

    # second run: everything up to date; --force redoes; new indices redo
    r = _run(bids)
    assert r.exit_code == 0 and r.output.splitlines()[-1] == "register-ct: 0 written, 3 up to date, 0 failed"
    r = _run(bids, "--force")
    assert r.output.splitlines()[-1] == "register-ct: 3 written, 0 up to date, 0 failed"
    # an option overrides the sidecar (and changed indices make the outputs out of date)
    r = _run(bids, "--sacrum-idx", "2", "--sacrum-idx", "92")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == "register-ct: 3 written, 0 up to date, 0 failed"
    meta = json.loads((out / "sub-02/anat/sub-02_T2w_seg.json").read_text())
    assert meta["SacrumIndices"] == [2, 92] and meta["IndicesFrom"] == "option"
    m = np.asanyarray(nib.load(str(out / "sub-02/anat/sub-02_T2w_seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(m, lab == 2)


def test_touching_the_label_leaves_the_output_up_to_date_new_bytes_redo_it(tmp_path):
    """One up-to-date rule for every stage: input checksums and settings, not modification times
    (a copy or a restore without -p must not redo a cohort)."""
    bids = make_bids(tmp_path / "ds")
    assert _run(bids).exit_code == 0
    label = bids / "derivatives/labels/sub-02/anat/sub-02_T2w_seg.nii.gz"
    out = bids / "derivatives/reg-labels/sub-02/anat/sub-02_T2w_seg.nii.gz"
    t = out.stat().st_mtime_ns + 10_000_000
    os.utime(label, ns=(t, t))
    r = _run(bids)
    assert r.output.splitlines()[-1] == "register-ct: 0 written, 3 up to date, 0 failed"
    img = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine, img.header), str(label))
    r = _run(bids)
    assert r.output.splitlines()[-1] == "register-ct: 1 written, 2 up to date, 0 failed"
    assert "written  ds/sub-02/anat/sub-02_T2w.nii.gz" in r.output


class _Killed(BaseException):
    """Stands for a SIGKILL between two writes (nothing of the run after it happens)."""


@pytest.mark.parametrize("killed_write", ["save_nifti_atomic", "write_json_atomic"])
def test_redo_killed_between_mask_and_sidecar_is_redone(tmp_path, monkeypatch, killed_write):
    """A run killed between the mask's and the sidecar's write (either one) after an index change:
    the next run must redo that image, not take the old mask for up to date."""
    bids = make_bids(tmp_path / "ds")
    assert _run(bids).exit_code == 0
    real = getattr(derivatives, killed_write)   # the writer's two atomic writes

    def kill_on_first_output(obj, path):
        if Path(path).parent.name == "anat":   # outputs only, not dataset_description.json
            raise _Killed()
        return real(obj, path)

    with monkeypatch.context() as m:
        m.setattr(derivatives, killed_write, kill_on_first_output)
        with pytest.raises(_Killed):
            register_dataset(bids, indices=(2, 92))
    batch = register_dataset(bids, indices=(2, 92))
    assert batch.summary(["written", "up to date", "failed"]) == "register-ct: 3 written, 0 up to date, 0 failed"
    out = bids / "derivatives/reg-labels/sub-01/anat/sub-01_T1w_seg.json"
    assert json.loads(out.read_text())["SacrumIndices"] == [2, 92]


def test_restored_label_with_an_old_mtime_is_redone(tmp_path):
    """`cp -p` of another label over the input: older mtime than the output, different bytes."""
    bids = make_bids(tmp_path / "ds")
    assert _run(bids).exit_code == 0
    label = bids / "derivatives/labels/sub-02/anat/sub-02_T2w_seg.nii.gz"
    out = bids / "derivatives/reg-labels/sub-02/anat/sub-02_T2w_seg.nii.gz"
    old = label.stat().st_mtime_ns
    img = nib.load(str(label))
    data = np.asanyarray(img.dataobj).copy()
    data[data == 1] = 0                      # a smaller sacrum: 2 -> 1, the rest -> background
    data[data == 2] = 1
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(label))
    os.utime(label, ns=(old, old))
    assert label.stat().st_mtime_ns < out.stat().st_mtime_ns
    r = _run(bids)
    assert r.output.splitlines()[-1] == "register-ct: 1 written, 2 up to date, 0 failed"
    assert "written  ds/sub-02/anat/sub-02_T2w.nii.gz" in r.output
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(out)).dataobj), data == 1)
    meta = json.loads(out.with_name("sub-02_T2w_seg.json").read_text())
    assert meta["SourcesSHA256"] == {"bids:raw:sub-02/anat/sub-02_T2w.nii.gz":
                                     hashlib.sha256((bids / "sub-02/anat/sub-02_T2w.nii.gz").read_bytes()).hexdigest(),
                                     "bids:labels:sub-02/anat/sub-02_T2w_seg.nii.gz":
                                     hashlib.sha256(label.read_bytes()).hexdigest()}


@pytest.mark.parametrize("text, reason", [("[1, 2]", "sidecar is an array, not a JSON object"),
                                          ("{broken", "sidecar not JSON (JSONDecodeError)"),
                                          ("null", "sidecar is null, not a JSON object")])
def test_output_sidecar_not_an_object_is_one_line_and_left_alone(tmp_path, text, reason):
    """A sidecar we cannot read may be someone's edit: one line, neither it nor its mask is touched."""
    bids = make_bids(tmp_path / "ds")
    assert _run(bids).exit_code == 0
    side = bids / "derivatives/reg-labels/sub-02/anat/sub-02_T2w_seg.json"
    mask = side.with_name("sub-02_T2w_seg.nii.gz")
    side.write_text(text)
    before = mask.read_bytes()
    r = _run(bids, "--force")
    assert r.exit_code == 1, r.output
    assert r.output.splitlines()[-1] == "register-ct: 2 written, 0 up to date, 1 failed"
    assert f"failed  ds/sub-02/anat/sub-02_T2w.nii.gz: {side}: {reason}: fix or remove it" in r.output
    assert side.read_text() == text and mask.read_bytes() == before


def test_label_sidecar_not_an_object_is_one_line(tmp_path):
    bids = make_bids(tmp_path / "ds")
    side = bids / "derivatives/labels/sub-02/anat/sub-02_T2w_seg.json"
    side.write_text("[1]")
    r = _run(bids)
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == "register-ct: 2 written, 0 up to date, 1 failed"
    assert f"{side}: not a JSON object" in r.output


def test_totalseg_v2_and_option_conflict(tmp_path):
    bids = make_bids(tmp_path / "ds")
    r = _run(bids, "--totalseg", "v2")
    assert r.exit_code == 1  # neither label has 25/26
    assert r.output.count("no voxel with sacrum index 25/26") == 3
    r = _run(bids, "--totalseg", "v2", "--sacrum-idx", "92")
    assert r.exit_code == 2 and "either --sacrum-idx or --totalseg" in r.output


def test_resolve_indices_precedence(tmp_path):
    label = tmp_path / "sub-01_CT_seg.nii.gz"
    assert resolve_indices(label, None) == ((92,), "default")
    (tmp_path / "sub-01_CT_seg.json").write_text(json.dumps({"SacrumIndices": [25, 26]}))
    assert resolve_indices(label, None) == ((25, 26), "sidecar")
    assert resolve_indices(label, (7,)) == ((7,), "option")
    (tmp_path / "sub-01_CT_seg.json").write_text(json.dumps({"SacrumIndices": "25"}))
    with pytest.raises(InputError, match="SacrumIndices must be a non-empty list of integers"):
        resolve_indices(label, None)


def test_bad_inputs_each_one_line_nothing_written_others_processed(tmp_path):
    bids = make_bids(tmp_path / "ds")
    aff = _aff((1.0, 1.0, 3.0), (-30, -30, -30))
    good_mask = _ball((60, 60, 20), aff, (0, 0, 0), 15, value=1)
    noise = np.random.default_rng(0).random((60, 60, 20)).astype(np.float32)  # does not compress
    ok = {"SacrumIndices": [1]}
    cases = {
        # truncated .nii.gz image
        "sub-03": lambda a, lab: (a.write_bytes(gzip.compress(nib.Nifti1Image(noise, aff).to_bytes())[:30000]),
                                  _save(_nifti(good_mask, aff), lab, ok)),
        # 4D label
        "sub-04": lambda a, lab: (_save(_nifti(np.ones((60, 60, 20), np.float32), aff), a),
                                  _save(nib.Nifti1Image(np.stack([good_mask, good_mask], -1), aff), lab, ok)),
        # label without the index
        "sub-05": lambda a, lab: (_save(_nifti(np.ones((60, 60, 20), np.float32), aff), a),
                                  _save(_nifti((good_mask * 3).astype(np.uint8), aff), lab, ok)),
        # no label at all
        "sub-06": lambda a, lab: _save(_nifti(np.ones((60, 60, 20), np.float32), aff), a),
    }
    for sub, make in cases.items():
        (bids / sub / "anat").mkdir(parents=True)
        make(bids / sub / "anat" / f"{sub}_T2w.nii.gz",
             bids / "derivatives/labels" / sub / "anat" / f"{sub}_T2w_seg.nii.gz")
    before = _tree_digest(bids)
    r = _run(bids)
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == "register-ct: 3 written, 0 up to date, 4 failed"
    failed = [line for line in r.stderr.splitlines() if line.startswith("register-ct: failed")]
    assert len(failed) == 4
    by_sub = {sub: [line for line in failed if f"{sub}_T2w.nii.gz:" in line] for sub in cases}
    assert all(len(v) == 1 for v in by_sub.values()), failed
    assert "sub-03_T2w.nii.gz: cannot read NIfTI" in by_sub["sub-03"][0]
    assert "not a 3D image (shape (60, 60, 20, 2))" in by_sub["sub-04"][0]
    assert "no voxel with sacrum index 1 (values present: 3)" in by_sub["sub-05"][0]
    assert "no label (looked for " in by_sub["sub-06"][0] and "sub-06_CT_seg.nii.gz" in by_sub["sub-06"][0]
    out = bids / "derivatives/reg-labels"
    for sub in cases:
        assert not (out / sub).exists()
    assert _tree_digest(bids) == before


def test_path_out_must_not_be_the_labels(tmp_path):
    bids = make_bids(tmp_path / "ds")
    r = _run(bids, "--path-out", bids / "derivatives/labels")
    assert r.exit_code == 2
    assert r.output.strip().endswith("is the labels folder; outputs would overwrite inputs")


def test_a_second_run_on_the_same_output_says_so(tmp_path):
    from sacrum_masks.batch import folder_lock

    bids = make_bids(tmp_path / "ds")
    with folder_lock(bids / "derivatives/reg-labels"):
        r = _run(bids)
    assert r.exit_code == 75  # EX_TEMPFAIL
    assert "another register-ct run is writing here" in r.output
    assert not (bids / "derivatives/reg-labels/sub-01").exists()


def test_path_label_and_path_out_options(tmp_path):
    bids = make_bids(tmp_path / "ds")
    labels = tmp_path / "elsewhere"
    (bids / "derivatives/labels").rename(labels)
    r = _run(bids, "--path-label", labels, "--path-out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out/sub-01/anat/sub-01_T1w_seg.nii.gz").is_file()
    assert (tmp_path / "out/dataset_description.json").is_file()
    assert not (bids / "derivatives/reg-labels").exists()


def test_seg_suffix_and_sessions(tmp_path):
    root = tmp_path / "ds"
    aff = _aff((1.0, 1.0, 1.0), (-20, -20, -20))
    mask = _ball((40, 40, 40), aff, (0, 0, 0), 10, value=1)
    _save(_nifti(np.ones((40, 40, 40), np.float32), aff), root / "sub-7/ses-2/anat/sub-7_ses-2_acq-sag_T2w.nii.gz")
    _save(_nifti(mask, aff), root / "derivatives/labels/sub-7/ses-2/anat/sub-7_ses-2_acq-sag_CT_label-all_dseg.nii.gz")
    r = _run(root, "--seg-suffix", "_label-all_dseg", "--sacrum-idx", "1")
    assert r.exit_code == 0, r.output
    out = root / "derivatives/reg-labels/sub-7/ses-2/anat/sub-7_ses-2_acq-sag_T2w_seg.nii.gz"
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(out)).dataobj), mask)


# --------------------------------------------------------------------------------------------------
# --backend sct
# --------------------------------------------------------------------------------------------------

def test_backend_sct_missing_says_so(tmp_path, monkeypatch):
    bids = make_bids(tmp_path / "ds")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r = _run(bids, "--backend", "sct")
    assert r.exit_code == 2
    assert r.output.strip() == ("sacrum-masks: error: --backend sct: sct_register_multimodal not found on PATH "
                                "(install Spinal Cord Toolbox, or use --backend native, which computes the same)")
    assert not (bids / "derivatives/reg-labels").exists()


def test_backend_sct_runs_the_original_command(tmp_path, monkeypatch):
    # Spinal Cord Toolbox is not installable here (not on PyPI): a stand-in sct_register_multimodal
    # records its arguments and resamples with SimpleITK (identity, nearest neighbour), as SCT does.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "sct_register_multimodal"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys, SimpleITK as sitk
        a = sys.argv[1:]
        with open({str(tmp_path / 'calls.jsonl')!r}, "a") as fh:
            fh.write(json.dumps(a) + "\\n")
        opt = dict(zip(a[::2], a[1::2]))
        assert opt["-identity"] == "1" and opt["-x"] == "nn"
        src, ref = sitk.ReadImage(opt["-i"]), sitk.ReadImage(opt["-d"])
        out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, src.GetPixelID())
        sitk.WriteImage(out, opt["-o"])
        """))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    bids = make_bids(tmp_path / "ds")
    r = _run(bids, "--backend", "sct", "--path-out", tmp_path / "sct")
    assert r.exit_code == 0, r.output
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2  # sub-02's mask already is on its image's grid: copied, no SCT
    for c in calls:
        assert c[0] == "-i" and c[1].endswith("sub-01_CT_seg.nii.gz") and c[2] == "-d"
        assert c[4:8] == ["-identity", "1", "-x", "nn"]
    r = _run(bids, "--path-out", tmp_path / "native")
    assert r.exit_code == 0
    for rel in ["sub-01/anat/sub-01_T1w_seg", "sub-01/anat/sub-01_T2w_seg", "sub-02/anat/sub-02_T2w_seg"]:
        a = nib.load(str(tmp_path / "sct" / f"{rel}.nii.gz"))
        b = nib.load(str(tmp_path / "native" / f"{rel}.nii.gz"))
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
        np.testing.assert_array_equal(a.affine, b.affine)
        assert json.loads((tmp_path / "sct" / f"{rel}.json").read_text())["Backend"] == "sct"
    assert not list((tmp_path / "sct").rglob(".sct-*"))  # SCT's working folder removed


# --------------------------------------------------------------------------------------------------
# bin/register.sh (make register)
# --------------------------------------------------------------------------------------------------

def _env(tmp_path):
    env = dict(os.environ)
    env["SACRUM_DATA"] = str(tmp_path / "data")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    for var in ("SACRUM_IDX", "TOTALSEG", "FORCE", "BACKEND"):
        env.pop(var, None)
    return env


def test_register_sh(tmp_path):
    script = ROOT / "bin" / "register.sh"
    env = _env(tmp_path)
    p = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert p.returncode == 2
    assert 'no dataset given; run make register DATASET="path ..."' in p.stderr
    a, b = make_bids(tmp_path / "a"), make_bids(tmp_path / "b")
    p = subprocess.run(["bash", str(script), str(a), str(tmp_path / "missing"), str(b)], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stdout.count("register-ct: 3 written, 0 up to date, 0 failed") == 2
    assert f"register-ct: {tmp_path / 'missing'}: not a folder" in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "register-ct: 1 of 3 datasets failed"
    env.update(SACRUM_IDX="1 2", FORCE="1")
    p = subprocess.run(["bash", str(script), str(a)], env=env, capture_output=True, text=True)
    assert p.returncode == 1  # the CT label has neither 1 nor 2
    assert "register-ct: 1 written, 0 up to date, 2 failed" in p.stdout
    assert json.loads((a / "derivatives/reg-labels/sub-02/anat/sub-02_T2w_seg.json").read_text())["SacrumIndices"] == [1, 2]
    env.pop("SACRUM_IDX")
    env.update(TOTALSEG="v3")
    p = subprocess.run(["bash", str(script), str(a)], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "TOTALSEG" in p.stderr and "'v3' is not one of 'v1', 'v2'" in p.stderr, p.stderr
    env.update(TOTALSEG="", SACRUM_IDX="1 x")   # an empty variable is unset; a non-integer index is exit 2
    p = subprocess.run(["bash", str(script), str(a)], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "SACRUM_IDX" in p.stderr and "'x' is not a valid integer" in p.stderr, p.stderr


# --------------------------------------------------------------------------------------------------
# Demo datasets (sacrum_masks.synth)
# --------------------------------------------------------------------------------------------------

def _dice(a, b):
    a, b = a != 0, b != 0
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_demo_datasets_every_pair(demo_root, tmp_path):
    datasets = ["goldatlas", "synthrad2023", "mrspineseg"]
    for name in datasets:
        bids = demo_root / name
        before = _tree_digest(bids)
        out = tmp_path / name
        batch = register_dataset(bids, path_out=out)
        assert batch.exit_code == 0, batch.failures
        assert _tree_digest(bids) == before
        images = sorted(p for p in bids.glob("sub-*/**/anat/*.nii.gz") if "_CT" not in p.name)
        assert images and batch.counts["written"] == len(images)
        for image in images:
            rel = image.relative_to(bids)
            stem = image.name[: -len(".nii.gz")]
            mask_path = out / rel.parent / f"{stem}_seg.nii.gz"
            img, mask = nib.load(str(image)), nib.load(str(mask_path))
            assert mask.shape == img.shape
            np.testing.assert_array_equal(mask.affine, img.affine)
            np.testing.assert_array_equal(mask.get_sform(), img.affine)
            np.testing.assert_allclose(mask.get_qform(), img.affine, rtol=0, atol=1e-4)
            meta = json.loads(mask_path.with_name(f"{stem}_seg.json").read_text())
            assert meta["IndicesFrom"] == "sidecar"
            assert meta["SacrumIndices"] == {"goldatlas": [92], "synthrad2023": [25, 26], "mrspineseg": [1]}[name]
            truth = demo_root / "truth" / name / rel.parent / f"{stem}_label-sacrum_seg.nii.gz"
            if truth.is_file():
                d = _dice(np.asanyarray(mask.dataobj), np.asanyarray(nib.load(str(truth)).dataobj))
                assert d > 0.9, (image, d)


def test_demo_grids_include_flipped_and_oblique(demo_root):
    # the demo data must exercise what this stage is for: CT/MRI grids that differ by flips and rotations
    codes, oblique = set(), False
    for name in ["goldatlas", "synthrad2023"]:
        for p in (demo_root / name).glob("sub-*/anat/*.nii.gz"):
            aff = nib.load(str(p)).affine
            codes.add(nib.aff2axcodes(aff))
            rot = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
            oblique |= bool((np.abs(rot) > 1e-3).sum() > 3)
    assert len(codes) > 1 and oblique


# --------------------------------------------------------------------------------------------------
# Real data (../shared/data/real)
# --------------------------------------------------------------------------------------------------

def _world_centroid(data, aff):
    ijk = np.argwhere(np.asarray(data) != 0)
    return (ijk @ aff[:3, :3].T + aff[:3, 3]).mean(0)


def _moved_grid(mri, centre, cover=None):
    """The MRI's grid (orientation, spacing) moved so that its centre is ``centre`` (world, mm).

    With ``cover`` (world bounding box lo, hi), the grid is centred on the box instead and its shape
    grows where needed to contain it.
    """
    aff = mri.affine.copy()
    shape = np.array(mri.shape[:3])
    if cover is not None:
        lo, hi = cover
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        extent = np.abs(np.linalg.inv(aff[:3, :3]) @ (corners - corners.mean(0)).T).max(1) * 2
        shape = np.maximum(shape, np.ceil(extent).astype(int) + 3)
        centre = (np.asarray(lo) + np.asarray(hi)) / 2
    aff[:3, 3] = centre - aff[:3, :3] @ ((shape - 1) / 2)
    img = nib.Nifti1Image(np.zeros(tuple(shape), np.int16), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    return img


MRIS = ["sct_t2_lumbar", "tptbox_t2", "totalseg_mr_sm"]


def _real_v1_sacrum(real_dir):
    """The real CT's TotalSegmentator v1 label: (image, voxels, sacrum (92) mask, sacrum world centroid)."""
    label_img = nib.load(str(real_dir / "totalseg_ct_seg_v1.nii.gz"))
    label = np.asanyarray(label_img.dataobj)
    sac = label == 92
    return label_img, label, sac, _world_centroid(sac, label_img.affine)


@pytest.mark.real
@pytest.mark.parametrize("mri_name", MRIS)
def test_real_v1_sacrum_onto_real_mri_grids(real_dir, mri_name):
    label_img, label, sac, centre = _real_v1_sacrum(real_dir)
    ijk = np.argwhere(sac)
    world = ijk @ label_img.affine[:3, :3].T + label_img.affine[:3, 3]
    box = (world.min(0) - 3, world.max(0) + 3)
    mri = nib.load(str(real_dir / f"{mri_name}.nii.gz"))
    grid = _moved_grid(mri, centre, cover=box)
    res = register_label(label_img, label, grid, (92,))
    assert res.volume_before_ml == pytest.approx(204.876)  # 7588 voxels of 27 mm^3
    assert res.fraction_outside == 0.0 and res.warnings == []
    assert res.volume_after_ml == pytest.approx(204.9, rel=0.03)
    out = np.asanyarray(res.mask.dataobj)
    voxel = np.linalg.norm(mri.affine[:3, :3], axis=0).max()
    assert np.linalg.norm(_world_centroid(out, grid.affine) - centre) < voxel
    np.testing.assert_array_equal(res.mask.affine, grid.affine)
    # same answer as SimpleITK, voxel for voxel (no ties: the origins are not on the CT lattice)
    np.testing.assert_array_equal(out, sitk_identity_nn(sac, label_img.affine, grid.shape, grid.affine))


@pytest.mark.real
@pytest.mark.parametrize("mri_name", MRIS)
def test_real_v1_sacrum_onto_real_mri_grids_of_real_size(real_dir, mri_name):
    # The real grids, moved onto the sacrum but keeping their size, are smaller than the sacrum
    # (120 x 87 x 126 mm): the part inside is carried exactly, and the rest is reported.
    label_img, label, sac, centre = _real_v1_sacrum(real_dir)
    mri = nib.load(str(real_dir / f"{mri_name}.nii.gz"))
    grid = _moved_grid(mri, centre)
    assert grid.shape == mri.shape
    res = register_label(label_img, label, grid, (92,))
    assert 0 < res.fraction_outside < 1 and len(res.warnings) == 1
    # the carried volume matches the fraction of voxel centres inside, up to the partial CT voxels
    # cut by the faces of the field of view (sct_t2_lumbar is a 38 mm slab: 12.7 CT voxels, 3.6% apart)
    expected = res.volume_before_ml * (1 - res.fraction_outside)
    assert res.volume_after_ml == pytest.approx(expected, rel=0.05)
    np.testing.assert_array_equal(np.asanyarray(res.mask.dataobj),
                                  sitk_identity_nn(sac, label_img.affine, grid.shape, grid.affine))


@pytest.mark.real
def test_real_v2_labels_25_and_26(real_dir):
    v1 = nib.load(str(real_dir / "totalseg_ct_seg_v1.nii.gz"))
    v2 = nib.load(str(real_dir / "totalseg_ct_seg_v2.nii.gz"))
    sac = np.asanyarray(v1.dataobj) == 92
    centre = _world_centroid(sac, v1.affine)
    ijk = np.argwhere(sac)
    world = ijk @ v1.affine[:3, :3].T + v1.affine[:3, 3]
    grid = _moved_grid(nib.load(str(real_dir / "tptbox_t2.nii.gz")), centre, cover=(world.min(0) - 3, world.max(0) + 3))
    r1 = register_label(v1, np.asanyarray(v1.dataobj), grid, (92,))
    r2 = register_label(v2, np.asanyarray(v2.dataobj), grid, (25, 26))
    r25 = register_label(v2, np.asanyarray(v2.dataobj), grid, (25,))
    assert r2.volume_before_ml == pytest.approx((5884 + 1796) * 0.027)
    assert r2.volume_after_ml == pytest.approx(r2.volume_before_ml, rel=0.03)
    m1, m2, m25 = (np.asanyarray(r.mask.dataobj) for r in (r1, r2, r25))
    assert _dice(m1, m2) > 0.95 > 0.87 > _dice(m1, m25)


@pytest.mark.real
def test_real_unmoved_mri_without_overlap_is_a_clear_error(real_dir, tmp_path):
    bids = tmp_path / "ds"
    (bids / "sub-01/anat").mkdir(parents=True)
    (bids / "derivatives/labels/sub-01/anat").mkdir(parents=True)
    os.symlink(real_dir / "totalseg_mr_sm.nii.gz", bids / "sub-01/anat/sub-01_T2w.nii.gz")
    os.symlink(real_dir / "totalseg_ct_seg_v1.nii.gz", bids / "derivatives/labels/sub-01/anat/sub-01_CT_seg.nii.gz")
    r = _run(bids)
    assert r.exit_code == 1
    lines = [line for line in r.stderr.splitlines() if line.startswith("register-ct: failed")]
    assert lines == [f"register-ct: failed  ds/sub-01/anat/sub-01_T2w.nii.gz: "
                     f"{bids / 'derivatives/labels/sub-01/anat/sub-01_CT_seg.nii.gz'}: the sacrum (204.9 mL) lies "
                     f"entirely outside the image's field of view (no overlap in world space: check both headers)"]
    assert not (bids / "derivatives/reg-labels/sub-01").exists()
