"""QC report for sacrum masks: plausibility checks with reasons, pictures, a ranked review page.

Three sources, one report (``index.html`` + ``qc.json`` + one PNG per mask):

* a derivatives folder ``<dataset>/derivatives/labels`` (stage 4's ``*_label-sacrum_seg`` masks);
* ``<dataset>/derivatives/reg-labels`` (stage 1's ``*_seg``: CT labels carried onto MRI, a registration QC;
  the sidecar's ``FractionOutsideFOV`` and volume change are checked too);
* a training config (``--config split.json``, TYPE LABEL): every mask it lists.

Each mask is drawn over its image (``<dataset>/sub-*/[ses-*/]anat/<stem>.nii.gz``, the mask's name without
its suffix): sagittal, coronal and axial slices through the mask's centroid and a strip of sagittal slices
across the mask, outline in red. The checks are :mod:`sacrum_masks.qc_checks` (thresholds in
:data:`~sacrum_masks.qc_checks.THRESHOLDS`); the page lists the masks worst first by
:func:`~sacrum_masks.qc_checks.score` and lets a reviewer mark each pass / fail / artifact
(:mod:`sacrum_masks.qc_page`). Uncertainty (``BoundaryEntropy``, ``FoldAgreementDice``) is read from stage 4's
sidecar when present ("n/a" otherwise).

Conventions
-----------
* Arrays are reoriented to SCT "RPI" (nibabel axis codes L, A, S) before measuring and slicing, so that
  nothing depends on the file's voxel order. Sagittal: anterior on the left, superior up. Coronal and axial:
  radiological (patient's right on the viewer's left). Voxel sizes set the aspect ratio.
* Volume = non-zero mask voxels x voxel volume, from the mask itself.
* A mask's key (``mask`` in qc.json and review.tsv) is its path relative to the folder holding the
  datasets (``<dataset>/derivatives/labels/sub-01/anat/...``), as in a split config.
* Every PNG is :data:`PNG_SIZE` pixels (width, height).
"""

from __future__ import annotations

import datetime as _dt
import math
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import nibabel as nib
import numpy as np

from . import __version__, derivatives
from . import qc_checks as qcc
from .batch import Batch, folder_lock
from .bids import NIFTI_EXTENSIONS, BidsName, iter_anat_files, sidecar_path, split_extension, suffix_parts
from .config import read_json_object_or_none
from .errors import InputError
from .nifti import atomic_path, load_image, same_grid, to_rpi, voxel_volume_ml, write_json_atomic, write_text_atomic

DEFAULT_SUFFIX = "_label-sacrum_seg"
#: mask suffix by derivatives pipeline when --suffix is not given
PIPELINE_SUFFIX = {"labels": "_label-sacrum_seg", "reg-labels": "_seg"}
QC_PIPELINE = "qc-sacrum"
FIG_SIZE_IN = (9.0, 6.0)
FIG_DPI = 90
#: (width, height) of every PNG in pixels
PNG_SIZE = (int(FIG_SIZE_IN[0] * FIG_DPI), int(FIG_SIZE_IN[1] * FIG_DPI))
STRIP_SLICES = 7
TOOL_NAME = "sacrum-masks"
#: the GeneratedBy names of our stages (4: predict, 1: register-ct, 0: ct-labels)
OUR_PROGRAMS = (TOOL_NAME, "sacrum-masks register-ct", "sacrum-masks ct-labels")

#: flag -> short label on the page
FLAG_TEXT = {
    "error": "unreadable",
    "bad_sidecar": "sidecar unreadable",
    "empty": "empty",
    "volume_outlier": "volume outlier",
    "extra_components": "extra components",
    "touches_border": "touches S-I border",
    "holes": "holes",
    "asymmetry": "L-R asymmetry",
    "position": "position",
    "extent": "extent",
    "fold_disagreement": "folds disagree",
    "uncertain_boundary": "uncertain boundary",
    "outside_fov": "label outside FOV",
    "volume_change": "volume changed",
}

# --------------------------------------------------------------------------- sidecars


def sidecar_kind(sidecar: dict | None, readable: bool = True) -> str:
    """``ours`` (stage 4 or 1 wrote it and nobody edited the mask since), ``manual`` or ``unreadable``.

    A mask is a manual correction when it has no sidecar, or when its sidecar's last ``GeneratedBy`` entry
    is not ours (spinalcordtoolbox/manual-correction appends ``{"Author", "Date"}`` to it).

    >>> sidecar_kind({"GeneratedBy": [{"Name": "sacrum-masks"}]})
    'ours'
    >>> sidecar_kind({"GeneratedBy": [{"Name": "sacrum-masks"}, {"Author": "J. Doe", "Date": "2026"}]})
    'manual'
    >>> sidecar_kind({"GeneratedBy": [{"Name": "sacrum-masks register-ct"}]})
    'ours'
    >>> sidecar_kind(None), sidecar_kind(None, readable=False)
    ('manual', 'unreadable')
    """
    if not readable:
        return "unreadable"
    return "ours" if any(derivatives.is_ours(sidecar, p) for p in OUR_PROGRAMS) else "manual"


def read_sidecar(mask: Path) -> tuple[dict | None, bool]:
    """(sidecar dict or None, readable): a missing sidecar is readable (None), a broken one is not."""
    side = sidecar_path(mask)
    if not side.exists():
        return None, True
    data = read_json_object_or_none(side)
    return data, data is not None


def _num(d: dict | None, key: str) -> float | None:
    v = (d or {}).get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


# --------------------------------------------------------------------------- one mask: measures


def mask_measures(mask_rpi: np.ndarray, spacing, voxel_ml: float) -> dict:
    """Every per-mask measure of an RPI-ordered mask (see :mod:`sacrum_masks.qc_checks`).

    >>> m = np.zeros((6, 5, 6), np.uint8); m[1:5, 1:4, 0:3] = 1
    >>> r = mask_measures(m, (1, 1, 1), 0.001)
    >>> r["voxels"], r["volume_ml"], r["border"], r["holes"], r["asymmetry"]
    (36, 0.036, [12, 0], 0, 0.0)
    """
    fg = np.asarray(mask_rpi) != 0
    n = int(np.count_nonzero(fg))
    largest, _ = qcc.largest_share(fg)
    pe = qcc.position_and_extent(fg, spacing)
    cross = int(fg.sum(axis=(0, 1)).max()) if n else 0
    centroid = [float(np.mean(i)) for i in np.nonzero(fg)] if n else None
    return {"voxels": n, "volume_ml": round(n * float(voxel_ml), 6), "largest": largest,
            "holes": qcc.hole_voxels(fg), "border": list(qcc.border_voxels(fg)), "cross_section": cross,
            "asymmetry": round(1.0 - qcc.mirror_overlap(fg, spacing), 4) if n else 0.0,
            "position": pe[0] if pe else None, "extent_mm": pe[1] if pe else None, "centroid": centroid}


def shape_checks(m: dict, voxel_ml: float, removed_ml: float = 0.0) -> list[qcc.Check]:
    """The checks of one mask that need no cohort: empty, components, border, holes, asymmetry."""
    checks = [qcc.check_empty(m["voxels"])]
    if m["voxels"]:
        checks += [qcc.check_components(m["largest"], m["voxels"], removed_ml, voxel_ml),
                   qcc.check_border(m["border"][0], m["border"][1], m["cross_section"]),
                   qcc.check_holes(m["holes"], m["voxels"]),
                   qcc.check_asymmetry(1.0 - m["asymmetry"])]
    return checks


def registration_checks(sidecar: dict | None) -> list[qcc.Check]:
    """Stage 1's own figures: label outside the MRI FOV, volume change on the MRI grid.

    >>> [c.reason for c in registration_checks({"FractionOutsideFOV": 0.2, "VolumeBeforeML": 100,
    ...                                         "VolumeAfterML": 100})][0]
    'label outside FOV: 20.0 % of the CT label is outside the MRI field of view'
    """
    out = []
    frac = _num(sidecar, "FractionOutsideFOV")
    if frac is not None:
        r = frac / qcc.T("fov_fraction")
        out.append(qcc.Check("outside_fov", frac, min(r, qcc.RATIO_CAP),
                             f"label outside FOV: {100 * frac:.1f} % of the CT label is outside the MRI field of view"
                             if r > 1 else ""))
    before, after = _num(sidecar, "VolumeBeforeML"), _num(sidecar, "VolumeAfterML")
    if before and after is not None:
        change = abs(after / before - 1.0)
        r = change / qcc.T("volume_change")
        out.append(qcc.Check("volume_change", round(change, 4), min(r, qcc.RATIO_CAP),
                             f"volume changed by {100 * change:.1f} % on the MRI grid ({before:.1f} -> {after:.1f} mL)"
                             if r > 1 else ""))
    return out


# --------------------------------------------------------------------------- pictures


def _display_range(planes) -> tuple[float, float]:
    vals = np.concatenate([np.asarray(p, dtype=float).ravel() for p in planes])
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [1, 99])
    if not hi > lo:
        lo, hi = float(vals.min()), float(vals.max()) + 1e-6
    return float(lo), float(hi)


def qc_planes(image: np.ndarray, mask: np.ndarray, center) -> dict:
    """Sagittal, coronal and axial planes through ``center`` of RPI arrays, each ``[horizontal, vertical]``.

    >>> a = np.arange(24).reshape(2, 3, 4); s = qc_planes(a, a > 10, (1, 2, 0))
    >>> s["sagittal"][0].shape, s["coronal"][0].shape, s["axial"][0].shape, int(s["coronal"][0][0, 0])
    ((3, 4), (2, 4), (2, 3), 8)
    """
    i, j, k = (int(np.clip(round(c), 0, n - 1)) for c, n in zip(center, image.shape))
    return {"sagittal": (image[i], mask[i]), "coronal": (image[:, j], mask[:, j]),
            "axial": (image[:, :, k], mask[:, :, k])}


def strip_indices(mask: np.ndarray, n: int = STRIP_SLICES) -> list[int]:
    """``n`` sagittal slice indices spread across the mask's L-R extent (the middle of the FOV when empty).

    >>> m = np.zeros((20, 2, 2)); m[4:15] = 1
    >>> strip_indices(m, 3)
    [6, 9, 12]
    """
    rows = np.nonzero(np.asarray(mask).any(axis=(1, 2)))[0]
    lo, hi = (int(rows[0]), int(rows[-1])) if rows.size else (0, mask.shape[0] - 1)
    return sorted({int(round(lo + (hi - lo) * (t + 0.5) / n)) for t in range(n)})


def _draw(ax, img2d, m2d, dh, dv, lo, hi, labels, flip=False, title=None):
    nh, nv = img2d.shape
    ax.imshow(np.asarray(img2d, dtype=float).T, cmap="gray", origin="lower", extent=(0, nh * dh, 0, nv * dv),
              vmin=lo, vmax=hi, interpolation="nearest", aspect="equal")
    m2d = np.asarray(m2d) != 0
    if m2d.any() and nh > 1 and nv > 1:
        ax.contour((np.arange(nh) + 0.5) * dh, (np.arange(nv) + 0.5) * dv, m2d.T.astype(float), levels=[0.5],
                   colors="red", linewidths=0.8)
    if flip:
        ax.invert_xaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8, parse_math=False)
    if labels:
        ax.text(0.02, 0.5, labels[0], transform=ax.transAxes, color="yellow", fontsize=7, va="center")
        ax.text(0.98, 0.5, labels[1], transform=ax.transAxes, color="yellow", fontsize=7, va="center", ha="right")


def render_qc_png(image_rpi, image_data: np.ndarray, mask_data: np.ndarray, center, title: str, out: Path) -> Path:
    """Draw the QC picture of one mask into a PNG of :data:`PNG_SIZE` pixels (written atomically).

    Top row: sagittal, coronal and axial slices through ``center``; bottom row: :data:`STRIP_SLICES`
    sagittal slices across the mask, cropped to the mask's box (+ 8 voxels). Outline in red.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dx, dy, dz = (float(v) for v in nib.affines.voxel_sizes(image_rpi.affine))
    planes = qc_planes(image_data, mask_data, center)
    lo, hi = _display_range([p[0] for p in planes.values()])
    fig = Figure(figsize=FIG_SIZE_IN, dpi=FIG_DPI)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, STRIP_SLICES, height_ratios=[2.2, 1.0])
    thirds = [(0, 2), (2, 5), (5, 7)]
    views = (("sagittal", dy, dz, ("A", "P"), True), ("coronal", dx, dz, ("R", "L"), False),
             ("axial", dx, dy, ("R", "L"), False))
    for (a, b), (view, dh, dv, labels, flip) in zip(thirds, views):
        img2d, m2d = planes[view]
        _draw(fig.add_subplot(grid[0, a:b]), img2d, m2d, dh, dv, lo, hi, labels, flip, view)
    fg = np.asarray(mask_data) != 0
    box = np.argwhere(fg)
    if box.size:
        (_, j0, k0), (_, j1, k1) = box.min(axis=0), box.max(axis=0)
    else:
        j0, k0, j1, k1 = 0, 0, fg.shape[1] - 1, fg.shape[2] - 1
    js = slice(max(j0 - 8, 0), j1 + 9)
    ks = slice(max(k0 - 8, 0), k1 + 9)
    for t, i in enumerate(strip_indices(fg)):
        _draw(fig.add_subplot(grid[1, t]), image_data[i, js, ks], fg[i, js, ks], dy, dz, lo, hi, None, True,
              f"x={i}")
    fig.suptitle(title, fontsize=9, parse_math=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.04, hspace=0.12)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=FIG_DPI, format="png")
    return out


# --------------------------------------------------------------------------- items and entries


@dataclass
class QcItem:
    """One mask to report: its files, its key and where its picture goes (relative to the report)."""

    mask: Path
    image: Path
    key: str
    png: str
    dataset: str
    image_key: str = ""


@dataclass
class QcEntry:
    """What the report says about one mask."""

    mask: str
    image: str
    png: str | None
    dataset: str
    subject: str
    session: str | None
    volume_ml: float | None = None
    voxels: int | None = None
    components_removed: int | None = None
    sidecar: str = "ours"
    boundary_entropy: float | None = None
    fold_dice: float | None = None
    measures: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)
    flags: list = field(default_factory=list)
    reasons: list = field(default_factory=list)
    score: float = 0.0
    error: str | None = None
    status: str = "written"


def dataset_root_of(deriv_dir: Path) -> Path:
    """The raw dataset of ``<dataset>/derivatives/<pipeline>`` (or of ``DIR/<dataset>/derivatives/<pipeline>``
    written with ``--output-dir``: its ``DatasetLinks.raw``); InputError for any other folder."""
    deriv_dir = Path(deriv_dir)
    if not deriv_dir.is_dir():
        raise InputError(deriv_dir, "not a folder")
    resolved = deriv_dir.resolve()
    if resolved.parent.name != "derivatives":
        raise InputError(deriv_dir, "expected a derivatives folder <dataset>/derivatives/<pipeline>")
    raw = derivatives.raw_dataset_of(resolved)
    if not raw.is_dir():
        raise InputError(deriv_dir, f"its raw dataset {raw} (DatasetLinks.raw) is not a folder")
    return raw


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


def png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's header, None when it is not a PNG (a picture from another layout is redrawn)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError:
        return None
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _png_name(mask: Path) -> str:
    return split_extension(mask.name)[0] + ".png"


def items_from_derivatives(deriv_dir: Path, suffix: str | None = None) -> tuple[list[QcItem], Path, str]:
    """(items, the folder holding the dataset, suffix) for a derivatives folder's masks."""
    deriv_dir = Path(deriv_dir)
    dataset = dataset_root_of(deriv_dir)
    suffix = suffix or PIPELINE_SUFFIX.get(deriv_dir.resolve().name, DEFAULT_SUFFIX)
    root = dataset.parent
    mask_root = deriv_dir.resolve().parents[2]   # the folder holding <dataset>/derivatives/<pipeline>
    items = []
    for mask in find_masks(deriv_dir, suffix):
        rel_dir = mask.parent.resolve().relative_to(deriv_dir.resolve())
        key = (mask.parent.resolve() / mask.name).relative_to(mask_root).as_posix()
        image = image_for_mask(mask, deriv_dir, dataset, suffix)
        items.append(QcItem(mask, image, key, (rel_dir / _png_name(mask)).as_posix(), dataset.name,
                            image.relative_to(root).as_posix()))
    if not items:
        raise InputError(deriv_dir, f"no masks sub-*/[ses-*/]anat/*{suffix}.nii.gz found (an empty cohort)")
    return items, root, suffix


def items_from_config(config_path: Path, datasets_path: Path | None = None) -> tuple[list[QcItem], Path]:
    """(items, DATASETS_PATH) for every entry of a TYPE LABEL split config (all splits)."""
    from .config import SPLIT_KEYS, image_from_label, load_config

    config = load_config(config_path, datasets_path, check_exists=False)
    if config.get("TYPE") != "LABEL":
        raise InputError(config_path, "QC of a config needs TYPE LABEL (a list of masks)")
    root = config["DATASETS_PATH"]
    items = []
    for key in SPLIT_KEYS:
        for label in config[key]:
            rel = Path(label).relative_to(root)
            image = image_from_label(label)
            items.append(QcItem(Path(label), image, rel.as_posix(), (rel.parent / _png_name(Path(label))).as_posix(),
                                rel.parts[0], image.relative_to(root).as_posix()))
    if not items:
        raise InputError(config_path, "lists no masks (an empty cohort)")
    return items, root


def qc_output_dir(*, deriv_dir: Path | None = None, config: Path | None = None, out_dir: Path | None = None,
                  output_root: Path | None = None) -> Path:
    """Where a report goes, checked: ``--out`` when given, else the default for the source.

    Defaults: ``qc-sacrum`` beside ``derivatives/labels``, ``qc-sacrum-<pipeline>`` beside another
    pipeline (``qc-sacrum-reg-labels``), so a derivative written with ``--output-dir`` gets its report
    there too; with ``output_root`` (``--output-dir``), ``<output_root>/<dataset>/derivatives/qc-sacrum*``;
    ``<config folder>/<config stem>_qc`` for a config. The folder may not be the derivatives folder or a
    dataset. (The one place that decides the folder: its BIDS files are added in :func:`prepare_output_dir`.)
    """
    if deriv_dir is not None:
        dataset = dataset_root_of(deriv_dir)
        name = Path(deriv_dir).resolve().name
        qc_name = QC_PIPELINE if name == "labels" else f"{QC_PIPELINE}-{name}"
        if output_root is not None:
            default = derivatives.prepare(dataset, qc_name, program=QC_PROGRAM, output_root=output_root).root
        else:
            default = Path(deriv_dir).resolve().parent / qc_name
        forbidden = {Path(deriv_dir).resolve(), dataset}
    else:
        config = Path(config)
        default = config.resolve().parent / f"{config.stem}_qc"
        forbidden = set()
    out = Path(out_dir) if out_dir is not None else default
    if out.resolve() in forbidden:
        raise InputError(out, "the QC folder must not be the derivatives folder or the dataset itself")
    return out


QC_PROGRAM = "sacrum-masks qc"


def prepare_output_dir(out_dir: Path, dataset: Path | None = None) -> None:
    """Create the report folder as a BIDS derivative: ``dataset_description.json`` (DatasetLinks to the
    raw ``dataset`` when there is one), ``README`` and a ``.bidsignore`` declaring the report's files, so
    that the BIDS validator passes it (docs/DESIGN.md, "Derivatives")."""
    folder = derivatives.DerivativeFolder(
        Path(dataset).resolve() if dataset is not None else None, Path(out_dir).name, Path(out_dir), QC_PROGRAM,
        description="qc: pictures, plausibility checks and review page of sacrum masks", title="Sacrum mask QC",
        external=dataset is not None and Path(dataset).resolve() not in Path(out_dir).resolve().parents)
    folder.ensure()


def measure_item(item: QcItem, out_dir: Path, *, force: bool = False) -> tuple[QcEntry, bool]:
    """Load, measure and draw one mask; InputError for an unreadable mask or image, or another grid.

    Returns (entry with per-mask checks, whether the PNG was drawn).
    """
    bn = BidsName.parse(item.mask)
    entry = QcEntry(mask=item.key, image=item.image_key, png=None, dataset=item.dataset, subject=bn.sub,
                    session=bn.ses)
    sidecar, readable = read_sidecar(item.mask)
    entry.sidecar = sidecar_kind(sidecar, readable)
    cr = (sidecar or {}).get("ComponentsRemoved")
    entry.components_removed = cr if isinstance(cr, int) and not isinstance(cr, bool) else None
    entry.boundary_entropy = _num(sidecar, "BoundaryEntropy")
    entry.fold_dice = _num(sidecar, "FoldAgreementDice")
    if not item.image.is_file():
        raise InputError(item.image, "no such file (the image of this mask)")
    mask_img, mask_data = load_image(item.mask)
    image_img, image_data = load_image(item.image)
    if not same_grid(mask_img, image_img):
        raise InputError(item.mask, f"not on the grid of its image {item.image.name} "
                                    f"(shape {mask_img.shape} vs {image_img.shape} or affine differs)")
    voxel_ml = voxel_volume_ml(mask_img)
    mask_rpi = np.asanyarray(to_rpi(mask_img, (np.asarray(mask_data) != 0).astype(np.uint8)).dataobj)
    img_rpi = to_rpi(image_img, image_data)
    spacing = tuple(float(v) for v in nib.affines.voxel_sizes(img_rpi.affine))
    m = mask_measures(mask_rpi, spacing, voxel_ml)
    entry.measures = {k: v for k, v in m.items() if k != "centroid"}
    entry.voxels, entry.volume_ml = m["voxels"], m["volume_ml"]
    removed_ml = _num(sidecar, "VolumeRemovedML") or 0.0
    checks = shape_checks(m, voxel_ml, removed_ml) + registration_checks(sidecar)
    checks.append(qcc.check_fold_agreement(entry.fold_dice))
    if not readable:
        checks.append(qcc.Check("bad_sidecar", None, qcc.RATIO_CAP,
                                f"sidecar {sidecar_path(item.mask).name} is not readable JSON"))
    entry.checks = checks
    png = out_dir / item.png
    up_to_date = (png.is_file() and not force and png_size(png) == PNG_SIZE
                  and png.stat().st_mtime >= max(item.mask.stat().st_mtime, item.image.stat().st_mtime))
    if not up_to_date:
        center = m["centroid"] or [(s - 1) / 2 for s in mask_rpi.shape]
        who = f"sub-{bn.sub}" + (f" ses-{bn.ses}" if bn.ses else "")
        vol = f"{m['volume_ml']:.2f} mL" if m["voxels"] else "EMPTY mask"
        render_qc_png(img_rpi, np.asanyarray(img_rpi.dataobj), mask_rpi, center,
                      f"{who} | {item.image.name} | {vol}", png)
    entry.png = item.png
    return entry, not up_to_date


def cohort_checks(entries: list[QcEntry]) -> None:
    """Add the cohort checks (volume, position, extent, boundary entropy), per dataset, then flags and score."""
    groups: dict[str, list[QcEntry]] = {}
    for en in entries:
        if en.error is None and en.voxels:
            groups.setdefault(en.dataset, []).append(en)
    for group in groups.values():
        limits = qcc.volume_limits([en.volume_ml for en in group])
        pos = qcc.cohort_stats([en.measures["position"] for en in group], qcc.T("position_floor"))
        ext = qcc.cohort_stats([en.measures["extent_mm"] for en in group], qcc.T("extent_floor"), log=True)
        ents = [en.boundary_entropy for en in group if en.boundary_entropy is not None]
        ent = (qcc.robust_center_spread(ents, qcc.T("entropy_floor"))
               if len(ents) >= qcc.T("min_cohort") else None)
        for en in group:
            en.checks += [qcc.check_volume(en.volume_ml, limits),
                          qcc.check_position(en.measures["position"], pos),
                          qcc.check_extent(en.measures["extent_mm"], ext),
                          qcc.check_entropy(en.boundary_entropy, ent)]
    for en in entries:
        failed = [c for c in en.checks if c.failed]
        en.flags = (["error"] if en.error else []) + [c.flag for c in failed]
        en.reasons = ([en.error] if en.error else []) + [c.reason for c in failed]
        en.score = qcc.score(en.checks, error=en.error is not None)
        en.checks = [asdict(c) for c in en.checks]


def run_report(items: list[QcItem], root: Path, out_dir: Path, *, title: str, source: str, suffix: str,
               force: bool = False, command_line: str | None = None,
               batch: Batch | None = None, dataset: Path | None = None) -> tuple[list[QcEntry], Path]:
    """Write the report of a list of masks: PNGs, ``qc.json``, ``index.html``. One line per mask in ``batch``."""
    from .qc_page import build_index_html

    batch = batch or Batch("qc")
    command_line = command_line or shlex.join(["sacrum-masks", *sys.argv[1:]])
    gen = {"Name": "sacrum-masks qc", "Version": __version__, "CommandLine": command_line,
           "Date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    entries: list[QcEntry] = []
    prepare_output_dir(out_dir, dataset)
    with folder_lock(out_dir, name=".sacrum-masks-qc.lock"):
        for item in items:
            try:
                entry, drawn = measure_item(item, out_dir, force=force)
            except InputError as exc:
                bn = BidsName.parse(item.mask)
                entry = QcEntry(mask=item.key, image=item.image_key, png=None, dataset=item.dataset,
                                subject=bn.sub, session=bn.ses, error=str(exc), status="failed")
                (out_dir / item.png).unlink(missing_ok=True)
                batch.report(item.key, "failed", str(exc))
                entries.append(entry)
                continue
            if entry.sidecar == "unreadable":
                batch.report(item.key, "failed", f"{sidecar_path(item.mask)}: sidecar is not readable JSON "
                                                 "(the mask is still in the report)")
            entry.status = "written" if drawn else "up to date"
            if entry.sidecar != "unreadable":
                batch.report(item.key, entry.status)
            entries.append(entry)
        cohort_checks(entries)
        entries.sort(key=lambda en: (-en.score, en.mask))
        flagged = sum(1 for en in entries if en.flags)
        counts = {"masks": len(entries), "written": batch.counts.get("written", 0),
                  "up_to_date": batch.counts.get("up to date", 0), "failed": batch.counts.get("failed", 0),
                  "flagged": flagged}
        meta = {"GeneratedBy": gen, "title": title, "source": source, "root": str(root), "suffix": suffix,
                "report_id": f"{root}|{source}", "counts": counts, "png_size": list(PNG_SIZE),
                "flags": FLAG_TEXT,
                "thresholds": {k: v[0] for k, v in qcc.THRESHOLDS.items()}}
        records = [asdict(en) for en in entries]
        write_json_atomic({**meta, "masks": records}, out_dir / "qc.json")
        index = write_text_atomic(build_index_html(records, meta), out_dir / "index.html")
    return entries, index


def run_qc(deriv_dir, out_dir=None, *, suffix: str | None = None, force: bool = False,
           command_line: str | None = None, batch: Batch | None = None,
           output_root=None) -> tuple[list[QcEntry], Path]:
    """The report of a derivatives folder (``labels``: stage 4; ``reg-labels``: stage 1).

    Parameters
    ----------
    deriv_dir : path-like
        ``<dataset>/derivatives/<pipeline>`` holding the masks.
    out_dir : path-like, optional
        Report folder (default :func:`qc_output_dir`).
    suffix : str, optional
        Mask name suffix (default by pipeline: :data:`PIPELINE_SUFFIX`).
    force : bool
        Redraw every PNG (otherwise a PNG newer than its mask and image is kept).
    command_line : str, optional
        Recorded in the report (default: ``sys.argv``).
    batch : Batch, optional
        Receives one line per mask (statuses ``written``, ``up to date``, ``failed``).
    output_root : path-like, optional
        ``--output-dir``: the report goes to ``<output_root>/<dataset>/derivatives/qc-sacrum*``.

    Returns
    -------
    (list of QcEntry, worst first; Path of index.html)
    """
    deriv_dir = Path(deriv_dir)
    out = qc_output_dir(deriv_dir=deriv_dir, out_dir=Path(out_dir) if out_dir is not None else None,
                        output_root=output_root)
    items, root, suffix = items_from_derivatives(deriv_dir, suffix)
    source = deriv_dir.resolve().relative_to(deriv_dir.resolve().parents[2]).as_posix()
    kind = "registration QC (stage 1)" if deriv_dir.resolve().name == "reg-labels" else "masks"
    return run_report(items, root, out, title=f"{source} ({kind})", source=source, suffix=suffix, force=force,
                      command_line=command_line, batch=batch, dataset=dataset_root_of(deriv_dir))


def run_qc_config(config, out_dir=None, *, datasets_path=None, force: bool = False,
                  command_line: str | None = None, batch: Batch | None = None) -> tuple[list[QcEntry], Path]:
    """The report of a training config's masks (TYPE LABEL, every split)."""
    config = Path(config)
    out = qc_output_dir(config=config, out_dir=Path(out_dir) if out_dir is not None else None)
    items, root = items_from_config(config, datasets_path)
    return run_report(items, root, out, title=f"config {config.name}", source=str(config.resolve()),
                      suffix="", force=force, command_line=command_line, batch=batch)


@click.command("qc")
@click.argument("deriv_dir", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Report on the masks of a training config (TYPE LABEL) instead of a derivatives folder.")
@click.option("--datasets-path", type=click.Path(file_okay=False, path_type=Path), envvar="DATASETS_PATH",
              default=None, help="Overrides the config's DATASETS_PATH.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder (default: <dataset>/derivatives/qc-sacrum; qc-sacrum-reg-labels for stage 1; "
                   "<config>_qc beside a config).")
@click.option("--suffix", default=None,
              help="Mask name suffix before .nii.gz [default: _label-sacrum_seg; _seg in reg-labels].")
@click.option("--force", is_flag=True, help="Redraw every picture.")
@click.option("--output-dir", "output_dir", envvar="SACRUM_OUTPUT_DIR", show_envvar=True, default=None,
              type=click.Path(path_type=Path),
              help="Write the report to DIR/<dataset>/derivatives/qc-sacrum* (read-only datasets).")
def qc_command(deriv_dir: Path | None, config: Path | None, datasets_path: Path | None, out_dir: Path | None,
               suffix: str | None, force: bool, output_dir: Path | None):
    """QC report of DERIV_DIR (<dataset>/derivatives/labels or reg-labels) or of --config's masks.

    Checks each mask (empty, volume, extra components, S-I border, holes, left-right asymmetry, position and
    extent against the cohort, fold agreement and boundary entropy from the sidecar), draws it, and writes
    index.html (ranked worst first, review marks, YAML/TSV export) and qc.json. Re-running redraws only
    pictures older than their mask or image (--force: all).
    """
    if (deriv_dir is None) == (config is None):
        raise click.UsageError("give a derivatives folder or --config, not both")
    batch = Batch("qc")
    if config is not None:
        entries, index = run_qc_config(config, out_dir, datasets_path=datasets_path, force=force, batch=batch)
    else:
        entries, index = run_qc(deriv_dir, out_dir, suffix=suffix, force=force, batch=batch, output_root=output_dir)
    flagged = sum(1 for en in entries if en.flags)
    click.echo(batch.summary(["written", "up to date", "failed"]) + f" ({flagged} flagged); report: {index}")
    sys.exit(batch.exit_code)
