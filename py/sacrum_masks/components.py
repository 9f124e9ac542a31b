"""Keep the largest connected component of a binary mask (connected-components-3d).

Three layers, as in nnU-Net's ``remove_connected_components``: :func:`largest_component` works on
arrays; :mod:`sacrum_masks.predict` applies it to each prediction before the mask is written.
"""

from __future__ import annotations

import cc3d
import numpy as np

#: connectivities cc3d accepts for 3D volumes: faces (6), faces + edges (18), + corners (26)
CONNECTIVITIES = (6, 18, 26)


def _bounding_box(fg: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box holding every nonzero voxel of a 2D/3D array, or None when there is none.

    Two passes over the array: the projection along the last axis gives the box of the other axes.
    """
    proj = np.any(fg, axis=-1)
    last = np.flatnonzero(np.any(fg, axis=tuple(range(fg.ndim - 1))))
    if last.size == 0:
        return None
    box = []
    for axis in range(proj.ndim):
        other = tuple(a for a in range(proj.ndim) if a != axis)
        hit = np.flatnonzero(np.any(proj, axis=other)) if other else np.flatnonzero(proj)
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    box.append(slice(int(last[0]), int(last[-1]) + 1))
    return tuple(box)


def largest_component(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Keep only the largest connected component of a binary mask.

    Voxels are foreground where ``mask != 0``. Two foreground voxels are connected when they share a
    face (``connectivity=6``), a face or an edge (18), or a face, an edge or a corner (26, the
    default, as ``scipy.ndimage.label(mask, np.ones((3, 3, 3)))`` in the original procedure).
    Connectivity is a property of the voxel grid: it does not depend on the image's orientation.
    When two components tie for the largest, the one met first in C order (lowest flat index) is kept.

    Parameters
    ----------
    mask : numpy.ndarray
        A 3D (or 2D) array of any dtype; not modified.
    connectivity : {6, 18, 26}
        Voxel neighbourhood (for 2D arrays: 4 or 8).

    Returns
    -------
    (numpy.ndarray, int)
        The kept component as a uint8 array of ``mask``'s shape with values {0, 1}, and the number of
        components removed (0 for an empty mask or a single component).

    Examples
    --------
    One slice, two blobs touching only at a corner (voxels ``[1, 1]`` and ``[2, 2]``):

    >>> m = np.array([[[1, 1, 0, 0],
    ...                [1, 1, 0, 0],
    ...                [0, 0, 1, 0],
    ...                [0, 0, 0, 0]]])
    >>> m = np.concatenate([m, m * 0])   # shape (2, 4, 4): the second slice is empty
    >>> out6, removed6 = largest_component(m, connectivity=6)
    >>> out6[0], removed6                # corner contact does not connect: the single voxel goes
    (array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [0, 0, 0, 0],
           [0, 0, 0, 0]], dtype=uint8), 1)
    >>> out26, removed26 = largest_component(m, connectivity=26)
    >>> out26[0], removed26              # corner contact connects: everything is kept
    (array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [0, 0, 1, 0],
           [0, 0, 0, 0]], dtype=uint8), 0)
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES} for 3D masks, got {connectivity}")
    # foreground = nonzero; bool and unsigned arrays are used as they are (no full-size copy)
    fg = mask if mask.dtype == bool or np.issubdtype(mask.dtype, np.unsignedinteger) else mask != 0
    box = _bounding_box(fg)
    if box is None:
        return np.zeros(mask.shape, dtype=np.uint8), 0
    # labelling the bounding box only: the same components, far fewer voxels to visit. C order whatever
    # the input's memory layout (nibabel arrays are often Fortran-ordered), so that component numbers,
    # and with them the tie rule below, do not depend on it
    sub = np.ascontiguousarray(fg[box])
    labels, n = cc3d.connected_components(sub, connectivity=connectivity, return_N=True, binary_image=True)
    if n <= 1:
        kept, removed = labels != 0, 0
    else:
        # sizes from the foreground voxels only (a bincount of the whole box would copy it as int64)
        counts = np.bincount(labels[labels != 0], minlength=n + 1)
        # cc3d numbers components in C scan order, so argmax's first-maximum rule keeps the one met first
        kept, removed = labels == int(np.argmax(counts)), int(n - 1)
    if kept.shape == mask.shape:
        return kept.view(np.uint8), removed
    out = np.zeros(mask.shape, dtype=np.uint8)
    out[box] = kept
    return out, removed
