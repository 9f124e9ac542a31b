"""Stage 4: sacrum masks for MRI images with a trained nnU-Net model, written as BIDS derivatives.

``sacrum-masks predict`` (called by ``bin/generate_sacrum.sh``) takes the images of a test config
(``DATASETS_PATH`` + ``TESTING``) and/or of whole BIDS datasets (``--bids``), loads the model once, and
for each image writes

    <dataset>/derivatives/labels/<sub-*/[ses-*/]anat>/<image stem>_label-sacrum_seg.nii.gz  (+ .json)

Conventions
-----------
* Orientation: the network runs on the image reoriented to SCT "RPI" (nibabel axis codes L, A, S),
  as the training data were, with the array laid out as nnU-Net's image reader gave it at training
  time (SimpleITK order: ``[z, y, x]`` of the file, spacing reversed likewise). The prediction is
  brought back to the input's own voxel order, so the mask has the input's exact grid.
* Post-processing: only the largest 26-connected component is kept
  (:func:`sacrum_masks.components.largest_component`).
* Paths, sidecar schema, ownership, up-to-date rule and write order are those of the one derivatives
  writer, :mod:`sacrum_masks.derivatives` (docs/DESIGN.md, "Derivatives"): a mask whose sidecar's last
  ``GeneratedBy`` entry is not ``sacrum-masks`` (a manual correction) is never overwritten, not even
  with ``--force``; a mask is up to date when its image's SHA-256 (keyed by ``bids:raw:...`` URI) and
  every setting that changes it (:func:`mask_settings`: fold, checkpoint and its SHA-256, tile step,
  mirroring, connectivity; not the model folder's path) are unchanged.
* ``--output-dir DIR`` writes ``DIR/<dataset name>/derivatives/labels`` instead (read-only raw datasets).
* Contrasts: only the images whose contrast is in ``--contrast`` (else the config's ``CONTRASTS``, else
  the model's training contrasts, ``sacrum_masks_contrasts`` of its dataset.json) are segmented; the
  others are listed as "skipped (contrast)".
* One lock per output folder (``derivatives/labels``), taken in sorted order; a busy lock makes the
  run exit 0 without work (or wait with ``--wait``). Shard runs (``--shard I/N``) hold it shared and
  claim each image (:mod:`sacrum_masks.claims`: a lock per output, whatever N), so shards of different
  N never write one image at once: an image another run has claimed is reported ``busy`` and left to it.
  Stale temporaries are removed only under the image's claim. ``--lock-dir`` puts every lock file on a
  local flock-capable folder (file systems without flock); ``--report FILE.json`` records each image's
  status and the counts (read by ``sacrum-masks slurm-summary``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import re
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import click
import numpy as np

from . import __version__
from .batch import Batch, folder_lock
from .claims import Claims
from . import bids
from .bids import BidsName, find_images, sidecar_path
from .components import largest_component
from . import derivatives
from .derivatives import DerivativeFolder, Plan
from .memory import keep_freed_memory
from .errors import InputError, LockBusy
from .folds import format_folds, parse_folds
from .nifti import (check_file, from_rpi, load_image, mask_like, remove_stale_temporaries, sha256_file, to_rpi,
                    voxel_volume_ml)

TOOL_NAME = "sacrum-masks"
PIPELINE = "labels"
MASK_SUFFIX = ("label-sacrum", "seg")
SUMMARY_ORDER = ["written", "up to date", "kept", "failed"]
SKIPPED_CONTRAST = "skipped (contrast)"
#: connectivity of the largest-component post-processing (a setting of the mask: in its Settings)
CONNECTIVITY = 26
#: nnU-Net readers whose array is the file's voxel array transposed to [z, y, x] (no reorientation)
PLAIN_READERS = ("SimpleITKIO", "NibabelIO")


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Item:
    """One image to segment.

    ``image`` and ``dataset`` are None for an entry that could not be resolved; ``error`` then says why.
    """

    entry: str
    image: Path | None = None
    dataset: Path | None = None
    error: str | None = None

    @property
    def key(self) -> str:
        """Sort key shared by every run (the absolute image path, else the entry as written)."""
        return str(self.image) if self.image is not None else self.entry

    @property
    def rel(self) -> str:
        """The image's path relative to its BIDS dataset (posix)."""
        return self.image.relative_to(self.dataset).as_posix()


def items_from_config(config_path: str | Path, datasets_path: str | Path | None = None) -> list[Item]:
    """The TESTING entries of a config (original format), each resolved or carrying its own error.

    A bad entry (outside DATASETS_PATH, absolute, not ``<dataset>/.../<file>``, inside a
    ``derivatives/`` folder, or of a dataset folder that does not exist) does not stop the others: it
    comes back with ``error`` set. Missing files are found later, when the image is read. The dataset
    folder is resolved (symbolic links followed), as in :func:`items_from_bids`, so one image has one
    spelling. A config whose ``TYPE`` is not ``IMAGE`` is refused (InputError).
    """
    from .config import entry_path, read_json_object, resolve_datasets_path

    path = Path(config_path)
    raw = read_json_object(path)
    if not isinstance(raw.get("TESTING", []), list):
        raise InputError(path, "not a config (expected a JSON object with a TESTING list)")
    if raw.get("TYPE") != "IMAGE":
        raise InputError(path, f"TYPE is {raw.get('TYPE')!r}: predict takes a config of images (TYPE IMAGE)")
    root = resolve_datasets_path(raw, path, datasets_path)
    if not root.is_dir():
        raise InputError(path, f"DATASETS_PATH {root} is not a folder (pass --datasets-path or set DATASETS_PATH)")
    items = []
    for i, entry in enumerate(raw.get("TESTING", [])):
        label = f"TESTING[{i}] {entry!r}"
        try:
            entry_path(root, entry, f"TESTING[{i}]")   # refuses entries that leave DATASETS_PATH
        except InputError as exc:
            items.append(Item(label, error=exc.reason))
            continue
        parts = PurePosixPath(entry).parts
        if len(parts) < 2:
            items.append(Item(label, error="expected <dataset>/sub-*/[ses-*/]anat/<image>.nii.gz"))
            continue
        if "derivatives" in parts:
            items.append(Item(label, error="not a raw image: inside derivatives/"))
            continue
        if not (root / parts[0]).is_dir():
            items.append(Item(label, error=f"dataset folder {root / parts[0]} not found"))
            continue
        dataset = (root / parts[0]).resolve()
        image = dataset.joinpath(*parts[1:])
        items.append(Item(str(image), image, dataset))
    return items


def items_from_bids(bids_dir: str | Path) -> list[Item]:
    """Every MRI image of a BIDS dataset (``sub-*/[ses-*/]anat``, CT excluded).

    The dataset folder is resolved (symbolic links followed), as in :func:`items_from_config`.
    A folder that is not a BIDS dataset (no ``sub-*`` folder: e.g. the parent of the datasets) is an
    InputError: a cron job must not report success while doing nothing.
    """
    root = Path(bids_dir).resolve()
    if not root.is_dir():
        raise InputError(bids_dir, "--bids: not a folder")
    if not any(p.is_dir() for p in root.glob("sub-*")):
        subs = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("sub-*")))[:3]
        hint = f" (its folders {', '.join(subs)} are: pass each with --bids)" if subs else ""
        raise InputError(bids_dir, f"--bids: not a BIDS dataset, no sub-* folder{hint}")
    return [Item(str(p), p, root) for p in find_images(root)]


def parse_contrasts(text: str | None) -> tuple[str, ...] | None:
    """``"T1w,T2w"`` as ``("T1w", "T2w")``; None for an empty or missing value (use the default).

    >>> parse_contrasts("T1w, T2w"), parse_contrasts("")
    (('T1w', 'T2w'), None)
    """
    if not text:
        return None
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    return parts or None


def config_contrasts(config_path: str | Path) -> tuple[str, ...] | None:
    """The contrasts of a config's ``CONTRASTS`` code (``t1_t2`` -> T1w, T2w), None when it has none."""
    from .config import CONTRASTS, read_json_object

    code = read_json_object(Path(config_path)).get("CONTRASTS")
    if code is None:
        return None
    if code not in CONTRASTS:
        raise InputError(config_path, f"CONTRASTS {code!r} is not one of {', '.join(CONTRASTS)}")
    return CONTRASTS[code]


def model_contrasts(model_dir: str | Path) -> tuple[str, ...] | None:
    """The contrasts a model was trained on (``sacrum_masks_contrasts`` of its dataset.json, written by
    convert), None for a model that does not record them (every contrast is then segmented)."""
    from .config import read_json_object_or_none

    meta = read_json_object_or_none(Path(model_dir) / "dataset.json") or {}
    vals = meta.get("sacrum_masks_contrasts")
    return tuple(vals) if isinstance(vals, list) and vals and all(isinstance(v, str) for v in vals) else None


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (1-based) as ``(I, N)``.

    >>> parse_shard("2/5")
    (2, 5)
    >>> parse_shard("6/5")
    Traceback (most recent call last):
    ...
    ValueError: shard '6/5': expected I/N with 1 <= I <= N
    """
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r}: expected I/N with 1 <= I <= N") from None
    if not 1 <= i <= n:
        raise ValueError(f"shard {text!r}: expected I/N with 1 <= I <= N")
    return i, n


def select_items(items: list[Item], shard: tuple[int, int] = (1, 1)) -> list[Item]:
    """Deduplicate, sort by :attr:`Item.key` and keep shard ``I`` of ``N``: items whose index % N == I - 1.

    Every run given the same inputs sees the same order, so N array tasks cover each image once.

    >>> [it.entry for it in select_items([Item(c) for c in "edcba"], (2, 2))]
    ['b', 'd']
    """
    unique = {it.key: it for it in items}
    ordered = [unique[k] for k in sorted(unique)]
    i, n = shard
    return [it for idx, it in enumerate(ordered) if idx % n == i - 1]


def normalise_items(items: list[Item]) -> list[Item]:
    """Items with their dataset folder resolved (symbolic links followed), duplicates dropped, order kept.

    :func:`items_from_config` and :func:`items_from_bids` already resolve; this makes
    :func:`run_predict` safe for items made otherwise, so one output folder never appears under two
    spellings (the run would lock itself out). An item whose dataset folder does not exist gets an
    error instead (nothing is created for it).
    """
    seen, result = set(), []
    for it in items:
        if it.error is None and it.image is not None:
            if not Path(it.dataset).is_dir():
                it = Item(it.entry, error=f"dataset folder {it.dataset} not found")
            else:
                old = Path(os.path.abspath(it.image))
                try:
                    rel = old.relative_to(os.path.abspath(it.dataset))
                except ValueError:
                    it = Item(it.entry, error=f"not inside its dataset folder {it.dataset}")
                else:
                    dataset = Path(it.dataset).resolve()
                    image = dataset / rel
                    it = Item(str(image) if it.entry in (str(it.image), str(old)) else it.entry, image, dataset)
        if it.key not in seen:
            seen.add(it.key)
            result.append(it)
    return result


def labels_folder(dataset: str | Path, output_root: str | Path | None = None) -> DerivativeFolder:
    """The ``derivatives/labels`` folder of a dataset (under ``output_root`` when given), shared with ct-labels."""
    return derivatives.prepare(dataset, PIPELINE, program=TOOL_NAME, output_root=output_root,
                               title=bids.LABELS_DESCRIPTION[0], description=bids.LABELS_DESCRIPTION[1])


def output_paths(item: Item, folder: DerivativeFolder | None = None) -> tuple[Path, Path]:
    """``(mask, sidecar)`` paths of an item (InputError for a name that is not BIDS or not NIfTI)."""
    folder = folder or labels_folder(item.dataset)
    mask = folder.output_path(item.image, *MASK_SUFFIX)
    return mask, sidecar_path(mask)


# ----------------------------------------------------------------------------------------- provenance


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def checkpoint_file(model_dir: str | Path, fold: str, checkpoint: str) -> Path:
    """``<model>/fold_<F>/checkpoint_<best|final>.pth`` of one fold, or one InputError naming the folds there."""
    return checkpoint_files(model_dir, fold, checkpoint)[0]


def checkpoint_files(model_dir: str | Path, folds, checkpoint: str) -> list[Path]:
    """The checkpoint of each fold of ``folds`` (a ``FOLD`` value: ``0``, ``"0 1 2"``, ``all``), or one
    InputError ``fold 3 not there (folds with checkpoint_best.pth: 0 1)``."""
    from .folds import check_folds, parse_folds

    try:
        return check_folds(model_dir, parse_folds(folds), checkpoint)
    except ValueError as exc:
        raise InputError("--fold", str(exc)) from None


def model_identity(model_dir: str | Path, fold: str, checkpoint: str) -> dict:
    """The model as the sidecar's ``GeneratedBy`` records it: folder ("Model"), folds (``format_folds``:
    ``"0"``, ``"0 1 2"``, ``"all"``), checkpoint and each fold's checkpoint SHA-256 (``{"0": ..., "1": ...}``).

    The folder's path is provenance only: :func:`mask_settings` (what decides "up to date") leaves it out,
    so moving or remounting the same checkpoint does not redo every mask.
    """
    from .folds import format_folds, parse_folds

    model_dir = Path(os.path.abspath(model_dir))
    ckpts = checkpoint_files(model_dir, fold, checkpoint)
    folds = parse_folds(fold)
    return {"Model": str(model_dir), "Fold": format_folds(folds), "Checkpoint": checkpoint,
            "CheckpointSHA256": {str(f): sha256_file(c) for f, c in zip(folds, ckpts)}}


def mask_settings(identity: dict, tile_step: float, mirroring: bool) -> dict:
    """Every setting that changes a mask (the sidecar's ``Settings``; a change makes the mask out of date).

    >>> mask_settings({"Model": "/m", "Fold": "0", "Checkpoint": "best", "CheckpointSHA256": {"0": "c"}}, 0.5, False)
    {'Fold': '0', 'Checkpoint': 'best', 'CheckpointSHA256': {'0': 'c'}, 'TileStepSize': 0.5, 'Mirroring': False, 'LargestComponent': 26}
    """
    return {"Fold": identity["Fold"], "Checkpoint": identity["Checkpoint"],
            "CheckpointSHA256": identity["CheckpointSHA256"], "TileStepSize": float(tile_step),
            "Mirroring": bool(mirroring), "LargestComponent": CONNECTIVITY}


def is_ours(sidecar: dict | None) -> bool:
    """True when a sidecar's last ``GeneratedBy`` entry is this tool (:func:`sacrum_masks.derivatives.is_ours`)."""
    return derivatives.is_ours(sidecar, TOOL_NAME)


def probseg_path(folder: DerivativeFolder, image: str | Path) -> Path:
    """``<image stem>_label-sacrum_probseg.nii.gz`` beside the mask (BIDS probabilistic segmentation)."""
    return folder.output_path(image, MASK_SUFFIX[0], "probseg")


def plan_mask(folder: DerivativeFolder, item: Item, settings: dict, force: bool = False,
              probseg: bool = False) -> tuple[Plan, Path]:
    """The writer's plan for one image's mask (and its probseg when ``probseg``), and the mask's path
    (InputError: one line for the batch)."""
    mask = folder.output_path(item.image, *MASK_SUFFIX)
    check_file(item.image)
    outputs = [mask, probseg_path(folder, item.image)] if probseg else [mask]
    return folder.plan(item.image, outputs, {folder.uri(item.image): item.image}, settings, force), mask


def mask_fields(mask: np.ndarray, img, n_removed: int) -> dict:
    """The sidecar keys of a mask besides the writer's schema (read by QC: see docs/DESIGN.md, stage 4)."""
    count = int(np.count_nonzero(mask))
    return {"SpatialReference": "orig", "VoxelCount": count, "VolumeML": round(count * voxel_volume_ml(img), 4),
            "ComponentsRemoved": int(n_removed), "Empty": count == 0}


def write_mask(folder: DerivativeFolder, mask_path: Path, plan: Plan, mask: np.ndarray, img, n_removed: int,
               identity: dict, extra: dict | None = None, outputs: dict | None = None) -> dict:
    """Write one mask (on ``img``'s grid, its qform and sform) and its sidecar through the writer.

    ``extra``: more sidecar keys (uncertainty); ``outputs``: more files ``{path: image}`` (the probseg).

    A plain function of picklable arguments, so an export worker can call it. Returns the sidecar.
    """
    generated = {**identity, "TileStepSize": plan.settings.get("TileStepSize"),
                 "Mirroring": plan.settings.get("Mirroring"),
                 "nnunetv2": _version("nnunetv2"), "torch": _version("torch")}
    fields = {**mask_fields(mask, img, n_removed), **(extra or {})}
    return folder.write({mask_path: mask_like(mask, img), **(outputs or {})}, fields, plan, generated)


def probseg_like(probability: np.ndarray, reference):
    """A float32 foreground probability image on ``reference``'s grid (qform and sform as :func:`mask_like`)."""
    import nibabel as nib

    grid = mask_like(np.zeros(probability.shape, np.uint8), reference)
    out = nib.Nifti1Image(np.asarray(probability, np.float32), grid.affine, grid.header)
    out.set_data_dtype(np.float32)
    return out


@dataclass(frozen=True)
class Job:
    """One mask to write (picklable): the item, its derivatives folder, its outputs and the writer's plan.

    ``probseg`` is the ``_label-sacrum_probseg`` path when probabilities are saved, else None.
    """

    item: Item
    folder: DerivativeFolder
    mask: Path
    plan: Plan
    probseg: Path | None = None

    @property
    def image(self) -> Path:
        return self.item.image

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.mask)


@dataclass(frozen=True)
class WriteMask:
    """The engine's sink: writes mask, sidecar and (optionally) probseg through the derivatives writer.

    A picklable callable (:func:`sacrum_masks.engine.run` calls it in a worker process).
    """

    identity: dict

    def __call__(self, job: Job, mask: np.ndarray, probability, info: dict):
        img = info["image"]
        extra = {k: v for k, v in (("BoundaryEntropy", info.get("boundary_entropy")),
                                   ("FoldAgreementDice", info.get("fold_agreement_dice"))) if v is not None}
        outputs = {}
        if job.probseg is not None and probability is not None:
            outputs[job.probseg] = probseg_like(probability, img)
        sidecar = self.write(job, mask, img, info.get("components_removed", 0), extra, outputs)
        return "written", describe(sidecar)

    def write(self, job: Job, mask, img, n_removed: int, extra: dict, outputs: dict) -> dict:
        return write_mask(job.folder, job.mask, job.plan, mask, img, n_removed, self.identity, extra, outputs)

    def cleanup(self, job: Job) -> None:
        """Remove the temporary files a killed write of ``job`` left (its outputs are whole or absent)."""
        remove_stale_temporaries(*(p for p in (job.mask, job.sidecar, job.probseg) if p is not None))


def describe(sidecar: dict) -> str:
    """The log line's detail for a written mask."""
    detail = (f"{sidecar['VoxelCount']} voxels, {sidecar['VolumeML']:g} mL, "
              f"{sidecar['ComponentsRemoved']} components removed")
    if "BoundaryEntropy" in sidecar:
        detail += f", boundary entropy {sidecar['BoundaryEntropy']:.3f} bits"
    if "FoldAgreementDice" in sidecar:
        detail += f", fold agreement Dice {sidecar['FoldAgreementDice']:.3f}"
    if sidecar["Empty"]:
        detail = "EMPTY prediction (no sacrum found), empty mask written; " + detail
    return detail


# ------------------------------------------------------------------------------------------ inference


def nnunet_input(rpi_img, data_rpi: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Array and spacing as nnU-Net's SimpleITKIO / NibabelIO reader gives them for an RPI file.

    The readers return ``[channel, z, y, x]`` (the file's voxel axes reversed) and the spacing
    reversed likewise, as float32; this reproduces that without writing a file.
    """
    zooms = [abs(float(z)) for z in rpi_img.header.get_zooms()[:3]]
    array = np.ascontiguousarray(np.asarray(data_rpi, dtype=np.float32).transpose(2, 1, 0))[None]
    return array, zooms[::-1]


PredictFn = Callable[[np.ndarray, list], np.ndarray]


def segment_image(predict_fn: PredictFn, img, data: np.ndarray, connectivity: int = 26):
    """Segment one image: reorient to RPI, predict, keep the largest component, restore the voxel order.

    Parameters
    ----------
    predict_fn : callable
        ``predict_fn(array[c, z, y, x], spacing[z, y, x]) -> labels[z, y, x]`` (nnU-Net's layout).
    img, data : nibabel image and its voxel array (as :func:`sacrum_masks.nifti.load_image` gives them).

    Returns
    -------
    (numpy.ndarray, int)
        Binary uint8 mask in ``img``'s own voxel order and shape, and the number of components removed.
    """
    rpi = to_rpi(img, data)
    array, spacing = nnunet_input(rpi, np.asanyarray(rpi.dataobj))
    labels = np.asarray(predict_fn(array, spacing))
    if labels.shape != array.shape[1:]:
        raise RuntimeError(f"prediction shape {labels.shape} differs from the input's {array.shape[1:]}")
    kept, n_removed = largest_component(labels.transpose(2, 1, 0) != 0, connectivity)
    return np.ascontiguousarray(from_rpi(kept, img)), n_removed


class NnunetModel:
    """An nnU-Net model loaded once; :meth:`predict` is a :data:`PredictFn` (the serial path).

    ``fold`` is a :func:`sacrum_masks.folds.parse_folds` value: several folds are one ensemble (logits
    averaged, as ``nnUNetv2_predict -f``).
    """

    def __init__(self, model_dir: str | Path, fold, checkpoint: str, device: str = "cpu",
                 tile_step: float = 0.5, mirroring: bool = False):
        """``fold``: a ``FOLD`` value (``0``, ``"0 1 2"``, ``"all"``); several folds are one ensemble whose
        outputs are averaged as ``nnUNetv2_predict -f 0 1 2`` does (nnU-Net's own predictor, ``use_folds``)."""
        from .engine import load_predictor
        from .folds import parse_folds

        checkpoint_files(model_dir, fold, checkpoint)   # one line naming the folds that are there
        self.folds = parse_folds(fold)
        self.predictor = load_predictor(model_dir, self.folds, checkpoint, device, tile_step, mirroring)

    def predict(self, array: np.ndarray, spacing: list) -> np.ndarray:
        return self.predictor.predict_single_npy_array(array, {"spacing": list(spacing)}, None, None, False)


# ------------------------------------------------------------------------------------------------ run


@dataclass
class Settings:
    model_dir: Path
    fold: str = "0"
    checkpoint: str = "best"
    device: str = "cpu"
    tile_step: float = 0.5
    mirroring: bool = False
    force: bool = False
    wait: bool = False
    shard: tuple[int, int] = (1, 1)
    contrasts: tuple[str, ...] | None = None    # None: the model's training contrasts (else every contrast)
    output_dir: Path | None = None              # None: <dataset>/derivatives/labels
    workers: int | None = None
    save_probabilities: bool = False
    bf16: bool = False
    preset: str | None = None
    lock_dir: Path | None = None                # None: the claims and locks beside the outputs
    report: Path | None = None                  # --report FILE.json
    schedule: str = "auto"                      # engine.choose_schedule: auto, pipeline, inline


def lock_output_folder(stack: ExitStack, folder: Path, shard: tuple[int, int], wait: bool,
                       lock_dir: Path | None = None) -> None:
    """Lock one output folder for this run; raises :class:`LockBusy` when another run conflicts.

    A whole-list run holds the folder's lock exclusively. A shard run (``--shard I/N``, SLURM array
    tasks) holds it shared, so shards run side by side, whatever their N; they never write one image at
    once because each image is claimed (:mod:`sacrum_masks.claims`). A whole-list run and a shard run
    exclude each other.
    """
    stack.enter_context(folder_lock(folder, wait=wait, shared=shard != (1, 1), lock_dir=lock_dir))


def plan_item(claims: Claims, folder: DerivativeFolder, item: Item, settings: dict, force: bool = False,
              probseg: bool = False) -> Plan | None:
    """The writer's plan for one image, made under the image's claim; None when another run holds it.

    The plan removes the temporary files a killed run left beside the outputs: only under the claim
    (:mod:`sacrum_masks.claims`), which is released before returning. InputError as :func:`plan_mask`.
    """
    claim = claims.try_claim(folder.output_path(item.image, *MASK_SUFFIX), folder.root)
    if claim is None:
        return None
    with claim:
        return plan_mask(folder, item, settings, force, probseg)[0]


def write_report(batch: Batch, settings: Settings, **extra) -> None:
    """``--report FILE.json``: the batch's statuses and counts (nothing when no report was asked for)."""
    if settings.report is not None:
        batch.write_report(settings.report, SUMMARY_ORDER, shard=f"{settings.shard[0]}/{settings.shard[1]}",
                           **extra)


def engine_network_factory(settings: Settings):
    """``threads -> engine.Network`` for the settings (the engine's default network)."""
    from . import engine

    spec = engine.ModelSpec(Path(settings.model_dir), parse_folds(settings.fold), settings.checkpoint,
                            settings.device, settings.tile_step, settings.mirroring, settings.bf16)
    return lambda threads: engine.Network(spec, threads)


class _Log:
    """One line per image (cron, pipes) or, when ``stream`` is a terminal, a tqdm bar with failures printed."""

    def __init__(self, batch: Batch, total: int, stream):
        self.batch, self.bar = batch, None
        out = stream or sys.stdout
        if total and hasattr(out, "isatty") and out.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="predict", unit="image", file=out)

    def __call__(self, job, status: str, detail: str = "") -> None:
        name = job.image if isinstance(job, Job) else job
        if self.bar is None:
            self.batch.report(name, status, detail)
            return
        stream = self.batch.stream
        self.batch.stream = open(os.devnull, "w") if status != "failed" else None
        try:
            self.batch.report(name, status, detail)
        finally:
            if self.batch.stream is not None:
                self.batch.stream.close()
            self.batch.stream = stream
        self.bar.update()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_serial(jobs: list[Job], model, sink, report, claim=None, release=None) -> None:
    """The serial path: :func:`segment_image` per image with ``model.predict``, then the same sink.

    Used with a stand-in network (tests) and as the engine's equality oracle; any exception of one
    image is that image's failure. ``claim``/``release`` as :func:`sacrum_masks.engine.run`.
    """
    from .engine import failure_reason

    for job in jobs:
        start = time.perf_counter()
        got = True if claim is None else claim(job)
        if got is not True:
            report(job, *got)
            continue
        try:
            img, data = load_image(job.image)
            mask, n_removed = segment_image(model.predict, img, data)
            out = sink(job, mask, None, {"image": img, "components_removed": n_removed})
        except Exception as exc:
            report(job, "failed", failure_reason(exc))
            continue
        finally:
            if release is not None:
                release(job)
        status, detail = out if isinstance(out, tuple) else (out, "")
        report(job, status, f"{detail}, {time.perf_counter() - start:.1f} s" if detail else detail)


def run_predict(items: list[Item], settings: Settings, *, model_factory=None, network_factory=None,
                sink_factory=None, stream=None) -> int:
    """Segment ``items`` (already selected): the batch of stage 4. Returns the exit status.

    By default the pipelined engine (:mod:`sacrum_masks.engine`) runs the nnU-Net model; a
    ``network_factory(threads)`` replaces its network. ``model_factory(settings)`` instead runs the
    serial path with an object whose ``predict`` is a :data:`PredictFn` (a stand-in network). Either is
    called once, and only when some mask has to be written. ``sink_factory(identity)`` builds the
    writer (default :class:`WriteMask`).
    """
    out = stream or sys.stdout
    batch = Batch("predict", stream=stream)
    identity = model_identity(settings.model_dir, settings.fold, settings.checkpoint)
    wanted = settings.contrasts or model_contrasts(settings.model_dir)
    mask_set = mask_settings(identity, settings.tile_step, settings.mirroring)
    if settings.bf16:
        mask_set["Bf16"] = True
    items = normalise_items(items)
    folders: dict[Path, DerivativeFolder] = {}
    for it in items:
        if it.error is None and it.dataset not in folders:
            # InputError (--output-dir inside the raw dataset) goes up: one line, exit 2, nothing written
            folders[it.dataset] = labels_folder(it.dataset, settings.output_dir)
    roots = [str(f.root) for f in sorted(folders.values(), key=lambda f: str(f.root))]
    claims = Claims(settings.lock_dir)
    empty = []
    with ExitStack() as locks:
        for folder in sorted(folders.values(), key=lambda f: str(f.root)):
            folder.ensure()   # InputError (a path component is a file) goes up: one line, exit 2
            try:
                lock_output_folder(locks, folder.root, settings.shard, settings.wait, settings.lock_dir)
            except LockBusy:
                print(f"predict: another run is writing {folder.root}; exiting", file=out, flush=True)
                write_report(batch, settings, folders=roots, busy_folder=str(folder.root))
                return 0
        print(f"predict: model {settings.model_dir} fold {settings.fold} checkpoint {settings.checkpoint} "
              f"device {settings.device}", file=out, flush=True)
        todo = []
        for it in items:
            if it.error is not None:
                batch.report(it.entry, "failed", it.error)
                continue
            folder = folders[it.dataset]
            try:
                folder.output_path(it.image, *MASK_SUFFIX)   # InputError first: not NIfTI, not a BIDS name
                contrast = BidsName.parse(it.image).contrast
                if wanted and contrast not in wanted:
                    batch.report(it.image, SKIPPED_CONTRAST, f"{contrast} (segmenting {', '.join(wanted)})")
                    continue
                plan = plan_item(claims, folder, it, mask_set, settings.force, settings.save_probabilities)
                if plan is None:
                    batch.report(it.image, "busy", "another run is writing it")
                    continue
                mask_path = folder.output_path(it.image, *MASK_SUFFIX)
            except InputError as exc:
                batch.report(it.entry, "failed", exc.reason if Path(exc.path) == it.image else str(exc))
                continue
            if plan.status == "kept":
                batch.report(it.image, "kept", plan.reason)
            elif plan.status == "up to date":
                batch.report(it.image, "up to date")
            else:
                todo.append(Job(it, folder, mask_path, plan,
                                probseg_path(folder, it.image) if settings.save_probabilities else None))
        if todo:
            keep_freed_memory()   # before the model's first tensor: the passes reuse their memory (memory.py)
            sink = (sink_factory or WriteMask)(identity)
            log = _Log(batch, len(todo), stream)
            held: dict = {}

            def report(job, status, detail=""):
                if status == "written" and detail.startswith("EMPTY"):
                    empty.append(str(job.image))
                log(job, status, detail)

            def claim(job):
                """Claim the job's image before it is read, and plan it again (another run may have written it)."""
                got = claims.try_claim(job.mask, job.folder.root)
                if got is None:
                    return "busy", "another run is writing it"
                try:
                    plan = plan_mask(job.folder, job.item, mask_set, settings.force, settings.save_probabilities)[0]
                except InputError as exc:
                    got.release()
                    return "failed", exc.reason
                if plan.status != "write":
                    got.release()
                    return plan.status, plan.reason
                held[id(job)] = got
                return True

            def release(job):
                got = held.pop(id(job), None)
                if got is not None:
                    got.release()

            try:
                if model_factory is not None:
                    run_serial(todo, model_factory(settings), sink, report, claim=claim, release=release)
                else:
                    from . import engine

                    engine.run(todo, network_factory or engine_network_factory(settings), sink,
                               workers=settings.workers, report=report, want_probabilities=settings.save_probabilities,
                               claim=claim, release=release, device=settings.device, schedule=settings.schedule)
            finally:
                log.close()
                for got in held.values():
                    got.release()
    line = batch.summary(SUMMARY_ORDER)
    if empty:
        line += f"; {len(empty)} empty: " + ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else "")
    print(line, file=out, flush=True)
    write_report(batch, settings, folders=roots)
    return batch.exit_code


# ------------------------------------------------------------------------------------------------ CLI


#: the test config run when neither --config nor --bids is given (the original procedure's list)
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "resources" / "configs" / "test_sacrum.json"


def default_model(env=None) -> Path | None:
    """The model folder ``make train`` writes for DNUM / DNAME / TRAINER / CONFIGURATION, under nnUNet_results.

    >>> str(default_model({"nnUNet_results": "/r"}))
    '/r/Dataset300_SacrumDataset/nnUNetTrainer__nnUNetPlans__3d_fullres'
    """
    env = os.environ if env is None else env
    results = env.get("nnUNet_results")
    if not results:
        return None
    return (Path(results) / f"Dataset{env.get('DNUM') or 300}_{env.get('DNAME') or 'SacrumDataset'}"
            / f"{env.get('TRAINER') or 'nnUNetTrainer'}__nnUNetPlans__{env.get('CONFIGURATION') or '3d_fullres'}")


def _shard_option(ctx, param, value):
    try:
        return parse_shard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _device_option(ctx, param, value):
    if value is None or re.fullmatch(r"cpu|cuda(:\d+)?", value):
        return value
    raise click.BadParameter(f"{value!r}: expected cpu, cuda or cuda:N")


def _fold_option(ctx, param, value):
    try:
        return format_folds(parse_folds(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _workers_option(ctx, param, value):
    if value is None:
        from .engine import cpu_allocation

        return cpu_allocation()
    return value


_MODEL_HELP = ("nnU-Net model folder; default: the one `make train` writes, "
               "$nnUNet_results/Dataset<DNUM>_<DNAME>/<TRAINER>__nnUNetPlans__<CONFIGURATION> from DNUM (300), "
               f"DNAME (SacrumDataset), TRAINER (nnUNetTrainer), CONFIGURATION (3d_fullres); now {default_model()}")


@click.command("predict", context_settings={"show_default": True})
@click.option("--config", "config", type=click.Path(path_type=Path, exists=True, dir_okay=False), envvar="SACRUM_CONFIG",
              show_envvar=True, help="Test config (original format): DATASETS_PATH + TESTING list of "
              f"<dataset>/sub-*/.../<image>. Without --config and --bids: {DEFAULT_CONFIG.name} of the repository.")
@click.option("--datasets-path", type=click.Path(path_type=Path), envvar="DATASETS_PATH", show_envvar=True,
              help="Overrides the config's DATASETS_PATH.")
@click.option("--bids", "bids_dirs", multiple=True, type=click.Path(path_type=Path),
              help="A BIDS dataset: every MRI image of sub-*/[ses-*/]anat (repeatable).")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), envvar="SACRUM_MODEL", show_envvar=True,
              default=default_model, show_default=False, help=_MODEL_HELP)
@click.option("--model-zip", envvar="MODEL_ZIP", show_envvar=True, default=None, show_default=False,
              help="Zip file or URL that installs the model when its folder is missing (under a lock: concurrent "
                   "runs install it once); default: the original release.")
@click.option("--fold", default="0", envvar="FOLD", show_envvar=True, callback=_fold_option,
              help="Fold 0-4, a list (\"0 1 2 3 4\": one ensemble) or 'all'.")
@click.option("--checkpoint", type=click.Choice(["best", "final"]), default="best", envvar="CHECKPOINT",
              show_envvar=True)
@click.option("--gpu", default="0", envvar="GPU", show_envvar=True,
              help="CUDA device id or cpu; an existing CUDA_VISIBLE_DEVICES (a SLURM allocation) is kept and "
                   "the id indexes it (0 = the first allocated GPU).")
@click.option("--device", default=None, callback=_device_option, show_default=False,
              help="Torch device (cpu, cuda, cuda:N) instead of --gpu.")
@click.option("--preset", type=click.Choice(["default", "fast"]), default=None, envvar="SACRUM_PRESET",
              show_envvar=True, show_default=False,
              help="CPU settings measured by bench/bench_engine.py: fast = the fastest whose masks agree with the "
                   "default's (Dice >= 0.99 on the demo): tile step 1.0 and, on a CPU with native bfloat16, bf16 "
                   "autocast (README, Stage 4 engine).")
@click.option("--tile-step", type=click.FloatRange(0.05, 1.0), default=None, envvar="TILE_STEP", show_envvar=True,
              show_default=False,
              help="Sliding-window step as a fraction of the patch (larger = faster, fewer overlaps) [default: 0.5, or the preset's].")
@click.option("--mirroring/--no-mirroring", default=False, envvar="MIRRORING", show_envvar=True,
              help="Test-time mirroring (slower, usually a little smoother).")
@click.option("--workers", type=click.IntRange(1, 1024), default=None, envvar="SACRUM_WORKERS", show_envvar=True,
              callback=_workers_option, show_default=False,
              help="CPUs to use [default: SLURM_CPUS_PER_TASK, else the CPUs of this process]: reader/export "
                   "processes plus the network's torch threads never exceed it.")
@click.option("--save-probabilities", is_flag=True, envvar="SACRUM_SAVE_PROBABILITIES", show_envvar=True,
              help="Also write <image>_label-sacrum_probseg.nii.gz (foreground probability, BIDS probseg).")
@click.option("--force", is_flag=True, envvar="FORCE", show_envvar=True,
              help="Rewrite masks of ours even when up to date (manual masks are kept).")
@click.option("--wait", is_flag=True, envvar="WAIT", show_envvar=True,
              help="Wait for another run's lock instead of exiting.")
@click.option("--shard", default="1/1", envvar="SHARD", show_envvar=True, callback=_shard_option,
              help="Process shard I of N of the sorted image list (SLURM array tasks).")
@click.option("--contrast", "contrast", envvar="SACRUM_CONTRAST", show_envvar=True, default=None,
              help="Contrasts to segment, e.g. T1w,T2w (default: the config's CONTRASTS, else the model's "
                   "training contrasts); the others are listed as 'skipped (contrast)'.")
@click.option("--output-dir", "output_dir", envvar="SACRUM_OUTPUT_DIR", show_envvar=True, default=None,
              type=click.Path(path_type=Path),
              help="Write DIR/<dataset>/derivatives/labels instead of inside each dataset (read-only datasets).")
@click.option("--lock-dir", type=click.Path(file_okay=False, path_type=Path), envvar="SACRUM_LOCK_DIR",
              show_envvar=True, help="Folder for the lock files, on a local flock-capable file system, for "
                                     "outputs on one without flock (then only runs on this node exclude each other).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), envvar="SACRUM_REPORT", show_envvar=True,
              help="Write every image's status and the counts to this JSON file (read by slurm-summary).")
@click.option("--schedule", type=click.Choice(["auto", "pipeline", "inline"]), default="auto", envvar="SACRUM_SCHEDULE",
              show_envvar=True, help="auto: reader/export processes beside the network on a GPU or from 4 CPUs on, "
                                     "the same steps in line below 4 CPUs (README, Stage 4 engine).")
@click.option("--serial", is_flag=True, hidden=True,
              help="One image after the other in one process (predict_single_npy_array): the benchmark's baseline.")
def predict_command(config, datasets_path, bids_dirs, model_dir, model_zip, fold, checkpoint, gpu, device, preset,
                    tile_step, mirroring, workers, save_probabilities, force, wait, shard, contrast, output_dir,
                    lock_dir, report, schedule, serial):
    """Write sacrum masks (BIDS derivatives/labels) for the images of a test config and/or BIDS datasets.

    Exit status: 0 when nothing failed (also when another run holds a lock), 1 when an image failed,
    2 for a usage error or a model that cannot be installed. Crontab example (every night at 2:00, GPU 0):
    0 2 * * * /path/to/sacrum-masks/bin/generate_sacrum.sh --bids /data/new-dataset >> /var/log/sacrum.log 2>&1
    """
    from .device import check_device
    from .engine import preset_settings
    from .model_zip import DEFAULT_MODEL_ZIP, install_model

    if config is None and not bids_dirs:
        if not DEFAULT_CONFIG.is_file():
            raise click.UsageError("give --config FILE and/or --bids DIR")
        config = DEFAULT_CONFIG
    if model_dir is None:
        raise click.UsageError("give --model DIR (or SACRUM_MODEL, or nnUNet_results: source env.sh)")
    if device is None:
        try:
            device = check_device(gpu, torch_device=True)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--gpu / GPU") from None
    chosen = preset_settings(preset, device)
    if tile_step is not None:
        chosen["tile_step"] = tile_step
    contrasts = parse_contrasts(contrast)
    if not Path(model_dir).is_dir():
        click.echo(f"predict: installing the model from {model_zip or DEFAULT_MODEL_ZIP}")
        install_model(model_zip or DEFAULT_MODEL_ZIP, model_dir)
    items = items_from_config(config, datasets_path) if config is not None else []
    if contrasts is None and config is not None:
        contrasts = config_contrasts(config)
    for d in bids_dirs:
        items += items_from_bids(d)
    selected = select_items(items, shard)
    if shard != (1, 1):
        click.echo(f"predict: shard {shard[0]}/{shard[1]}: {len(selected)} of {len(items)} images")
    settings = Settings(Path(model_dir), fold, checkpoint, device, chosen["tile_step"], mirroring, force, wait, shard,
                        contrasts, output_dir, workers, save_probabilities, chosen.get("bf16", False), preset,
                        lock_dir, report, schedule)
    serial_model = (lambda s: NnunetModel(s.model_dir, s.fold, s.checkpoint, s.device, s.tile_step, s.mirroring)) \
        if serial else None
    sys.exit(run_predict(selected, settings, model_factory=serial_model))
