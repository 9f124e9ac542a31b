"""QC report for sacrum masks: one PNG per mask and a self-contained ``index.html`` (+ ``qc.json``).

For a derivatives folder ``<dataset>/derivatives/labels``, every mask
``sub-*/[ses-*/]anat/<stem>_label-sacrum_seg.nii.gz`` is drawn over its image
``<dataset>/sub-*/[ses-*/]anat/<stem>.nii.gz``: a sagittal and a coronal slice through the mask's
centroid (the image centre for an empty mask), the mask outline in red, subject and volume in the title.

Conventions
-----------
* Image and mask are reoriented to SCT "RPI" (nibabel axis codes L, A, S) before slicing, so the views
  are the same whatever the file's voxel order. Sagittal: anterior on the left, superior up. Coronal:
  radiological (patient's right on the viewer's left), superior up. Voxel sizes set the aspect ratio.
* Volume = number of non-zero mask voxels x voxel volume (from the mask itself; no sidecar needed).
* "Touches border": a mask voxel on the first or last slice along any axis.
* Volume outliers: outside ``[Q1 - 1.5 IQR, Q3 + 1.5 IQR]`` of the non-empty masks of this report
  (evaluated from 4 non-empty masks on; fewer gives no range).
* The default output folder is ``<dataset>/derivatives/qc-sacrum/`` (a sibling of ``labels`` so the
  labels folder stays BIDS-clean); it gets its own ``dataset_description.json``.
* Figures have a fixed size and dpi (:data:`FIG_SIZE_IN`, :data:`FIG_DPI`): every PNG is
  :data:`PNG_SIZE` pixels (width, height).
"""

from __future__ import annotations

import datetime as _dt
import html
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import click
import nibabel as nib
import numpy as np

from . import __version__
from .batch import Batch, folder_lock
from .bids import (NIFTI_EXTENSIONS, BidsName, ensure_dataset_description, iter_anat_files, sidecar_path,
                   split_extension, suffix_parts)
from .config import read_json_object_or_none
from .errors import InputError
from .nifti import atomic_path, load_image, same_grid, to_rpi, voxel_volume_ml, write_json_atomic, write_text_atomic

DEFAULT_SUFFIX = "_label-sacrum_seg"
QC_PIPELINE = "qc-sacrum"
FIG_SIZE_IN = (8.0, 4.5)
FIG_DPI = 100
#: (width, height) of every PNG in pixels
PNG_SIZE = (int(FIG_SIZE_IN[0] * FIG_DPI), int(FIG_SIZE_IN[1] * FIG_DPI))
MIN_COHORT = 4

FLAG_TEXT = {
    "empty": "empty mask",
    "volume_outlier": "volume outside cohort 1.5 IQR range",
    "touches_border": "touches image border",
    "no_sidecar": "no sidecar",
    "bad_sidecar": "sidecar unreadable",
}


# --------------------------------------------------------------------------- pure functions


def mask_measures(mask: np.ndarray, voxel_ml: float) -> dict:
    """Voxel count, volume, centroid and border contact of a mask (non-zero voxels).

    Parameters
    ----------
    mask : ndarray, 3D
        Any dtype; non-zero is inside.
    voxel_ml : float
        Volume of one voxel in mL.

    Returns
    -------
    dict
        ``voxels`` (int), ``volume_ml`` (float), ``centroid`` (voxel indices, float, or None when empty),
        ``touches_border`` (bool).

    >>> m = np.zeros((4, 5, 6), np.uint8); m[1:3, 1:3, 0] = 1
    >>> r = mask_measures(m, 0.001)
    >>> r["voxels"], round(r["volume_ml"], 6), r["centroid"], r["touches_border"]
    (4, 0.004, [1.5, 1.5, 0.0], True)
    """
    inside = np.asarray(mask) != 0
    n = int(np.count_nonzero(inside))
    touches = False
    centroid = None
    if n:
        idx = np.nonzero(inside)
        centroid = [float(np.mean(i)) for i in idx]
        touches = any(int(i.min()) == 0 or int(i.max()) == s - 1 for i, s in zip(idx, inside.shape))
    return {"voxels": n, "volume_ml": n * float(voxel_ml), "centroid": centroid, "touches_border": touches}


def volume_range(volumes, k: float = 1.5, min_n: int = MIN_COHORT):
    """``(Q1 - k IQR, Q3 + k IQR)`` of the volumes, or None for fewer than ``min_n`` values.

    >>> volume_range([10, 11, 12, 13])
    (8.5, 14.5)
    >>> volume_range([10, 11]) is None
    True
    """
    v = np.asarray(list(volumes), dtype=float)
    if v.size < min_n:
        return None
    q1, q3 = np.percentile(v, [25, 75])
    iqr = q3 - q1
    return (float(q1 - k * iqr), float(q3 + k * iqr))


def qc_slices(image: np.ndarray, mask: np.ndarray, center) -> dict:
    """Sagittal and coronal planes through ``center`` of RPI-ordered (L, A, S) arrays.

    Returns ``{"sagittal": (img2d, mask2d), "coronal": (img2d, mask2d)}``; each plane is indexed
    ``[horizontal, vertical]``: sagittal ``[A, S]`` (axis 0 fixed), coronal ``[L, S]`` (axis 1 fixed).

    >>> a = np.arange(24).reshape(2, 3, 4); s = qc_slices(a, a > 10, (1, 2, 0))
    >>> s["sagittal"][0].shape, s["coronal"][0].shape, int(s["coronal"][0][0, 0])
    ((3, 4), (2, 4), 8)
    """
    i, j = (int(np.clip(round(c), 0, n - 1)) for c, n in zip(center[:2], image.shape[:2]))
    return {"sagittal": (image[i, :, :], mask[i, :, :]), "coronal": (image[:, j, :], mask[:, j, :])}


def _display_range(planes) -> tuple[float, float]:
    vals = np.concatenate([np.asarray(p, dtype=float).ravel() for p in planes])
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [1, 99])
    if not hi > lo:
        lo, hi = float(vals.min()), float(vals.max()) + 1e-6
    return float(lo), float(hi)


def render_qc_png(image_rpi, image_data: np.ndarray, mask_data: np.ndarray, center, title: str, out: Path) -> Path:
    """Draw the two QC slices (mask outline over image) into a PNG of :data:`PNG_SIZE` pixels.

    ``image_rpi`` is the RPI-reoriented image (its affine gives the voxel sizes); ``image_data`` and
    ``mask_data`` are its RPI-ordered arrays. Written atomically (temporary file + rename).
    """
    # Agg canvas on a bare Figure: no pyplot, no global backend state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dx, dy, dz = (float(v) for v in nib.affines.voxel_sizes(image_rpi.affine))
    planes = qc_slices(image_data, mask_data, center)
    lo, hi = _display_range([planes["sagittal"][0], planes["coronal"][0]])
    fig = Figure(figsize=FIG_SIZE_IN, dpi=FIG_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    views = (("sagittal", dy, ("A", "P")), ("coronal", dx, ("R", "L")))
    for ax, (view, dh, (left, right)) in zip(axes, views):
        img2d, m2d = planes[view]
        nh, nv = img2d.shape
        extent = (0, nh * dh, 0, nv * dz)
        ax.imshow(np.asarray(img2d, dtype=float).T, cmap="gray", origin="lower", extent=extent,
                  vmin=lo, vmax=hi, interpolation="nearest", aspect="equal")
        m2d = np.asarray(m2d) != 0
        if m2d.any() and nh > 1 and nv > 1:
            xs = (np.arange(nh) + 0.5) * dh
            ys = (np.arange(nv) + 0.5) * dz
            ax.contour(xs, ys, m2d.T.astype(float), levels=[0.5], colors="red", linewidths=1.0)
        if view == "sagittal":
            ax.invert_xaxis()  # anterior on the left
        ax.set_title(view, fontsize=9, parse_math=False)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.01, 0.5, left, transform=ax.transAxes, color="yellow", fontsize=8, va="center")
        ax.text(0.99, 0.5, right, transform=ax.transAxes, color="yellow", fontsize=8, va="center", ha="right")
    fig.suptitle(title, fontsize=9, parse_math=False)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.86, wspace=0.05)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=FIG_DPI, format="png")
    return out


# --------------------------------------------------------------------------- one mask


@dataclass
class QcEntry:
    """What the report says about one mask (paths relative to the dataset root / the QC folder)."""

    mask: str
    image: str
    png: str | None
    subject: str
    session: str | None
    volume_ml: float | None = None
    voxels: int | None = None
    components_removed: int | None = None
    sidecar_volume_ml: float | None = None
    flags: list[str] = field(default_factory=list)
    error: str | None = None
    status: str = "written"


def dataset_root_of(deriv_dir: Path) -> Path:
    """``<dataset>`` of ``<dataset>/derivatives/<pipeline>``; InputError for any other folder."""
    deriv_dir = Path(deriv_dir)
    if not deriv_dir.is_dir():
        raise InputError(deriv_dir, "not a folder")
    resolved = deriv_dir.resolve()
    if resolved.parent.name != "derivatives":
        raise InputError(deriv_dir, "expected a derivatives folder <dataset>/derivatives/<pipeline>")
    return resolved.parent.parent


def find_masks(deriv_dir: Path, suffix: str = DEFAULT_SUFFIX) -> list[Path]:
    """Masks ``sub-*/[ses-*/]anat/*<suffix>.nii[.gz]`` of a derivatives folder, sorted."""
    parts = suffix_parts(suffix)
    return [path for path, bn in iter_anat_files(deriv_dir)
            if len(bn.parts) > len(parts) and bn.parts[-len(parts):] == parts]


def image_for_mask(mask: Path, deriv_dir: Path, dataset: Path, suffix: str = DEFAULT_SUFFIX) -> Path:
    """The image a mask was made for: same relative folder in the dataset, name without the suffix."""
    stem = BidsName.parse(mask).drop_suffix(*suffix_parts(suffix)).stem
    folder = dataset / Path(mask).parent.resolve().relative_to(Path(deriv_dir).resolve())
    for ext in NIFTI_EXTENSIONS:
        if (folder / (stem + ext)).is_file():
            return folder / (stem + ext)
    return folder / (stem + ".nii.gz")


def read_sidecar(mask: Path) -> tuple[dict | None, str | None]:
    """(sidecar dict, problem flag) for ``<mask stem>.json``: flag ``no_sidecar`` or ``bad_sidecar``."""
    side = sidecar_path(mask)
    if not side.is_file():
        return None, "no_sidecar"
    data = read_json_object_or_none(side)
    return (data, None) if data is not None else (None, "bad_sidecar")


def qc_one(mask_path: Path, image_path: Path, png_path: Path, *, force: bool = False) -> tuple[dict, bool]:
    """Measure one mask and draw its PNG (unless the PNG is newer than mask and image and not ``force``).

    Returns (measures from :func:`mask_measures`, whether the PNG was drawn). Raises InputError for an
    unreadable mask or image, or a mask that is not on its image's grid.
    """
    mask_img, mask_data = load_image(mask_path)
    image_img, image_data = load_image(image_path)
    if not same_grid(mask_img, image_img):
        raise InputError(mask_path, f"not on the grid of its image {image_path.name} "
                                    f"(shape {mask_img.shape} vs {image_img.shape} or affine differs)")
    measures = mask_measures(mask_data, voxel_volume_ml(mask_img))
    up_to_date = (png_path.is_file() and not force
                  and png_path.stat().st_mtime >= max(mask_path.stat().st_mtime, image_path.stat().st_mtime))
    if up_to_date:
        return measures, False
    img_rpi = to_rpi(image_img, image_data)
    mask_rpi = np.asanyarray(to_rpi(mask_img, mask_data).dataobj)
    data_rpi = np.asanyarray(img_rpi.dataobj)
    m = mask_measures(mask_rpi, 1.0)
    center = m["centroid"] if m["centroid"] is not None else [(s - 1) / 2 for s in data_rpi.shape]
    bn = BidsName.parse(mask_path)
    who = f"sub-{bn.sub}" + (f" ses-{bn.ses}" if bn.ses else "")
    vol = f"{measures['volume_ml']:.2f} mL" if measures["voxels"] else "EMPTY mask"
    title = f"{who} | {image_path.name} | {vol}"
    render_qc_png(img_rpi, data_rpi, mask_rpi, center, title, png_path)
    return measures, True


# --------------------------------------------------------------------------- report


def _rel_url(path: str) -> str:
    return "/".join(quote(p) for p in path.split("/"))


def build_index_html(entries: list[QcEntry], meta: dict) -> str:
    """The report page: one row per mask (picture, volume, components removed, flags). All text escaped,
    links relative (URL-quoted), no network resources."""
    e = html.escape
    counts = meta.get("counts", {})
    rows = []
    for i, en in enumerate(entries, 1):
        flags = "".join(f'<span class="flag">{e(FLAG_TEXT.get(f, f))}</span> ' for f in en.flags)
        if en.error:
            flags += f'<span class="flag err">{e(en.error)}</span>'
        pic = (f'<a href="{e(_rel_url(en.png))}"><img src="{e(_rel_url(en.png))}" width="{PNG_SIZE[0] // 2}" '
               f'height="{PNG_SIZE[1] // 2}" alt="{e(en.mask)}"></a>' if en.png else "no picture")
        vol = "" if en.volume_ml is None else f"{en.volume_ml:.2f}"
        comp = "n/a" if en.components_removed is None else str(en.components_removed)
        cls = ' class="flagged"' if (en.flags or en.error) else ""
        rows.append(
            f'<tr{cls}><td>{i}</td><td>{pic}</td><td class="name">{e(en.mask)}<br><small>image: {e(en.image)}</small>'
            f"</td><td>{e('sub-' + en.subject)}{e(' ses-' + en.session) if en.session else ''}</td>"
            f'<td class="num">{vol}</td><td class="num">{e(comp)}</td><td>{flags or "ok"}</td></tr>')
    rng = meta.get("volume_range_ml")
    rng_text = (f"{rng[0]:.2f} to {rng[1]:.2f} mL" if rng else
                f"not evaluated (fewer than {MIN_COHORT} non-empty masks)")
    gen = meta["GeneratedBy"]
    summary = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Sacrum mask QC: {e(meta['dataset_name'])}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px; vertical-align: top; }}
td.num {{ text-align: right; font-family: monospace; }}
td.name {{ font-family: monospace; word-break: break-all; max-width: 28em; }}
tr.flagged {{ background: #fff3f0; }}
.flag {{ display: inline-block; background: #d9534f; color: white; border-radius: 3px; padding: 1px 4px; margin: 1px; }}
.flag.err {{ background: #6f42c1; }}
</style></head><body>
<h1>Sacrum mask QC: {e(meta['dataset_name'])}</h1>
<p>{len(entries)} masks in <code>{e(meta['derivatives'])}</code>; {e(summary)}.<br>
Cohort volume range (1.5 IQR): {e(rng_text)}.<br>
Generated by {e(gen['Name'])} {e(gen['Version'])} on {e(gen['Date'])}: <code>{e(gen['CommandLine'])}</code></p>
<table>
<tr><th>#</th><th>sagittal | coronal</th><th>mask</th><th>subject</th><th>volume (mL)</th>
<th>components removed</th><th>flags</th></tr>
{chr(10).join(rows)}
</table>
</body></html>
"""


def default_out_dir(deriv_dir: Path) -> Path:
    """``<dataset>/derivatives/qc-sacrum``."""
    return dataset_root_of(deriv_dir) / "derivatives" / QC_PIPELINE


def run_qc(deriv_dir, out_dir=None, *, suffix: str = DEFAULT_SUFFIX, force: bool = False,
           command_line: str | None = None, batch: Batch | None = None) -> tuple[list[QcEntry], Path]:
    """Write the QC report of a derivatives folder: PNGs, ``index.html``, ``qc.json``.

    Parameters
    ----------
    deriv_dir : path-like
        ``<dataset>/derivatives/<pipeline>`` holding the masks.
    out_dir : path-like, optional
        Report folder (default :func:`default_out_dir`). Must not be the derivatives folder or the dataset.
    suffix : str
        Mask name suffix (before the extension).
    force : bool
        Redraw every PNG (otherwise a PNG newer than its mask and image is kept).
    command_line : str, optional
        Recorded in the report (default: ``sys.argv``).
    batch : Batch, optional
        Receives one line per mask (statuses ``written``, ``up to date``, ``failed``).

    Returns
    -------
    (list of QcEntry, Path of index.html)
    """
    deriv_dir = Path(deriv_dir)
    dataset = dataset_root_of(deriv_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(deriv_dir)
    if out_dir.resolve() in (deriv_dir.resolve(), dataset):
        raise InputError(out_dir, "the QC folder must not be the derivatives folder or the dataset itself")
    batch = batch or Batch("qc")
    masks = find_masks(deriv_dir, suffix)
    if not masks:
        raise InputError(deriv_dir, f"no masks sub-*/[ses-*/]anat/*{suffix}.nii.gz found")
    command_line = command_line or shlex.join(["sacrum-masks", *sys.argv[1:]])
    gen = {"Name": "sacrum-masks qc", "Version": __version__, "CommandLine": command_line,
           "Date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    entries: list[QcEntry] = []
    with folder_lock(out_dir, name=".sacrum-masks-qc.lock"):
        ensure_dataset_description(out_dir, name="Sacrum mask QC",
                                   description="qc: PNG views and volume checks of sacrum masks")
        for mask in masks:
            # the folder resolved, not the file: a mask that is a link loop is reported by qc_one
            rel_mask = (mask.parent.resolve() / mask.name).relative_to(dataset).as_posix()
            image = image_for_mask(mask, deriv_dir, dataset, suffix)
            rel_dir = mask.parent.resolve().relative_to(deriv_dir.resolve())
            png = out_dir / rel_dir / (split_extension(mask.name)[0] + ".png")
            bn = BidsName.parse(mask)
            try:
                rel_image = (image.parent.resolve() / image.name).relative_to(dataset).as_posix()
            except ValueError:
                rel_image = str(image)
            entry = QcEntry(mask=rel_mask, image=rel_image, png=None, subject=bn.sub, session=bn.ses)
            sidecar, side_flag = read_sidecar(mask)
            if side_flag:
                entry.flags.append(side_flag)
            if sidecar is not None:
                cr, sv = sidecar.get("ComponentsRemoved"), sidecar.get("VolumeML")
                entry.components_removed = cr if isinstance(cr, int) and not isinstance(cr, bool) else None
                is_num = isinstance(sv, (int, float)) and not isinstance(sv, bool)
                entry.sidecar_volume_ml = float(sv) if is_num else None
            try:
                measures, drawn = qc_one(mask, image, png, force=force)
            except InputError as exc:
                entry.error, entry.status = str(exc), "failed"
                png.unlink(missing_ok=True)
                batch.report(rel_mask, "failed", str(exc))
                entries.append(entry)
                continue
            entry.png = png.relative_to(out_dir).as_posix()
            entry.voxels, entry.volume_ml = measures["voxels"], measures["volume_ml"]
            if measures["voxels"] == 0:
                entry.flags.insert(0, "empty")
            if measures["touches_border"]:
                entry.flags.append("touches_border")
            entry.status = "written" if drawn else "up to date"
            batch.report(rel_mask, entry.status)
            entries.append(entry)
        rng = volume_range(en.volume_ml for en in entries if en.voxels)
        for en in entries:
            if rng and en.voxels and not (rng[0] <= en.volume_ml <= rng[1]):
                en.flags.insert(1 if "empty" in en.flags else 0, "volume_outlier")
        flagged = sum(1 for en in entries if en.flags and not en.error)
        counts = {"written": batch.counts.get("written", 0), "up_to_date": batch.counts.get("up to date", 0),
                  "failed": batch.counts.get("failed", 0), "flagged": flagged}
        meta = {"GeneratedBy": gen, "dataset_name": dataset.name,
                "derivatives": deriv_dir.resolve().relative_to(dataset).as_posix(),
                "suffix": suffix, "volume_range_ml": list(rng) if rng else None, "counts": counts}
        write_json_atomic({**meta, "png_size": list(PNG_SIZE), "flags": FLAG_TEXT,
                           "masks": [vars(en) for en in entries]}, out_dir / "qc.json")
        index = write_text_atomic(build_index_html(entries, meta), out_dir / "index.html")
    return entries, index


@click.command("qc")
@click.argument("deriv_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder (default: <dataset>/derivatives/qc-sacrum).")
@click.option("--suffix", default=DEFAULT_SUFFIX, show_default=True, help="Mask name suffix before .nii.gz.")
@click.option("--force", is_flag=True, help="Redraw every picture.")
def qc_command(deriv_dir: Path, out_dir: Path | None, suffix: str, force: bool):
    """QC report for the masks of DERIV_DIR (<dataset>/derivatives/labels): one PNG per mask, index.html, qc.json.

    Flags: empty mask, volume outside the cohort's 1.5 IQR range, mask touching the image border,
    no sidecar. Re-running redraws only pictures older than their mask or image (--force: all).
    """
    batch = Batch("qc")
    entries, index = run_qc(deriv_dir, out_dir, suffix=suffix, force=force, batch=batch)  # LockBusy: exit 75 (cli)
    flagged = sum(1 for en in entries if en.flags)
    click.echo(batch.summary(["written", "up to date", "failed"]) + f" ({flagged} flagged); report: {index}")
    sys.exit(batch.exit_code)
