"""Stage 2: a split config (TYPE LABEL) to an nnU-Net v2 raw dataset.

``$nnUNet_raw/Dataset<NNN>_<name>/``::

    imagesTr/<name>-sub-<label>_<NNN>_0000.nii.gz   labelsTr/<name>-sub-<label>_<NNN>.nii.gz   (TRAINING + VALIDATION)
    imagesTs/...                                    labelsTs/...                                (TESTING)
    dataset.json        nnunetv2 generate_dataset_json: background 0, sacrum 1, .nii.gz, numTraining
    conversion.json     case id -> source image and label (relative to DATASETS_PATH, sha256), the inputs,
                        the config's SEED (stage 3 draws its grouped folds with it, sacrum_masks.splits)
    conversion_invalid.txt   only with --skip-invalid and invalid pairs: one line per pair

As in the original ``convert_config_to_nnunet.py``: case ids are ``<name>-sub-<label>_<NNN>``
with a running number (``%03d``) over TRAINING, then VALIDATION (both to ``*Tr``), continued
into TESTING (``*Ts``); one channel, ``_0000``; image and label are reoriented to SCT "RPI"
(nibabel axis codes L, A, S) before they are compared and saved. Unlike the original, a pair
that fails (missing, unreadable, different shape/spacing/affine, label values not {0, 1}) stops
the stage with every failure listed, unless ``skip_invalid``; the label is written on the exact
grid of its reoriented image (uint8, qform = sform).

The dataset is built in a hidden sibling folder and renamed into place: a failed or killed
conversion never leaves half a dataset where nnU-Net would find it.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from . import RPI_AXCODES, __version__
from .batch import Batch, folder_lock
from .bids import BidsName
from .config import SPLIT_KEYS, entry_path, image_from_label, load_config, read_json_object_or_none, relative_entry
from .errors import InputError
from .nifti import load_image, mask_like, save_nifti_atomic, sha256_file, to_rpi, write_json_atomic

#: Largest difference (mm) allowed between the image's and the label's affines after reorientation.
AFFINE_TOL_MM = 1e-3
CHANNEL = "0000"
LABELS = {"background": 0, "sacrum": 1}
FILE_ENDING = ".nii.gz"


@dataclass(frozen=True)
class Case:
    """One image/label pair of the config, in conversion order."""

    split: str          # "Tr" or "Ts"
    config_key: str     # TRAINING, VALIDATION or TESTING
    label: Path         # absolute
    image: Path         # absolute
    label_rel: str      # relative to DATASETS_PATH
    image_rel: str

    @property
    def subject(self) -> str:
        return "sub-" + BidsName.parse(self.image).sub


def plan_cases(config: dict) -> list[Case]:
    """The pairs of a loaded LABEL config, TRAINING + VALIDATION (``Tr``) then TESTING (``Ts``).

    Each label's image is :func:`~sacrum_masks.config.image_from_label`; it must stay inside
    DATASETS_PATH like the label itself.
    """
    if config.get("TYPE") != "LABEL":
        raise InputError(config.get("CONFIG_PATH", "config"),
                         f"TYPE is {config.get('TYPE')!r}: convert needs a LABEL config (label paths)")
    root = config["DATASETS_PATH"]
    cases = []
    for key in SPLIT_KEYS:
        for i, label in enumerate(config[key]):
            label_rel = relative_entry(config, label)
            image_rel = image_from_label(label_rel).as_posix()
            image = entry_path(root, image_rel, f"{key}[{i}] image")
            cases.append(Case("Ts" if key == "TESTING" else "Tr", key, label, image, label_rel, image_rel))
    return cases


def pair_problems(img_rpi, lbl_rpi, label_data: np.ndarray, tol: float = AFFINE_TOL_MM) -> list[str]:
    """What is wrong with an image/label pair already reoriented to RPI (empty list: nothing).

    Checks: same shape, same voxel spacing and affines within ``tol`` mm, label values in {0, 1}.
    """
    problems = []
    if tuple(img_rpi.shape[:3]) != tuple(lbl_rpi.shape[:3]):
        problems.append(f"shape {tuple(lbl_rpi.shape[:3])} differs from the image's {tuple(img_rpi.shape[:3])}")
        return problems
    sp_img = np.sqrt((img_rpi.affine[:3, :3] ** 2).sum(axis=0))
    sp_lbl = np.sqrt((lbl_rpi.affine[:3, :3] ** 2).sum(axis=0))
    if not np.allclose(sp_img, sp_lbl, atol=tol, rtol=0):
        problems.append(f"spacing {np.round(sp_lbl, 4).tolist()} differs from the image's {np.round(sp_img, 4).tolist()}")
    elif not np.allclose(img_rpi.affine, lbl_rpi.affine, atol=tol, rtol=0):
        diff = float(np.abs(img_rpi.affine - lbl_rpi.affine).max())
        problems.append(f"affine differs from the image's by up to {diff:.4g} mm (tolerance {tol:g})")
    values = np.unique(label_data)
    extra = [v for v in values.tolist() if v not in (0, 1)]
    if extra:
        shown = ", ".join(f"{v:g}" for v in extra[:5]) + (", ..." if len(extra) > 5 else "")
        problems.append(f"label values must be 0 and 1, found {shown}")
    return problems


def convert_pair(image_path, label_path, tol: float = AFFINE_TOL_MM):
    """Load an image and its label, reorient both to RPI (L, A, S) and check they match.

    Returns
    -------
    (nibabel.Nifti1Image, nibabel.Nifti1Image)
        The reoriented image (float64 data stored as float32) and the uint8 label on the image's
        exact grid (same affine as qform and sform).

    Raises
    ------
    InputError
        Unreadable files or any problem of :func:`pair_problems` (all named, one line).
    """
    img, img_data = load_image(image_path)
    lbl, lbl_data = load_image(label_path)
    if img_data.dtype == np.float64:
        img_data = img_data.astype(np.float32)
    img_rpi = to_rpi(img, img_data)
    lbl_rpi = to_rpi(lbl, lbl_data)
    lbl_rpi_data = np.asanyarray(lbl_rpi.dataobj)
    problems = pair_problems(img_rpi, lbl_rpi, lbl_rpi_data, tol)
    if problems:
        raise InputError(label_path, "; ".join(problems))
    return img_rpi, mask_like(lbl_rpi_data, img_rpi)


def case_id(dname: str, subject: str, number: int) -> str:
    """``<name>-sub-<label>_<NNN>`` as in the original.

    >>> case_id("SacrumDataset", "sub-053", 7)
    'SacrumDataset-sub-053_007'
    """
    return f"{dname}-{subject}_{number:03d}"


def dataset_folder_name(dnum: int, dname: str) -> str:
    """``Dataset<NNN>_<name>``; NNN in 1..999, name of letters, digits and ``-``."""
    if not 1 <= dnum <= 999:
        raise InputError("-dnum", f"{dnum} is not in 1..999")
    if not dname or not all(c.isascii() and (c.isalnum() or c == "-") for c in dname):
        raise InputError("-dname", f"{dname!r}: use letters, digits and '-' only")
    return f"Dataset{dnum:03d}_{dname}"


def other_datasets(dnum: int, name: str, folders) -> list[Path]:
    """Folders ``Dataset<NNN>_*`` with this number but another name (nnU-Net would pick either)."""
    found = []
    for folder in folders:
        if folder and Path(folder).is_dir():
            found += [p for p in sorted(Path(folder).glob(f"Dataset{dnum:03d}_*")) if p.is_dir() and p.name != name]
    return found


def input_fingerprint(cases: list[Case], dname: str) -> list[dict]:
    """What the dataset is made from: each pair's relative paths, split and sha256 (None when unreadable)."""

    def sha(path):
        try:
            return sha256_file(path)
        except OSError:
            return None

    return [{"split": c.config_key, "image": c.image_rel, "label": c.label_rel,
             "image_sha256": sha(c.image), "label_sha256": sha(c.label)} for c in cases] + [{"name": dname}]


@dataclass
class ConvertResult:
    """What :func:`convert_dataset` did."""

    folder: Path
    status: str                                   # "written", "up to date" or "failed"
    cases: dict = field(default_factory=dict)     # case id -> record
    invalid: list = field(default_factory=list)   # [{"image", "label", "reason"}]
    num_training: int = 0
    num_test: int = 0


def _is_up_to_date(target: Path, fingerprint: list[dict]) -> tuple[bool, str]:
    record_path = target / "conversion.json"
    if not record_path.is_file():
        return False, "was not made by sacrum-masks convert (no conversion.json)"
    record = read_json_object_or_none(record_path)
    if record is None:
        return False, "has an unreadable conversion.json"
    if record.get("Inputs") != fingerprint:
        old = {(d.get("split"), d.get("image"), d.get("label"), d.get("image_sha256"), d.get("label_sha256"))
               for d in record.get("Inputs", []) if isinstance(d, dict)}
        new = {(d.get("split"), d.get("image"), d.get("label"), d.get("image_sha256"), d.get("label_sha256"))
               for d in fingerprint}
        return False, f"differs from the config ({len(old ^ new)} pair(s) added, removed or changed)"
    for cid, rec in record.get("Cases", {}).items():
        sub = rec.get("split", "Tr")
        if not (target / f"images{sub}" / f"{cid}_{CHANNEL}{FILE_ENDING}").is_file() or \
                not (target / f"labels{sub}" / f"{cid}{FILE_ENDING}").is_file():
            return False, f"lacks files of case {cid}"
    if not (target / "dataset.json").is_file():
        return False, "lacks dataset.json"
    return True, ""


def _remove_stale(path_out: Path, name: str) -> None:
    for stale in path_out.glob(f".{name}.*"):
        if stale.is_dir() and (".tmp-" in stale.name or ".old-" in stale.name):
            shutil.rmtree(stale)


def convert_dataset(config: dict, path_out, dnum: int = 300, dname: str = "SacrumDataset", *,
                    force: bool = False, skip_invalid: bool = False, tol: float = AFFINE_TOL_MM,
                    batch: Batch | None = None, extra_roots=()) -> ConvertResult:
    """Write ``<path_out>/Dataset<dnum>_<dname>`` from a loaded LABEL config (:func:`load_config`).

    Parameters
    ----------
    config : dict
        From :func:`sacrum_masks.config.load_config`.
    path_out : path-like
        The nnU-Net raw folder.
    force : bool
        Replace an existing dataset of that name even when it is up to date or differs.
    skip_invalid : bool
        Leave out invalid pairs (listed in ``conversion_invalid.txt``) instead of failing.
    tol : float
        Affine tolerance (mm) between image and label after reorientation.
    batch : Batch, optional
        Where per-case lines go (default ``Batch("convert")``).
    extra_roots : iterable of path-like
        Other nnU-Net folders (preprocessed, results) searched for a clashing ``Dataset<dnum>_*``.

    Raises
    ------
    InputError
        Another dataset with this number, an existing different dataset without ``force``, no
        training case. LockBusy when another conversion of this number runs.
    """
    batch = batch or Batch("convert")
    name = dataset_folder_name(dnum, dname)
    path_out = Path(path_out).absolute()
    clash = other_datasets(dnum, name, [path_out, *extra_roots])
    if clash:
        raise InputError(clash[0], f"another dataset has number {dnum:03d}; nnU-Net would pick either: "
                         f"remove it or choose another -dnum")
    cases = plan_cases(config)
    target = path_out / name
    with folder_lock(path_out, name=f".{name}.lock"):
        _remove_stale(path_out, name)
        fingerprint = input_fingerprint(cases, dname)
        if target.exists():
            fresh, why = _is_up_to_date(target, fingerprint)
            if fresh and not force:
                click.echo(f"convert: up to date  {target} (pass --force to rebuild)")
                return ConvertResult(target, "up to date")
            if not force:
                raise InputError(target, f"exists and {why}: pass --force to replace it")
        tmp = path_out / f".{name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            result = _build(cases, tmp, dname, tol, skip_invalid, batch)
            result.folder = target
            if result.status == "failed":
                return result
            _write_records(tmp, name, config, result, fingerprint, skip_invalid)
            if target.exists():
                old = path_out / f".{name}.old-{os.getpid()}"
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old)
            else:
                os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return result


def _build(cases, tmp: Path, dname: str, tol: float, skip_invalid: bool, batch: Batch) -> ConvertResult:
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    result = ConvertResult(tmp, "written")
    counter = 0
    for case in cases:
        try:
            img_rpi, mask_rpi = convert_pair(case.image, case.label, tol)
        except InputError as exc:
            if exc.path == str(case.label):
                reason = exc.reason
            elif exc.path == str(case.image):
                reason = f"image {case.image_rel}: {exc.reason}"
            else:
                reason = str(exc)
            result.invalid.append({"image": case.image_rel, "label": case.label_rel, "reason": reason})
            batch.report(case.label_rel, "skipped" if skip_invalid else "failed", reason)
            continue
        counter += 1
        cid = case_id(dname, case.subject, counter)
        save_nifti_atomic(img_rpi, tmp / f"images{case.split}" / f"{cid}_{CHANNEL}{FILE_ENDING}")
        save_nifti_atomic(mask_rpi, tmp / f"labels{case.split}" / f"{cid}{FILE_ENDING}")
        result.cases[cid] = {"split": case.split, "config_split": case.config_key,
                             "image": case.image_rel, "label": case.label_rel}
        if case.split == "Tr":
            result.num_training += 1
        else:
            result.num_test += 1
        batch.report(cid, "converted", f"{case.label_rel}")
    if result.invalid and not skip_invalid:
        result.status = "failed"
    elif result.num_training == 0:
        raise InputError(cases[0].label if cases else "config", "no valid TRAINING/VALIDATION pair: nothing to train on")
    return result


def _write_records(tmp: Path, name: str, config: dict, result: ConvertResult, fingerprint, skip_invalid) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(
        str(tmp), channel_names={0: "multi_contrasts"}, labels=dict(LABELS),
        num_training_cases=result.num_training, file_ending=FILE_ENDING, dataset_name=name,
        overwrite_image_reader_writer="SimpleITKIO",
        description=f"Sacrum masks; {result.num_training} training, {result.num_test} test cases; "
                    f"images and labels reoriented to RPI ({''.join(RPI_AXCODES)} nibabel axis codes)",
        license="see the source datasets", converted_by=f"sacrum-masks {__version__} convert",
    )
    hashes = {(d["image"], d["label"]): d for d in fingerprint if "image" in d}
    cases = {}
    for cid, rec in result.cases.items():
        h = hashes.get((rec["image"], rec["label"]), {})
        cases[cid] = {**rec, "image_sha256": h.get("image_sha256"), "label_sha256": h.get("label_sha256")}
    write_json_atomic({
        "GeneratedBy": {"Name": "sacrum-masks convert", "Version": __version__},
        "Config": str(config.get("CONFIG_PATH", "")),
        "DatasetsPath": str(config["DATASETS_PATH"]),
        "Orientation": "RPI (nibabel " + ",".join(RPI_AXCODES) + ")",
        "SkipInvalid": bool(skip_invalid),
        "Seed": int(config.get("SEED", 0)),   # seeds the grouped folds 1-4 of splits_final.json (stage 3)
        "Cases": cases,
        "Invalid": result.invalid,
        "Inputs": fingerprint,
    }, tmp / "conversion.json")
    if result.invalid:
        lines = [f"{d['label']}: {d['reason']}" for d in result.invalid]
        (tmp / "conversion_invalid.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@click.command("convert")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Split config of TYPE LABEL (init-config).")
@click.option("--datasets-path", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding the BIDS datasets [default: env DATASETS_PATH, else the config's].")
@click.option("--path-out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="nnU-Net raw folder [default: $nnUNet_raw].")
@click.option("-dnum", "--dataset-number", "dnum", type=int, default=300, show_default=True,
              help="nnU-Net dataset number.")
@click.option("-dname", "--dataset-name", "dname", default="SacrumDataset", show_default=True,
              help="nnU-Net dataset name.")
@click.option("--force", is_flag=True, help="Rebuild even when the dataset is up to date or differs.")
@click.option("--skip-invalid", is_flag=True,
              help="Leave out invalid pairs (listed in conversion_invalid.txt) instead of stopping.")
def convert_command(config_path, datasets_path, path_out, dnum, dname, force, skip_invalid):
    """Make the nnU-Net raw dataset Dataset<NNN>_<name> from a LABEL split config.

    TRAINING + VALIDATION go to imagesTr/labelsTr, TESTING to imagesTs/labelsTs; images and labels
    are reoriented to RPI (nibabel L, A, S). Re-running does nothing when the dataset is up to date.
    """
    if path_out is None:
        if not os.environ.get("nnUNet_raw"):
            raise InputError("--path-out", "not given and nnUNet_raw is not set (source env.sh or pass --path-out)")
        path_out = Path(os.environ["nnUNet_raw"])
    config = load_config(config_path, datasets_path)
    batch = Batch("convert")
    extra = [os.environ.get("nnUNet_preprocessed"), os.environ.get("nnUNet_results")]
    result = convert_dataset(config, path_out, dnum, dname, force=force, skip_invalid=skip_invalid,
                             batch=batch, extra_roots=[e for e in extra if e])  # LockBusy: exit 75 (cli)
    if result.status == "up to date":
        return
    click.echo(batch.summary(["converted", "skipped", "failed"]))
    if result.status == "failed":
        click.echo(f"convert: stopped: {len(result.invalid)} invalid pair(s), nothing written "
                   "(fix them or pass --skip-invalid)", err=True)
        sys.exit(1)
    note = f"; invalid pairs listed in {result.folder / 'conversion_invalid.txt'}" if result.invalid else ""
    click.echo(f"convert: wrote {result.folder} ({result.num_training} training, {result.num_test} test cases{note})")
