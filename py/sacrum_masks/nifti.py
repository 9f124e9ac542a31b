"""NIfTI input/output with the contracts of docs/DESIGN.md.

* :func:`load_image` reads a file fully (so a truncated ``.nii.gz`` fails here, not later) and raises
  :class:`~sacrum_masks.errors.InputError` for anything that is not a finite 3D image.
* :func:`mask_like` builds a binary uint8 mask on the exact grid of a reference image
  (same shape; the reference's qform and sform copied, matrices and codes: docs/DESIGN.md, "Headers").
* :func:`save_nifti_atomic` / :func:`write_json_atomic` write a hidden temporary file in the
  destination folder and rename it into place: readers never see a half-written file.
* :func:`to_rpi` / :func:`from_rpi` reorient to SCT's "RPI" (nibabel axis codes L, A, S) and back.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from . import RPI_AXCODES
from .errors import InputError

#: Smallest voxel volume (mm^3) accepted: below it the affine is taken as singular.
MIN_VOXEL_MM3 = 1e-9


def load_image(path: str | Path, *, check_finite: bool = True, squeeze_4d: bool = True):
    """Load a 3D NIfTI image with its data read into memory.

    Parameters
    ----------
    path : path-like
        A ``.nii`` or ``.nii.gz`` file.
    check_finite : bool
        Refuse images with NaN or infinite voxels.
    squeeze_4d : bool
        Accept a 4D image whose 4th dimension is 1 (returned as 3D).

    Returns
    -------
    (nibabel.Nifti1Image, numpy.ndarray)
        The image (header and affine) and its voxel array (scaled, as ``dataobj`` gives it).

    Raises
    ------
    InputError
        Missing, unreadable or truncated file, not 3D, non-finite voxels, or a singular affine.
    """
    path = Path(path)
    check_file(path)
    img = None
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError,
            nib.spatialimages.HeaderDataError) as exc:
        detail = " ".join(str(exc).split())  # one line: some nibabel messages hold newlines
        raise InputError(path, f"cannot read NIfTI ({type(exc).__name__}: {detail})") from None
    except MemoryError:
        shape = f"shape {img.shape}" if img is not None else "a size"
        raise InputError(path, f"cannot read NIfTI (header claims {shape}, more than the memory available: "
                               "damaged header?)") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image ({type(img).__name__})")
    if data.ndim == 4 and data.shape[3] == 1 and squeeze_4d:
        data = data[..., 0]
        img = nib.Nifti1Image(data, img.affine, img.header)
    if data.ndim != 3:
        raise InputError(path, f"not a 3D image (shape {tuple(data.shape)})")
    if min(data.shape) < 1:
        raise InputError(path, f"empty image (shape {tuple(data.shape)})")
    if check_finite and np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise InputError(path, f"{bad} voxels are NaN or infinite")
    lin = np.asarray(img.affine, float)[:3, :3]
    if not np.isfinite(img.affine).all() or abs(float(np.linalg.det(lin))) < MIN_VOXEL_MM3:
        raise InputError(path, "voxel-to-world affine is singular or not finite (zero voxel size or "
                               "degenerate qform/sform): fix the header")
    return img, data


def check_file(path: str | Path) -> Path:
    """Raise :class:`InputError` unless ``path`` is a readable regular file (or a link to one).

    The reason names what is wrong: no such file, a folder, a symbolic link loop or a broken link.
    """
    path = Path(path)
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(path, "symbolic link loop") from None
        if path.is_symlink():
            raise InputError(path, f"broken symbolic link (to {os.readlink(path)})") from None
        raise InputError(path, "no such file" if exc.errno == errno.ENOENT else f"cannot read ({exc.strerror})") from None
    if path.is_dir():
        raise InputError(path, "is a folder, not a NIfTI file")
    if not path.is_file():
        raise InputError(path, "not a regular file")
    return path


def mask_like(data: np.ndarray, reference, *, binary: bool = True) -> nib.Nifti1Image:
    """A uint8 mask (or label) on the exact grid of ``reference``.

    With ``binary`` (the default) the voxels are ``data != 0`` (0 or 1); without it the label values
    are kept, and must be integers in 0..255 (else ValueError). The new header copies the reference's
    qform and sform, matrices AND codes, whatever they are (a qform that differs from the sform, a code
    0): every reader then places the mask where it places the image, whichever of the two it trusts
    (nibabel: the sform when its code is set; ITK/SimpleITK, hence nnU-Net, ITK-SNAP and Slicer, may
    prefer the qform). A reference that is not NIfTI gets its affine as both, code 1 (scanner). Voxel
    sizes come from the reference, no scaling.

    >>> ref = nib.Nifti1Image(np.zeros((2, 3, 4), np.float32), np.diag([2., 2., 3., 1.]))
    >>> ref.set_qform(np.diag([2., 2., 3., 1.]), code=1)
    >>> ref.set_sform(np.array([[2., 0, 0, 5], [0, 2, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1]]), code=2)
    >>> m = mask_like(np.ones((2, 3, 4)), ref)
    >>> m.get_data_dtype(), m.shape, [int(m.header[k]) for k in ("qform_code", "sform_code")]
    (dtype('uint8'), (2, 3, 4), [1, 2])
    >>> bool((m.get_qform() == ref.get_qform()).all() and (m.get_sform() == ref.get_sform()).all())
    True
    """
    if tuple(data.shape) != tuple(reference.shape[:3]):
        raise ValueError(f"mask shape {data.shape} differs from reference shape {reference.shape}")
    affine = reference.affine
    data = np.asarray(data)
    if binary:
        voxels = (data != 0).astype(np.uint8)
    else:
        voxels = data.astype(np.uint8)
        if not np.array_equal(voxels, data):
            raise ValueError("label values are not integers in 0..255 (they do not fit uint8)")
    out = nib.Nifti1Image(voxels, affine)
    if isinstance(reference, nib.Nifti1Image):   # Nifti2Image is a subclass: same header fields
        ref = reference.header
        out.header.set_qform(ref.get_qform(), code=int(ref["qform_code"]))
        out.header.set_sform(ref.get_sform(), code=int(ref["sform_code"]))
        out.header.set_zooms(ref.get_zooms()[:3])
        out.update_header()
    else:
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
    out.header.set_xyzt_units("mm", "sec")
    out.set_data_dtype(np.uint8)
    return out


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a hidden temporary path beside ``path`` (same extension); renamed onto ``path`` on success.

    The temporary file is ``.<name>.<random>.tmp<ext>`` in the destination folder (so the rename is
    atomic and globs for ``sub-*`` never see it); it is removed when the block fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{ext}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(*paths: str | Path) -> None:
    """Remove the hidden temporary files (:func:`atomic_path`) a killed run left beside ``paths``.

    Call it only while holding the lock of the output folder (a running writer's file would go too).
    """
    for path in map(Path, paths):
        ext = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp{ext}"):
            tmp.unlink(missing_ok=True)


def save_nifti_atomic(img, path: str | Path) -> Path:
    """Save ``img`` to ``path`` through a hidden temporary file renamed into place."""
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a hidden temporary file renamed into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(obj, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON through a hidden temporary file renamed into place."""
    return write_text_atomic(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def same_grid(a, b, atol: float = 1e-3) -> bool:
    """True when two images share shape (first 3 axes) and affine within ``atol`` (mm)."""
    return tuple(a.shape[:3]) == tuple(b.shape[:3]) and np.allclose(a.affine, b.affine, atol=atol, rtol=0)


def voxel_volume_ml(img) -> float:
    """Volume of one voxel in mL (|det| of the affine's 3x3 part, mm^3 / 1000)."""
    return float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0


def to_rpi(img, data: np.ndarray | None = None):
    """Reorient an image to SCT "RPI" (nibabel axis codes L, A, S); voxels are permuted, not resampled.

    Returns a new :class:`nibabel.Nifti1Image`; the input is not modified.

    >>> img = nib.Nifti1Image(np.arange(8).reshape(2, 2, 2).astype(np.int16), np.diag([-1., -1., 1., 1.]))
    >>> nib.aff2axcodes(to_rpi(img).affine)
    ('L', 'A', 'S')
    """
    data = np.asanyarray(img.dataobj) if data is None else data
    start = io_orientation(img.affine)
    target = axcodes2ornt(RPI_AXCODES)
    transform = ornt_transform(start, target)
    new = nib.Nifti1Image(apply_orientation(data, transform), img.affine @ nib.orientations.inv_ornt_aff(transform, data.shape))
    new.set_qform(new.affine, code=1)
    new.set_sform(new.affine, code=1)
    return new


def from_rpi(data_rpi: np.ndarray, original) -> np.ndarray:
    """Bring an array on the RPI-reoriented grid of ``original`` back to ``original``'s voxel order.

    Inverse of :func:`to_rpi` for the voxel array: ``from_rpi(to_rpi(img).get_fdata(), img)``
    equals ``img.get_fdata()``.
    """
    target = io_orientation(original.affine)
    start = axcodes2ornt(RPI_AXCODES)
    out = apply_orientation(data_rpi, ornt_transform(start, target))
    if tuple(out.shape) != tuple(original.shape[:3]):
        raise ValueError(f"reoriented shape {out.shape} does not match {original.shape}")
    return out
