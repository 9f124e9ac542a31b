"""Plausibility checks of sacrum masks: pure functions on arrays and numbers, thresholds in one table.

Every check returns a :class:`Check`: its flag name, the measured value, a *ratio* (the measure over its
threshold: the check fails when ``ratio > 1``) and a reason in words. The page ranks masks by
:func:`score`.

Conventions
-----------
* Arrays are RPI-ordered (nibabel axis codes L, A, S; :func:`sacrum_masks.nifti.to_rpi`): axis 0 runs
  right to left, axis 1 posterior to anterior, axis 2 inferior to superior. ``spacing`` is the voxel size
  in mm along those axes. Non-zero is inside.
* Components: 26-connectivity (as stage 4's largest-component step). Holes: background voxels not
  6-connected to the array's border (``scipy.ndimage.binary_fill_holes``), the digital-topology pair
  of a 26-connected object; tunnels open at both ends (the sacral canal, the foramina) are not holes.
* Cohort statistics are robust: median and ``1.4826 x MAD`` (the standard deviation for normal data),
  with a floor on the spread (:data:`THRESHOLDS`) so that a very uniform cohort does not flag tiny
  differences; they are evaluated from ``min_cohort`` masks on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: name -> (value, what it means). The README's threshold table is :func:`thresholds_markdown`.
THRESHOLDS: dict[str, tuple[float, str]] = {
    "volume_k": (3.5, "volume outlier: abs(log(volume / cohort median)) over this many robust SDs of log volume"),
    "volume_min_factor": (1.4, "volume outlier: never flagged within this factor of the cohort median"),
    "components_share": (0.05, "extra components: share of the predicted volume removed or outside the "
                               "largest 26-connected component"),
    "border_voxels": (1, "touches border: mask voxels on the first or last axial (S-I) slice of the FOV"),
    "holes_share": (0.01, "holes: (filled volume - volume) / volume"),
    "asymmetry": (0.30, "asymmetry: 1 - overlap of the mask with its mirror image about its own "
                        "mid-sagittal plane (best plane within +-12 deg)"),
    "position_k": (4.0, "position: centroid (fraction of the FOV per axis) over this many robust SDs "
                        "from the cohort median"),
    "position_floor": (0.04, "position: robust SD never below this fraction of the FOV"),
    "extent_k": (4.0, "extent: log bounding-box size per axis over this many robust SDs from the cohort"),
    "extent_floor": (0.12, "extent: robust SD of log size never below this (about 12 %)"),
    "fold_dice": (0.85, "fold disagreement: mean Dice between the folds of an ensemble below this"),
    "entropy_k": (4.0, "uncertain boundary: BoundaryEntropy over this many robust SDs above the cohort median"),
    "entropy_floor": (0.05, "uncertain boundary: robust SD of BoundaryEntropy never below this (bits)"),
    "fov_fraction": (0.01, "registration (stage 1): share of the CT label outside the MRI's field of view"),
    "volume_change": (0.05, "registration (stage 1): abs(volume after / volume before - 1) on the MRI grid"),
    "min_cohort": (4, "cohort checks (volume, position, extent, entropy) need this many non-empty masks"),
}

#: the most a single check adds to the score (an empty mask, an unreadable file)
RATIO_CAP = 10.0
#: score of an entry that could not be read at all (listed first)
ERROR_SCORE = 100.0

MAD_TO_SD = 1.4826


def T(name: str) -> float:
    """The value of a threshold of :data:`THRESHOLDS`.

    >>> T("holes_share")
    0.01
    """
    return THRESHOLDS[name][0]


def thresholds_markdown() -> str:
    """The threshold table as Markdown (pasted into the README; a test keeps them equal).

    >>> thresholds_markdown().splitlines()[0]
    '| threshold | value | meaning |'
    """
    lines = ["| threshold | value | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | {v:g} | {text} |" for k, (v, text) in THRESHOLDS.items()]
    return "\n".join(lines)


@dataclass(frozen=True)
class Check:
    """Result of one check: ``flag`` (its name), ``value`` (the measure), ``ratio`` (> 1 fails), ``reason``."""

    flag: str
    value: float | None
    ratio: float
    reason: str

    @property
    def failed(self) -> bool:
        return self.ratio > 1.0


def _ratio(x: float) -> float:
    return float(min(max(x, 0.0), RATIO_CAP))


# --------------------------------------------------------------------------------------------- measures


def largest_share(mask: np.ndarray) -> tuple[int, int]:
    """(voxels of the largest 26-connected component, all voxels).

    >>> m = np.zeros((5, 5, 5), np.uint8); m[0:2, 0:2, 0:2] = 1; m[4, 4, 4] = 1
    >>> largest_share(m)
    (8, 9)
    """
    import cc3d

    fg = np.asarray(mask) != 0
    n = int(np.count_nonzero(fg))
    if n == 0:
        return 0, 0
    labels = cc3d.connected_components(fg.astype(np.uint8), connectivity=26)
    counts = np.bincount(labels.ravel())[1:]
    return int(counts.max()), n


def hole_voxels(mask: np.ndarray) -> int:
    """Voxels of the filled mask that are not in the mask (enclosed cavities).

    >>> m = np.zeros((7, 7, 7), np.uint8); m[1:6, 1:6, 1:6] = 1; m[3, 3, 3] = 0
    >>> hole_voxels(m)
    1
    >>> m[3, 3, 1:6] = 0   # a tunnel through the block is not a hole
    >>> hole_voxels(m)
    0
    """
    from scipy.ndimage import binary_fill_holes

    fg = np.asarray(mask) != 0
    if not fg.any():
        return 0
    return int(np.count_nonzero(binary_fill_holes(fg)) - np.count_nonzero(fg))


def border_voxels(mask: np.ndarray) -> tuple[int, int]:
    """Mask voxels on the (inferior, superior) slices of an RPI array (axis 2 is S).

    >>> m = np.zeros((3, 3, 4), np.uint8); m[1, 1, 0] = 1; m[:, :, 2] = 1
    >>> border_voxels(m)
    (1, 0)
    """
    fg = np.asarray(mask) != 0
    return int(np.count_nonzero(fg[:, :, 0])), int(np.count_nonzero(fg[:, :, -1]))


def _unit(yaw_deg: float, roll_deg: float) -> np.ndarray:
    y, r = math.radians(yaw_deg), math.radians(roll_deg)
    # the L axis turned by yaw about S, then by roll about A
    n = np.array([math.cos(y) * math.cos(r), math.sin(y), math.cos(y) * math.sin(r)])
    return n / np.linalg.norm(n)


def mirror_overlap(mask: np.ndarray, spacing=(1.0, 1.0, 1.0), max_angle: float = 12.0, step: float = 4.0) -> float:
    """Best share of mask voxels whose mirror image is also in the mask, over mid-sagittal planes.

    The plane passes through the centroid (shifted by up to half a voxel along L, so that mirror
    images fall on voxel centres), its normal the L axis turned by yaw (about S) and roll (about A)
    in ``[-max_angle, max_angle]`` by ``step`` degrees; distances in mm (``spacing``). Mirror images
    are rounded to the nearest voxel; those outside the array count as outside the mask.
    Asymmetry is ``1 - mirror_overlap``.

    >>> m = np.zeros((9, 6, 6), np.uint8); m[2:7, 1:4, 1:5] = 1
    >>> mirror_overlap(m)
    1.0
    >>> m[2:4, :, :] = 0; m[2:4, 4:6, 1:5] = 1   # the right third moved anterior
    >>> round(mirror_overlap(m), 2)
    0.65
    """
    fg = np.asarray(mask) != 0
    idx = np.argwhere(fg)
    if idx.size == 0:
        return 1.0
    sp = np.asarray(spacing, dtype=float)
    pts = idx * sp
    c = pts.mean(axis=0)
    angles = np.arange(-max_angle, max_angle + 1e-9, step)
    shape = np.array(fg.shape)
    best = 0.0
    for dx in (-0.5, 0.0, 0.5):
        cc = c + np.array([dx * sp[0], 0.0, 0.0])
        for yaw in angles:
            for roll in angles:
                n = _unit(yaw, roll)
                d = (pts - cc) @ n
                mirrored = np.rint((pts - 2.0 * d[:, None] * n) / sp).astype(np.int64)
                ok = np.all((mirrored >= 0) & (mirrored < shape), axis=1)
                hits = np.count_nonzero(fg[tuple(mirrored[ok].T)])
                best = max(best, hits / len(idx))
    return float(best)


def position_and_extent(mask: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> tuple[list[float], list[float]] | None:
    """(centroid as a fraction of the FOV per RPI axis, bounding-box size in mm per axis); None when empty.

    >>> position_and_extent(np.pad(np.ones((2, 2, 2)), ((0, 2), (1, 1), (2, 0))), (1, 1, 2))
    ([0.25, 0.5, 0.75], [2.0, 2.0, 4.0])
    """
    idx = np.argwhere(np.asarray(mask) != 0)
    if idx.size == 0:
        return None
    shape = np.asarray(np.shape(mask), dtype=float)
    frac = (idx.mean(axis=0) + 0.5) / shape
    size = (idx.max(axis=0) - idx.min(axis=0) + 1) * np.asarray(spacing, dtype=float)
    return [round(float(v), 4) for v in frac], [round(float(v), 3) for v in size]


def robust_center_spread(values, floor: float) -> tuple[float, float]:
    """(median, max(1.4826 x MAD, floor)) of the values.

    >>> robust_center_spread([1.0, 2.0, 3.0, 4.0, 100.0], 0.1)
    (3.0, 1.4826)
    """
    v = np.asarray(list(values), dtype=float)
    med = float(np.median(v))
    return med, max(MAD_TO_SD * float(np.median(np.abs(v - med))), float(floor))


# --------------------------------------------------------------------------------------------- checks


def check_empty(voxels: int) -> Check:
    """An empty mask.

    >>> check_empty(0).failed, check_empty(5).failed
    (True, False)
    """
    if voxels == 0:
        return Check("empty", 0, RATIO_CAP, "empty mask: no voxel in the sacrum")
    return Check("empty", voxels, 0.0, "")


def volume_limits(volumes, k: float | None = None, min_factor: float | None = None,
                  min_n: int | None = None) -> tuple[float, float] | None:
    """The cohort's robust volume range ``(lo, hi)`` in mL, or None for fewer than ``min_n`` volumes.

    ``median x/÷ exp(max(k x robust SD of log volume, log(min_factor)))``.

    >>> lo, hi = volume_limits([100, 101, 99, 100, 102])
    >>> round(lo, 1), round(hi, 1)
    (71.4, 140.0)
    >>> volume_limits([1, 2]) is None
    True
    """
    k = T("volume_k") if k is None else k
    min_factor = T("volume_min_factor") if min_factor is None else min_factor
    min_n = int(T("min_cohort")) if min_n is None else min_n
    v = [float(x) for x in volumes if x and x > 0]
    if len(v) < min_n:
        return None
    med, sd = robust_center_spread(np.log(v), 0.0)
    half = max(k * sd, math.log(min_factor))
    return float(math.exp(med - half)), float(math.exp(med + half))


def check_volume(volume_ml: float, limits: tuple[float, float] | None) -> Check:
    """Volume outside the cohort's robust range (:func:`volume_limits`).

    >>> check_volume(50.0, (70.0, 140.0)).reason
    'volume 50.00 mL outside the cohort range 70.00-140.00 mL'
    >>> round(check_volume(100.0, (70.0, 140.0)).ratio, 2)
    0.03
    """
    if limits is None or not volume_ml:
        return Check("volume_outlier", volume_ml, 0.0, "")
    lo, hi = limits
    center, half = (math.log(lo) + math.log(hi)) / 2, (math.log(hi) - math.log(lo)) / 2
    ratio = abs(math.log(volume_ml) - center) / half
    reason = (f"volume {volume_ml:.2f} mL outside the cohort range {lo:.2f}-{hi:.2f} mL" if ratio > 1 else "")
    return Check("volume_outlier", volume_ml, _ratio(ratio), reason)


def check_components(largest: int, total: int, removed_ml: float = 0.0, voxel_ml: float = 1.0) -> Check:
    """Share of the predicted volume in extra components: removed by stage 4 or still in the file.

    Parameters
    ----------
    largest, total : int
        Voxels of the largest 26-connected component and of the whole mask (:func:`largest_share`).
    removed_ml : float
        Volume stage 4 removed (0 when the sidecar does not say).
    voxel_ml : float
        Volume of one voxel.

    >>> check_components(90, 100).reason
    'extra components: 10.0 % of the predicted volume outside the largest component'
    >>> check_components(100, 100, removed_ml=1.0, voxel_ml=0.1).failed
    True
    """
    predicted = total * voxel_ml + removed_ml
    if predicted <= 0:
        return Check("extra_components", 0.0, 0.0, "")
    share = ((total - largest) * voxel_ml + removed_ml) / predicted
    ratio = share / T("components_share")
    reason = (f"extra components: {100 * share:.1f} % of the predicted volume outside the largest component"
              if ratio > 1 else "")
    return Check("extra_components", round(share, 4), _ratio(ratio), reason)


def check_border(inferior: int, superior: int, cross_section: int) -> Check:
    """Mask voxels on the FOV's inferior or superior slice (a sacrum cut off by the field of view).

    ``cross_section`` is the mask's largest axial cross-section (voxels); the ratio is 1 + the border
    contact as a share of it.

    >>> check_border(0, 0, 50).failed
    False
    >>> c = check_border(25, 0, 50); c.failed, c.ratio, c.reason
    (True, 1.5, 'touches the inferior border of the FOV (25 voxels on the last slice)')
    """
    n = max(inferior, superior)
    if n < T("border_voxels"):
        return Check("touches_border", 0, 0.0, "")
    side = " and ".join(s for s, v in (("inferior", inferior), ("superior", superior)) if v)
    ratio = 1.0 + min(n / max(cross_section, 1), 1.0)
    return Check("touches_border", n, _ratio(ratio),
                 f"touches the {side} border of the FOV ({inferior + superior} voxels on the last slice)")


def check_holes(holes: int, voxels: int) -> Check:
    """Enclosed cavities: (filled volume - volume) / volume.

    >>> check_holes(30, 1000).reason
    'holes: 3.0 % of the volume enclosed inside the mask'
    >>> check_holes(0, 1000).ratio
    0.0
    """
    if not voxels:
        return Check("holes", 0.0, 0.0, "")
    share = holes / voxels
    ratio = share / T("holes_share")
    reason = f"holes: {100 * share:.1f} % of the volume enclosed inside the mask" if ratio > 1 else ""
    return Check("holes", round(share, 4), _ratio(ratio), reason)


def check_asymmetry(overlap: float) -> Check:
    """Left-right asymmetry ``1 - overlap`` (:func:`mirror_overlap`).

    >>> check_asymmetry(0.6).reason
    'left-right asymmetry 0.40 about its mid-sagittal plane (over 0.30)'
    """
    asym = 1.0 - overlap
    ratio = asym / T("asymmetry")
    reason = (f"left-right asymmetry {asym:.2f} about its mid-sagittal plane (over {T('asymmetry'):.2f})"
              if ratio > 1 else "")
    return Check("asymmetry", round(asym, 4), _ratio(ratio), reason)


AXES = ("L-R", "A-P", "S-I")


def cohort_stats(rows: list[list[float]], floor: float, log: bool = False) -> list[tuple[float, float]] | None:
    """(median, robust SD) per column of the cohort's rows (``log`` first), or None below ``min_cohort``.

    >>> cohort_stats([[0.5], [0.5], [0.52], [0.48]], 0.04)
    [(0.5, 0.04)]
    """
    if len(rows) < int(T("min_cohort")):
        return None
    a = np.asarray(rows, dtype=float)
    if log:
        a = np.log(a)
    return [robust_center_spread(a[:, j], floor) for j in range(a.shape[1])]


def check_position(frac: list[float] | None, stats) -> Check:
    """Centroid (fraction of the FOV per axis) far from the cohort's.

    >>> c = check_position([0.5, 0.5, 0.1], [(0.5, 0.04)] * 3); c.failed, c.reason
    (True, 'position: centroid at 0.10 of the FOV along S-I, cohort 0.50 +- 0.04')
    """
    if frac is None or stats is None:
        return Check("position", None, 0.0, "")
    z = [abs(v - m) / s for v, (m, s) in zip(frac, stats)]
    j = int(np.argmax(z))
    ratio = z[j] / T("position_k")
    reason = (f"position: centroid at {frac[j]:.2f} of the FOV along {AXES[j]}, "
              f"cohort {stats[j][0]:.2f} +- {stats[j][1]:.2f}" if ratio > 1 else "")
    return Check("position", round(z[j], 2), _ratio(ratio), reason)


def check_extent(size_mm: list[float] | None, stats) -> Check:
    """Bounding-box size per axis far from the cohort's (on a log scale).

    >>> c = check_extent([100, 60, 45], [(math.log(100), 0.12), (math.log(60), 0.12), (math.log(90), 0.12)])
    >>> c.failed, c.reason
    (True, 'extent: 45 mm along S-I, cohort median 90 mm')
    """
    if size_mm is None or stats is None:
        return Check("extent", None, 0.0, "")
    z = [abs(math.log(max(v, 1e-6)) - m) / s for v, (m, s) in zip(size_mm, stats)]
    j = int(np.argmax(z))
    ratio = z[j] / T("extent_k")
    reason = (f"extent: {size_mm[j]:.0f} mm along {AXES[j]}, cohort median {math.exp(stats[j][0]):.0f} mm"
              if ratio > 1 else "")
    return Check("extent", round(z[j], 2), _ratio(ratio), reason)


def check_fold_agreement(dice: float | None) -> Check:
    """Fold ensemble disagreement (sidecar ``FoldAgreementDice``; None for a single fold).

    >>> check_fold_agreement(0.7).reason
    'folds disagree: mean Dice between folds 0.700 (under 0.85)'
    >>> check_fold_agreement(None).ratio
    0.0
    """
    if dice is None:
        return Check("fold_disagreement", None, 0.0, "")
    ratio = (1.0 - dice) / (1.0 - T("fold_dice"))
    reason = (f"folds disagree: mean Dice between folds {dice:.3f} (under {T('fold_dice'):.2f})"
              if ratio > 1 else "")
    return Check("fold_disagreement", dice, _ratio(ratio), reason)


def check_entropy(entropy: float | None, stats: tuple[float, float] | None) -> Check:
    """Boundary entropy (sidecar ``BoundaryEntropy``, bits) high for this cohort.

    >>> check_entropy(0.9, (0.3, 0.05)).reason
    'uncertain boundary: entropy 0.90 bits, cohort 0.30 +- 0.05'
    """
    if entropy is None or stats is None:
        return Check("uncertain_boundary", entropy, 0.0, "")
    z = (entropy - stats[0]) / stats[1]
    ratio = z / T("entropy_k")
    reason = (f"uncertain boundary: entropy {entropy:.2f} bits, cohort {stats[0]:.2f} +- {stats[1]:.2f}"
              if ratio > 1 else "")
    return Check("uncertain_boundary", entropy, _ratio(ratio), reason)


def score(checks: list[Check], error: bool = False) -> float:
    """Rank of a mask on the page, worst first: number of failed checks + the largest ratio.

    A mask with a failed check scores at least 2, a mask without one less than 1 (its largest ratio,
    how close it came to a threshold); an entry that could not be read scores :data:`ERROR_SCORE`.

    >>> score([Check("a", 1, 0.4, ""), Check("b", 1, 0.9, "")])
    0.9
    >>> score([Check("a", 1, 1.5, "x"), Check("b", 1, 0.2, "")])
    2.5
    >>> score([], error=True)
    100.0
    """
    if error:
        return ERROR_SCORE
    failed = sum(1 for c in checks if c.failed)
    worst = max((c.ratio for c in checks), default=0.0)
    return round(failed + worst, 4)
