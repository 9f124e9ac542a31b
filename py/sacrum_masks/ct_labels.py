"""Stage 0 (optional): TotalSegmentator sacrum labels for CT images that have none.

For every CT image ``<dataset>/sub-*/[ses-*/]anat/<stem>.nii.gz`` (contrast ``CT``) without
``derivatives/labels/<same folder>/<stem>_seg.nii.gz``, TotalSegmentator runs through its Python API
(task ``total``, ``roi_subset`` sacrum + vertebrae_S1, multilabel output) and the label is written on the
CT's exact grid with the values of TotalSegmentator's v2 class map (sacrum = 25, vertebrae_S1 = 26),
plus a sidecar::

    {"LabelOrder": "totalsegmentator-v2", "SacrumIndices": [25, 26], "GeneratedBy": [...], "Sources": [...]}

so stage 1 (``register-ct``) picks the right indices by itself. Paths, the rest of the sidecar
(``Sources`` as ``bids:raw:...``, ``SourcesSHA256``, ``Settings``), ownership and the write order are
the derivatives writer's (:mod:`sacrum_masks.derivatives`, docs/DESIGN.md "Derivatives"): a label
without our sidecar (the dataset's own) is never replaced, not even with ``--force``. ``SacrumIndices`` lists the indices that
are really in the written label (an S1 that TotalSegmentator did not find is not claimed); a CT where
neither is found fails and nothing is written for it.

TotalSegmentator is an optional extra (``make setup CT=1``). Its weights cannot be downloaded on machines
without internet: before any work this module checks that the weight folders TotalSegmentator would use
are there (its own lookup: ``TOTALSEG_WEIGHTS_PATH``, else ``$TOTALSEG_HOME_DIR/nnunet/results``, else
``~/.totalsegmentator/nnunet/results``), and when they are not it says in one line how to provide them
and writes nothing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shlex
import sys
from pathlib import Path

import click
import nibabel as nib
import numpy as np

from . import derivatives
from .batch import Batch, folder_lock
from .bids import LABELS_DESCRIPTION, BidsName, find_images, sidecar_path
from .derivatives import DerivativeFolder
from .errors import InputError
from .nifti import load_image, mask_like, remove_stale_temporaries, same_grid

LABEL_ORDER = "totalsegmentator-v2"
PROGRAM = "sacrum-masks ct-labels"
#: TotalSegmentator v2 class map (``totalsegmentator.map_to_binary.class_map["total"]``, checked on 2.18.0)
V2_CLASSES = {25: "sacrum", 26: "vertebrae_S1"}
ROI_SUBSET = ["sacrum", "vertebrae_S1"]
TASK = "total"

#: Weight folders (``TASK_ID_WEIGHTS_CONFIGS`` of TotalSegmentator 2.18.0) that task ``total`` with a
#: ``roi_subset`` loads: the five 1.5 mm parts (all are fetched even when the subset needs one) and the
#: 6 mm model used to crop around the subset; with ``--fast``: the 3 mm model and the 6 mm one.
#: ``totalseg_download_weights -t total`` / ``-t total_fast`` download exactly these.
WEIGHT_FOLDERS = {
    291: "Dataset291_TotalSegmentator_part1_organs_1559subj",
    292: "Dataset292_TotalSegmentator_part2_vertebrae_1532subj",
    293: "Dataset293_TotalSegmentator_part3_cardiac_1559subj",
    294: "Dataset294_TotalSegmentator_part4_muscles_1559subj",
    295: "Dataset295_TotalSegmentator_part5_ribs_1559subj",
    297: "Dataset297_TotalSegmentator_total_3mm_1559subj",
    298: "Dataset298_TotalSegmentator_total_6mm_1559subj",
}
TASK_WEIGHTS = {False: (291, 292, 293, 294, 295, 298), True: (297, 298)}


class TotalSegUnavailable(Exception):
    """TotalSegmentator or its weights are missing: one line for the user, nothing written."""


# --------------------------------------------------------------------------- environment checks


def totalseg_weights_dir(environ=None) -> Path:
    """Where TotalSegmentator looks for its weights (same rule as ``totalsegmentator.config.get_weights_dir``)."""
    env = os.environ if environ is None else environ
    if env.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(env["TOTALSEG_WEIGHTS_PATH"])
    if env.get("TOTALSEG_HOME_DIR"):
        home = Path(env["TOTALSEG_HOME_DIR"])
    else:
        home = (Path("/tmp") if str(Path.home()) == "/" else Path.home()) / ".totalsegmentator"
    return home / "nnunet" / "results"


def missing_weights(fast: bool = False, environ=None) -> list[str]:
    """Names of the weight folders that are absent or hold no ``*/fold_0/checkpoint_final.pth``.

    Stricter than TotalSegmentator itself (which only checks that the folder exists), so a half-copied
    folder is caught here rather than deep inside nnU-Net.
    """
    root = totalseg_weights_dir(environ)
    missing = []
    for task_id in TASK_WEIGHTS[bool(fast)]:
        folder = root / WEIGHT_FOLDERS[task_id]
        if not (folder.is_dir() and any(folder.glob("*/fold_0/checkpoint_final.pth"))):
            missing.append(WEIGHT_FOLDERS[task_id])
    return missing


def load_totalsegmentator():
    """``(totalsegmentator function, version)``; TotalSegUnavailable when it is not installed or not v2."""
    try:
        api = importlib.import_module("totalsegmentator.python_api")
    except ImportError as exc:
        raise TotalSegUnavailable(
            f"TotalSegmentator is not installed ({exc}); install it with `make setup CT=1`") from None
    try:
        version = importlib.metadata.version("TotalSegmentator")
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(sys.modules.get("totalsegmentator"), "__version__", "unknown"))
    if not version.startswith("2."):
        raise TotalSegUnavailable(f"TotalSegmentator {version} found; this stage needs 2.x (class map v2: "
                                  f"sacrum 25, vertebrae_S1 26); install it with `make setup CT=1`")
    return api.totalsegmentator, version


def check_weights(fast: bool = False, environ=None) -> None:
    """TotalSegUnavailable (one line saying how to provide them) when weights are missing."""
    missing = missing_weights(fast, environ)
    if missing:
        task = "total_fast" if fast else "total"
        raise TotalSegUnavailable(
            f"TotalSegmentator weights missing in {totalseg_weights_dir(environ)} ({', '.join(missing)}): "
            f"on a connected machine run `totalseg_download_weights -t {task}`, copy its ~/.totalsegmentator "
            f"folder here and set TOTALSEG_HOME_DIR to it (or TOTALSEG_WEIGHTS_PATH to its nnunet/results)")


# --------------------------------------------------------------------------- pure parts


def find_ct_images(bids_dir) -> list[Path]:
    """CT images (contrast ``CT``) of ``sub-*/[ses-*/]anat``, sorted."""
    return [p for p in find_images(bids_dir, include_ct=True) if BidsName.parse(p).contrast == "CT"]


def labels_folder(bids_dir, output_dir=None) -> DerivativeFolder:
    """``derivatives/labels`` (shared with predict's masks, same description) as this stage writes it."""
    return derivatives.prepare(bids_dir, "labels", program=PROGRAM, output_root=output_dir,
                               title=LABELS_DESCRIPTION[0], description=LABELS_DESCRIPTION[1])


def ct_label_path(bids_dir, image) -> Path:
    """``<dataset>/derivatives/labels/<folder>/<CT stem>_seg.nii.gz``."""
    return labels_folder(bids_dir).output_path(image, "seg")


def label_settings(fast: bool) -> dict:
    """The settings that change a CT label (its sidecar's ``Settings``)."""
    return {"Task": TASK, "RoiSubset": list(ROI_SUBSET), "Fast": bool(fast)}


def label_on_grid(seg, ct) -> tuple[nib.Nifti1Image, list[int]]:
    """TotalSegmentator's multilabel output as a uint8 label on the CT's exact grid.

    Parameters
    ----------
    seg : nibabel image
        TotalSegmentator output (v2 class ids; ``roi_subset`` keeps the full-map ids).
    ct : nibabel image
        The CT it was computed from.

    Returns
    -------
    (image, present)
        The label (values 0, 25, 26; qform and sform = the CT's affine) and the sacrum indices present.

    Raises
    ------
    ValueError
        Output not on the CT grid, values outside {0, 25, 26}, or neither 25 nor 26 present.
    """
    if not same_grid(seg, ct):
        raise ValueError(f"TotalSegmentator output is not on the CT grid (shape {seg.shape} vs {ct.shape})")
    data = np.asanyarray(seg.dataobj)
    values = set(int(v) for v in np.unique(data))
    extra = sorted(values - {0, *V2_CLASSES})
    if extra:
        raise ValueError(f"TotalSegmentator output has values {extra} outside {{0, 25, 26}}: "
                         f"not the v2 class map this stage expects")
    present = sorted(values & set(V2_CLASSES))
    if not present:
        raise ValueError("TotalSegmentator found no sacrum (25) or vertebrae_S1 (26) in this CT")
    return mask_like(data, ct, binary=False), present


def label_fields(present: list[int]) -> dict:
    """The CT label's own sidecar keys (shared with the demo labels and read by stage 1)."""
    return {"LabelOrder": LABEL_ORDER, "SacrumIndices": list(present),
            "Labels": {str(k): V2_CLASSES[k] for k in present}}


def totalseg_entry(version: str, fast: bool, device: str) -> dict:
    """TotalSegmentator's ``GeneratedBy`` entry (before ours)."""
    return {"Name": "TotalSegmentator", "Version": version, "Task": TASK, "RoiSubset": list(ROI_SUBSET),
            "Multilabel": True, "Fast": bool(fast), "Device": device}


# --------------------------------------------------------------------------- driver


def run_ct_labels(bids_dir, *, device: str = "gpu", fast: bool = False, force: bool = False,
                  command_line: str | None = None, batch: Batch | None = None, output_dir=None) -> Batch:
    """Write the missing TotalSegmentator CT labels of one BIDS dataset.

    Statuses: ``written``, ``kept`` (a label exists: a dataset's own, never replaced, or one this stage
    wrote from the same CT bytes and settings; ``force`` redoes the latter), ``failed``. Raises
    TotalSegUnavailable before touching anything when TotalSegmentator or its weights are missing (only
    checked when some CT needs a label).
    """
    bids_dir = Path(bids_dir)
    folder = labels_folder(bids_dir, output_dir)
    batch = batch or Batch("ct-labels")
    command_line = command_line or shlex.join(["sacrum-masks", *sys.argv[1:]])
    settings = label_settings(fast)
    todo = []
    for image in find_ct_images(bids_dir):
        rel = image.relative_to(bids_dir).as_posix()
        out = folder.output_path(image, "seg")
        try:
            plan = folder.plan(image, [out], {folder.uri(image): image}, settings, force, clean=False)
        except InputError as exc:
            batch.report(rel, "failed", exc.reason if Path(exc.path) == image else str(exc))
            continue
        if plan.status != "write":
            batch.report(rel, "kept")
            continue
        todo.append((image, rel, out, plan))
    if not todo:
        return batch
    run_totalseg, version = load_totalsegmentator()
    check_weights(fast)
    folder.ensure()
    with folder_lock(folder.root, name=".sacrum-masks-ct-labels.lock"):
        for image, rel, out, plan in todo:
            remove_stale_temporaries(out, sidecar_path(out))  # left by a killed run; we hold the lock
            try:
                ct, _ = load_image(image)
            except InputError as exc:
                batch.report(rel, "failed", exc.reason)
                continue
            saved = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
            try:
                seg = run_totalseg(str(image), None, ml=True, task=TASK, roi_subset=list(ROI_SUBSET),
                                   fast=fast, device=device, quiet=True)
                label, present = label_on_grid(seg, ct)
            except Exception as exc:  # TotalSegmentator failing on one CT: report it, go on with the rest
                batch.report(rel, "failed", f"{type(exc).__name__}: {exc}")
                continue
            finally:
                for k, v in saved.items():  # TotalSegmentator points nnUNet_* at its weights; undo that
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            folder.write({out: label}, label_fields(present), plan, {"CommandLine": command_line},
                         before=[totalseg_entry(version, fast, device)])
            written = np.asanyarray(nib.load(str(out)).dataobj)
            if sorted(set(np.unique(written).tolist()) & set(V2_CLASSES)) != present:  # verify what we claim
                out.unlink()
                sidecar_path(out).unlink(missing_ok=True)
                batch.report(rel, "failed", f"written label lost indices {present}")
                continue
            batch.report(rel, "written", f"indices {present}")
    return batch


@click.command("ct-labels")
@click.argument("bids_dirs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--device", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="TotalSegmentator device (it falls back to the CPU when no GPU is seen).")
@click.option("--fast", is_flag=True, help="TotalSegmentator's 3 mm model (weights: -t total_fast).")
@click.option("--force", is_flag=True, help="Redo labels this stage wrote before (a dataset's own are kept).")
@click.option("--output-dir", "output_dir", envvar="SACRUM_OUTPUT_DIR", show_envvar=True, default=None,
              type=click.Path(path_type=Path),
              help="Write DIR/<dataset>/derivatives/labels instead of inside each dataset (read-only datasets).")
def ct_labels_command(bids_dirs: tuple[Path, ...], device: str, fast: bool, force: bool, output_dir):
    """Stage 0: TotalSegmentator sacrum labels (v2: sacrum 25, S1 26) for CT images of BIDS_DIRS without one.

    Writes derivatives/labels/sub-*/[ses-*/]anat/<CT stem>_seg.nii.gz and a sidecar (LabelOrder,
    SacrumIndices, TotalSegmentator version) that stage 1 reads. Needs `make setup CT=1` and the
    TotalSegmentator weights (TOTALSEG_HOME_DIR).
    """
    batch = Batch("ct-labels")
    try:
        for bids_dir in bids_dirs:
            run_ct_labels(bids_dir, device=device, fast=fast, force=force, batch=batch, output_dir=output_dir)
    except TotalSegUnavailable as exc:
        click.echo(f"ct-labels: {exc}", err=True)
        sys.exit(3)
    click.echo(batch.summary(["written", "kept", "failed"]))
    sys.exit(batch.exit_code)
