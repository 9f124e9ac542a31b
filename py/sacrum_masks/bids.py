"""BIDS file names: the one place where names are parsed, built and walked.

A BIDS-like name is ``<part>_<part>_..._<part><extension>``; a part is either an entity
``key-value`` (``sub-01``, ``ses-02``, ``acq-lowresSag``, ``label-sacrum``) or a bare word
(``T2w``, ``CT``, ``seg``). The *contrast* is the first bare word (``T2w`` in
``sub-01_acq-x_T2w_seg.nii.gz``), the *suffix* the last one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .errors import InputError

NIFTI_EXTENSIONS = (".nii.gz", ".nii")


def split_extension(name: str) -> tuple[str, str]:
    """Split a file name into stem and NIfTI extension (a real suffix, not a character set).

    >>> split_extension("sub-01_T2w.nii.gz")
    ('sub-01_T2w', '.nii.gz')
    >>> split_extension("sub-01_run-1_seg.nii")
    ('sub-01_run-1_seg', '.nii')
    >>> split_extension("notes.txt")
    ('notes.txt', '')
    """
    for ext in NIFTI_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    return name, ""


@dataclass(frozen=True)
class BidsName:
    """A parsed BIDS-like file name.

    >>> n = BidsName.parse("sub-001_ses-01_acq-lowresSag_T2w.nii.gz")
    >>> n.sub, n.ses, n.contrast, n.suffix, n.extension
    ('001', '01', 'T2w', 'T2w', '.nii.gz')
    >>> n.with_contrast("CT").add_suffix("seg").name
    'sub-001_ses-01_acq-lowresSag_CT_seg.nii.gz'
    >>> BidsName.parse("sub-01_T2w_label-sacrum_seg.nii.gz").entities["label"]
    'sacrum'
    """

    parts: tuple[str, ...]
    extension: str = ".nii.gz"

    @classmethod
    def parse(cls, path: str | Path) -> "BidsName":
        name = Path(path).name
        stem, ext = split_extension(name)
        parts = tuple(stem.split("_"))
        if not parts[0].startswith("sub-") or len(parts[0]) <= 4 or any(p == "" for p in parts):
            raise InputError(path, "not a BIDS file name (expected sub-<label>_..._<suffix>.nii.gz)")
        return cls(parts, ext)

    @property
    def entities(self) -> dict[str, str]:
        return dict(p.split("-", 1) for p in self.parts if "-" in p)

    @property
    def sub(self) -> str:
        return self.entities["sub"]

    @property
    def ses(self) -> str | None:
        return self.entities.get("ses")

    @property
    def bare(self) -> tuple[str, ...]:
        return tuple(p for p in self.parts if "-" not in p)

    @property
    def contrast(self) -> str | None:
        return self.bare[0] if self.bare else None

    @property
    def suffix(self) -> str | None:
        return self.bare[-1] if self.bare else None

    @property
    def stem(self) -> str:
        return "_".join(self.parts)

    @property
    def name(self) -> str:
        return self.stem + self.extension

    def with_contrast(self, contrast: str) -> "BidsName":
        """Replace the contrast word (the first bare part); other parts are kept in place."""
        if self.contrast is None:
            raise InputError(self.name, "has no contrast suffix (T1w, T2w, CT, ...)")
        i = self.parts.index(self.contrast)
        return replace(self, parts=self.parts[:i] + (contrast,) + self.parts[i + 1 :])

    def add_suffix(self, *parts: str) -> "BidsName":
        """Append parts (``"seg"``, ``"label-sacrum"``) after the existing ones."""
        return replace(self, parts=self.parts + tuple(parts))

    def drop_suffix(self, *parts: str) -> "BidsName":
        """Remove trailing parts; they must be there.

        >>> BidsName.parse("sub-01_T2w_label-sacrum_seg.nii.gz").drop_suffix("label-sacrum", "seg").name
        'sub-01_T2w.nii.gz'
        """
        n = len(parts)
        if n == 0:
            return self
        if self.parts[-n:] != tuple(parts) or len(self.parts) <= n:
            raise InputError(self.name, f"does not end with _{'_'.join(parts)}")
        return replace(self, parts=self.parts[:-n])


def iter_anat_files(root: str | Path):
    """``(path, BidsName)`` of every NIfTI file of ``sub-*/[ses-*/]anat/`` below ``root``, sorted by path.

    Hidden files (temporary files of an interrupted write) and names that are not BIDS are ignored.
    An entry with a NIfTI name that is not a regular file (a folder, a broken link, a link loop) is
    listed, so that the stage reading it reports it instead of skipping it silently.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a folder")
    found = []
    for pattern in ("sub-*/anat/sub-*", "sub-*/ses-*/anat/sub-*"):
        for path in root.glob(pattern):
            if split_extension(path.name)[1] == "":
                continue
            try:
                found.append((path, BidsName.parse(path)))
            except InputError:
                continue
    return sorted(found, key=lambda pair: pair[0])


def find_images(bids_dir: str | Path, *, include_ct: bool = False) -> list[Path]:
    """Every NIfTI image of ``sub-*/[ses-*/]anat/`` in a BIDS dataset, sorted; CT excluded by default.

    Derivatives, hidden files and names that are not BIDS are ignored.
    """
    return [path for path, bn in iter_anat_files(bids_dir) if include_ct or bn.contrast != "CT"]


def derivative_path(bids_dir: str | Path, image: str | Path, pipeline: str, *suffix: str) -> Path:
    """``<bids_dir>/derivatives/<pipeline>/<image's folder relative to bids_dir>/<stem>_<suffix>.nii.gz``.

    >>> str(derivative_path("/d", "/d/sub-01/anat/sub-01_T2w.nii.gz", "labels", "label-sacrum", "seg"))
    '/d/derivatives/labels/sub-01/anat/sub-01_T2w_label-sacrum_seg.nii.gz'
    """
    root = Path(bids_dir)
    image = Path(image)
    rel = image.parent.relative_to(root)
    name = BidsName.parse(image).add_suffix(*suffix)
    return root / "derivatives" / pipeline / rel / (name.stem + ".nii.gz")


def suffix_parts(suffix: str, option: str = "--suffix") -> tuple[str, ...]:
    """The parts of a name suffix given on the command line: ``"_label-sacrum_seg"`` -> ``("label-sacrum", "seg")``.

    Leading and trailing underscores are ignored; an empty suffix or an empty part (``"_a__b"``) is an
    :class:`InputError` naming ``option``.

    >>> suffix_parts("_label-sacrum_seg")
    ('label-sacrum', 'seg')
    >>> suffix_parts("seg", "--seg-suffix")
    ('seg',)
    >>> suffix_parts("_a__b", "--seg-suffix")
    Traceback (most recent call last):
    ...
    sacrum_masks.errors.InputError: --seg-suffix: '_a__b' is not a BIDS suffix like _seg or _label-sacrum_seg
    """
    parts = tuple(suffix.strip("_").split("_"))
    if any(p == "" for p in parts):
        raise InputError(option, f"{suffix!r} is not a BIDS suffix like _seg or _label-sacrum_seg")
    return parts


def sidecar_path(nifti_path: str | Path) -> Path:
    """The JSON sidecar of a NIfTI file: same folder, same stem, ``.json``.

    >>> sidecar_path("/d/sub-01_T2w_seg.nii.gz").as_posix(), sidecar_path("sub-01.x_T2w.nii").as_posix()
    ('/d/sub-01_T2w_seg.json', 'sub-01.x_T2w.json')
    """
    path = Path(nifti_path)
    stem, ext = split_extension(path.name)
    if not ext:
        raise ValueError(f"{path}: not a NIfTI file name (.nii or .nii.gz)")
    return path.with_name(stem + ".json")


#: ``dataset_description.json`` of ``derivatives/labels`` (CT labels of ct-labels and masks of predict share it)
LABELS_DESCRIPTION = ("Sacrum labels", "CT labels (sacrum-masks ct-labels: TotalSegmentator) and MRI sacrum masks "
                      "(sacrum-masks predict: nnU-Net v2, largest 26-connected component)")
BIDS_VERSION = "1.9.0"


def ensure_dataset_description(folder: str | Path, *, name: str, description: str | None = None) -> Path:
    """Create ``<folder>/dataset_description.json`` (a BIDS derivative) when absent; never overwrite it.

    Content: ``Name``, ``BIDSVersion``, ``DatasetType: "derivative"`` and
    ``GeneratedBy: [{"Name": "sacrum-masks", "Version": ..., "Description": description}]``; written
    atomically (a concurrent or killed writer never leaves a half file). Returns the file's path.
    """
    from . import __version__
    from .nifti import write_json_atomic  # here: parsing names must not need nibabel

    path = Path(folder) / "dataset_description.json"
    if not path.exists():
        generated = {"Name": "sacrum-masks", "Version": __version__}
        if description:
            generated["Description"] = description
        write_json_atomic({"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
                           "GeneratedBy": [generated]}, path)
    return path
