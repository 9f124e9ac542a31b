"""Stage 1: sacrum labels (CT or MRI) carried onto each MRI image's own grid.

Reproduces the original ``register_CT_to_MR.py`` step, which ran
``sct_register_multimodal -i <label> -d <image> -identity 1 -x nn``: an identity transform in world
(scanner) space, nearest-neighbour resampling onto the destination grid, the destination's header.

Three layers:

* :func:`resample_mask_nn` -- pure array function: a binary mask on one grid resampled onto another
  (identity in world space, nearest neighbour), working only inside the bounding box of the mask.
* :func:`register_label` -- image in, image out: keep the sacrum indices, resample, check volumes.
* :func:`register_dataset` -- the batch over a BIDS dataset (label lookup, one line per image, summary);
  paths, sidecars, ownership, up-to-date rule and write order are the derivatives writer's
  (:mod:`sacrum_masks.derivatives`, docs/DESIGN.md "Derivatives"): a manual correction in
  ``reg-labels`` (a file whose sidecar's last GeneratedBy entry is not ours) survives any input change
  and ``--force``; sidecars name their inputs by BIDS URI (``bids:raw:...``, ``bids:labels:...``), so a
  moved data root stays up to date. :data:`register_ct_command` is its click command.

Conventions
-----------
Affines are nibabel's voxel -> world (RAS+, mm) affines (``img.affine``, the sform when set).
A destination voxel ``i`` takes the value of the source voxel ``floor(c + 0.5)`` where
``c = inv(A_src) @ A_dst @ i`` is its continuous source index ("round half up", the rounding of ITK's
``NearestNeighborInterpolateImageFunction``; SimpleITK agrees except at exact .5 ties, where tiny
floating-point differences in ``c`` may round either way). Source voxels outside the source array
are background. A source voxel's centre is inside the destination field of view when its continuous
destination index lies in ``[-0.5, n - 0.5)`` on every axis.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
from scipy import ndimage

from . import derivatives
from .batch import Batch, folder_lock
from .bids import BidsName, find_images, sidecar_path, suffix_parts
from .config import read_json_object
from .derivatives import DerivativeFolder, Plan
from .errors import InputError, LockBusy
from .nifti import check_file, load_image, mask_like, same_grid, voxel_volume_ml

#: TotalSegmentator label order -> sacrum indices (v2 splits S1 off the sacrum: both are needed).
TOTALSEG_INDICES = {"v1": (92,), "v2": (25, 26)}
DEFAULT_INDICES = TOTALSEG_INDICES["v1"]
#: Volume change (relative) tolerated when the whole label lies inside the MRI's field of view.
VOLUME_TOLERANCE = 0.05  # above: a warning
VOLUME_ERROR = 0.25  # above: an error
SCT_COMMAND = "sct_register_multimodal"
PROGRAM = "sacrum-masks register-ct"


# --------------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------------

def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive voxel bounding box (lo, hi) of the non-zero voxels, or None when empty."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        if nz.size == 0:
            return None
        lo.append(nz[0])
        hi.append(nz[-1])
    return np.array(lo), np.array(hi)


def _axis_aligned(m: np.ndarray, shape) -> np.ndarray | None:
    """For a 3x3 matrix that is a scaled permutation, the source axis read by each destination axis.

    Off-axis terms smaller than 1e-9 voxel over the whole grid are ignored (they could only move a
    value that sits exactly on a rounding tie).
    """
    perm = np.argmax(np.abs(m), axis=0)  # perm[d] = source axis that destination axis d moves along
    if sorted(perm.tolist()) != [0, 1, 2]:
        return None
    off = np.abs(m).copy()
    off[perm, np.arange(3)] = 0.0
    if (off * np.asarray(shape, float)[None, :]).sum() > 1e-9:
        return None
    return perm


def resample_mask_nn(src_mask: np.ndarray, src_affine: np.ndarray, dst_shape, dst_affine: np.ndarray) -> np.ndarray:
    """Resample a binary mask onto another grid: identity in world space, nearest neighbour.

    Only the destination voxels inside the destination-space bounding box of the mask's world
    bounding box are computed, so the cost scales with the size of the mask, not of the grid.
    Grids that differ by flips, axis permutations, scalings and shifts take a separable path (one
    index vector per axis); oblique ones go through :func:`scipy.ndimage.affine_transform` (order 0,
    which also reads ``floor(c + 0.5)``) on the cropped mask.

    Parameters
    ----------
    src_mask : ndarray, 3D
        The mask; non-zero is foreground. Not modified.
    src_affine, dst_affine : ndarray, 4x4
        Voxel -> world affines of the source and destination grids (any orientation, oblique allowed).
    dst_shape : tuple of 3 ints
        Destination grid shape.

    Returns
    -------
    ndarray of uint8, ``dst_shape``
        1 where the nearest source voxel (``floor(c + 0.5)``, see the module docstring) is foreground.

    Examples
    --------
    A flip of the first axis (destination x runs the other way, same world positions):

    >>> src = np.zeros((4, 1, 1), np.uint8); src[0] = 1
    >>> flip = np.array([[-1., 0, 0, 3], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    >>> resample_mask_nn(src, np.eye(4), (4, 1, 1), flip)[:, 0, 0]
    array([0, 0, 0, 1], dtype=uint8)

    A destination shifted by half a voxel: its voxel 1 (world x = 0.5) lies exactly between source
    voxels 0 and 1 and reads voxel 1 (half rounds up):

    >>> src = np.zeros((4, 1, 1), np.uint8); src[1] = 1
    >>> shift = np.eye(4); shift[0, 3] = -0.5
    >>> resample_mask_nn(src, np.eye(4), (4, 1, 1), shift)[:, 0, 0]
    array([0, 1, 0, 0], dtype=uint8)
    """
    dst_shape = tuple(int(n) for n in dst_shape)
    out = np.zeros(dst_shape, np.uint8)
    src_mask = np.asarray(src_mask)
    box = _bbox(src_mask)
    if box is None:
        return out
    lo, hi = box
    crop = src_mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] != 0
    # dst voxel index -> src continuous index, relative to the crop
    m = np.linalg.inv(np.asarray(src_affine, float)) @ np.asarray(dst_affine, float)
    lin, off = m[:3, :3], m[:3, 3] - lo

    # Destination bounding box: the source box (voxel edges, +-0.5) mapped into destination index space.
    corners = np.array([[a, b, c] for a in (lo[0] - 0.5, hi[0] + 0.5)
                        for b in (lo[1] - 0.5, hi[1] + 0.5) for c in (lo[2] - 0.5, hi[2] + 0.5)])
    to_dst = np.linalg.inv(np.asarray(dst_affine, float)) @ np.asarray(src_affine, float)
    cd = corners @ to_dst[:3, :3].T + to_dst[:3, 3]
    dlo = np.maximum(np.floor(cd.min(axis=0) - 1e-6).astype(int), 0)
    dhi = np.minimum(np.ceil(cd.max(axis=0) + 1e-6).astype(int), np.array(dst_shape) - 1)
    if np.any(dhi < dlo):
        return out
    ranges = [np.arange(dlo[d], dhi[d] + 1) for d in range(3)]

    perm = _axis_aligned(lin, dst_shape)
    if perm is not None:
        # Separable case (no rotation between the grids): one index vector per axis.
        idx = []
        for d in range(3):
            s = perm[d]
            i = np.floor(off[s] + lin[s, d] * ranges[d] + 0.5).astype(np.intp)
            idx.append(i)
        ok = [(i >= 0) & (i < crop.shape[perm[d]]) for d, i in enumerate(idx)]
        sub = np.zeros(tuple(len(r) for r in ranges), bool)
        sel = [np.flatnonzero(o) for o in ok]
        if all(s.size for s in sel):
            # crop axes reordered so that axis d of `view` is source axis perm[d]
            view = np.transpose(crop, perm)
            sub[np.ix_(*sel)] = view[np.ix_(idx[0][sel[0]], idx[1][sel[1]], idx[2][sel[2]])]
        out[dlo[0]:dhi[0] + 1, dlo[1]:dhi[1] + 1, dlo[2]:dhi[2] + 1] = sub
        return out

    # General case (oblique): scipy's affine_transform walks the destination box in C and reads the
    # source at floor(c + 0.5) (order 0); the crop gets a one-voxel zero border so that scipy's
    # edge handling never decides a value: outside the padded crop is background, as is the border.
    padded = np.pad(crop.view(np.uint8), 1)
    box_shape = tuple(int(n) for n in dhi - dlo + 1)
    sub = ndimage.affine_transform(padded, lin, offset=lin @ dlo + off + 1.0, output_shape=box_shape,
                                   order=0, mode="constant", cval=0, prefilter=False)
    out[dlo[0]:dhi[0] + 1, dlo[1]:dhi[1] + 1, dlo[2]:dhi[2] + 1] = sub
    return out


def fraction_outside(src_mask: np.ndarray, src_affine: np.ndarray, dst_shape, dst_affine: np.ndarray) -> float:
    """Fraction of the mask's voxels whose centres fall outside the destination field of view.

    A centre is inside when its continuous destination index is in ``[-0.5, n - 0.5)`` on every axis.

    >>> src = np.ones((4, 1, 1), np.uint8)
    >>> fraction_outside(src, np.eye(4), (2, 1, 1), np.eye(4))
    0.5
    """
    ijk = np.argwhere(np.asarray(src_mask) != 0)
    if len(ijk) == 0:
        return 0.0
    m = np.linalg.inv(np.asarray(dst_affine, float)) @ np.asarray(src_affine, float)
    c = ijk @ m[:3, :3].T + m[:3, 3]
    inside = np.all((c >= -0.5) & (c < np.asarray(dst_shape) - 0.5), axis=1)
    return float(1.0 - inside.mean())


def sacrum_mask(label: np.ndarray, indices, name="label") -> np.ndarray:
    """Boolean mask of the voxels whose value is one of ``indices``.

    Raises
    ------
    InputError
        None of the indices is present; the message names the values the label does have.
    """
    mask = np.isin(label, np.asarray(indices))
    if not mask.any():
        values = np.unique(label)
        values = values[values != 0]
        shown = ", ".join(f"{v:g}" for v in values[:30]) + (", ..." if len(values) > 30 else "")
        raise InputError(name, f"no voxel with sacrum index {'/'.join(str(i) for i in indices)} "
                               f"(values present: {shown or 'none, the label is empty'}); "
                               f"set --sacrum-idx or --totalseg")
    return mask


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------

@dataclass
class Registered:
    """Result of :func:`register_label`: the mask on the image grid and its numbers."""

    mask: object  # nibabel.Nifti1Image, uint8 {0, 1}
    volume_before_ml: float
    volume_after_ml: float
    fraction_outside: float
    warnings: list[str] = field(default_factory=list)
    same_grid: bool = False


def check_volumes(before_ml: float, after_ml: float, frac_out: float, name: str = "label") -> list[str]:
    """The checks of stage 1: returns warnings, raises :class:`InputError` on failure.

    * nothing of the label on the image grid: error (label entirely outside the field of view);
    * part of the label outside the field of view: a warning with the fraction;
    * otherwise the volume should be preserved within :data:`VOLUME_TOLERANCE` (5%): a larger change is a
      warning (nearest neighbour onto thick slices legitimately changes a volume by several percent:
      -7.4% for a 1.5 mm CT label onto 4 mm sagittal slices of the demo data), and a change beyond
      :data:`VOLUME_ERROR` (25%) is an error: the grids or the label are wrong, not merely coarse.

    >>> check_volumes(100.0, 97.0, 0.0)
    []
    >>> check_volumes(100.0, 92.6, 0.0)
    ['volume changed by -7.4% (100.0 mL -> 92.6 mL; more than 5%: coarse image grid?)']
    """
    if after_ml == 0.0:
        raise InputError(name, f"the sacrum ({before_ml:.1f} mL) lies entirely outside the image's field of view "
                               f"(no overlap in world space: check both headers)")
    if frac_out > 0.0:
        return [f"{100 * frac_out:.1f}% of the sacrum lies outside the image's field of view "
                f"({before_ml:.1f} mL -> {after_ml:.1f} mL)"]
    change = after_ml / before_ml - 1.0
    if abs(change) > VOLUME_ERROR:
        raise InputError(name, f"volume not preserved: {before_ml:.1f} mL -> {after_ml:.1f} mL "
                               f"({100 * change:+.1f}%, more than {100 * VOLUME_ERROR:.0f}%)")
    if abs(change) > VOLUME_TOLERANCE:
        return [f"volume changed by {100 * change:+.1f}% ({before_ml:.1f} mL -> {after_ml:.1f} mL; "
                f"more than {100 * VOLUME_TOLERANCE:.0f}%: coarse image grid?)"]
    return []


def register_label(label_img, label_data: np.ndarray, image_img, indices, *, name: str = "label",
                   resampled: np.ndarray | None = None) -> Registered:
    """Keep the sacrum of a label and put it on an image's grid (identity in world space, nearest neighbour).

    Parameters
    ----------
    label_img, label_data
        The label (any grid) and its voxels.
    image_img
        The destination image; only its grid (shape, affine) is used.
    indices : sequence of int
        Label values that make up the sacrum.
    name : str
        Name used in error messages.
    resampled : ndarray, optional
        The label already resampled onto the image grid by another backend (SCT); the sacrum is
        selected from it instead of resampling here.

    Returns
    -------
    Registered
        ``mask`` is a uint8 {0, 1} image on the exact grid of ``image_img`` (its shape and affine as
        both qform and sform). When the label already is on the image's grid (same shape, affines equal
        within 1e-3 mm) its voxels are copied.
    """
    src = sacrum_mask(label_data, indices, name)
    before = int(src.sum()) * voxel_volume_ml(label_img)
    shape = tuple(image_img.shape[:3])
    on_grid = same_grid(label_img, image_img)
    if on_grid:
        dst = src.astype(np.uint8)
        frac = 0.0
    else:
        frac = fraction_outside(src, label_img.affine, shape, image_img.affine)
        if resampled is None:
            dst = resample_mask_nn(src, label_img.affine, shape, image_img.affine)
        else:
            if tuple(resampled.shape[:3]) != shape:
                raise InputError(name, f"resampled label has shape {resampled.shape}, image has {shape}")
            dst = np.isin(resampled, np.asarray(indices)).astype(np.uint8)
    after = int(dst.sum()) * voxel_volume_ml(image_img)
    warnings = check_volumes(before, after, frac, name)
    return Registered(mask_like(dst, image_img), before, after, frac, warnings, on_grid)


def sct_executable() -> str:
    """Path of ``sct_register_multimodal``; InputError (about ``--backend sct``) when it is not on PATH."""
    exe = shutil.which(SCT_COMMAND)
    if exe is None:
        raise InputError("--backend sct", f"{SCT_COMMAND} not found on PATH (install Spinal Cord Toolbox, "
                                          f"or use --backend native, which computes the same)")
    return exe


def run_sct(label_path: Path, image_path: Path, workdir: Path) -> np.ndarray:
    """Resample a label onto an image with SCT, as the original did; returns the resampled voxels.

    Runs ``sct_register_multimodal -i <label> -d <image> -identity 1 -x nn -o <out> -ofolder <workdir>``
    in ``workdir`` (its warping fields stay there).
    """
    exe = sct_executable()
    out = workdir / "label_reg.nii.gz"
    cmd = [exe, "-i", str(label_path), "-d", str(image_path), "-identity", "1", "-x", "nn",
           "-o", str(out), "-ofolder", str(workdir)]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InputError(label_path, f"{SCT_COMMAND} failed (exit {proc.returncode}): {tail[0]}")
    return load_image(out)[1]


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------

def _existing(path_no_ext: Path) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        p = path_no_ext.with_name(path_no_ext.name + ext)
        if p.is_file():
            return p
    return None


def find_label(bids_dir: Path, image: Path, path_label: Path, seg_suffix: str = "_seg") -> tuple[Path | None, list[Path]]:
    """The source label of an MRI image, and the candidates looked at (in order).

    1. ``<path_label>/<image folder>/<image stem><seg_suffix>.nii[.gz]`` (an MRI mask);
    2. the subject's CT label: the image name with its contrast replaced by ``CT``
       (``sub-01_acq-x_T2w`` -> ``sub-01_acq-x_CT<seg_suffix>``).
    """
    rel = image.parent.relative_to(bids_dir)
    parts = suffix_parts(seg_suffix, "--seg-suffix")
    name = BidsName.parse(image)
    candidates = [path_label / rel / name.add_suffix(*parts).stem,
                  path_label / rel / name.with_contrast("CT").add_suffix(*parts).stem]
    for c in candidates:
        found = _existing(c)
        if found is not None:
            return found, candidates
    return None, [c.with_name(c.name + ".nii.gz") for c in candidates]


def resolve_indices(label: Path, option: tuple[int, ...] | None) -> tuple[tuple[int, ...], str]:
    """Sacrum indices and where they came from: the option, else the label's sidecar, else 92.

    A label sidecar that is there but unreadable, not JSON or not a JSON object is an InputError
    (silently falling back to 92 could pick the wrong structure).
    """
    if option:
        return tuple(int(i) for i in option), "option"
    side = sidecar_path(label)
    if side.is_file():
        meta = read_json_object(side)
        if "SacrumIndices" in meta:
            vals = meta["SacrumIndices"]
            if not isinstance(vals, list) or not vals or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
                raise InputError(side, f"SacrumIndices must be a non-empty list of integers, not {vals!r}")
            return tuple(vals), "sidecar"
    return DEFAULT_INDICES, "default"


def reg_labels_folder(bids_dir: Path, path_label: Path, path_out: Path | None = None,
                      output_dir: Path | None = None) -> DerivativeFolder:
    """The ``reg-labels`` derivative folder (``path_out`` replaces its root when given)."""
    folder = derivatives.prepare(
        bids_dir, "reg-labels", program=PROGRAM, output_root=output_dir, links={"labels": path_label},
        title="Sacrum masks on MRI grids",
        description="register-ct: sacrum labels (CT or MRI) carried onto each MRI image's grid (identity in "
                    "world space, nearest neighbour)")
    return dataclasses.replace(folder, root=Path(path_out)) if path_out is not None else folder


def register_image(folder: DerivativeFolder, image: Path, label: Path, out: Path, plan: Plan, indices_from: str,
                   backend: str = "native") -> Registered:
    """Load, register, and write one image's mask and sidecar through the writer. Returns the result.

    ``plan`` (:meth:`DerivativeFolder.plan`) carries the inputs' checksums and the settings (sacrum
    indices, backend) that the sidecar records.
    """
    indices = tuple(plan.settings["SacrumIndices"])
    image_img, _ = load_image(image)
    label_img, label_data = load_image(label)
    resampled = None
    if backend == "sct" and not same_grid(label_img, image_img):
        sacrum_mask(label_data, indices, str(label))  # fail before running SCT
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".sct-", dir=out.parent) as tmp:
            resampled = run_sct(label, image, Path(tmp))
    res = register_label(label_img, label_data, image_img, indices, name=str(label), resampled=resampled)
    fields = {
        "SacrumIndices": list(indices),
        "IndicesFrom": indices_from,
        "Backend": backend,
        "SameGrid": res.same_grid,
        "VolumeBeforeML": round(res.volume_before_ml, 4),
        "VolumeAfterML": round(res.volume_after_ml, 4),
        "FractionOutsideFOV": round(res.fraction_outside, 6),
        "Warnings": res.warnings,
    }
    folder.write({out: res.mask}, fields, plan)
    return res


def register_dataset(bids_dir, *, path_label=None, path_out=None, seg_suffix: str = "_seg",
                     indices: tuple[int, ...] | None = None, backend: str = "native", force: bool = False,
                     batch: Batch | None = None, output_dir=None) -> Batch:
    """Stage 1 over one BIDS dataset; one line per MRI image, a summary, a non-zero exit on any failure.

    Parameters
    ----------
    bids_dir : path-like
        The BIDS dataset (read only).
    path_label, path_out : path-like, optional
        Labels folder (default ``derivatives/labels``) and output folder (``derivatives/reg-labels``).
    seg_suffix : str
        Suffix of the label files (``_seg``).
    indices : tuple of int, optional
        Sacrum indices; when None, each label's sidecar ``SacrumIndices``, else 92.
    backend : {"native", "sct"}
    force : bool
        Redo outputs of ours that are up to date (a file that is not ours is kept, even then).
    output_dir : path-like, optional
        Write ``<output_dir>/<dataset name>/derivatives/reg-labels`` instead (read-only raw datasets).
    """
    bids_dir = Path(bids_dir).resolve()
    path_label = Path(path_label).resolve() if path_label else bids_dir / "derivatives" / "labels"
    folder = reg_labels_folder(bids_dir, path_label, Path(path_out).resolve() if path_out else None, output_dir)
    path_out = folder.root
    if path_out == path_label:
        raise InputError("--path-out", f"{path_out} is the labels folder; outputs would overwrite inputs")
    if path_out == bids_dir:
        raise InputError("--path-out", f"{path_out} is the raw dataset; use a derivatives folder")
    suffix_parts(seg_suffix, "--seg-suffix")
    if backend == "sct":
        sct_executable()  # before any work: missing SCT is one line
    images = find_images(bids_dir)
    batch = batch or Batch("register-ct")
    if not images:
        raise InputError(bids_dir, "no MRI image in sub-*/[ses-*/]anat/")
    try:
        folder.ensure()
        with folder_lock(path_out):
            for image in images:
                item = f"{bids_dir.name}/{image.relative_to(bids_dir)}"
                try:
                    check_file(image)  # a folder or a link loop named like an image: say so, go on
                except InputError as exc:
                    batch.report(item, "failed", str(exc))
                    continue
                label, looked = find_label(bids_dir, image, path_label, seg_suffix)
                if label is None:
                    batch.report(item, "failed", "no label (looked for " + ", ".join(str(p) for p in looked) + ")")
                    continue
                out = folder.output_path(image, "seg")
                if out.resolve() in (label.resolve(), image.resolve()):
                    batch.report(item, "failed", f"output {out} would overwrite its input")
                    continue
                try:
                    idx, src = resolve_indices(label, indices)
                    inputs = {folder.uri(image): image, folder.uri(label): label}
                    plan = folder.plan(image, [out], inputs, {"SacrumIndices": list(idx), "Backend": backend}, force)
                    if plan.status == "kept":
                        batch.report(item, "kept", plan.reason)
                        continue
                    if plan.status == "up to date":
                        batch.report(item, "up to date")
                        continue
                    res = register_image(folder, image, label, out, plan, src, backend)
                except InputError as exc:
                    batch.report(item, "failed", str(exc))
                    continue
                detail = f"{label.name} [{','.join(map(str, idx))}] {res.volume_before_ml:.1f} -> {res.volume_after_ml:.1f} mL"
                if res.warnings:
                    detail += "; warning: " + "; ".join(res.warnings)
                batch.report(item, "written", detail)
    except LockBusy as exc:
        raise LockBusy(f"{path_out}: another register-ct run is writing here ({exc}); try again when it ends") from None
    return batch


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------

@click.command("register-ct")
@click.argument("bids_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--path-label", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Labels folder (default BIDS_DIR/derivatives/labels; one dataset only).")
@click.option("--path-out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default BIDS_DIR/derivatives/reg-labels; one dataset only).")
@click.option("--seg-suffix", default="_seg", show_default=True, help="Suffix of the label files.")
@click.option("--sacrum-idx", "sacrum_idx", type=int, multiple=True, envvar="SACRUM_IDX", show_envvar=True,
              help="Label value of the sacrum; repeatable (the variable: values separated by spaces). "
                   "Default: the label sidecar's SacrumIndices, else 92.")
@click.option("--totalseg", type=click.Choice(["v1", "v2"]), default=None, envvar="TOTALSEG", show_envvar=True,
              help="TotalSegmentator label order: v1 = 92, v2 = 25 and 26 (sacrum and S1).")
@click.option("--backend", type=click.Choice(["native", "sct"]), default="native", show_default=True,
              envvar="BACKEND", show_envvar=True,
              help="native: in-process resampling; sct: sct_register_multimodal -identity 1 -x nn (needs SCT on PATH).")
@click.option("--force", is_flag=True, envvar="FORCE", show_envvar=True,
              help="Redo outputs of ours that are up to date (manual corrections are kept).")
@click.option("--output-dir", "output_dir", envvar="SACRUM_OUTPUT_DIR", show_envvar=True, default=None,
              type=click.Path(path_type=Path),
              help="Write DIR/<dataset>/derivatives/reg-labels instead of inside BIDS_DIR (read-only datasets).")
def register_ct_command(bids_dirs, path_label, path_out, seg_suffix, sacrum_idx, totalseg, backend, force, output_dir):
    """Sacrum labels (CT or MRI) onto every MRI image's grid: BIDS_DIR/derivatives/reg-labels/.../<image>_seg.nii.gz.

    For each MRI image of sub-*/[ses-*/]anat of each BIDS_DIR, the label is
    derivatives/labels/<path>/<image>_seg.nii.gz if present, else the subject's CT label (<image with CT
    as contrast>_seg.nii.gz). The sacrum is carried with an identity transform in world space and
    nearest-neighbour resampling (as sct_register_multimodal -identity 1 -x nn). A dataset that fails
    does not stop the others; the exit status is then 1.
    """
    if not bids_dirs:
        raise click.UsageError('no dataset given; run make register DATASET="path ..."')
    if sacrum_idx and totalseg:
        raise click.BadParameter("give either --sacrum-idx or --totalseg, not both", param_hint="--totalseg")
    if len(bids_dirs) > 1 and (path_label or path_out):
        raise click.BadParameter("one dataset only with --path-label / --path-out", param_hint="--path-out")
    indices = tuple(sacrum_idx) or (TOTALSEG_INDICES[totalseg] if totalseg else None)
    failed = 0
    for bids_dir in bids_dirs:
        if not Path(bids_dir).is_dir():
            click.echo(f"register-ct: {bids_dir}: not a folder", err=True)
            failed += 1
            continue
        try:
            batch = register_dataset(bids_dir, path_label=path_label, path_out=path_out, seg_suffix=seg_suffix,
                                     indices=indices, backend=backend, force=force, output_dir=output_dir)
        except (InputError, LockBusy) as exc:
            if len(bids_dirs) == 1:
                raise   # one line and its exit status from the CLI (2, or busy)
            click.echo(f"register-ct: {exc}", err=True)
            failed += 1
            continue
        click.echo(batch.summary(["written", "up to date", "failed"]))
        failed += bool(batch.exit_code)
    if failed:
        if len(bids_dirs) > 1:
            click.echo(f"register-ct: {failed} of {len(bids_dirs)} datasets failed", err=True)
        raise SystemExit(1)
