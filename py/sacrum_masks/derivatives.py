"""The one writer of BIDS derivatives (stages 0, 1 and 4; the QC folder's BIDS files).

Modelled on niworkflows' ``DerivativesDataSink``: a caller says what it made (arrays on an image's grid,
a few sidecar fields); this module decides the path, the header, the sidecar schema, ownership, the
write order and whether anything needs doing. See docs/DESIGN.md, "Derivatives".

Layout
------
``DerivativeFolder.root`` is ``<dataset>/derivatives/<pipeline>`` (in place), or with an output root
``DIR``, ``DIR/<dataset name>/derivatives/<pipeline>``: the same layout under another root, so that a
read-only raw dataset is never written to. Each folder holds ``dataset_description.json``
(``DatasetType: derivative``, ``GeneratedBy``, ``DatasetLinks`` naming the raw dataset ``raw`` and any
other input dataset), a ``README`` and a ``.bidsignore`` declaring NeuroPoly's names (``*_seg.*``,
``*_label-sacrum_seg.*``), which are not BIDS suffixes but are what SCT and the seed's users read.

Sidecar schema (:func:`sidecar`)
--------------------------------
``GeneratedBy`` (list; our entry is the LAST one: tools such as SCT's ``manual-correction`` append
theirs, and a file whose last entry is another tool's is a correction, so no longer ours),
``Sources`` (BIDS URIs ``bids:raw:sub-01/anat/sub-01_T2w.nii.gz``, resolved through ``DatasetLinks``),
``SourcesSHA256`` (URI -> SHA-256), ``Settings`` (every setting that changes the output), then the
caller's fields.

Rules
-----
* Ownership: an output without a sidecar, with a sidecar that is not ours, or whose last
  ``GeneratedBy`` entry is not ours, is never written over, not even with ``force`` ("kept").
* Up to date: the output exists, the sidecar is ours, not pending, its ``SourcesSHA256`` equals the
  inputs' current checksums (keyed by URI, so a moved or remounted data root is still up to date) and
  its ``Settings`` equal the current ones.
* One crash-safe write order (:meth:`DerivativeFolder.write`): a *pending* sidecar first (ours, no
  checksums: it claims the file and can never look up to date), then the outputs (each atomic), then
  the final sidecar. A run killed anywhere leaves "write" for the next run, never "kept" or "up to date"
  for a stale or half-made output.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .bids import BIDS_VERSION, BidsName, sidecar_path, split_extension
from .errors import InputError
from .nifti import remove_stale_temporaries, save_nifti_atomic, sha256_file, write_json_atomic, write_text_atomic

TOOL = "sacrum-masks"
RAW = "raw"
#: NeuroPoly's derivative names (not BIDS suffixes) and the QC report's files, declared to the validator
BIDSIGNORE = ("*_seg.nii.gz", "*_seg.nii", "*_seg.json", "*_label-sacrum_seg.*", "*_seg.*", "*.png",
              "index.html", "qc.json", "review.json", "*.lock")
STATUSES = ("write", "up to date", "kept")
IGNORE_HEADER = "# NeuroPoly derivative names (not BIDS suffixes) and QC files; written by sacrum-masks"


# --------------------------------------------------------------------------------------------- URIs


def bids_uri(dataset_name: str, rel: str | Path) -> str:
    """``bids:<dataset>:<path within the dataset>`` (BIDS URI, relative to that dataset's root).

    >>> bids_uri("raw", "sub-01/anat/sub-01_T2w.nii.gz")
    'bids:raw:sub-01/anat/sub-01_T2w.nii.gz'
    """
    return f"bids:{dataset_name}:{Path(rel).as_posix()}"


def _link_value(target: Path, root: Path, absolute: bool) -> str:
    """How ``DatasetLinks`` names ``target`` from ``root``: a relative path in place (a moved data root
    keeps it valid), an absolute ``file://`` URI when written under another output root."""
    if absolute:
        return target.resolve().as_uri()
    return Path(os.path.relpath(target.resolve(), root.resolve())).as_posix()


# ------------------------------------------------------------------------------------------ folders


@dataclass(frozen=True)
class DerivativeFolder:
    """One derivative dataset: where it is, which raw dataset it comes from, who writes it.

    A plain, picklable record (paths and strings): a worker process can take one and write through it.
    Build it with :func:`prepare`.
    """

    dataset: Path | None              # the raw dataset (read only); None for a report on several datasets
    pipeline: str                     # labels, reg-labels, qc-sacrum, ...
    root: Path                        # <output root or dataset>/derivatives/<pipeline>
    program: str                      # GeneratedBy Name of our sidecars ("sacrum-masks register-ct", ...)
    description: str = ""
    title: str = ""
    links: tuple[tuple[str, Path], ...] = ()   # (name, folder) of input datasets besides the raw one
    external: bool = False            # written under an --output-dir (DatasetLinks are absolute)

    # -- names ----------------------------------------------------------------------------------

    def output_path(self, image: str | Path, *suffix: str, extension: str = ".nii.gz") -> Path:
        """The derivative of ``image`` (a file of the raw dataset): same folder below the root, the
        image's BIDS name with ``suffix`` parts appended (NeuroPoly names: ``"label-sacrum", "seg"``).

        >>> f = DerivativeFolder(Path("/d"), "labels", Path("/d/derivatives/labels"), "sacrum-masks")
        >>> f.output_path("/d/sub-01/ses-1/anat/sub-01_ses-1_T2w.nii.gz", "label-sacrum", "seg").as_posix()
        '/d/derivatives/labels/sub-01/ses-1/anat/sub-01_ses-1_T2w_label-sacrum_seg.nii.gz'
        """
        image = Path(image)
        if split_extension(image.name)[1] == "":
            raise InputError(image, "not a NIfTI file (.nii or .nii.gz)")
        rel = self.raw_rel(image).parent
        return self.root / rel / (BidsName.parse(image).add_suffix(*suffix).stem + extension)

    def raw_rel(self, path: str | Path) -> Path:
        """``path`` relative to the raw dataset (InputError when it is not inside it)."""
        try:
            return Path(os.path.abspath(path)).relative_to(os.path.abspath(self.dataset))
        except ValueError:
            raise InputError(path, f"not inside the raw dataset {self.dataset}") from None

    def uri(self, path: str | Path) -> str:
        """The BIDS URI of an input: ``bids:raw:...`` for the raw dataset, ``bids:<name>:...`` for a
        linked dataset (the most specific folder wins: ``derivatives/labels`` lies inside the raw one)."""
        p = Path(os.path.abspath(path))
        best = None
        for name, folder in ((RAW, self.dataset), *self.links):
            try:
                rel = p.relative_to(os.path.abspath(folder))
            except ValueError:
                continue
            if best is None or len(rel.parts) < len(best[1].parts):
                best = (name, rel)
        if best is None:
            raise InputError(path, f"not inside the raw dataset {self.dataset} or a linked dataset")
        return bids_uri(*best)

    # -- the folder's own files -------------------------------------------------------------------

    def dataset_description(self) -> dict:
        links = {RAW: _link_value(self.dataset, self.root, self.external)} if self.dataset is not None else {}
        for name, folder in self.links:
            links[name] = _link_value(folder, self.root, self.external)
        generated = {"Name": TOOL, "Version": __version__}
        if self.description:
            generated["Description"] = self.description
        desc = {"Name": self.title or self.pipeline, "BIDSVersion": BIDS_VERSION,
                "DatasetType": "derivative", "GeneratedBy": [generated]}
        return {**desc, "DatasetLinks": links} if links else desc

    def readme(self) -> str:
        source = (f"Derivative of the BIDS dataset `{self.dataset.name}` (DatasetLinks \"raw\" in "
                  f"dataset_description.json)" if self.dataset is not None else "Derivative of BIDS datasets")
        return (f"# {self.title or self.pipeline}\n\n{self.description or self.pipeline}.\n\n"
                f"{source}, written by sacrum-masks {__version__}.\n\n"
                "File names follow NeuroPoly's conventions (`*_seg`, `*_label-sacrum_seg`, read by the Spinal "
                "Cord Toolbox), which are not BIDS suffixes: `.bidsignore` declares them. Each output's JSON "
                "sidecar records what made it (GeneratedBy), its inputs as BIDS URIs (Sources, "
                "SourcesSHA256) and the settings that change it (Settings). A file whose sidecar's last "
                "GeneratedBy entry is another tool (a manual correction) is never overwritten.\n")

    def ensure(self) -> None:
        """Create the folder with ``dataset_description.json``, ``README`` and ``.bidsignore``.

        Files we wrote before are brought up to date (a moved root, new links); a description, README or
        .bidsignore written by someone else (a dataset's own ``derivatives/labels``) is never touched. A path
        component that is a file is one InputError.
        """
        for parent in (self.root, *self.root.parents):
            if parent.exists() and not parent.is_dir():
                raise InputError(parent, "is a file, not a folder: cannot write derivatives below it")
            if parent.exists():
                break
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(self.root, f"cannot create the derivatives folder ({exc.strerror or exc})") from None
        desc_path = self.root / "dataset_description.json"
        old = _read_json(desc_path)
        if old is None or (_is_ours(old, TOOL) and old != _merged_description(old, self.dataset_description())):
            write_json_atomic(_merged_description(old or {}, self.dataset_description()), desc_path)
        if not (self.root / "README").exists():
            write_text_atomic(self.readme(), self.root / "README")
        ignore = self.root / ".bidsignore"   # ours (first line IGNORE_HEADER) is kept complete; another's is left alone
        have = ignore.read_text(encoding="utf-8").splitlines() if ignore.is_file() else None
        if have is None or (have[:1] == [IGNORE_HEADER] and any(p not in have for p in BIDSIGNORE)):
            have = have or [IGNORE_HEADER]
            write_text_atomic("\n".join(have + [p for p in BIDSIGNORE if p not in have]) + "\n", ignore)

    # -- outputs ---------------------------------------------------------------------------------

    def checksums(self, inputs: dict[str, str | Path]) -> dict[str, str]:
        """``{uri: sha256}`` of the inputs (InputError, one line, for one that cannot be read)."""
        sums = {}
        for uri, path in inputs.items():
            try:
                sums[uri] = sha256_file(path)
            except OSError as exc:
                raise InputError(path, f"cannot read ({exc.strerror or exc})") from None
        return sums

    def plan(self, image: str | Path, outputs, inputs: dict[str, str | Path], settings: dict,
             force: bool = False, *, clean: bool = True) -> "Plan":
        """What to do for one image's outputs: a :class:`Plan` whose ``status`` is one of :data:`STATUSES`.

        ``outputs``: the output paths (the first one carries the sidecar); ``inputs``: ``{uri: path}``
        (:meth:`uri`); ``settings``: every setting that changes the output (JSON values); ``clean``:
        remove the temporary files a killed run left (only while holding the folder's lock).
        Raises InputError for a sidecar that is there but not a JSON object, for an output path that is
        a folder, and for a file that is not ours and no longer on its image's grid.
        """
        outputs = [Path(p) for p in outputs]
        side = sidecar_path(outputs[0])
        if clean:
            remove_stale_temporaries(*outputs, side)   # left by a killed run; callers hold the folder's lock
        for p in (*outputs, side):
            if p.is_dir():
                raise InputError(p, "is a folder where an output file belongs: remove it")
        meta = read_sidecar(side)
        exists = [p.exists() for p in outputs]
        settings = _json_roundtrip(settings)
        sums = self.checksums(inputs)
        if (any(exists) or meta is not None) and not is_ours(meta, self.program):
            _check_grid(outputs[0], image)
            return Plan("kept", sums, settings, f"{outputs[0].name} was not written by {self.program}")
        if not all(exists) or force or meta.get("Pending"):
            return Plan("write", sums, settings)
        if meta.get("SourcesSHA256") == sums and meta.get("Settings") == settings:
            return Plan("up to date", sums, settings)
        return Plan("write", sums, settings)

    def write(self, outputs: dict, fields: dict, plan: "Plan", generated: dict | None = None,
              before: list | None = None) -> dict:
        """Write ``outputs`` (``{path: nibabel image}``; the first carries the sidecar) in the one order:
        pending sidecar, outputs, final sidecar. Returns the sidecar written.

        ``fields``: the caller's sidecar keys; ``generated``: extra keys of our ``GeneratedBy`` entry;
        ``before``: ``GeneratedBy`` entries of the tools we ran (TotalSegmentator), listed before ours.
        """
        if plan.status != "write":
            raise ValueError(f"plan is {plan.status!r}: nothing to write")
        paths = list(outputs)
        side = sidecar_path(paths[0])
        final = sidecar(self.program, plan, fields, generated, before)
        pending = {**final, "SourcesSHA256": {}, "Pending": True}
        fresh = [p for p in (side, *paths) if not Path(p).exists()]
        try:
            write_json_atomic(pending, side)
            for path, img in outputs.items():
                save_nifti_atomic(img, path)
            write_json_atomic(final, side)
        except BaseException:
            # a failed write (a full disk) takes back the files it created; a rewrite keeps its pending
            # sidecar, which says "out of date" to the next run
            for p in fresh:
                Path(p).unlink(missing_ok=True)
            raise
        return final


@dataclass(frozen=True)
class Plan:
    """The decision of :meth:`DerivativeFolder.plan`, with what the sidecar will record."""

    status: str
    sources_sha256: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    reason: str = ""

    def __str__(self) -> str:
        return self.status


def prepare(dataset: str | Path, pipeline: str, *, program: str, output_root: str | Path | None = None,
            description: str = "", title: str = "", links: dict[str, str | Path] | None = None) -> DerivativeFolder:
    """The :class:`DerivativeFolder` of ``pipeline`` for a raw ``dataset`` (nothing is created yet).

    With ``output_root`` the folder is ``<output_root>/<dataset name>/derivatives/<pipeline>``; an
    output root inside the raw dataset is refused (InputError): that mode is for read-only datasets.
    ``links``: other input datasets (``{"labels": <dataset>/derivatives/labels}``) for ``Sources`` URIs.
    """
    dataset = Path(dataset).resolve()
    if not dataset.is_dir():
        raise InputError(dataset, "not a folder (expected a BIDS dataset)")
    external = output_root is not None
    if external:
        out = Path(output_root).resolve()
        if out == dataset or dataset in out.parents:
            where = " (inside its sub-* folders)" if any(p.name.startswith("sub-") for p in (out, *out.parents)) else ""
            raise InputError(output_root, f"--output-dir is inside the raw dataset {dataset}{where}: it must be "
                                          f"elsewhere (leave it out to write {dataset}/derivatives)")
        if out.exists() and not out.is_dir():
            raise InputError(output_root, "--output-dir is a file, not a folder")
        root = out / dataset.name / "derivatives" / pipeline
    else:
        root = dataset / "derivatives" / pipeline
    link_pairs = tuple((name, Path(p).resolve()) for name, p in sorted((links or {}).items()))
    return DerivativeFolder(dataset, pipeline, root, program, description, title, link_pairs, external)


def raw_dataset_of(deriv_dir: str | Path) -> Path:
    """The raw dataset a derivative folder was made from: its ``DatasetLinks.raw`` (a relative path or a
    ``file://`` URI), else the folder's grandparent (``<dataset>/derivatives/<pipeline>``)."""
    deriv_dir = Path(deriv_dir).resolve()
    desc = _read_json(deriv_dir / "dataset_description.json") or {}
    raw = (desc.get("DatasetLinks") or {}).get(RAW) if isinstance(desc.get("DatasetLinks"), dict) else None
    if isinstance(raw, str) and raw:
        if raw.startswith("file://"):
            from urllib.parse import unquote, urlparse
            return Path(unquote(urlparse(raw).path))
        if "://" not in raw:
            return (deriv_dir / raw).resolve()
    return deriv_dir.parent.parent


# --------------------------------------------------------------------------------------- sidecars


def generated_entry(program: str, extra: dict | None = None) -> dict:
    """Our ``GeneratedBy`` entry: name, version, date, then ``extra``."""
    return {"Name": program, "Version": __version__,
            "Date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(extra or {})}


def sidecar(program: str, plan: Plan, fields: dict, generated: dict | None = None, before: list | None = None) -> dict:
    """The sidecar schema: ``GeneratedBy`` (ours last), ``Sources``, ``SourcesSHA256``, ``Settings``, fields.

    >>> s = sidecar("sacrum-masks", Plan("write", {"bids:raw:sub-01/anat/sub-01_T2w.nii.gz": "ab"}, {"a": 1}), {"X": 2})
    >>> s["GeneratedBy"][-1]["Name"], s["Sources"], s["Settings"], s["X"]
    ('sacrum-masks', ['bids:raw:sub-01/anat/sub-01_T2w.nii.gz'], {'a': 1}, 2)
    """
    return {"GeneratedBy": [*(before or []), generated_entry(program, generated)],
            "Sources": list(plan.sources_sha256), "SourcesSHA256": dict(plan.sources_sha256),
            "Settings": dict(plan.settings), **fields}


def read_sidecar(path: str | Path) -> dict | None:
    """The sidecar's JSON object; None when there is none; InputError (one line) when it is not JSON."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else f"not JSON ({type(exc).__name__})"
        raise InputError(path, f"sidecar {reason}: fix or remove it (its output is left alone)") from None
    if not isinstance(data, dict):
        kind = {list: "an array", type(None): "null", str: "a string", bool: "a boolean"}.get(type(data), "a number")
        raise InputError(path, f"sidecar is {kind}, not a JSON object: fix or remove it (its output is left alone)")
    return data


def is_ours(meta: dict | None, program: str) -> bool:
    """True when the sidecar's LAST ``GeneratedBy`` entry is ``program``.

    >>> is_ours({"GeneratedBy": [{"Name": "sacrum-masks"}]}, "sacrum-masks")
    True
    >>> is_ours({"GeneratedBy": [{"Name": "sacrum-masks"}, {"Name": "manual-correction"}]}, "sacrum-masks")
    False
    """
    return _is_ours(meta, program)


def _is_ours(meta, program: str) -> bool:
    gen = meta.get("GeneratedBy") if isinstance(meta, dict) else None
    return isinstance(gen, list) and bool(gen) and isinstance(gen[-1], dict) and gen[-1].get("Name") == program


def _read_json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _merged_description(old: dict, new: dict) -> dict:
    """A description of ours refreshed: our keys replaced, DatasetLinks merged, others' keys kept."""
    if "DatasetLinks" not in new:
        return {**old, **new}
    links = {**(old.get("DatasetLinks") or {}), **new["DatasetLinks"]} if isinstance(old.get("DatasetLinks"), dict) \
        else new["DatasetLinks"]
    return {**old, **new, "DatasetLinks": links}


def _json_roundtrip(obj):
    return json.loads(json.dumps(obj))


def _check_grid(output: Path, image: str | Path) -> None:
    """A file that is not ours must still lie on its image's grid; InputError when the image was replaced."""
    import nibabel as nib
    import numpy as np

    if not (output.is_file() and Path(image).is_file()):
        return
    try:
        a, b = nib.load(str(output)), nib.load(str(image))
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError):
        return   # not a NIfTI we can read: the stage that reads it reports it
    if tuple(a.shape[:3]) != tuple(b.shape[:3]) or not np.allclose(a.affine, b.affine, atol=1e-3, rtol=0):
        raise InputError(output, f"not written by us and no longer on the grid of {Path(image).name} "
                                 f"(shape {tuple(a.shape[:3])} vs {tuple(b.shape[:3])}; the image was replaced?): "
                                 "redo or remove the correction")
