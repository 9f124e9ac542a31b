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
* Ownership: a mask whose sidecar says ``GeneratedBy[0].Name == "sacrum-masks"`` is ours. A mask
  without such a sidecar (a manual correction) is never overwritten, not even with ``--force``.
* Up to date: ours, same input SHA-256 and same model identity (fold, checkpoint name and the
  checkpoint file's SHA-256; not the model folder's path, so a moved or remounted model is the same
  model): nothing is done. The sidecar still records the folder ("Model") for provenance.
* Writes are atomic (temporary file + rename). For a new mask the sidecar is written first, for a
  rewrite the mask is: whatever point a run is killed at, the next run sees "missing" or "out of
  date", never "kept" or "up to date" for a stale mask.
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
from .bids import BidsName, derivative_path, find_images, sidecar_path, split_extension
from .config import read_json_object_or_none
from .components import largest_component
from .errors import InputError, LockBusy
from .nifti import (check_file, from_rpi, load_image, mask_like, save_nifti_atomic, sha256_file, to_rpi,
                    voxel_volume_ml, write_json_atomic)

TOOL_NAME = "sacrum-masks"
PIPELINE = "labels"
MASK_SUFFIX = ("label-sacrum", "seg")
SUMMARY_ORDER = ["written", "up to date", "kept", "failed"]
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
    """
    root = Path(bids_dir).resolve()
    return [Item(str(p), p, root) for p in find_images(root)]


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


def output_paths(item: Item) -> tuple[Path, Path]:
    """``(mask, sidecar)`` paths of an item (InputError for a name that is not BIDS or not NIfTI)."""
    if split_extension(item.image.name)[1] == "":
        raise InputError(item.image, "not a NIfTI file (.nii or .nii.gz)")
    BidsName.parse(item.image)
    mask = derivative_path(item.dataset, item.image, PIPELINE, *MASK_SUFFIX)
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


#: The keys of :func:`model_identity` that decide whether a mask is up to date ("Model", the folder's
#: path, is provenance only: moving or remounting the same checkpoint must not redo every mask).
IDENTITY_KEYS = ("Fold", "Checkpoint", "CheckpointSHA256")


def model_identity(model_dir: str | Path, fold: str, checkpoint: str) -> dict:
    """The model as the sidecar records it: folder ("Model"), folds (``format_folds``: ``"0"``, ``"0 1 2"``,
    ``"all"``), checkpoint and each fold's checkpoint SHA-256 (``{"0": ..., "1": ...}``).

    Only :data:`IDENTITY_KEYS` decide whether a mask is up to date (:func:`plan_status`).
    """
    from .folds import format_folds, parse_folds

    model_dir = Path(os.path.abspath(model_dir))
    ckpts = checkpoint_files(model_dir, fold, checkpoint)
    folds = parse_folds(fold)
    return {"Model": str(model_dir), "Fold": format_folds(folds), "Checkpoint": checkpoint,
            "CheckpointSHA256": {str(f): sha256_file(c) for f, c in zip(folds, ckpts)}}


def is_ours(sidecar: dict | None) -> bool:
    """True when a sidecar was written by this tool (``GeneratedBy[0].Name == "sacrum-masks"``)."""
    try:
        return sidecar["GeneratedBy"][0]["Name"] == TOOL_NAME
    except (TypeError, KeyError, IndexError):
        return False


def read_sidecar(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or not a JSON object."""
    return read_json_object_or_none(path)


def plan_status(mask: Path, sidecar: dict | None, input_sha: str, identity: dict, force: bool = False) -> str:
    """What to do with one output: ``"kept"``, ``"up to date"`` or ``"write"``.

    >>> ident = {"Model": "/m", "Fold": 0, "Checkpoint": "best", "CheckpointSHA256": "c"}
    >>> ours = {"GeneratedBy": [{"Name": "sacrum-masks", **ident}], "InputSHA256": "i"}
    >>> plan_status(Path("/nonexistent.nii.gz"), ours, "i", ident)
    'write'
    >>> plan_status(Path(__file__), ours, "i", {**ident, "Model": "/moved/m"})
    'up to date'
    """
    if not mask.exists():
        return "write"
    if not is_ours(sidecar):
        return "kept"
    if force:
        return "write"
    made_by = sidecar["GeneratedBy"][0]
    same_model = all(made_by.get(k) == identity.get(k) for k in IDENTITY_KEYS)
    return "up to date" if same_model and sidecar.get("InputSHA256") == input_sha else "write"


def make_sidecar(item: Item, identity: dict, input_sha: str, mask: np.ndarray, img, n_removed: int,
                 settings: dict) -> dict:
    """The mask's JSON sidecar (keys relied upon by the other stages: see DESIGN.md, stage 4)."""
    count = int(np.count_nonzero(mask))
    generated = {"Name": TOOL_NAME, "Version": __version__,
                 "Date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 **identity, **settings,
                 "nnunetv2": _version("nnunetv2"), "torch": _version("torch")}
    return {"SpatialReference": "orig", "GeneratedBy": [generated], "Sources": [f"bids::{item.rel}"],
            "InputSHA256": input_sha, "VoxelCount": count,
            "VolumeML": round(count * voxel_volume_ml(img), 4), "ComponentsRemoved": int(n_removed),
            "Empty": count == 0}


def ensure_dataset_description(folder: Path) -> None:
    """Create ``<folder>/dataset_description.json`` when absent; an existing one is never touched.

    ``derivatives/labels`` is shared with ct-labels: both write the same description
    (:data:`sacrum_masks.bids.LABELS_DESCRIPTION`).
    """
    bids.ensure_dataset_description(folder, name=bids.LABELS_DESCRIPTION[0], description=bids.LABELS_DESCRIPTION[1])


def write_outputs(mask_img, mask_path: Path, sidecar: dict, sidecar_path: Path) -> None:
    """Write mask and sidecar, each atomically, in the order that keeps a killed run detectable.

    A new mask: sidecar first (a sidecar without mask is redone). A rewrite of one of ours: mask first
    (the old sidecar no longer matches, so the new mask is redone rather than kept as is).
    """
    if mask_path.exists():
        save_nifti_atomic(mask_img, mask_path)
        write_json_atomic(sidecar, sidecar_path)
    else:
        write_json_atomic(sidecar, sidecar_path)
        save_nifti_atomic(mask_img, mask_path)


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
    """An nnU-Net model loaded once; :meth:`predict` is a :data:`PredictFn`."""

    def __init__(self, model_dir: str | Path, fold, checkpoint: str, device: str = "cpu",
                 tile_step: float = 0.5, mirroring: bool = False):
        """``fold``: a ``FOLD`` value (``0``, ``"0 1 2"``, ``"all"``); several folds are one ensemble whose
        outputs are averaged as ``nnUNetv2_predict -f 0 1 2`` does (nnU-Net's own predictor, ``use_folds``)."""
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        from .folds import parse_folds

        checkpoint_files(model_dir, fold, checkpoint)   # one line naming the folds that are there
        self.folds = parse_folds(fold)

        dev = torch.device(device)
        self.predictor = nnUNetPredictor(tile_step_size=tile_step, use_gaussian=True, use_mirroring=mirroring,
                                         perform_everything_on_device=dev.type == "cuda", device=dev,
                                         verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        self.predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=self.folds,
                                                            checkpoint_name=f"checkpoint_{checkpoint}.pth")
        reader = self.predictor.plans_manager.plans.get("image_reader_writer", "SimpleITKIO")
        if reader not in PLAIN_READERS:
            raise InputError(model_dir, f"plans.json image_reader_writer {reader!r} is not supported "
                             f"(expected one of {', '.join(PLAIN_READERS)})")

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
    lock_dir: Path | None = None
    report: Path | None = None


def lock_output_folder(stack: ExitStack, folder: Path, shard: tuple[int, int], wait: bool,
                       lock_dir: Path | None = None) -> None:
    """Lock one output folder for this run; raises :class:`LockBusy` when another run conflicts.

    A whole-list run holds the folder's lock exclusively. A shard run (``--shard I/N``, SLURM array
    tasks) holds it shared, so shards run side by side, whatever their N; they never write one image at
    once because each image is claimed (:mod:`sacrum_masks.claims`). A whole-list run and a shard run
    exclude each other.
    """
    stack.enter_context(folder_lock(folder, wait=wait, shared=shard != (1, 1), lock_dir=lock_dir))


def output_folder(item: Item) -> Path:
    """The output folder of an item (``<dataset>/derivatives/labels``): its lock and its claims."""
    return item.dataset / "derivatives" / PIPELINE


def plan_item(claims: Claims, item: Item, mask_path: Path, side_path: Path, identity: dict,
              force: bool) -> tuple[str, str]:
    """Plan one image under its claim: ``(status, detail_or_sha)``.

    Status ``"busy"`` (another run holds the claim), ``"failed"`` (detail: why), ``"kept"``,
    ``"up to date"`` or ``"write"`` (detail: the input's SHA-256). Temporaries a killed run left beside
    the outputs are removed here, under the claim, which is released before returning.
    """
    claim = claims.try_claim(mask_path, output_folder(item))
    if claim is None:
        return "busy", "another run is writing it"
    with claim:
        claim.remove_stale_temporaries(mask_path, side_path)
        try:
            sha = sha256_file(item.image)
        except OSError as exc:   # permission denied, I/O error, ...: this image only
            return "failed", f"cannot read ({exc.strerror or exc})"
        return plan_status(mask_path, read_sidecar(side_path), sha, identity, force), sha


def report_planned(batch: Batch, item: Item, status: str, detail: str, mask_path: Path) -> None:
    """One line for an image that needs no writing (status of :func:`plan_item` other than "write")."""
    if status == "kept":
        batch.report(item.image, "kept", f"{mask_path.name} was not written by {TOOL_NAME}")
    elif status == "up to date":
        batch.report(item.image, "up to date")
    else:
        batch.report(item.image, status, detail)


def write_report(batch: Batch, settings: Settings, **extra) -> None:
    """``--report FILE.json``: the batch's statuses and counts (nothing when no report was asked for)."""
    if settings.report is not None:
        batch.write_report(settings.report, SUMMARY_ORDER, shard=f"{settings.shard[0]}/{settings.shard[1]}",
                           **extra)


def run_predict(items: list[Item], settings: Settings, *, model_factory=None, stream=None) -> int:
    """Segment ``items`` (already selected): the batch of stage 4. Returns the exit status.

    ``model_factory(settings)`` returns an object with a ``predict`` :data:`PredictFn`; it is called once,
    and only when some mask has to be written (default: :class:`NnunetModel`).
    """
    model_factory = model_factory or (lambda s: NnunetModel(s.model_dir, s.fold, s.checkpoint, s.device,
                                                            s.tile_step, s.mirroring))
    out = stream or sys.stdout
    batch = Batch("predict", stream=stream)
    identity = model_identity(settings.model_dir, settings.fold, settings.checkpoint)
    items = normalise_items(items)
    folders = sorted({output_folder(it) for it in items if it.error is None})
    claims = Claims(settings.lock_dir)
    with ExitStack() as locks:
        for folder in folders:
            try:
                lock_output_folder(locks, folder, settings.shard, settings.wait, settings.lock_dir)
            except LockBusy:
                print(f"predict: another run is writing {folder}; exiting", file=out, flush=True)
                write_report(batch, settings, folders=[str(f) for f in folders], busy_folder=str(folder))
                return 0
        for folder in folders:
            ensure_dataset_description(folder)
        todo = []
        for it in items:
            if it.error is not None:
                batch.report(it.entry, "failed", it.error)
                continue
            try:
                mask_path, side_path = output_paths(it)
                check_file(it.image)
            except InputError as exc:
                batch.report(it.entry, "failed", exc.reason)
                continue
            status, detail = plan_item(claims, it, mask_path, side_path, identity, settings.force)
            if status == "write":
                todo.append((it, mask_path, side_path, detail))
            elif status == "failed":
                batch.report(it.entry, "failed", detail)
            else:
                report_planned(batch, it, status, detail, mask_path)
        empty = []
        if todo:
            model = model_factory(settings)
            run_settings = {"TileStepSize": settings.tile_step, "Mirroring": settings.mirroring}
            for it, mask_path, side_path, sha in todo:
                start = time.perf_counter()
                claim = claims.try_claim(mask_path, output_folder(it))
                if claim is None:
                    batch.report(it.image, "busy", "another run is writing it")
                    continue
                with claim:
                    # planned again under the claim: another run may have written it since
                    status = plan_status(mask_path, read_sidecar(side_path), sha, identity, settings.force)
                    if status != "write":
                        report_planned(batch, it, status, "", mask_path)
                        continue
                    try:
                        img, data = load_image(it.image)
                        mask, n_removed = segment_image(model.predict, img, data)
                    except InputError as exc:
                        batch.report(it.image, "failed", exc.reason)
                        continue
                    except OSError as exc:
                        batch.report(it.image, "failed", f"cannot read ({exc.strerror or exc})")
                        continue
                    sidecar = make_sidecar(it, identity, sha, mask, img, n_removed, run_settings)
                    write_outputs(mask_like(mask, img), mask_path, sidecar, side_path)
                detail = (f"{sidecar['VoxelCount']} voxels, {sidecar['VolumeML']:g} mL, "
                          f"{n_removed} components removed, {time.perf_counter() - start:.1f} s")
                if sidecar["Empty"]:
                    empty.append(str(it.image))
                    detail = "EMPTY prediction (no sacrum found), empty mask written; " + detail
                batch.report(it.image, "written", detail)
    line = batch.summary(SUMMARY_ORDER)
    if empty:
        line += f"; {len(empty)} empty: " + ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else "")
    print(line, file=out, flush=True)
    write_report(batch, settings, folders=[str(f) for f in folders])
    return batch.exit_code


# ------------------------------------------------------------------------------------------------ CLI


def _shard_option(ctx, param, value):
    try:
        return parse_shard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _device_option(ctx, param, value):
    if re.fullmatch(r"cpu|cuda(:\d+)?", value):
        return value
    raise click.BadParameter(f"{value!r}: expected cpu, cuda or cuda:N")


@click.command("predict")
@click.option("--config", "config", type=click.Path(path_type=Path),
              help="Test config (original format): DATASETS_PATH + TESTING list of <dataset>/sub-*/.../<image>.")
@click.option("--datasets-path", type=click.Path(path_type=Path),
              help="Overrides the config's DATASETS_PATH (else env DATASETS_PATH, else the config's).")
@click.option("--bids", "bids_dirs", multiple=True, type=click.Path(path_type=Path),
              help="A BIDS dataset: every MRI image of sub-*/[ses-*/]anat (repeatable).")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="nnU-Net model folder (<nnUNet_results>/<Dataset>/<Trainer__Plans__Configuration>).")
@click.option("--fold", default="0", show_default=True,
              help="Fold 0-4, a list (\"0 1 2 3 4\": one ensemble, outputs averaged as nnUNetv2_predict -f does) "
                   "or all (nnU-Net's fold_all).")
@click.option("--checkpoint", type=click.Choice(["best", "final"]), default="best", show_default=True)
@click.option("--device", default="cpu", show_default=True, callback=_device_option,
              help="cpu, cuda (the first visible GPU) or cuda:N (visible GPU N, e.g. of a SLURM allocation); "
                   "bin/generate_sacrum.sh picks it from GPU (sacrum-masks check-device --torch-device).")
@click.option("--tile-step", type=click.FloatRange(0.05, 1.0), default=0.5, show_default=True,
              help="Sliding-window step as a fraction of the patch (larger = faster, fewer overlaps).")
@click.option("--mirroring/--no-mirroring", default=False, show_default=True,
              help="Test-time mirroring (slower, usually a little smoother).")
@click.option("--force", is_flag=True, help="Rewrite masks of ours even when up to date (manual masks are kept).")
@click.option("--wait", is_flag=True, help="Wait for another run's lock instead of exiting.")
@click.option("--shard", default="1/1", show_default=True, callback=_shard_option,
              help="Process shard I of N of the sorted image list (SLURM array tasks).")
@click.option("--lock-dir", type=click.Path(file_okay=False, path_type=Path), envvar="SACRUM_LOCK_DIR",
              show_envvar=True, help="Folder for the lock files, on a local flock-capable file system, for "
                                     "outputs on one without flock (then only runs on this node exclude each other).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), envvar="SACRUM_REPORT", show_envvar=True,
              help="Write every image's status and the counts to this JSON file (read by slurm-summary).")
def predict_command(config, datasets_path, bids_dirs, model_dir, fold, checkpoint, device, tile_step, mirroring,
                    force, wait, shard, lock_dir, report):
    """Write sacrum masks (BIDS derivatives/labels) for the images of a test config and/or BIDS datasets."""
    if config is None and not bids_dirs:
        raise click.UsageError("give --config FILE and/or --bids DIR")
    from .folds import format_folds, parse_folds

    try:
        fold = format_folds(parse_folds(fold))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fold") from None
    items = items_from_config(config, datasets_path) if config is not None else []
    for d in bids_dirs:
        items += items_from_bids(d)
    selected = select_items(items, shard)
    if shard != (1, 1):
        click.echo(f"predict: shard {shard[0]}/{shard[1]}: {len(selected)} of {len(items)} images")
    settings = Settings(Path(model_dir), fold, checkpoint, device, tile_step, mirroring, force, wait, shard,
                        lock_dir, report)
    sys.exit(run_predict(selected, settings))
