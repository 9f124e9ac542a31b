"""Benchmark of the largest-component step: :func:`sacrum_masks.components.largest_component` against the
original procedure's function (totalspineseg ``largest_component_filewise.keep_largest_component``:
``get_fdata()`` float64 data, cast to uint8, ``np.unique``, ``scipy.ndimage.label`` with a 3x3x3 structure,
``np.bincount``, then ``seg == largest``), measured in the same run on the same array.

Data: the real TotalSegmentator sacrum (../shared/data/real/totalseg_ct_sacrum_v1.nii.gz, 3 mm) upsampled
to 0.8 mm (nearest neighbour, 457x379x420 = 73 M voxels), plus the same volume with 40 stray voxels
(as a prediction has) so that something is removed. Outputs are compared voxel for voxel.

    python bench/bench_components.py [--repeat N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from sacrum_masks.components import largest_component
from _timing import best_of  # bench/ is on sys.path when run as a script

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
SPACING = 0.8


def original_largest(seg_data: np.ndarray) -> np.ndarray:
    """The original's function body, array in / array out (loading and saving left out of both sides)."""
    seg_data_src = seg_data.astype(np.uint8)
    out = np.zeros_like(seg_data_src)
    for value in [v for v in np.unique(seg_data_src) if v != 0]:
        mask = seg_data_src == value
        labeled, _ = ndimage.label(mask, np.ones((3, 3, 3)))
        sizes = np.bincount(labeled.ravel())[1:]
        out[labeled == sizes.argmax() + 1] = value
    return out


def upsampled_label() -> np.ndarray:
    img = nib.load(REAL / "totalseg_ct_sacrum_v1.nii.gz")
    zoom = np.asarray(img.header.get_zooms()[:3], float) / SPACING
    return ndimage.zoom(np.asanyarray(img.dataobj), zoom, order=0, grid_mode=True, mode="grid-constant")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if not (REAL / "totalseg_ct_sacrum_v1.nii.gz").is_file():
        print(f"bench_components: skipped, {REAL} has no totalseg_ct_sacrum_v1.nii.gz (it comes with ../shared)")
        return 0
    label = upsampled_label()
    noisy = label.copy()
    rng = np.random.default_rng(0)
    for idx in zip(*(rng.integers(0, s, 40) for s in noisy.shape)):
        noisy[idx] = 1
    print(f"bench_components: sacrum label at {SPACING} mm, shape {label.shape} "
          f"({label.size / 1e6:.0f} M voxels, {int(label.sum())} in the sacrum), best of {args.repeat}")
    ok = True
    for name, data in [("real label", label), ("real label + 40 stray voxels", noisy)]:
        as_float = data.astype(np.float64)     # what get_fdata() gives the original
        t_orig, ref = best_of(lambda: original_largest(as_float), args.repeat)
        t_ours, (out, removed) = best_of(lambda: largest_component(as_float), args.repeat)
        t_u8, (out_u8, _) = best_of(lambda: largest_component(data), args.repeat)
        same = np.array_equal(out, ref) and np.array_equal(out_u8, ref)
        ok &= same
        print(f"  {name}: original (scipy, float64) {t_orig:.3f} s; ours (cc3d) {t_ours:.3f} s on the same float64 "
              f"array -> {t_orig / t_ours:.1f}x; on the uint8 prediction {t_u8:.3f} s -> {t_orig / t_u8:.1f}x "
              f"(goal >= 10x); {removed} components removed; outputs identical: {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
