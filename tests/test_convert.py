"""Stage 2: split config -> nnU-Net raw dataset (orientation, checks, numbering, re-runs, nnU-Net's own check)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from sacrum_masks.cli import main
from sacrum_masks.config import load_config, make_config
from sacrum_masks.convert import convert_dataset, convert_pair, pair_problems
from sacrum_masks.errors import InputError
from sacrum_masks.nifti import to_rpi

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (5, 6, 7)


def lps_affine(spacing=(1.0, 1.5, 2.0), origin=(10.0, 20.0, -30.0)):
    """Axes pointing to L, P, S (nibabel axis codes): x and y flipped against RAS."""
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = origin
    return aff


def save(path: Path, data, affine) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def make_pair(root: Path, ds: str, sub: str, contrast: str = "T2w", *, affine=None, label=None, image=None,
              label_affine=None) -> Path:
    affine = lps_affine() if affine is None else affine
    rng = np.random.default_rng(zlib.crc32(f"{ds}/{sub}/{contrast}".encode()))
    image = rng.normal(100, 10, SHAPE).astype(np.float32) if image is None else image
    if label is None:
        label = np.zeros(image.shape, np.uint8)
        label[1:3, 2:4, 3:5] = 1
    save(root / ds / f"sub-{sub}" / "anat" / f"sub-{sub}_{contrast}.nii.gz", image, affine)
    return save(root / ds / "derivatives" / "reg-labels" / f"sub-{sub}" / "anat" / f"sub-{sub}_{contrast}_seg.nii.gz",
                label, affine if label_affine is None else label_affine)


def config_file(tmp_path: Path, labels, validation=0.0, test=0.25, seed=0) -> Path:
    cfg = make_config(labels, "LABEL", validation, test, seed)
    path = tmp_path / "split.json"
    path.write_text(json.dumps(cfg))
    return path


def run(args, env=None):
    return CliRunner().invoke(main, args, env=env)


# ------------------------------------------------------------------------------------ orientation


@pytest.mark.parametrize("affine", [
    lps_affine(),
    # permuted and flipped axes: S, R, P
    np.array([[0, 1.5, 0, 5], [0, 0, -2.0, 8], [1.0, 0, 0, -3], [0, 0, 0, 1]]),
], ids=["LPS", "SRP"])
def test_label_corner_stays_in_the_same_anatomical_corner(tmp_path, affine):
    image = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    label = np.zeros(SHAPE, np.uint8)
    label[0, 0, 0] = 1
    lbl_path = make_pair(tmp_path, "ds", "01", affine=affine, label=label, image=image)
    img_rpi, mask_rpi = convert_pair(tmp_path / "ds/sub-01/anat/sub-01_T2w.nii.gz", lbl_path)
    assert nib.aff2axcodes(img_rpi.affine) == ("L", "A", "S") == nib.aff2axcodes(mask_rpi.affine)
    out = np.asarray(mask_rpi.dataobj)
    assert out.dtype == np.uint8 and int(out.sum()) == 1
    found = tuple(int(i) for i in np.argwhere(out)[0])
    # the labelled voxel is at the same world point, and carries the same image value
    np.testing.assert_allclose(mask_rpi.affine @ (*found, 1), affine @ (0, 0, 0, 1), atol=1e-6)
    assert np.asarray(img_rpi.dataobj)[found] == image[0, 0, 0]
    # and in the corner named by the original axes: the extreme of each world axis that voxel 0 holds
    codes = nib.aff2axcodes(affine)
    expected = []
    for axis, code in zip(range(3), ("L", "A", "S")):
        src_axis = [i for i, c in enumerate(codes) if c in (code, {"L": "R", "A": "P", "S": "I"}[code])][0]
        n = out.shape[axis]
        # voxel 0 of the source axis lies at its most "code" end when the axis points away from code
        expected.append(0 if codes[src_axis] == code else n - 1)
    assert found == tuple(expected)
    if codes == ("L", "P", "S"):
        assert found == (0, SHAPE[1] - 1, 0)   # most right, most anterior, most inferior


def test_label_in_another_orientation_on_the_same_grid_is_accepted(tmp_path):
    """A label saved RAS while its image is LPS (same world grid) lands on the image's voxels."""
    label = np.zeros(SHAPE, np.uint8)
    label[0, 1, 2] = 1
    lbl_path = make_pair(tmp_path, "ds", "01", label=label)
    img = nib.load(str(tmp_path / "ds/sub-01/anat/sub-01_T2w.nii.gz"))
    ras = nib.as_closest_canonical(nib.load(str(lbl_path)))
    nib.save(ras, str(lbl_path))
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    img_rpi, mask_rpi = convert_pair(img.get_filename(), lbl_path)
    expected = to_rpi(nib.Nifti1Image(label, img.affine))
    np.testing.assert_array_equal(np.asarray(mask_rpi.dataobj), np.asarray(expected.dataobj))


def test_pair_problems_are_named(tmp_path):
    a = nib.Nifti1Image(np.zeros(SHAPE, np.float32), lps_affine())
    shifted = lps_affine(origin=(10.0, 20.5, -30.0))
    assert pair_problems(a, nib.Nifti1Image(np.zeros((5, 6, 8), np.uint8), lps_affine()), np.zeros((5, 6, 8))) == \
        ["shape (5, 6, 8) differs from the image's (5, 6, 7)"]
    assert pair_problems(a, nib.Nifti1Image(np.zeros(SHAPE, np.uint8), shifted), np.zeros(SHAPE)) == \
        ["affine differs from the image's by up to 0.5 mm (tolerance 0.001)"]
    assert pair_problems(a, nib.Nifti1Image(np.zeros(SHAPE, np.uint8), lps_affine(spacing=(1, 1, 2))),
                         np.zeros(SHAPE)) == ["spacing [1.0, 1.0, 2.0] differs from the image's [1.0, 1.5, 2.0]"]
    values = np.zeros(SHAPE)
    values[0, 0, :3] = [2, 92, 0.5]
    assert pair_problems(a, nib.Nifti1Image(np.zeros(SHAPE, np.uint8), lps_affine()), values) == \
        ["label values must be 0 and 1, found 0.5, 2, 92"]
    # within tolerance
    tiny = lps_affine(origin=(10.0, 20.0004, -30.0))
    assert pair_problems(a, nib.Nifti1Image(np.zeros(SHAPE, np.uint8), tiny), np.zeros(SHAPE)) == []


# ------------------------------------------------------------------------------------ dataset


def four_subjects(root: Path):
    return sorted([make_pair(root, "dsA", s, c) for s in ("01", "02", "03") for c in ("T1w", "T2w")]
                  + [make_pair(root, "dsB", "01")])


def test_convert_writes_nnunet_layout(tmp_path):
    root = tmp_path / "bids"
    labels = four_subjects(root)
    cfg_path = config_file(tmp_path, labels, validation=0.25, test=0.25)
    raw = tmp_path / "raw"
    res = run(["convert", "--config", str(cfg_path), "--path-out", str(raw), "-dnum", "301", "-dname", "Sac"])
    assert res.exit_code == 0, res.output
    ds = raw / "Dataset301_Sac"
    cfg = json.loads(cfg_path.read_text())
    n_tr = len(cfg["TRAINING"]) + len(cfg["VALIDATION"])
    n_ts = len(cfg["TESTING"])
    assert n_tr + n_ts == 7 and n_ts >= 1
    tr = sorted(p.name for p in (ds / "imagesTr").iterdir())
    ts = sorted(p.name for p in (ds / "imagesTs").iterdir())
    assert len(tr) == n_tr and len(ts) == n_ts
    # running number over TRAINING, VALIDATION, then continued into TESTING
    numbers = sorted(int(n.split("_")[-2]) for n in tr + ts)
    assert numbers == list(range(1, 8))
    assert all(int(n.split("_")[-2]) <= n_tr for n in tr) and all(int(n.split("_")[-2]) > n_tr for n in ts)
    assert all(n.startswith("Sac-sub-") and n.endswith("_0000.nii.gz") for n in tr + ts)
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == sorted(n.replace("_0000", "") for n in tr)
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "sacrum": 1}
    assert (dj["numTraining"], dj["file_ending"], dj["channel_names"]) == (n_tr, ".nii.gz", {"0": "multi_contrasts"})
    conv = json.loads((ds / "conversion.json").read_text())
    # the training contrasts travel with the model (its dataset.json): predict's default --contrast
    tr_contrasts = {Path(rec["image"]).name.split("_")[-1].split(".")[0] for rec in conv["Cases"].values()
                    if rec["split"] == "Tr"}
    assert set(dj["sacrum_masks_contrasts"]) >= tr_contrasts and dj["sacrum_masks_contrasts"]
    assert len(conv["Cases"]) == 7
    for cid, rec in conv["Cases"].items():
        assert rec["label"].startswith(rec["image"].split("/")[0] + "/derivatives/reg-labels/")
        assert cid.startswith("Sac-sub-" + rec["image"].split("sub-")[1].split("/")[0] + "_")
        src_split = rec["config_split"]
        assert rec["label"] in cfg[src_split]
        out = nib.load(str(ds / f"labels{rec['split']}" / f"{cid}.nii.gz"))
        assert out.get_data_dtype() == np.uint8 and nib.aff2axcodes(out.affine) == ("L", "A", "S")
    assert not list(raw.glob(".Dataset301_Sac.tmp-*"))
    assert "convert: 7 converted, 0 skipped, 0 failed" in res.output


def test_invalid_pairs_stop_the_stage_or_are_skipped(tmp_path):
    root = tmp_path / "bids"
    labels = four_subjects(root)
    bad_values = np.zeros(SHAPE, np.uint8)
    bad_values[0, 0, 0] = 92
    labels.append(make_pair(root, "dsB", "02", label=bad_values))
    labels.append(make_pair(root, "dsB", "03", label=np.zeros((5, 6, 8), np.uint8)))
    cfg_path = config_file(tmp_path, labels, test=0.0)
    (root / "dsA" / "sub-02" / "anat" / "sub-02_T2w.nii.gz").unlink()   # a missing image after init-config
    raw = tmp_path / "raw"
    res = run(["convert", "--config", str(cfg_path), "--path-out", str(raw)])
    assert res.exit_code == 1
    assert "dsB/derivatives/reg-labels/sub-02/anat/sub-02_T2w_seg.nii.gz: label values must be 0 and 1, found 92" \
        in res.output
    assert "sub-03_T2w_seg.nii.gz: shape (5, 6, 8) differs from the image's (5, 6, 7)" in res.output
    assert "image dsA/sub-02/anat/sub-02_T2w.nii.gz: no such file" in res.output
    assert "convert: 6 converted, 0 skipped, 3 failed" in res.output
    assert "stopped: 3 invalid pair(s), nothing written" in res.output
    assert sorted(os.listdir(raw)) == [".Dataset300_SacrumDataset.lock"]
    res = run(["convert", "--config", str(cfg_path), "--path-out", str(raw), "--skip-invalid"])
    assert res.exit_code == 0, res.output
    ds = raw / "Dataset300_SacrumDataset"
    assert "convert: 6 converted, 3 skipped, 0 failed" in res.output and "conversion_invalid.txt" in res.output
    report = (ds / "conversion_invalid.txt").read_text().splitlines()
    assert len(report) == 3 and any("found 92" in line for line in report)
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 6


def converted_four_subjects(tmp_path):
    """Four subjects in tmp_path/bids converted once into tmp_path/raw: (bids root, convert args, dataset)."""
    root = tmp_path / "bids"
    cfg_path = config_file(tmp_path, four_subjects(root))
    raw = tmp_path / "raw"
    args = ["convert", "--config", str(cfg_path), "--path-out", str(raw)]
    assert run(args).exit_code == 0
    return root, args, raw / "Dataset300_SacrumDataset"


def test_rerun_is_up_to_date_force_and_changes(tmp_path):
    root, args, ds = converted_four_subjects(tmp_path)
    stamp = {p: p.stat().st_mtime_ns for p in ds.rglob("*")}
    res = run(args)
    assert res.exit_code == 0 and res.output == f"convert: up to date  {ds} (pass --force to rebuild)\n"
    assert {p: p.stat().st_mtime_ns for p in ds.rglob("*")} == stamp
    # the same files under another DATASETS_PATH are the same inputs
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    res = run(args + ["--datasets-path", str(moved)])
    assert res.exit_code == 0 and "up to date" in res.output
    # a changed source: refused without --force, replaced with it
    make_pair(root, "dsB", "01", label=np.ones(SHAPE, np.uint8))
    res = run(args)
    assert res.exit_code == 2
    assert res.output.strip() == (f"sacrum-masks: error: {ds}: exists and differs from the config "
                                  "(2 pair(s) added, removed or changed): pass --force to replace it")
    res = run(args + ["--force"])
    assert res.exit_code == 0, res.output
    conv = json.loads((ds / "conversion.json").read_text())
    cid = [c for c, r in conv["Cases"].items() if r["image"].startswith("dsB/")][0]
    split = conv["Cases"][cid]["split"]
    assert np.asarray(nib.load(str(ds / f"labels{split}" / f"{cid}.nii.gz")).dataobj).all()
    assert [p.name for p in ds.parent.iterdir() if p.name.startswith(".Dataset300_SacrumDataset.")] == \
        [".Dataset300_SacrumDataset.lock"]


def test_another_dataset_with_the_same_number_is_refused(tmp_path):
    root = tmp_path / "bids"
    cfg_path = config_file(tmp_path, four_subjects(root))
    raw = tmp_path / "raw"
    (raw / "Dataset300_Other").mkdir(parents=True)
    res = run(["convert", "--config", str(cfg_path), "--path-out", str(raw)])
    assert res.exit_code == 2
    assert res.output.strip() == (f"sacrum-masks: error: {raw / 'Dataset300_Other'}: another dataset has number 300; "
                                  "nnU-Net would pick either: remove it or choose another -dnum")
    results = tmp_path / "results"
    (results / "Dataset302_Old").mkdir(parents=True)
    res = run(["convert", "--config", str(cfg_path), "--path-out", str(raw), "-dnum", "302"],
              env={"nnUNet_results": str(results)})
    assert res.exit_code == 2 and "Dataset302_Old: another dataset has number 302" in res.output


def test_convert_needs_a_label_config(tmp_path):
    root = tmp_path / "bids"
    make_pair(root, "ds", "01")
    cfg = make_config([root / "ds/sub-01/anat/sub-01_T2w.nii.gz"], "IMAGE", 0, 0)
    (tmp_path / "img.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="TYPE is 'IMAGE': convert needs a LABEL config"):
        convert_dataset(load_config(tmp_path / "img.json", env={}), tmp_path / "raw")


def test_converted_dataset_passes_nnunet_verify(tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    root = tmp_path / "bids"
    cfg = load_config(config_file(tmp_path, four_subjects(root)), env={})
    result = convert_dataset(cfg, tmp_path / "raw")
    verify_dataset_integrity(str(result.folder), num_processes=1)   # raises on any problem


def test_bin_dataset_sh(tmp_path):
    root = tmp_path / "bids"
    cfg_path = config_file(tmp_path, four_subjects(root))
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_") and k not in ("CONFIG", "DATASETS_PATH")}
    env.update(SACRUM_DATA=str(tmp_path / "data"), DNUM="305", DNAME="Demo")
    proc = subprocess.run(["bash", str(ROOT / "bin" / "dataset.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "dataset: no CONFIG: make dataset CONFIG=resources/configs/<split>.json\n"
    proc = subprocess.run(["bash", str(ROOT / "bin" / "dataset.sh")], env={**env, "CONFIG": str(cfg_path)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data" / "nnUNet" / "raw" / "Dataset305_Demo" / "dataset.json").is_file()
    proc = subprocess.run(["bash", str(ROOT / "bin" / "dataset.sh")],
                          env={**env, "CONFIG": str(cfg_path), "FORCE": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0 and "convert: 7 converted" in proc.stdout


def test_demo_data_converts_and_verifies(demo_root, tmp_path):
    """Demo MRI images with their true sacrum masks (OUT/truth) as labels: convert, then nnU-Net's check."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    bids = tmp_path / "bids"
    labels = []
    for truth in sorted((demo_root / "truth").rglob("*_label-sacrum_seg.nii.gz")):
        rel = truth.relative_to(demo_root / "truth")
        ds = rel.parts[0]
        if ds not in ("goldatlas", "mrspineseg", "whole-spine"):
            continue
        image_rel = rel.parent / truth.name.replace("_label-sacrum_seg", "")
        (bids / image_rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(demo_root / image_rel, bids / image_rel)
        dest = bids / ds / "derivatives" / "labels" / Path(*rel.parts[1:])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(truth, dest)
        labels.append(dest)
    assert len(labels) >= 4
    cfg_path = config_file(tmp_path, labels, validation=0.0, test=0.25)
    res = run(["convert", "--config", str(cfg_path), "--path-out", str(tmp_path / "raw")])
    assert res.exit_code == 0, res.output
    folder = tmp_path / "raw" / "Dataset300_SacrumDataset"
    assert f"convert: {len(labels)} converted, 0 skipped, 0 failed" in res.output
    verify_dataset_integrity(str(folder), num_processes=1)


def test_second_concurrent_conversion_says_so(tmp_path):
    from sacrum_masks.batch import folder_lock

    root = tmp_path / "bids"
    cfg_path = config_file(tmp_path, four_subjects(root))
    raw = tmp_path / "raw"
    with folder_lock(raw, name=".Dataset300_SacrumDataset.lock"):
        res = run(["convert", "--config", str(cfg_path), "--path-out", str(raw)])
    assert res.exit_code == 75
    assert res.output == f"sacrum-masks: busy: {raw}: another run holds {raw}/.Dataset300_SacrumDataset.lock\n"
    assert not (raw / "Dataset300_SacrumDataset").exists()


@pytest.mark.parametrize("text", ["[1, 2]", "null", "{broken"])
def test_conversion_record_not_an_object_is_not_up_to_date(tmp_path, text):
    """A conversion.json holding JSON that is not an object: one line (rebuild with --force), no crash."""
    _, args, ds = converted_four_subjects(tmp_path)
    (ds / "conversion.json").write_text(text)
    res = run(args)
    assert res.exit_code == 2
    assert res.output.strip() == (f"sacrum-masks: error: {ds}: exists and has an unreadable conversion.json: "
                                  "pass --force to replace it")
