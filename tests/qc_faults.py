"""Faults implanted in copies of real demo masks (helpers of test_qc_faults.py).

Each fault copies one image and its mask as a new subject (``sub-f<name>``) of the same dataset, both
reoriented to RPI (nibabel L, A, S) so that the arrays below are indexed [L, A, S]. The fault is made on
the mask only (and, for ``cut``, on the field of view of both).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from sacrum_masks.nifti import mask_like, to_rpi

#: fault -> the flag that must name it
FAULTS = {"hole": "holes", "cut": "touches_border", "component": "extra_components", "half": "volume_outlier",
          "shifted": "asymmetry"}


def hole(m: np.ndarray, img) -> tuple[np.ndarray, object]:
    """An enclosed cavity: the eroded interior within a ball around the innermost voxel."""
    dist = ndimage.distance_transform_edt(m)
    c = np.unravel_index(np.argmax(dist), m.shape)
    grid = np.indices(m.shape)
    ball = sum((g - ci) ** 2 for g, ci in zip(grid, c)) <= max(dist.max() - 1.5, 1.5) ** 2
    interior = ndimage.binary_erosion(m, iterations=1)
    out = m.copy()
    out[ball & interior] = 0
    return out, img


def cut(m: np.ndarray, img) -> tuple[np.ndarray, object]:
    """The field of view ends in the middle of the sacrum (inferior slices dropped)."""
    ks = np.nonzero(m.any(axis=(0, 1)))[0]
    k = int((ks[0] + ks[-1]) // 2)
    return m[:, :, k:].copy(), img.slicer[:, :, k:]


def component(m: np.ndarray, img) -> tuple[np.ndarray, object]:
    """A second blob, a quarter of the mask's volume, a few voxels anterior of it."""
    out = m.copy()
    idx = np.argwhere(m)
    side = max(int(round((0.25 * len(idx)) ** (1 / 3))), 2)
    ci, _, ck = idx.mean(axis=0).astype(int)
    a0 = int(idx[:, 1].max()) + 3
    a0 = min(a0, m.shape[1] - side - 1)
    out[ci - side // 2: ci - side // 2 + side, a0:a0 + side, ck - side // 2: ck - side // 2 + side] = 1
    return out, img


def half(m: np.ndarray, img) -> tuple[np.ndarray, object]:
    """Half the volume: the mask shrunk about its centroid by 0.5^(1/3) in every direction."""
    c = np.argwhere(m).mean(axis=0)
    s = 0.5 ** (1 / 3)
    out = ndimage.affine_transform(m.astype(np.float32), np.eye(3) / s, offset=c - c / s, order=1) > 0.5
    return out.astype(np.uint8), img


def shifted(m: np.ndarray, img) -> tuple[np.ndarray, object]:
    """The left half (L of the centroid) moved superior by a third of the mask's S-I extent."""
    idx = np.argwhere(m)
    ci = int(round(idx[:, 0].mean()))
    ks = idx[:, 2]
    dk = int(round((ks.max() - ks.min() + 1) / 3))
    out = m.copy()
    left = np.zeros_like(m)
    left[ci:] = m[ci:]
    out[ci:] = 0
    out[ci:, :, dk:] = left[ci:, :, :-dk]
    return out, img


def implant(dataset: Path, mask: Path, fault: str) -> Path:
    """Copy ``mask`` (of ``dataset/derivatives/labels``) and its image as ``sub-f<fault>`` with the fault."""
    rel = mask.relative_to(dataset / "derivatives" / "labels")
    sub = rel.parts[0]
    image = dataset / rel.parent / mask.name.replace("_label-sacrum_seg", "")
    new_sub = f"sub-f{fault}"
    img = to_rpi(nib.load(image))
    data = (np.asanyarray(to_rpi(nib.load(mask)).dataobj) != 0).astype(np.uint8)
    out, img = globals()[fault](data, img)
    img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    new_rel = Path(str(rel.parent).replace(sub, new_sub, 1))
    new_name = image.name.replace(sub, new_sub, 1)
    (dataset / new_rel).mkdir(parents=True, exist_ok=True)
    nib.save(img, str(dataset / new_rel / new_name))
    dst = dataset / "derivatives" / "labels" / new_rel / mask.name.replace(sub, new_sub, 1)
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(mask_like(out, img), str(dst))
    side = json.loads(mask.with_name(mask.name.replace(".nii.gz", ".json")).read_text())
    dst.with_name(dst.name.replace(".nii.gz", ".json")).write_text(json.dumps(side))
    return dst


def copy_datasets(bids: Path, names, dst: Path) -> dict[str, Path]:
    """Copy demo datasets (images and their stage-4 masks; not the old QC report)."""
    out = {}
    for name in names:
        out[name] = dst / name
        shutil.copytree(bids / name, out[name], ignore=shutil.ignore_patterns("qc-sacrum*"))
    return out
