"""Benchmark of stage 1: the real CT sacrum label onto a 0.8 mm 320x320x60 MRI grid.

Time per image of :func:`sacrum_masks.register.register_label` (sacrum selection, resampling only
inside the sacrum's bounding box, volume and field-of-view checks, mask on the image grid) against
``nibabel.processing.resample_from_to(order=0)`` of the binary sacrum (the whole grid), measured in the
same run; the two outputs are compared voxel for voxel. Two grids: sagittal (axis-aligned, PIR) and the
same grid tilted by 12 degrees (oblique). Needs ../shared/data/real (skips, saying so, without it).

    python bench/bench_register.py [--repeat N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from scipy.spatial.transform import Rotation

from sacrum_masks.register import register_label
from _timing import best_of  # bench/ is on sys.path when run as a script

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
SHAPE = (320, 320, 60)
SPACING = 0.8


def grid(centre, tilt_degrees: float) -> nib.Nifti1Image:
    """A sagittal 0.8 mm grid (axes P, I, R like a sagittal spine MRI), centred on ``centre``."""
    rot = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # i -> P, j -> I, k -> R
    rot = Rotation.from_euler("x", tilt_degrees, degrees=True).as_matrix() @ rot
    aff = np.eye(4)
    aff[:3, :3] = rot * SPACING
    aff[:3, 3] = centre - aff[:3, :3] @ ((np.array(SHAPE) - 1) / 2)
    img = nib.Nifti1Image(np.zeros(SHAPE, np.int16), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    return img


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    label_path = REAL / "totalseg_ct_seg_v1.nii.gz"
    if not label_path.is_file():
        print(f"bench_register: skipped, {label_path} not found (it comes with ../shared)")
        return 0
    label_img = nib.load(str(label_path))
    label = np.asanyarray(label_img.dataobj)
    sacrum = nib.Nifti1Image((label == 92).astype(np.uint8), label_img.affine)
    ijk = np.argwhere(label == 92)
    centre = (ijk @ label_img.affine[:3, :3].T + label_img.affine[:3, 3]).mean(0)

    for name, tilt in (("sagittal", 0.0), ("oblique 12 deg", 12.0)):
        dst = grid(centre, tilt)
        t_native, res = best_of(lambda: register_label(label_img, label, dst, (92,)), args.repeat)
        t_nib, ref = best_of(lambda: resample_from_to(sacrum, (SHAPE, dst.affine), order=0), args.repeat)
        ours = np.asanyarray(res.mask.dataobj)
        theirs = np.asanyarray(ref.dataobj) != 0
        differ = int((ours != theirs).sum())
        print(f"register native ({name}, {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} at {SPACING} mm): "
              f"{1000 * t_native:.1f} ms/image; nibabel resample_from_to(order=0): {1000 * t_nib:.1f} ms/image; "
              f"ratio {t_nib / t_native:.1f}x; outputs: {differ} of {ours.size} voxels differ "
              f"({int(ours.sum())} vs {int(theirs.sum())} sacrum voxels, {res.volume_after_ml:.1f} mL, "
              f"{100 * res.fraction_outside:.1f}% of the sacrum outside the grid)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
