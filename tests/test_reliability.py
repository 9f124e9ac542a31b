"""Reliability campaign: hostile names, a corpus of bad inputs, raw data never modified, SIGKILLs, concurrent runs.

Stage 4 uses a stand-in for the network (tests/test_predict.py's threshold model and fake model folder):
nnU-Net weights cannot be trained in a unit test's time; everything around the network is real.
Permission tests (chmod 000) do not apply when the tests run as root (root reads anything): they skip so.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from sacrum_masks.cli import main
from sacrum_masks.nifti import load_image
from sacrum_masks.predict import Settings, items_from_bids, items_from_config, run_predict, select_items
from sacrum_masks.qc import run_qc
from sacrum_masks.synth import write_demo_datasets

from test_predict import Loads, fake_model_dir

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ["a b", "é 日本", "q'\"x", "d$HOME", "-ds"]
REG = "derivatives/reg-labels"


# ------------------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def demo1(tmp_path_factory) -> Path:
    """Demo datasets with one subject each (read-only: copy before use)."""
    out = tmp_path_factory.mktemp("demo1")
    write_demo_datasets(out, seed=0, subjects=1)
    return out


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file below root (links recorded by target, not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            out[rel] = "link:" + os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def all_paths(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def rename_subject(ds: Path, old: str, new: str, acq: str) -> None:
    """Rename every file and folder of subject ``old`` to ``new`` and add an ``acq-`` entity to its names."""
    for path in sorted(ds.rglob(f"sub-{old}*"), key=lambda p: -len(p.parts)):
        name = path.name
        if path.is_file():
            name = name.replace(f"sub-{old}_", f"sub-{new}_{acq}_", 1)
        else:
            name = name.replace(f"sub-{old}", f"sub-{new}", 1)
        path.rename(path.with_name(name))


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def failed_lines(text: str, stage: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{stage}: failed")]


# ----------------------------------------------------------------------------- 1. hostile names, all stages

def test_hostile_names_through_every_stage(demo1, tmp_path):
    root = tmp_path / "root $X é"          # also a '$' in DATASETS_PATH itself
    for n in HOSTILE:
        shutil.copytree(demo1 / "goldatlas", root / n)
    rename_subject(root / "é 日本", "01", "01a", "acq-x1")
    raw = {n: digest(root / n) for n in HOSTILE}
    before = all_paths(tmp_path)

    for n in HOSTILE:                       # stage 1
        r = cli("register-ct", root / n)
        assert r.exit_code == 0, r.output
        assert r.output.splitlines()[-1] == "register-ct: 2 written, 0 up to date, 0 failed"
    sub = {n: "01a" if n == "é 日本" else "01" for n in HOSTILE}
    name = {n: f"sub-{sub[n]}_acq-x1" if n == "é 日本" else f"sub-{sub[n]}" for n in HOSTILE}
    labels = [root / n / REG / f"sub-{sub[n]}/anat/{name[n]}_{c}_seg.nii.gz" for n in HOSTILE for c in ("T1w", "T2w")]
    for lab in labels:
        assert load_image(lab)[1].dtype == np.uint8

    listing = tmp_path / "labels.txt"       # stage 2: init-config + convert
    listing.write_text("".join(f"{p}\n" for p in labels), encoding="utf-8")
    cfg = tmp_path / "split.json"
    r = cli("init-config", "--txt", listing, "--type", "LABEL", "--split-validation", 0, "--split-test", 0.2, "-o", cfg)
    assert r.exit_code == 0, r.output
    config = json.loads(cfg.read_text(encoding="utf-8"))
    assert config["DATASETS_PATH"] == str(root).replace("$", "$$")
    entries = sorted(config["TRAINING"] + config["TESTING"])
    assert entries == sorted(p.relative_to(root).as_posix() for p in labels)
    r = cli("convert", "--config", cfg, "--path-out", tmp_path / "raw")
    assert r.exit_code == 0, r.output
    folder = tmp_path / "raw" / "Dataset300_SacrumDataset"
    record = json.loads((folder / "conversion.json").read_text(encoding="utf-8"))
    assert sorted(c["label"] for c in record["Cases"].values()) == entries
    assert any("-sub-01a_" in cid for cid in record["Cases"])
    for cid, c in record["Cases"].items():
        assert (folder / f"images{c['split']}" / f"{cid}_0000.nii.gz").is_file()
        assert (folder / f"labels{c['split']}" / f"{cid}.nii.gz").is_file()

    model = fake_model_dir(tmp_path / "model")   # stage 4 (stand-in network), from a config and from --bids
    test_cfg = tmp_path / "test.json"
    images = [f"{n}/sub-{sub[n]}/anat/{name[n]}_{c}.nii.gz" for n in HOSTILE for c in ("T1w", "T2w")]
    test_cfg.write_text(json.dumps({"TYPE": "IMAGE", "DATASETS_PATH": str(root).replace("$", "$$"),
                                    "TESTING": images}), encoding="utf-8")
    out = io.StringIO()
    assert run_predict(select_items(items_from_config(test_cfg)), Settings(model), model_factory=Loads(), stream=out) == 0
    assert out.getvalue().splitlines()[-1] == "predict: 10 written, 0 up to date, 0 kept, 0 failed"
    out = io.StringIO()
    items = [it for n in HOSTILE for it in items_from_bids(root / n)]
    assert run_predict(select_items(items), Settings(model), model_factory=Loads(), stream=out) == 0
    assert out.getvalue().splitlines()[-1] == "predict: 0 written, 10 up to date, 0 kept, 0 failed"

    for n in HOSTILE:                       # QC
        entries_qc, index = run_qc(root / n / "derivatives" / "labels", batch=None, command_line="qc")
        assert [e.status for e in entries_qc] == ["written", "written"]
        assert index == root / n / "derivatives/qc-sacrum/index.html"
        for c in ("T1w", "T2w"):
            stem = f"sub-{sub[n]}/anat/{name[n]}_{c}"
            assert (root / n / f"derivatives/labels/{stem}_label-sacrum_seg.nii.gz").is_file()
            assert (root / n / f"derivatives/labels/{stem}_label-sacrum_seg.json").is_file()
            assert (root / n / f"derivatives/qc-sacrum/{stem}_label-sacrum_seg.png").is_file()

    # raw files untouched; nothing written outside the expected folders
    for n in HOSTILE:
        after = digest(root / n)
        assert {k: after[k] for k in raw[n]} == raw[n]
    allowed = ([(root / n / "derivatives" / d).relative_to(tmp_path).as_posix()
                for n in HOSTILE for d in ("reg-labels", "labels", "qc-sacrum")]
               + ["labels.txt", "split.json", "test.json", "raw", "model"])
    new = sorted(all_paths(tmp_path) - before)
    stray = [p for p in new if not any(p == a or p.startswith(a + "/") for a in allowed)]
    assert stray == []


def _script_env(tmp_path):
    env = dict(os.environ)
    env["SACRUM_DATA"] = str(tmp_path / "data")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    for var in ("SACRUM_IDX", "TOTALSEG", "FORCE", "BACKEND", "DATASETS_PATH"):
        env.pop(var, None)
    return env


def test_register_and_qc_scripts_quote_hostile_paths(demo1, tmp_path):
    base = tmp_path / "w d$HOME"
    for n in ("-ds", "sp ace $HOME"):
        shutil.copytree(demo1 / "goldatlas", base / n)
    before = all_paths(tmp_path)
    env = _script_env(tmp_path)
    # a relative "-ds" must not be taken for an option
    p = subprocess.run(["bash", str(ROOT / "bin/register.sh"), "-ds", str(base / "sp ace $HOME")], cwd=base, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("register-ct: 2 written, 0 up to date, 0 failed") == 2
    p = subprocess.run(["bash", str(ROOT / "bin/qc.sh"), "-ds/derivatives/reg-labels", "--", "--suffix", "_seg"],
                       cwd=base, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "qc: 2 written, 0 up to date, 0 failed" in p.stdout
    new = sorted(all_paths(tmp_path) - before)
    allowed = [f"w d$HOME/{n}/derivatives/{d}" for n in ("-ds", "sp ace $HOME") for d in ("reg-labels", "qc-sacrum-reg-labels")]
    assert [p for p in new if not any(p == a or p.startswith(a + "/") for a in allowed)] == []
    for n in ("-ds", "sp ace $HOME"):
        for c in ("T1w", "T2w"):
            assert (base / n / REG / f"sub-01/anat/sub-01_{c}_seg.nii.gz").is_file()
    assert (base / "-ds/derivatives/qc-sacrum-reg-labels/sub-01/anat/sub-01_T2w_seg.png").is_file()


# ------------------------------------------------------------------------------ 2. a corpus of bad inputs

def _nifti_bytes(data, affine=None) -> bytes:
    return nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_bytes()


def _raw_header_file(path: Path, srow) -> None:
    """A float32 4x5x6 image whose sform (code 1) is ``srow`` and qform unset: bytes written by hand."""
    hdr = nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4)).header.copy()
    hdr["qform_code"], hdr["sform_code"], hdr["vox_offset"] = 0, 1, 352
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = srow
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + np.ones((4, 5, 6), np.float32).tobytes(order="F")))


def write_bad(path: Path, kind: str, good: Path) -> str:
    """Write a bad file of ``kind`` at ``path``; returns the reason expected in its error line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.load(good)
    data = np.asanyarray(img.dataobj)
    shape3 = np.ones((4, 5, 6), np.float32)
    if kind == "zero-byte":
        path.write_bytes(b"")
        return "cannot read NIfTI (ImageFileError: Empty file"
    if kind == "gzip-random":
        path.write_bytes(gzip.compress(random.Random(1).randbytes(5000)))
        return "cannot read NIfTI (ImageFileError: Cannot work out file type"
    if kind == "not-gzipped":
        path.write_bytes(_nifti_bytes(data, img.affine))
        return "is not a gzip file"
    if kind == "truncated-header":
        path.write_bytes(gzip.compress(_nifti_bytes(data, img.affine)[:200]))
        return "cannot read NIfTI (ImageFileError: Cannot work out file type"
    if kind == "truncated-data":
        path.write_bytes(gzip.compress(_nifti_bytes(data, img.affine)[:600]))
        return "cannot read NIfTI (OSError: Expected"
    if kind == "2d":
        nib.save(nib.Nifti1Image(shape3[:, :, 0], np.eye(4)), path)
        return "not a 3D image (shape (4, 5))"
    if kind == "5d":
        nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 2, 2), np.float32), np.eye(4)), path)
        return "not a 3D image (shape (4, 5, 6, 2, 2))"
    if kind in ("nan", "inf"):
        d = np.asarray(data, np.float32).copy()
        d.flat[7] = np.nan if kind == "nan" else -np.inf
        nib.save(nib.Nifti1Image(d, img.affine), path)
        return "1 voxels are NaN or infinite"
    if kind == "zero-affine":
        _raw_header_file(path, ([0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]))
        return "voxel-to-world affine is singular or not finite"
    if kind == "singular-affine":
        _raw_header_file(path, ([1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]))
        return "voxel-to-world affine is singular or not finite"
    if kind == "bad-datatype":
        raw = bytearray(_nifti_bytes(shape3))
        raw[70:72] = (9999).to_bytes(2, "little", signed=True)
        path.write_bytes(gzip.compress(bytes(raw)))
        return "cannot read NIfTI (HeaderDataError: data code 9999 not recognized)"
    if kind == "directory":
        path.mkdir()
        return "is a folder, not a NIfTI file"
    if kind == "link-loop":
        os.symlink(path.name, path)
        return "symbolic link loop"
    raise AssertionError(kind)


IMAGE_FAULTS = ["zero-byte", "gzip-random", "not-gzipped", "truncated-header", "truncated-data", "2d", "5d", "nan",
                "inf", "zero-affine", "singular-affine", "bad-datatype", "directory", "link-loop"]


def _bad_subjects(ds: Path, faults, make_label=True) -> dict[str, str]:
    """Subjects sub-b01.. whose T2w image is bad (each with a good copy of sub-01's CT label)."""
    good = ds / "sub-01/anat/sub-01_T2w.nii.gz"
    expected = {}
    for i, kind in enumerate(faults, 1):
        sub = f"sub-b{i:02d}"
        expected[sub] = write_bad(ds / sub / "anat" / f"{sub}_T2w.nii.gz", kind, good)
        if make_label:
            lab = ds / "derivatives/labels" / sub / "anat"
            lab.mkdir(parents=True)
            shutil.copy(ds / "derivatives/labels/sub-01/anat/sub-01_CT_seg.nii.gz", lab / f"{sub}_CT_seg.nii.gz")
            shutil.copy(ds / "derivatives/labels/sub-01/anat/sub-01_CT_seg.json", lab / f"{sub}_CT_seg.json")
    return expected


def _check_lines(lines, expected, name="T2w"):
    for sub, reason in expected.items():
        mine = [line for line in lines if f"{sub}_{name}" in line]
        assert len(mine) == 1, (sub, lines)
        # the file named (as a path, or as the config entry that gives it), then the reason
        assert (f"{sub}_{name}.nii.gz: " in mine[0] or f"{sub}_{name}.nii.gz': " in mine[0]) and reason in mine[0], \
            (sub, mine)
        assert "Traceback" not in mine[0]


def test_bad_images_stage1(demo1, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(demo1 / "goldatlas", ds)
    expected = _bad_subjects(ds, IMAGE_FAULTS)
    # a label with values outside the expected set: float values, none equal to the sacrum index
    (ds / "sub-c01/anat").mkdir(parents=True)
    shutil.copy(ds / "sub-01/anat/sub-01_T2w.nii.gz", ds / "sub-c01/anat/sub-c01_T2w.nii.gz")
    lab = nib.load(ds / "derivatives/labels/sub-01/anat/sub-01_CT_seg.nii.gz")
    weird = np.asanyarray(lab.dataobj).astype(np.float32) * 0.5 - 3.25
    (ds / "derivatives/labels/sub-c01/anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(weird, lab.affine), ds / "derivatives/labels/sub-c01/anat/sub-c01_CT_seg.nii.gz")
    expected["sub-c01"] = "no voxel with sacrum index 92 (values present: -3.25, "
    raw = digest(ds)
    r = cli("register-ct", ds)
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == f"register-ct: 2 written, 0 up to date, {len(expected)} failed"
    lines = failed_lines(r.stderr, "register-ct")
    assert len(lines) == len(expected)
    _check_lines(lines, expected)
    assert sorted(p.relative_to(ds / REG).as_posix() for p in (ds / REG).rglob("*.nii.gz")) == \
        ["sub-01/anat/sub-01_T1w_seg.nii.gz", "sub-01/anat/sub-01_T2w_seg.nii.gz"]
    assert not [p for p in (ds / REG).rglob("*") if p.name.startswith(".") and "tmp" in p.name]
    assert digest(ds) == {**raw, **{k: v for k, v in digest(ds).items() if k.startswith(REG)}}


def test_bad_labels_stage2(demo1, tmp_path):
    """convert stops with every bad pair listed (nothing written); --skip-invalid writes the good ones."""
    root = tmp_path / "root"
    ds = root / "ds"
    shutil.copytree(demo1 / "goldatlas", ds)
    assert cli("register-ct", ds).exit_code == 0
    good_label = ds / REG / "sub-01/anat/sub-01_T2w_seg.nii.gz"
    faults = ["zero-byte", "gzip-random", "not-gzipped", "truncated-header", "2d", "5d", "nan", "zero-affine"]
    expected = {}
    entries = [f"ds/{REG}/sub-01/anat/sub-01_T1w_seg.nii.gz", f"ds/{REG}/sub-01/anat/sub-01_T2w_seg.nii.gz"]
    for i, kind in enumerate(faults + ["values"], 1):
        sub = f"sub-b{i:02d}"
        (ds / sub / "anat").mkdir(parents=True)
        shutil.copy(ds / "sub-01/anat/sub-01_T2w.nii.gz", ds / sub / "anat" / f"{sub}_T2w.nii.gz")
        label = ds / REG / sub / "anat" / f"{sub}_T2w_seg.nii.gz"
        if kind == "values":
            img = nib.load(good_label)
            d = np.asanyarray(img.dataobj).copy()
            d[0, 0, 0] = 2
            label.parent.mkdir(parents=True)
            nib.save(nib.Nifti1Image(d, img.affine), label)
            expected[sub] = "label values must be 0 and 1, found 2"
        else:
            expected[sub] = write_bad(label, kind, good_label)
        entries.append(label.relative_to(root).as_posix())
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"TYPE": "LABEL", "CONTRASTS": "t1_t2", "DATASETS_PATH": str(root),
                               "TRAINING": entries, "VALIDATION": [], "TESTING": []}))
    raw = digest(root)
    out = tmp_path / "raw"
    r = cli("convert", "--config", cfg, "--path-out", out)
    assert r.exit_code == 1
    _check_lines(failed_lines(r.stderr, "convert"), expected, "T2w_seg")
    assert len(failed_lines(r.stderr, "convert")) == len(expected)
    assert r.stderr.splitlines()[-1].startswith(f"convert: stopped: {len(expected)} invalid pair(s), nothing written")
    assert [p.name for p in out.iterdir() if not p.name.endswith(".lock")] == []
    r = cli("convert", "--config", cfg, "--path-out", out, "--skip-invalid")
    assert r.exit_code == 0, r.output
    assert "convert: 2 converted, 9 skipped, 0 failed" in r.output
    skipped = [line for line in r.output.splitlines() if line.startswith("convert: skipped")]
    _check_lines(skipped, expected, "T2w_seg")
    folder = out / "Dataset300_SacrumDataset"
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == \
        ["SacrumDataset-sub-01_001.nii.gz", "SacrumDataset-sub-01_002.nii.gz"]
    assert len((folder / "conversion_invalid.txt").read_text().splitlines()) == len(expected)
    assert digest(root) == raw


def test_bad_images_stage4_and_qc(demo1, tmp_path):
    root = tmp_path / "root"
    ds = root / "ds"
    shutil.copytree(demo1 / "whole-spine", ds)
    expected = _bad_subjects(ds, IMAGE_FAULTS, make_label=False)
    raw = digest(ds)
    model = fake_model_dir(tmp_path / "m")
    cfg = tmp_path / "test.json"
    testing = ["ds/sub-01/anat/sub-01_T1w.nii.gz", "ds/sub-01/anat/sub-01_T2w.nii.gz"] + \
        [f"ds/{sub}/anat/{sub}_T2w.nii.gz" for sub in expected]
    cfg.write_text(json.dumps({"TYPE": "IMAGE", "DATASETS_PATH": str(root), "TESTING": testing}))
    for items in (items_from_config(cfg), items_from_bids(ds)):
        out = io.StringIO()
        assert run_predict(select_items(items), Settings(model), model_factory=Loads(), stream=out) == 1
        text = out.getvalue()
        assert text.splitlines()[-1].startswith("predict: ")
        assert text.splitlines()[-1].endswith(f"0 kept, {len(expected)} failed")
        lines = failed_lines(text, "predict")
        assert len(lines) == len(expected)
        _check_lines(lines, expected)
    masks = sorted(p.relative_to(ds / "derivatives/labels").as_posix()
                   for p in (ds / "derivatives/labels").rglob("*.nii.gz"))
    assert masks == ["sub-01/anat/sub-01_T1w_label-sacrum_seg.nii.gz", "sub-01/anat/sub-01_T2w_label-sacrum_seg.nii.gz"]
    assert {k: v for k, v in digest(ds).items() if k in raw} == raw

    # QC: bad masks next to good ones
    good_mask = ds / "derivatives/labels/sub-01/anat/sub-01_T2w_label-sacrum_seg.nii.gz"
    qc_expected = {}
    for i, kind in enumerate(["zero-byte", "gzip-random", "truncated-header", "5d", "zero-affine", "directory",
                              "link-loop"], 1):
        sub = f"sub-q{i:02d}"
        shutil.copytree(ds / "sub-01", ds / sub, copy_function=lambda s, d: shutil.copy(s, d.replace("sub-01", sub)))
        qc_expected[sub] = write_bad(ds / f"derivatives/labels/{sub}/anat/{sub}_T2w_label-sacrum_seg.nii.gz",
                                     kind, good_mask)
    out = io.StringIO()
    from sacrum_masks.batch import Batch
    batch = Batch("qc", stream=out)
    entries, index = run_qc(ds / "derivatives/labels", batch=batch, command_line="qc")
    assert batch.summary(["written", "up to date", "failed"]) == f"qc: 2 written, 0 up to date, {len(qc_expected)} failed"
    _check_lines(failed_lines(out.getvalue(), "qc"), qc_expected, "T2w_label-sacrum_seg")
    pngs = sorted(p.relative_to(ds / "derivatives/qc-sacrum").as_posix() for p in (ds / "derivatives/qc-sacrum").rglob("*.png"))
    assert pngs == ["sub-01/anat/sub-01_T1w_label-sacrum_seg.png", "sub-01/anat/sub-01_T2w_label-sacrum_seg.png"]


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("runs as root: root reads a chmod 000 file, so permission errors cannot be produced here")
    p = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4)), p)
    p.chmod(0)
    from sacrum_masks.errors import InputError
    with pytest.raises(InputError, match="cannot read NIfTI"):
        load_image(p)


# ------------------------------------------------------------------------------ 4./5. SIGKILL, concurrency

def _cli_env():
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def _register_cmd(ds):
    return [str(Path(sys.executable).parent / "sacrum-masks"), "register-ct", str(ds)]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A dataset of 12 MRI images (6 goldatlas subjects), and its masks from one uninterrupted run."""
    src = tmp_path_factory.mktemp("big")
    write_demo_datasets(src, seed=0, subjects=6)
    ref = src / "goldatlas"
    p = subprocess.run(_register_cmd(ref), env=_cli_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return ref


def _masks(ds: Path) -> dict[str, bytes]:
    return {p.relative_to(ds / REG).as_posix(): p.read_bytes() for p in sorted((ds / REG).rglob("*_seg.nii.gz"))}


def _visible_outputs_complete(ds: Path) -> int:
    n = 0
    for p in (ds / REG).rglob("*"):
        if p.name.startswith("."):
            continue
        if p.name.endswith(".nii.gz"):
            img, data = load_image(p)
            assert set(np.unique(data).tolist()) <= {0, 1}
            n += 1
        elif p.suffix == ".json":
            json.loads(p.read_text())
    return n


def test_sigkill_at_random_times_then_rerun(big, tmp_path):
    """SIGKILL when a seeded random number of masks is visible (plus a random delay), four times, then rerun."""
    ds = tmp_path / "goldatlas"
    shutil.copytree(big, ds, ignore=shutil.ignore_patterns("reg-labels"))
    raw = digest(ds)
    rng = random.Random(20240)
    targets = sorted(rng.sample(range(1, 12), 4))
    killed = 0
    for target in targets:
        proc = subprocess.Popen(_register_cmd(ds), env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and len(list((ds / REG).rglob("sub-*_seg.nii.gz"))) < target:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        killed += proc.wait() == -signal.SIGKILL
        _visible_outputs_complete(ds)
    assert killed >= 1
    p = subprocess.run(_register_cmd(ds), env=_cli_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert _masks(ds) == _masks(big)
    assert len(_masks(ds)) == 12
    assert not [q for q in (ds / REG).rglob(".*") if ".tmp" in q.name]   # stale temporaries cleaned up
    assert {k: v for k, v in digest(ds).items() if not k.startswith(REG)} == raw


def test_concurrent_run_is_refused_and_outputs_match(big, tmp_path):
    ds = tmp_path / "goldatlas"
    shutil.copytree(big, ds, ignore=shutil.ignore_patterns("reg-labels"))
    first = subprocess.Popen(_register_cmd(ds), env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = ds / REG / ".sacrum-masks.lock"
    deadline = time.monotonic() + 60
    while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)   # the first run holds the lock, mid-way, for as long as the second runs
    try:
        second = subprocess.run(_register_cmd(ds), env=_cli_env(), capture_output=True, text=True)
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert out.splitlines()[-1] == "register-ct: 12 written, 0 up to date, 0 failed"
    assert second.returncode == 75  # EX_TEMPFAIL, as convert and qc
    assert second.stdout == ""
    assert second.stderr.count("\n") == 1
    assert "another register-ct run is writing here" in second.stderr
    assert _masks(ds) == _masks(big)
