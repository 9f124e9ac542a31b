"""``sacrum-masks evaluate``: compare predicted masks with reference masks, one CSV row per case.

Pairs are found by relative path: every ``*.nii.gz`` / ``*.nii`` below ``--truth`` (recursively) is
compared with the file at the same relative path below ``--pred`` (or, with ``--pred-bids D``, below
``D/derivatives/labels`` against ``--truth/<name of D>``). This fits both an nnU-Net test split
(``labelsTs/<case>.nii.gz`` vs ``<predictions>/<case>.nii.gz``) and BIDS derivatives
(``truth/<dataset>/sub-XX/anat/<stem>_label-sacrum_seg.nii.gz`` vs ``<dataset>/derivatives/labels/...``).
Any non-zero voxel is foreground (a multi-label prediction is scored as a binary mask).

Table columns: ``case`` (relative path without extension), ``status`` (``ok``, ``missing`` or
``failed``), ``dice``, ``hd95_mm``, ``volume_pred_ml``, ``volume_truth_ml``, ``detail``.
See :mod:`sacrum_masks.metrics` for the metric conventions (empty masks, ``inf``).
The summary line gives the number of cases, mean and worst Dice; the exit status is 1 when a
prediction is missing or a pair cannot be compared (different grids, unreadable file).
"""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path

import click
import numpy as np

from .bids import split_extension
from .errors import InputError
from .metrics import dice, hd95, volume_ml
from .nifti import load_image, same_grid, write_text_atomic

COLUMNS = ("case", "status", "dice", "hd95_mm", "volume_pred_ml", "volume_truth_ml", "detail")


def evaluate_arrays(pred: np.ndarray, truth: np.ndarray, spacing) -> dict:
    """Dice, HD95 (mm) and both volumes (mL) for two masks on the same grid (non-zero = foreground)."""
    return {
        "dice": dice(pred, truth),
        "hd95_mm": hd95(pred, truth, spacing),
        "volume_pred_ml": volume_ml(pred, spacing),
        "volume_truth_ml": volume_ml(truth, spacing),
    }


def evaluate_pair(pred_path: Path, truth_path: Path) -> dict:
    """Metrics for one pair of files; raises InputError when they cannot be compared."""
    truth_img, truth = load_image(truth_path)
    pred_img, pred = load_image(pred_path)
    if not same_grid(pred_img, truth_img):
        raise InputError(pred_path, f"not on the grid of {truth_path} (shape {pred_img.shape} vs {truth_img.shape}, "
                                    f"or different affine)")
    spacing = [float(z) for z in truth_img.header.get_zooms()[:3]]
    return evaluate_arrays(pred, truth, spacing)


def find_truth_files(truth_dir: Path) -> list[Path]:
    """Reference masks below ``truth_dir`` (recursive, sorted, hidden files and folders skipped)."""
    out = []
    for path in sorted(truth_dir.rglob("*")):
        rel = path.relative_to(truth_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and split_extension(path.name)[1] in (".nii.gz", ".nii"):
            out.append(path)
    return out


def evaluate_folders(pred_dir: str | Path, truth_dir: str | Path) -> list[dict]:
    """One row per reference mask below ``truth_dir`` (see the module docstring for the pairing)."""
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    rows = []
    for truth_path in find_truth_files(truth_dir):
        rel = truth_path.relative_to(truth_dir)
        stem, _ = split_extension(str(rel))
        row = {"case": stem, "status": "ok", "dice": math.nan, "hd95_mm": math.nan,
               "volume_pred_ml": math.nan, "volume_truth_ml": math.nan, "detail": ""}
        pred_path = pred_dir / rel
        if not pred_path.is_file():
            row.update(status="missing", detail=f"no prediction {pred_path}")
        else:
            try:
                row.update(evaluate_pair(pred_path, truth_path))
            except InputError as exc:
                row.update(status="failed", detail=str(exc))
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> str:
    """One line: number of cases, mean and worst Dice (over the compared cases), missing and failed.

    >>> summarize([{"case": "a", "status": "ok", "dice": 0.9}, {"case": "b", "status": "ok", "dice": 0.7},
    ...            {"case": "c", "status": "missing", "dice": float("nan")}])
    'evaluate: 3 cases, mean Dice 0.8000, worst Dice 0.7000 (b), 1 missing, 0 failed'
    """
    ok = [r for r in rows if r["status"] == "ok"]
    missing = sum(r["status"] == "missing" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    if ok:
        worst = min(ok, key=lambda r: r["dice"])
        mean = float(np.mean([r["dice"] for r in ok]))
        scores = f"mean Dice {mean:.4f}, worst Dice {worst['dice']:.4f} ({worst['case']})"
    else:
        scores = "mean Dice n/a, worst Dice n/a"
    return f"evaluate: {len(rows)} cases, {scores}, {missing} missing, {failed} failed"


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.6g}")
    return str(value)


def table_text(rows: list[dict]) -> str:
    """The CSV text of the table (header + one line per row)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_fmt(row.get(c, "")) for c in COLUMNS])
    return buf.getvalue()


def evaluate_bids(truth_root: str | Path, bids_dirs) -> list[dict]:
    """Rows for stage-4 outputs of BIDS datasets against ``truth_root/<dataset name>/``.

    The predictions of dataset ``D`` are read from ``D/derivatives/labels``; case names are prefixed
    with ``D``'s folder name (``whole-spine/sub-01/anat/sub-01_T2w_label-sacrum_seg``).
    """
    rows = []
    for bids in bids_dirs:
        bids = Path(bids)
        truth_dir = Path(truth_root) / bids.name
        if not truth_dir.is_dir():
            raise InputError(truth_dir, f"no reference masks for dataset {bids.name}")
        for row in evaluate_folders(bids / "derivatives" / "labels", truth_dir):
            row["case"] = f"{bids.name}/{row['case']}"
            rows.append(row)
    return rows


def report_rows(prog: str, rows: list[dict], table: str, output: Path, line: str, summary_path: Path | None) -> int:
    """Write the table (and the one-line summary), name each case that is not ok; the exit status.

    Shared by ``evaluate`` and ``evaluate-model``: 0 when every case is ok, else 1.
    """
    write_text_atomic(table, output)
    if summary_path is not None:
        write_text_atomic(line + "\n", summary_path)
    for row in rows:
        if row["status"] != "ok":
            click.echo(f"{prog}: {row['status']}  {row['case']}: {row['detail']}", err=True)
    click.echo(line)
    click.echo(f"{prog}: table {output}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


@click.command("evaluate")
@click.argument("bids_dirs", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--pred", "pred_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="folder of predicted masks (same relative paths as in --truth)")
@click.option("--pred-bids", "pred_bids", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="BIDS dataset whose derivatives/labels hold the predictions, compared with --truth/<its name> "
                   "(repeatable; further datasets may follow as arguments)")
@click.option("--truth", "truth_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="folder of reference masks")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="per-case table (CSV)")
@click.option("--summary", "summary_path", type=click.Path(dir_okay=False, path_type=Path),
              help="also write the summary line to this file")
def evaluate_command(bids_dirs, pred_dir: Path | None, pred_bids, truth_dir: Path, output: Path,
                     summary_path: Path | None):
    """Dice, HD95 (mm) and volumes (mL) of predicted masks against --truth; per-case table to -o.

    Either --pred DIR (pairs by relative path with --truth), or BIDS datasets (--pred-bids D [D ...]):
    D/derivatives/labels against --truth/<name of D>. Exit status 1 when a prediction is missing or
    cannot be compared.
    """
    datasets = list(pred_bids) + list(bids_dirs)
    if (pred_dir is None) == (not datasets):
        raise click.UsageError("give either --pred DIR or BIDS datasets (--pred-bids D [D ...]), not both")
    if output.resolve().is_relative_to(truth_dir.resolve()):
        raise click.BadParameter(f"{output}: the table must not be written inside --truth", param_hint="-o")
    if pred_dir is not None:
        rows = evaluate_folders(pred_dir, truth_dir)
    else:
        rows = evaluate_bids(truth_dir, datasets)
    if not rows:
        raise InputError(truth_dir, "no reference masks (*.nii.gz, *.nii) found")
    sys.exit(report_rows("evaluate", rows, table_text(rows), output, summarize(rows), summary_path))
