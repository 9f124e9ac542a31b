"""Core helpers: BIDS names, NIfTI I/O contracts, orientation round trips, batch lock."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import gzip
import json
import multiprocessing as mp
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import sacrum_masks
from sacrum_masks import batch, bids, errors, nifti
from sacrum_masks.bids import BidsName
from sacrum_masks.errors import InputError, LockBusy


@pytest.mark.parametrize("module", [bids, nifti, batch, errors])
def test_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


PACKAGE_MODULES = sorted(m.name for m in pkgutil.iter_modules(sacrum_masks.__path__) if not m.ispkg)


@pytest.mark.parametrize("name", PACKAGE_MODULES)
def test_doctests_of_every_module(name):
    """Every docstring example of the package runs (the examples are the documentation)."""
    module = importlib.import_module(f"sacrum_masks.{name}")
    assert doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_bids_ct_name_keeps_other_entities():
    n = BidsName.parse("sub-01_ses-2_acq-sag_run-1_T2w.nii.gz")
    assert n.with_contrast("CT").add_suffix("seg").name == "sub-01_ses-2_acq-sag_run-1_CT_seg.nii.gz"


@pytest.mark.parametrize("bad", ["T2w.nii.gz", "sub-_T2w.nii.gz", "sub-01__T2w.nii.gz", "x_sub-01_T2w.nii"])
def test_bids_rejects_non_bids_names(bad):
    with pytest.raises(InputError, match="not a BIDS file name"):
        BidsName.parse(bad)


def test_split_extension_is_a_suffix_not_a_character_set():
    # str.rstrip(".nii.gz") would eat the trailing "i" and "g" characters of the stem
    assert bids.split_extension("sub-01_acq-gi_T2w.nii.gz")[0] == "sub-01_acq-gi_T2w"
    assert "sub-01_acq-gi.nii.gz".rstrip(".nii.gz") == "sub-01_acq-"


def test_find_images_skips_ct_derivatives_and_hidden(tmp_path):
    for rel in ["sub-01/anat/sub-01_T2w.nii.gz", "sub-01/anat/sub-01_CT.nii.gz",
                "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz", "sub-01/anat/.sub-01_T2w.nii.gz.tmp.nii.gz",
                "derivatives/labels/sub-01/anat/sub-01_T2w_seg.nii.gz", "sub-01/anat/sub-01_T2w.json"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in bids.find_images(tmp_path)]
    assert found == ["sub-01/anat/sub-01_T2w.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"]
    with_ct = [p.name for p in bids.find_images(tmp_path, include_ct=True)]
    assert with_ct == ["sub-01_CT.nii.gz", "sub-01_T2w.nii.gz", "sub-02_ses-1_T1w.nii.gz"]


def _img(shape=(4, 5, 6), affine=None, dtype=np.float32, data=None):
    data = np.arange(np.prod(shape), dtype=dtype).reshape(shape) if data is None else data
    return nib.Nifti1Image(data, np.eye(4) if affine is None else affine)


def test_load_image_errors_are_one_line(tmp_path):
    good = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(_img(), good)
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[:-40])
    four_d = tmp_path / "four.nii.gz"
    nib.save(_img(shape=(3, 3, 3, 2)), four_d)
    nan = tmp_path / "nan.nii.gz"
    d = np.ones((3, 3, 3), np.float32)
    d[1, 1, 1] = np.nan
    nib.save(_img(data=d), nan)
    text = tmp_path / "text.nii.gz"
    text.write_bytes(gzip.compress(b"hello"))
    cases = {tmp_path / "missing.nii.gz": "no such file", truncated: "cannot read NIfTI",
             four_d: r"not a 3D image \(shape \(3, 3, 3, 2\)\)", nan: "1 voxels are NaN",
             text: "cannot read NIfTI"}
    for path, reason in cases.items():
        with pytest.raises(InputError, match=reason) as exc:
            nifti.load_image(path)
        assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    img, data = nifti.load_image(good)
    assert data.shape == (4, 5, 6)


def test_mask_like_exact_grid_and_binary():
    aff = np.array([[0, 0, -2.5, 10], [1.2, 0, 0, -3], [0, 0.8, 0, 7], [0, 0, 0, 1]], float)
    ref = nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), aff)
    ref.set_qform(aff, code=2)
    m = nifti.mask_like(np.array([0, 3, -1.0] * 20).reshape(3, 4, 5), ref)
    assert m.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(m.dataobj))) == {0, 1}
    np.testing.assert_allclose(m.get_qform(), aff, atol=1e-6)
    np.testing.assert_allclose(m.get_sform(), aff, atol=1e-6)
    assert int(m.header["qform_code"]) == 2
    with pytest.raises(ValueError):
        nifti.mask_like(np.zeros((3, 4, 4)), ref)


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S"), ("P", "I", "R"), ("A", "S", "L")])
def test_rpi_round_trip_and_anatomy(codes):
    """A voxel marked in the anatomical left-posterior-inferior corner stays there after to_rpi."""
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff

    shape = (4, 5, 6)
    ornt = axcodes2ornt(codes)
    affine = inv_ornt_aff(ornt, shape)  # maps voxel indices of an image in `codes` to RAS mm
    data = np.zeros(shape, np.int16)
    # find the voxel whose world position is most left (+x is R, so min x), posterior, inferior
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = nib.affines.apply_affine(affine, ijk)
    corner = ijk[np.argmin(xyz[:, 0] + xyz[:, 1] + xyz[:, 2])]
    data[tuple(corner)] = 7
    img = nib.Nifti1Image(data, affine)
    rpi = nifti.to_rpi(img)
    assert nib.aff2axcodes(rpi.affine) == ("L", "A", "S")
    out = np.asanyarray(rpi.dataobj)
    # in L,A,S voxel order, index 0 on axes 1 and 2 is posterior/inferior, last index on axis 0 is left
    assert out[out.shape[0] - 1, 0, 0] == 7
    world_before = nib.affines.apply_affine(affine, corner)
    world_after = nib.affines.apply_affine(rpi.affine, np.argwhere(out == 7)[0])
    np.testing.assert_allclose(world_before, world_after)
    np.testing.assert_array_equal(nifti.from_rpi(out, img), data)


def test_atomic_writers_leave_no_temp_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "sub-01_T2w_seg.nii.gz"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(RuntimeError):
        nifti.save_nifti_atomic(_img(), target)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    nifti.save_nifti_atomic(_img(), target)
    nifti.write_json_atomic({"a": 1}, tmp_path / "x.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub-01_T2w_seg.nii.gz", "x.json"]


def _hold_lock(folder, ready, release):
    with batch.folder_lock(folder):
        ready.set()
        release.wait(10)


def test_folder_lock_refuses_second_holder(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    p.start()
    try:
        assert ready.wait(10)
        with pytest.raises(LockBusy, match="another run"):
            with batch.folder_lock(tmp_path):
                pass
    finally:
        release.set()
        p.join(10)
    with batch.folder_lock(tmp_path):  # free again once the holder is gone
        pass


def test_lock_dies_with_killed_holder(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    p.start()
    assert ready.wait(10)
    os.kill(p.pid, 9)
    p.join(10)
    with batch.folder_lock(tmp_path):
        pass


def test_mask_like_keeps_label_values_when_not_binary():
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    ref = nib.Nifti1Image(np.zeros((2, 3, 4), np.int16), aff)
    ref.set_sform(aff, code=2)
    data = np.zeros((2, 3, 4), np.float32)
    data[0, 0, 0], data[1, 2, 3] = 25, 26
    m = nifti.mask_like(data, ref, binary=False)
    assert m.get_data_dtype() == np.uint8 and int(m.header["sform_code"]) == 2
    np.testing.assert_array_equal(np.asanyarray(m.dataobj), data.astype(np.uint8))
    for bad in (300, 2.5, -1):   # does not fit uint8 exactly
        data[0, 0, 0] = bad
        with pytest.raises(ValueError, match="do not fit uint8"):
            nifti.mask_like(data, ref, binary=False)


def test_sidecar_path_and_suffix_parts():
    assert bids.sidecar_path("/d/sub-01_T2w_seg.nii.gz") == Path("/d/sub-01_T2w_seg.json")
    assert bids.sidecar_path("/d/sub-01_T2w.nii").name == "sub-01_T2w.json"
    with pytest.raises(ValueError):
        bids.sidecar_path("/d/sub-01_T2w.json")
    assert bids.suffix_parts("_seg") == ("seg",) and bids.suffix_parts("label-sacrum_seg_") == ("label-sacrum", "seg")
    for bad in ("", "_", "_a__b"):
        with pytest.raises(InputError, match=r"^--seg-suffix: .* is not a BIDS suffix"):
            bids.suffix_parts(bad, "--seg-suffix")


def test_ensure_dataset_description_created_once_never_overwritten(tmp_path):
    from sacrum_masks import __version__
    folder = tmp_path / "derivatives" / "x"
    path = bids.ensure_dataset_description(folder, name="N", description="what")
    assert path == folder / "dataset_description.json"
    assert json.loads(path.read_text()) == {
        "Name": "N", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "sacrum-masks", "Version": __version__, "Description": "what"}]}
    path.write_text('{"Name": "mine"}')
    bids.ensure_dataset_description(folder, name="other")
    assert path.read_text() == '{"Name": "mine"}'
    assert [p.name for p in folder.iterdir()] == ["dataset_description.json"]  # no temporary left


def test_read_json_object_or_none(tmp_path):
    from sacrum_masks.config import read_json_object_or_none
    p = tmp_path / "a.json"
    assert read_json_object_or_none(p) is None                      # missing
    for text in ("[1, 2]", "{not json", "3", "\xff"):
        p.write_text(text, encoding="latin-1")
        assert read_json_object_or_none(p) is None
    p.write_text('{"a": [1]}')
    assert read_json_object_or_none(p) == {"a": [1]}
    assert read_json_object_or_none(tmp_path) is None               # a folder
