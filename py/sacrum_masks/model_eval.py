"""``sacrum-masks evaluate-model``: the Dice of the masks users get, on the test split (stage 3's evaluation).

The TESTING cases of the raw dataset are segmented **from their original files** (``conversion.json``:
``DatasetsPath`` + the image the case was converted from) through stage 4's own code path and defaults:
:class:`sacrum_masks.predict.NnunetModel` (one fold, or an ensemble of folds averaged as
``nnUNetv2_predict -f 0 1 ...`` does) and :func:`sacrum_masks.predict.segment_image` (RPI for the network,
largest 26-connected component, the mask back on the image's own grid), with the defaults of
:class:`sacrum_masks.predict.Settings` (checkpoint best, no mirroring, tile step 0.5). Each mask is
compared with the case's original label on that grid (:func:`sacrum_masks.evaluate.evaluate_arrays`).

A raw dataset not made by ``convert`` (no ``conversion.json``) is evaluated on its own
``imagesTs/<case>_0000`` and ``labelsTs/<case>`` files, which then are the originals.

Outputs: the per-case table (CSV: the columns of ``sacrum-masks evaluate`` plus the settings), the summary
line (``--summary``; it names the settings), and the masks (``--masks DIR``: ``<case>.nii.gz``, the
file stage 4 would write for that image).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from .errors import InputError

#: columns of the table: those of ``sacrum-masks evaluate`` and the settings the masks were made with
SETTING_COLUMNS = ("folds", "checkpoint", "mirroring", "tile_step", "largest_component", "grid")


@dataclass(frozen=True)
class HeldOutCase:
    case: str
    image: Path
    label: Path


def held_out_cases(raw_dir: str | Path) -> list[HeldOutCase]:
    """The test cases of a raw dataset, sorted by case id (see the module docstring for the files)."""
    raw_dir = Path(raw_dir)
    record = raw_dir / "conversion.json"
    if record.is_file():
        try:
            conversion = json.loads(record.read_text(encoding="utf-8"))
            root = Path(conversion["DatasetsPath"])
            cases = conversion.get("Cases", {})
        except (OSError, ValueError, KeyError):
            raise InputError(record, "unreadable conversion record: rebuild the dataset (make dataset FORCE=1)") \
                from None
        return [HeldOutCase(cid, root / rec["image"], root / rec["label"])
                for cid, rec in sorted(cases.items()) if rec.get("split") == "Ts"]
    out = []
    for label in sorted((raw_dir / "labelsTs").glob("*.nii.gz")):
        cid = label.name[: -len(".nii.gz")]
        out.append(HeldOutCase(cid, raw_dir / "imagesTs" / f"{cid}_0000.nii.gz", label))
    return out


def settings_of(folds, checkpoint: str, mirroring: bool, tile_step: float) -> dict:
    """The settings columns (and the summary's wording) of an evaluation."""
    from .folds import format_folds

    return {"folds": format_folds(folds), "checkpoint": checkpoint, "mirroring": "on" if mirroring else "off",
            "tile_step": tile_step, "largest_component": "26-connected", "grid": "original"}


def settings_text(settings: dict) -> str:
    """``folds 0, checkpoint best, mirroring off, tile step 0.5, largest component, original grids``."""
    return (f"folds {settings['folds']}, checkpoint {settings['checkpoint']}, mirroring {settings['mirroring']}, "
            f"tile step {settings['tile_step']:g}, largest component ({settings['largest_component']}), "
            f"{settings['grid']} grids (stage 4's code path)")


def evaluate_cases(model, cases: list[HeldOutCase], masks_dir: Path | None = None, stream=None) -> list[dict]:
    """One row per case: segment the original image with ``model`` (a :data:`~sacrum_masks.predict.PredictFn`
    holder) as stage 4 does and compare with the label on the image's grid."""
    from .evaluate import evaluate_arrays
    from .nifti import load_image, mask_like, same_grid, save_nifti_atomic
    from .predict import segment_image

    rows = []
    for tc in cases:
        row = {"case": tc.case, "status": "ok", "dice": math.nan, "hd95_mm": math.nan, "volume_pred_ml": math.nan,
               "volume_truth_ml": math.nan, "detail": str(tc.image)}
        try:
            img, data = load_image(tc.image)
            truth_img, truth = load_image(tc.label)
            if not same_grid(img, truth_img, atol=1e-3):
                raise InputError(tc.label, f"not on the grid of {tc.image}")
            mask, _removed = segment_image(model.predict, img, data)
            if masks_dir is not None:
                save_nifti_atomic(mask_like(mask, img), masks_dir / f"{tc.case}.nii.gz")
            spacing = [float(z) for z in img.header.get_zooms()[:3]]
            row.update(evaluate_arrays(mask, truth != 0, spacing))
        except InputError as exc:
            row.update(status="failed", detail=str(exc))
        except OSError as exc:
            row.update(status="failed", detail=f"{tc.image}: cannot read ({exc.strerror or exc})")
        rows.append(row)
        if stream is not None:
            print(f"evaluate-model: {tc.case} {row['status']} dice {row['dice']:.4f}", file=stream, flush=True)
    return rows


def table_text(rows: list[dict], settings: dict) -> str:
    from .evaluate import COLUMNS, _fmt

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow((*COLUMNS, *SETTING_COLUMNS))
    for row in rows:
        writer.writerow([_fmt(row.get(c, "")) for c in COLUMNS] + [_fmt(settings[c]) for c in SETTING_COLUMNS])
    return buf.getvalue()


@click.command("evaluate-model")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="nnU-Net model folder (<nnUNet_results>/<Dataset>/<Trainer__Plans__Configuration>).")
@click.option("--raw", "raw_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The raw dataset ($nnUNet_raw/Dataset<NNN>_<name>) whose test split is evaluated.")
@click.option("--fold", default="0", show_default=True, help='Fold, list of folds ("0 1": one ensemble) or all.')
@click.option("--checkpoint", type=click.Choice(["best", "final"]), default=None,
              help="[default: stage 4's, best]")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="table (CSV)")
@click.option("--summary", "summary_path", type=click.Path(dir_okay=False, path_type=Path),
              help="also write the summary line here")
@click.option("--masks", "masks_dir", type=click.Path(file_okay=False, path_type=Path),
              help="write each case's mask here (<case>.nii.gz)")
def evaluate_model_command(model_dir, raw_dir, fold, checkpoint, device, output, summary_path, masks_dir):
    """Dice of stage 4's masks on the test split, from the original images (see the module docstring)."""
    from .evaluate import report_rows, summarize
    from .folds import check_folds, parse_folds
    from .predict import NnunetModel, Settings

    try:
        folds = parse_folds(fold)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fold") from None
    defaults = Settings(model_dir=model_dir)
    checkpoint = checkpoint or defaults.checkpoint
    check_folds(model_dir, folds, checkpoint)
    cases = held_out_cases(raw_dir)
    if not cases:
        raise InputError(raw_dir, "no test cases (TESTING in conversion.json, or labelsTs)")
    model = NnunetModel(model_dir, folds, checkpoint, device, defaults.tile_step, defaults.mirroring)
    settings = settings_of(folds, checkpoint, defaults.mirroring, defaults.tile_step)
    if masks_dir is not None:
        masks_dir.mkdir(parents=True, exist_ok=True)
    rows = evaluate_cases(model, cases, masks_dir, stream=sys.stdout)
    sys.exit(report_rows("evaluate-model", rows, table_text(rows, settings), output,
                         f"{summarize(rows)}; {settings_text(settings)}", summary_path))
