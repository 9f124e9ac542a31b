"""Segmentation metrics on binary masks: Dice, 95th-percentile Hausdorff distance (mm), volume (mL).

Conventions
-----------
* Masks are arrays on the same voxel grid; any non-zero voxel is foreground.
* ``spacing`` is the voxel size in mm along each array axis (``img.header.get_zooms()[:3]``).
* The surface of a mask is its foreground voxels that have at least one background 6-neighbour
  (face connectivity; voxels outside the array count as background).
* Empty masks: ``dice`` of two empty masks is 1.0 (both agree there is nothing); ``hd95`` of two
  empty masks is 0.0, and of one empty and one non-empty mask is ``inf`` (no surface to measure a
  distance to; ``nan`` is never returned, so a mean over cases is visibly infinite, not silently skipped).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _as_bool(a) -> np.ndarray:
    return np.asarray(a) != 0


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"masks have different shapes: {a.shape} and {b.shape}")


def dice(a, b) -> float:
    """Dice coefficient 2|A∩B| / (|A| + |B|); 1.0 when both masks are empty.

    >>> a = np.zeros((1, 4)); a[0, :2] = 1      # [1 1 0 0]
    >>> b = np.zeros((1, 4)); b[0, 1:3] = 1     # [0 1 1 0]
    >>> dice(a, b)
    0.5
    >>> dice(np.zeros(3), np.zeros(3))
    1.0
    """
    a, b = _as_bool(a), _as_bool(b)
    _check_same_shape(a, b)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def surface(mask) -> np.ndarray:
    """Boolean surface of a mask: foreground voxels with a background face neighbour.

    >>> surface(np.ones((3, 3), bool)).astype(int)
    array([[1, 1, 1],
           [1, 0, 1],
           [1, 1, 1]])
    """
    m = _as_bool(mask)
    if not m.any():
        return m.copy()
    structure = ndimage.generate_binary_structure(m.ndim, 1)
    eroded = ndimage.binary_erosion(m, structure=structure, border_value=0)
    return m & ~eroded


def surface_distances(a, b, spacing) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``a`` to the nearest surface voxel of ``b``.

    Both masks must be non-empty. Distances are between voxel centres (Euclidean, anisotropic spacing).
    """
    a, b = _as_bool(a), _as_bool(b)
    _check_same_shape(a, b)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != a.ndim:
        raise ValueError(f"spacing {spacing} does not match a {a.ndim}D mask")
    sa, sb = surface(a), surface(b)
    if not sa.any() or not sb.any():
        raise ValueError("surface distances need two non-empty masks")
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    return dist_to_b[sa]


def hd95(a, b, spacing=None) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two masks, in mm.

    The 95th percentile (numpy's default linear interpolation) of the pooled distances from the surface
    of ``a`` to that of ``b`` and from ``b`` to ``a``. 0.0 when both masks are empty, ``inf`` when only
    one is.

    Parameters
    ----------
    a, b : array_like
        Masks on the same grid (non-zero = foreground).
    spacing : sequence of float, optional
        Voxel size in mm per axis (default 1 mm).

    >>> a = np.zeros((1, 10)); a[0, 2] = 1
    >>> b = np.zeros((1, 10)); b[0, 5] = 1
    >>> hd95(a, b, spacing=(1.0, 2.0))
    6.0
    """
    a, b = _as_bool(a), _as_bool(b)
    _check_same_shape(a, b)
    if spacing is None:
        spacing = (1.0,) * a.ndim
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return 0.0
    if has_a != has_b:
        return float("inf")
    d = np.concatenate([surface_distances(a, b, spacing), surface_distances(b, a, spacing)])
    return float(np.percentile(d, 95))


def volume_ml(mask, spacing) -> float:
    """Foreground volume in mL (voxel count x voxel volume in mm^3 / 1000).

    >>> volume_ml(np.ones((10, 10, 10)), (1.0, 1.0, 1.0))
    1.0
    """
    return int(_as_bool(mask).sum()) * float(np.prod([float(s) for s in spacing])) / 1000.0
