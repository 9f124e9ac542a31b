"""Headers: every file written on an image's grid copies the image's qform and sform, matrices and codes.

The oracle is the readers themselves: nibabel (``img.affine``: the sform when its code is set, else the
qform) and SimpleITK (ITK's NIfTI reader, the one nnU-Net, ITK-SNAP and Slicer use, which may take the
qform instead). For each reader the mask must lie exactly where that reader puts its image, for images
whose qform and sform differ (the MRSpineSeg case) under every combination of codes. Before docs/DESIGN.md
"Headers", a mask got the sform in both fields and SimpleITK placed it millimetres off its image.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from sacrum_masks import convert, evaluate
from sacrum_masks.nifti import mask_like
from sacrum_masks.predict import Settings, items_from_bids, run_predict, select_items
from sacrum_masks.register import register_dataset
from test_predict import Loads, blob_image, fake_model_dir, rotation

#: (qform_code, sform_code) of the issue
CODES = [(1, 1), (1, 2), (2, 1), (0, 1), (1, 0)]


def two_headed(img, qcode: int, scode: int):
    """``img`` with a qform 3 mm and 4 degrees away from its sform, and the given codes."""
    s = img.affine.copy()
    q = s.copy()
    q[:3, :3] = rotation(2, 4.0) @ s[:3, :3]
    q[:3, 3] += [3.0, -2.0, 1.5]
    header = nib.Nifti1Header()
    header.set_data_shape(img.shape)
    header.set_data_dtype(img.get_data_dtype())
    header.set_qform(q, code=qcode)
    header.set_sform(s, code=scode)
    return nib.Nifti1Image(np.asanyarray(img.dataobj), header.get_best_affine(), header)   # saved as set


def geometry(path) -> dict:
    """Where each reader puts a file: nibabel's affine, SimpleITK's origin, direction, spacing, size."""
    nimg = nib.load(str(path))
    simg = sitk.ReadImage(str(path))
    return {"nibabel": nimg.affine, "shape": nimg.shape[:3],
            "sitk": np.concatenate([simg.GetOrigin(), simg.GetDirection(), simg.GetSpacing()]),
            "sitk_size": simg.GetSize()}


def assert_same_place(mask_path, image_path):
    m, i = geometry(mask_path), geometry(image_path)
    assert m["shape"] == i["shape"] and m["sitk_size"] == i["sitk_size"]
    np.testing.assert_allclose(m["nibabel"], i["nibabel"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(m["sitk"], i["sitk"], atol=1e-5, rtol=0)
    mh, ih = nib.load(str(mask_path)).header, nib.load(str(image_path)).header
    assert (int(mh["qform_code"]), int(mh["sform_code"])) == (int(ih["qform_code"]), int(ih["sform_code"]))


def test_the_two_readers_really_disagree_on_these_images(tmp_path):
    """The cases are meaningful: on a two-headed image with codes (1, 2) nibabel takes the sform and
    SimpleITK the qform, millimetres apart; (1, 0) makes nibabel take the qform too."""
    def origins(qcode, scode):
        path = tmp_path / f"img{qcode}{scode}.nii.gz"
        nib.save(two_headed(blob_image("LPS"), qcode, scode), str(path))
        g = geometry(path)
        return g["nibabel"][:3, 3] * [-1, -1, 1], g["sitk"][:3]   # nibabel RAS -> ITK LPS

    nib_o, itk_o = origins(1, 2)
    assert np.abs(nib_o - itk_o).max() > 2.0
    nib_q, itk_q = origins(1, 0)
    np.testing.assert_allclose(nib_q, itk_q, atol=1e-5)
    assert np.abs(nib_q - nib_o).max() > 2.0


@pytest.mark.parametrize("qcode, scode", CODES)
def test_mask_like_copies_both_forms(tmp_path, qcode, scode):
    img = two_headed(blob_image("oblique"), qcode, scode)
    nib.save(img, str(tmp_path / "img.nii.gz"))
    nib.save(mask_like(np.asanyarray(img.dataobj) > 50, img), str(tmp_path / "mask.nii.gz"))
    assert_same_place(tmp_path / "mask.nii.gz", tmp_path / "img.nii.gz")


@pytest.mark.parametrize("qcode, scode", CODES)
def test_predict_and_register_masks_lie_on_their_image_for_both_readers(tmp_path, qcode, scode):
    ds = tmp_path / "ds"
    rel = "sub-01/anat/sub-01_T2w.nii.gz"
    (ds / rel).parent.mkdir(parents=True)
    img = two_headed(blob_image("LPS"), qcode, scode)
    nib.save(img, str(ds / rel))
    # stage 4 (stand-in network, real writer)
    assert run_predict(select_items(items_from_bids(ds)), Settings(fake_model_dir(tmp_path)), model_factory=Loads()) == 0
    mask = ds / "derivatives/labels/sub-01/anat/sub-01_T2w_label-sacrum_seg.nii.gz"
    assert_same_place(mask, ds / rel)
    # stage 1: an MRI label on another grid (nibabel's world) carried onto the image
    label = ds / "derivatives/labels/sub-01/anat/sub-01_T2w_seg.nii.gz"
    lab_aff = np.diag([0.5, 0.5, 0.5, 1.0])
    lab_aff[:3, 3] = img.affine[:3, 3] - 30
    grid = np.stack(np.meshgrid(*[np.arange(120)] * 3, indexing="ij"), -1).reshape(-1, 3)
    src = np.round((grid @ lab_aff[:3, :3].T + lab_aff[:3, 3] - img.affine[:3, 3])
                   @ np.linalg.inv(img.affine[:3, :3]).T).astype(int)   # label voxel -> image voxel (nibabel)
    inside = ((src >= 0) & (src < img.shape)).all(1)
    bright = np.zeros(len(grid), bool)
    bright[inside] = (np.asanyarray(img.dataobj) > 50)[tuple(src[inside].T)]
    lab = bright.reshape(120, 120, 120).astype(np.uint8)
    nib.save(nib.Nifti1Image(lab, lab_aff), str(label))
    label.with_name("sub-01_T2w_seg.json").write_text(json.dumps({"SacrumIndices": [1]}))
    batch = register_dataset(ds)
    assert batch.exit_code == 0, batch.failures
    reg = ds / "derivatives/reg-labels/sub-01/anat/sub-01_T2w_seg.nii.gz"
    assert_same_place(reg, ds / rel)
    # evaluation reads both on the same grid (same_grid by nibabel, as every stage): Dice of the pair
    row = evaluate.evaluate_pair(mask, reg)
    assert row["dice"] > 0.5


@pytest.mark.parametrize("qcode, scode", CODES)
def test_convert_label_lies_on_its_training_image_for_both_readers(tmp_path, qcode, scode):
    img = two_headed(blob_image("oblique"), qcode, scode)
    lbl = mask_like(np.asanyarray(img.dataobj) > 50, img)
    nib.save(img, str(tmp_path / "img.nii.gz"))
    nib.save(lbl, str(tmp_path / "lbl.nii.gz"))
    img_rpi, lbl_rpi = convert.convert_pair(tmp_path / "img.nii.gz", tmp_path / "lbl.nii.gz")
    nib.save(img_rpi, str(tmp_path / "case_0000.nii.gz"))
    nib.save(lbl_rpi, str(tmp_path / "case.nii.gz"))
    assert_same_place(tmp_path / "case.nii.gz", tmp_path / "case_0000.nii.gz")
