"""Stage 4 (predict + bin/generate_sacrum.sh).

Unit tests use a stand-in for the network (a threshold of the image intensity, in nnU-Net's array
layout) so that orientation, ownership, up-to-date and locking logic are checked exactly and fast.
End-to-end tests (marked slow) use the small model trained by bin/demo.sh (``demo_run`` fixture).
"""

from __future__ import annotations

import doctest
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sacrum_masks import derivatives, predict
from sacrum_masks.batch import folder_lock
from sacrum_masks.device import check_device, cuda_selection, device_problem
from sacrum_masks.errors import InputError
from sacrum_masks.nifti import same_grid, sha256_file, to_rpi
from sacrum_masks.predict import (Item, Settings, items_from_bids, items_from_config, nnunet_input,
                                  run_predict, segment_image, select_items)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bin" / "generate_sacrum.sh"
SUMMARY = "predict: {} written, {} up to date, {} kept, {} failed"


def test_doctests():
    result = doctest.testmod(predict)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------ orientation round trip

def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def affine_for(kind: str, zooms=(0.9, 1.1, 2.5)) -> np.ndarray:
    """RAS (x->R, y->A, z->S), LPS (x->L, y->P, z->S), a sagittal PIR, and an oblique LPS."""
    z = np.diag(zooms)
    rot = {"RAS": np.eye(3), "LPS": np.diag([-1.0, -1.0, 1.0]),
           "PIR": np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float),
           "oblique": rotation(0, 12) @ rotation(2, -9) @ np.diag([-1.0, -1.0, 1.0])}[kind]
    aff = np.eye(4)
    aff[:3, :3] = rot @ z
    aff[:3, 3] = [10.0, -20.0, 5.0]
    return aff


def blob_image(kind: str, shape=(12, 14, 10)):
    """A float image with a bright box (the "sacrum") and a small bright speck far from it."""
    data = np.full(shape, 10.0, np.float32)
    data[3:8, 4:11, 2:7] = 100.0
    data[10, 1, 8] = 100.0          # a separate component (removed by the largest-component step)
    data += np.arange(shape[0], dtype=np.float32)[:, None, None] * 0.01   # breaks symmetry
    img = nib.Nifti1Image(data, affine_for(kind))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return img


def threshold_model(array, spacing):
    """Stand-in network: foreground where the intensity is high (nnU-Net layout in, labels out)."""
    assert array.ndim == 4 and array.shape[0] == 1 and array.dtype == np.float32
    return (array[0] > 50).astype(np.uint8)


@pytest.mark.parametrize("kind", ["RAS", "LPS", "PIR", "oblique"])
def test_nnunet_input_matches_simpleitk_reader_on_rpi_file(tmp_path, kind):
    """The array and spacing fed to nnU-Net are what its training-time reader gives for the RPI file."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    img = blob_image(kind)
    rpi = to_rpi(img)
    assert nib.aff2axcodes(rpi.affine) == ("L", "A", "S")
    nib.save(rpi, tmp_path / "rpi.nii.gz")
    ref, props = SimpleITKIO().read_images([str(tmp_path / "rpi.nii.gz")])
    array, spacing = nnunet_input(rpi, np.asanyarray(rpi.dataobj))
    np.testing.assert_array_equal(array, ref)
    np.testing.assert_allclose(spacing, props["spacing"], rtol=1e-6)


def superior_anterior_left_model(array, spacing):
    """Stand-in network that depends on orientation: bright voxels of the superior-anterior-left octant.

    In nnU-Net's layout of an RPI image, axis 0 runs I->S, axis 1 P->A and axis 2 R->L, so it marks
    the bright voxels with ``z >= nz // 2``, ``y >= ny // 2`` and ``x >= nx // 2``. A skipped or wrong
    reorientation (or restoration) marks other voxels.
    """
    labels = threshold_model(array, spacing)
    nz, ny, nx = labels.shape
    labels[: nz // 2] = 0
    labels[:, : ny // 2] = 0
    labels[:, :, : nx // 2] = 0
    return labels


# blob_image's box is [3:8, 4:11, 2:7] and its speck [10, 1, 8] (shape 12, 14, 10). Worked out by hand:
# RAS: i runs right (left half: i <= 5), j anterior (j >= 7), k up (superior half: k >= 5); speck on the right.
# LPS (and the oblique LPS, whose closest axes are LPS): i runs left (i >= 6), j posterior (j <= 6), k up
#   (k >= 5); the speck is in the octant, a second component.
# PIR: i runs posterior (anterior half: i <= 5), j down (superior half: j <= 6), k right (left half: k <= 4);
#   speck on the right.
OCTANT = {"RAS": ((slice(3, 6), slice(7, 11), slice(5, 7)), 0),
          "LPS": ((slice(6, 8), slice(4, 7), slice(5, 7)), 1),
          "PIR": ((slice(3, 6), slice(4, 7), slice(2, 5)), 0),
          "oblique": ((slice(6, 8), slice(4, 7), slice(5, 7)), 1)}


@pytest.mark.parametrize("kind", ["RAS", "LPS", "PIR", "oblique"])
def test_segment_image_restores_the_input_voxel_order(kind):
    img = blob_image(kind)
    data = np.asanyarray(img.dataobj)
    mask, removed = segment_image(superior_anterior_left_model, img, data)
    box, speck_removed = OCTANT[kind]
    expected = np.zeros(data.shape, np.uint8)
    expected[box] = 1
    np.testing.assert_array_equal(mask, expected)
    assert removed == speck_removed


def test_network_sees_superior_along_first_axis():
    """nnU-Net layout of an RPI image: axis 0 = I->S, axis 1 = P->A, axis 2 = R->L."""
    img = blob_image("LPS")
    world = nib.affines.apply_affine(img.affine, np.indices(img.shape).reshape(3, -1).T).reshape(*img.shape, 3)
    seen = {}

    def probe(array, spacing):
        seen["array"], seen["spacing"] = array, spacing
        return np.zeros(array.shape[1:], np.uint8)

    for axis, sign in [(2, 1.0), (1, 1.0), (0, -1.0)]:   # S, A, and L (= -x in RAS)
        data = (sign * world[..., axis]).astype(np.float32)
        segment_image(probe, img, data)
        profile = np.moveaxis(seen["array"][0], {2: 0, 1: 1, 0: 2}[axis], 0)
        assert np.all(np.diff(profile, axis=0) > 0)
    np.testing.assert_allclose(seen["spacing"], [2.5, 1.1, 0.9])


# --------------------------------------------------------------------------------- selection, shards

def test_shards_cover_the_list_once_and_are_deterministic(tmp_path):
    items = [Item(str(tmp_path / f"img{i:02d}"), tmp_path / f"img{i:02d}", tmp_path) for i in range(11)]
    shards = [select_items(list(reversed(items)), (i, 3)) for i in (1, 2, 3)]
    flat = sorted(it.key for s in shards for it in s)
    assert flat == sorted(it.key for it in items)
    assert [it.image.name for it in shards[1]] == ["img01", "img04", "img07", "img10"]
    assert select_items(items + items[:3]) == select_items(items)


def test_config_bad_entries_are_items_with_their_error(tmp_path):
    (tmp_path / "ds" / "sub-01" / "anat").mkdir(parents=True)
    cfg = tmp_path / "test.json"
    cfg.write_text(json.dumps({"TYPE": "IMAGE", "DATASETS_PATH": str(tmp_path), "TESTING": [
        "ds/sub-01/anat/sub-01_T2w.nii.gz", "../outside/sub-01/anat/sub-01_T2w.nii.gz", "/abs/sub-01_T2w.nii.gz",
        "sub-01_T2w.nii.gz"]}))
    items = items_from_config(cfg)
    assert [it.error is None for it in items] == [True, False, False, False]
    assert items[0].dataset == tmp_path / "ds" and items[0].rel == "sub-01/anat/sub-01_T2w.nii.gz"
    assert "leaves DATASETS_PATH" in items[1].error and "absolute" in items[2].error


def test_config_of_labels_is_refused_and_derivatives_entries_fail(tmp_path):
    (tmp_path / "ds" / "sub-01" / "anat").mkdir(parents=True)
    cfg = tmp_path / "test.json"
    cfg.write_text(json.dumps({"TYPE": "LABEL", "DATASETS_PATH": str(tmp_path), "TESTING": [
        "ds/derivatives/labels/sub-01/anat/sub-01_T2w_seg.nii.gz"]}))
    with pytest.raises(InputError) as exc:
        items_from_config(cfg)
    assert str(exc.value) == f"{cfg}: TYPE is 'LABEL': predict takes a config of images (TYPE IMAGE)"
    cfg.write_text(json.dumps({"TYPE": "IMAGE", "DATASETS_PATH": str(tmp_path), "TESTING": [
        "ds/derivatives/labels/sub-01/anat/sub-01_T2w.nii.gz", "ds/sub-01/anat/sub-01_T2w.nii.gz"]}))
    items = items_from_config(cfg)
    assert [it.error for it in items] == ["not a raw image: inside derivatives/", None]


def test_config_entry_of_a_missing_dataset_fails_and_creates_nothing(tmp_path, capsys):
    ds = small_dataset(tmp_path)
    cfg = tmp_path / "test.json"
    cfg.write_text(json.dumps({"TYPE": "IMAGE", "DATASETS_PATH": str(ds.parent), "TESTING": [
        "typo/sub-01/anat/sub-01_T2w.nii.gz", "ds/sub-01/anat/sub-01_T2w.nii.gz"]}))
    items = items_from_config(cfg)
    assert [it.error for it in items] == [f"dataset folder {ds.parent / 'typo'} not found", None]
    assert run_predict(select_items(items), Settings(fake_model_dir(tmp_path)), model_factory=Loads()) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"predict: failed  TESTING[0] 'typo/sub-01/anat/sub-01_T2w.nii.gz': "
                                    f"dataset folder {ds.parent / 'typo'} not found")
    assert captured.out.strip().splitlines()[-1] == SUMMARY.format(1, 0, 0, 1)
    assert sorted(p.name for p in ds.parent.iterdir()) == ["ds"]
    # an Item made by hand whose dataset is missing: reported, nothing created either
    ghost = tmp_path / "ghost"
    item = Item(str(ghost / "sub-01/anat/sub-01_T2w.nii.gz"), ghost / "sub-01/anat/sub-01_T2w.nii.gz", ghost)
    assert run_predict([item], Settings(fake_model_dir(tmp_path / "m")), model_factory=Loads()) == 1
    assert capsys.readouterr().err.strip().endswith(f"dataset folder {ghost} not found")
    assert not ghost.exists()


def test_same_dataset_through_a_symlink_is_one_item_and_one_lock(tmp_path, capsys):
    """The config's DATASETS_PATH and a --bids path reach the same images through a symbolic link."""
    ds = small_dataset(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(ds.parent, target_is_directory=True)
    cfg = tmp_path / "test.json"
    cfg.write_text(json.dumps({"TYPE": "IMAGE", "DATASETS_PATH": str(ds.parent),
                               "TESTING": ["ds/sub-01/anat/sub-01_T2w.nii.gz"]}))
    items = select_items(items_from_config(cfg) + items_from_bids(link / "ds") + items_from_bids(ds))
    assert [it.image for it in items] == sorted(p.resolve() for p in ds.glob("sub-*/**/anat/*.nii.gz"))
    assert {it.dataset for it in items} == {ds.resolve()}
    # an item made by hand with the other spelling is the same image: one lock, one mask
    other = Item(str(link / "ds/sub-01/anat/sub-01_T2w.nii.gz"), link / "ds/sub-01/anat/sub-01_T2w.nii.gz", link / "ds")
    assert run_predict(items + [other], Settings(fake_model_dir(tmp_path)), model_factory=Loads()) == 0
    out = capsys.readouterr().out
    assert "another run" not in out and out.strip().splitlines()[-1] == SUMMARY.format(3, 0, 0, 0)


def test_unreadable_image_is_one_failure_line(tmp_path, capsys, monkeypatch):
    """A PermissionError while reading an image fails that image only.

    Tests run as root, where chmod 000 does not stop a read: the checksum read is made to raise instead.
    """
    ds = small_dataset(tmp_path)
    bad = ds / "sub-03" / "anat" / "sub-03_T2w.nii.gz"
    real_sha = derivatives.sha256_file

    def sha(path, *args, **kw):
        if Path(path) == bad:
            raise PermissionError(13, "Permission denied", str(path))
        return real_sha(path, *args, **kw)

    monkeypatch.setattr(derivatives, "sha256_file", sha)   # the writer checksums the inputs
    assert run_predict(select_items(items_from_bids(ds)), Settings(fake_model_dir(tmp_path)),
                       model_factory=Loads()) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == f"predict: failed  {bad}: cannot read (Permission denied)"
    assert captured.out.strip().splitlines()[-1] == SUMMARY.format(2, 0, 0, 1)


def test_moved_model_with_the_same_checkpoint_is_up_to_date(tmp_path, capsys):
    ds = small_dataset(tmp_path)
    model = fake_model_dir(tmp_path)
    items = select_items(items_from_bids(ds))
    run_predict(items, Settings(model), model_factory=Loads())
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(model, moved)
    shutil.rmtree(model)
    capsys.readouterr()
    loads = Loads()
    assert run_predict(items, Settings(moved), model_factory=loads) == 0
    assert last_line(capsys) == SUMMARY.format(0, 3, 0, 0) and loads.count == 0
    # other bytes in the checkpoint are another model
    (moved / "fold_0" / "checkpoint_best.pth").write_bytes(b"retrained weights")
    assert run_predict(items, Settings(moved), model_factory=loads) == 0
    assert last_line(capsys) == SUMMARY.format(3, 0, 0, 0)
    side = json.loads(next((ds / "derivatives" / "labels").rglob("*_seg.json")).read_text())
    assert side["GeneratedBy"][0]["Model"] == str(moved)


@pytest.mark.parametrize("gpu, visible, expected", [
    ("cpu", None, (None, "cpu")),
    ("cpu", "2,3", (None, "cpu")),
    ("1", None, ("1", "cuda")),          # no allocation: the id is a device of the machine
    ("1", "", ("1", "cuda")),
    ("0", "2,3", (None, "cuda:0")),      # SLURM allocated 2,3: GPU=0 is the first of them (device 2)
    ("1", "2,3", (None, "cuda:1")),
    ("0,1", None, ("0,1", "cuda")),
])
def test_cuda_selection_respects_an_existing_allocation(gpu, visible, expected):
    assert cuda_selection(gpu, visible) == expected


def test_check_device_leaves_an_allocation_alone(monkeypatch):
    """No GPU here: the check fails, but CUDA_VISIBLE_DEVICES set by SLURM stays as it was."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(ValueError):
        check_device("0")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert device_problem("2", True, 2, "2,3", needed=3) == \
        "GPU=2: only 2 CUDA devices are visible, device index 2 needs 3 (CUDA_VISIBLE_DEVICES=2,3)"
    assert device_problem("1", True, 2, "2,3", needed=2) is None


# ------------------------------------------------------------------------------ batch with a stand-in

def fake_model_dir(root: Path) -> Path:
    model = root / "results" / "Dataset300_SacrumDataset" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "dataset.json").write_text("{}")
    (model / "plans.json").write_text("{}")
    (model / "fold_0" / "checkpoint_best.pth").write_bytes(b"best weights")
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"final weights")
    return model


class Loads:
    """Counts model loads; the stand-in network thresholds the intensity."""

    def __init__(self, empty=False):
        self.count = 0
        self.empty = empty

    def __call__(self, settings):
        self.count += 1
        fn = (lambda a, s: np.zeros(a.shape[1:], np.uint8)) if self.empty else threshold_model
        return type("M", (), {"predict": staticmethod(fn)})()


def small_dataset(root: Path) -> Path:
    ds = root / "bids" / "ds"
    for rel, kind in [("sub-01/anat/sub-01_T2w.nii.gz", "LPS"), ("sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz", "RAS"),
                      ("sub-03/anat/sub-03_T2w.nii.gz", "oblique")]:
        (ds / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(blob_image(kind), ds / rel)
    return ds


def mask_of(ds: Path, rel: str) -> Path:
    return ds / "derivatives" / "labels" / rel.replace(".nii.gz", "_label-sacrum_seg.nii.gz")


def last_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_batch_writes_then_nothing_then_force(tmp_path, capsys):
    ds = small_dataset(tmp_path)
    settings = Settings(fake_model_dir(tmp_path))
    loads = Loads()
    assert run_predict(select_items(items_from_bids(ds)), settings, model_factory=loads) == 0
    assert last_line(capsys) == SUMMARY.format(3, 0, 0, 0) and loads.count == 1
    for rel in ["sub-01/anat/sub-01_T2w.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
                "sub-03/anat/sub-03_T2w.nii.gz"]:
        img, out = nib.load(ds / rel), nib.load(mask_of(ds, rel))
        assert same_grid(img, out) and out.get_data_dtype() == np.uint8
        np.testing.assert_allclose(out.get_qform(), img.affine, atol=1e-4)
        np.testing.assert_allclose(out.get_sform(), img.affine, atol=1e-4)
        side = json.loads(mask_of(ds, rel).with_name(mask_of(ds, rel).name.replace(".nii.gz", ".json")).read_text())
        assert side["SpatialReference"] == "orig" and side["Sources"] == [f"bids:raw:{rel}"]
        assert side["SourcesSHA256"] == {f"bids:raw:{rel}": sha256_file(ds / rel)}
        assert side["Settings"] == {"Fold": "0", "Checkpoint": "best", "CheckpointSHA256": {"0": sha256_file(
            settings.model_dir / "fold_0" / "checkpoint_best.pth")}, "TileStepSize": 0.5, "Mirroring": False,
            "LargestComponent": 26}
        assert side["VoxelCount"] == 5 * 7 * 5 and side["ComponentsRemoved"] == 1 and side["Empty"] is False
        assert side["VolumeML"] == pytest.approx(175 * 0.9 * 1.1 * 2.5 / 1000, abs=1e-4)
        gen = side["GeneratedBy"][-1]
        assert gen["Name"] == "sacrum-masks" and gen["Fold"] == "0" and gen["Checkpoint"] == "best"
        assert {"Version", "Date", "Model", "nnunetv2", "torch", "CheckpointSHA256"} <= set(gen)
    desc = json.loads((ds / "derivatives" / "labels" / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "sacrum-masks"
    assert desc["DatasetLinks"] == {"raw": "../.."}   # relative: a moved data root keeps it valid
    assert (ds / "derivatives" / "labels" / "README").is_file()
    assert "*_label-sacrum_seg.*" in (ds / "derivatives" / "labels" / ".bidsignore").read_text().splitlines()

    # second run: nothing written, the model is not even loaded
    def outputs():   # every file but the lock (which records the pid of its holder)
        return {p: p.stat().st_mtime_ns for p in (ds / "derivatives").rglob("*") if p.name != ".sacrum-masks.lock"}

    mtimes = outputs()
    assert run_predict(select_items(items_from_bids(ds)), settings, model_factory=loads) == 0
    assert last_line(capsys) == SUMMARY.format(0, 3, 0, 0) and loads.count == 1
    assert outputs() == mtimes

    # another checkpoint is another model: everything is redone; --force redoes too
    final = Settings(settings.model_dir, checkpoint="final")
    assert run_predict(select_items(items_from_bids(ds)), final, model_factory=loads) == 0
    assert last_line(capsys) == SUMMARY.format(3, 0, 0, 0)
    forced = Settings(settings.model_dir, checkpoint="final", force=True)
    assert run_predict(select_items(items_from_bids(ds)), forced, model_factory=loads) == 0
    assert last_line(capsys) == SUMMARY.format(3, 0, 0, 0) and loads.count == 3


def test_changed_input_is_redone(tmp_path, capsys):
    ds = small_dataset(tmp_path)
    settings = Settings(fake_model_dir(tmp_path))
    run_predict(select_items(items_from_bids(ds)), settings, model_factory=Loads())
    img = blob_image("LPS")
    nib.save(nib.Nifti1Image(img.get_fdata().astype(np.float32) + 0.5, img.affine), ds / "sub-01/anat/sub-01_T2w.nii.gz")
    run_predict(select_items(items_from_bids(ds)), settings, model_factory=Loads())
    out = capsys.readouterr().out
    assert "predict: written  " + str(ds / "sub-01/anat/sub-01_T2w.nii.gz") in out
    assert out.strip().splitlines()[-1] == SUMMARY.format(1, 2, 0, 0)


def test_manual_mask_survives_force(tmp_path, capsys):
    ds = small_dataset(tmp_path)
    rel = "sub-01/anat/sub-01_T2w.nii.gz"
    manual = mask_of(ds, rel)
    manual.parent.mkdir(parents=True)
    manual.write_bytes(b"a manual correction")
    # a foreign sidecar (another tool) does not make it ours either
    manual.with_name(manual.name.replace(".nii.gz", ".json")).write_text('{"GeneratedBy": [{"Name": "ITK-SNAP"}]}')
    settings = Settings(fake_model_dir(tmp_path), force=True)
    assert run_predict(select_items(items_from_bids(ds)), settings, model_factory=Loads()) == 0
    out = capsys.readouterr().out
    assert f"predict: kept  {ds / rel}: sub-01_T2w_label-sacrum_seg.nii.gz was not written by sacrum-masks" in out
    assert out.strip().splitlines()[-1] == SUMMARY.format(2, 0, 1, 0)
    assert manual.read_bytes() == b"a manual correction"


def test_empty_prediction_is_flagged_not_a_crash(tmp_path, capsys):
    ds = small_dataset(tmp_path)
    settings = Settings(fake_model_dir(tmp_path))
    assert run_predict(select_items(items_from_bids(ds))[:1], settings, model_factory=Loads(empty=True)) == 0
    out = capsys.readouterr().out
    assert "EMPTY prediction" in out
    assert out.strip().splitlines()[-1].startswith(SUMMARY.format(1, 0, 0, 0) + "; 1 empty: ")
    m = mask_of(ds, "sub-01/anat/sub-01_T2w.nii.gz")
    assert not np.asanyarray(nib.load(m).dataobj).any()
    side = json.loads(m.with_name(m.name.replace(".nii.gz", ".json")).read_text())
    assert side["Empty"] is True and side["VoxelCount"] == 0 and side["VolumeML"] == 0


def write_bad_inputs(ds: Path) -> dict[str, str]:
    """Bad images next to good ones; returns entry -> expected reason."""
    anat = ds / "sub-09" / "anat"
    anat.mkdir(parents=True)
    nan = np.full((6, 6, 6), np.nan, np.float32)
    nib.save(nib.Nifti1Image(nan, np.eye(4)), anat / "sub-09_T2w.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6, 2), np.float32), np.eye(4)), anat / "sub-09_acq-4d_T2w.nii.gz")
    (anat / "sub-09_T1w.txt").write_text("not nifti")
    return {"sub-09_T2w.nii.gz": "216 voxels are NaN or infinite",
            "sub-09_acq-4d_T2w.nii.gz": "not a 3D image (shape (6, 6, 6, 2))",
            "sub-09_T1w.txt": "not a NIfTI file (.nii or .nii.gz)",
            "sub-09_T1w.nii.gz": "no such file",
            "'../../etc/sub-01_T2w.nii.gz'": "'..' leaves DATASETS_PATH"}


def test_bad_entries_one_line_each_others_written(tmp_path, capsys):
    ds = small_dataset(tmp_path)
    reasons = write_bad_inputs(ds)
    good = ["ds/sub-01/anat/sub-01_T2w.nii.gz", "ds/sub-03/anat/sub-03_T2w.nii.gz"]
    bad = ["ds/sub-09/anat/sub-09_T2w.nii.gz", "ds/sub-09/anat/sub-09_acq-4d_T2w.nii.gz",
           "ds/sub-09/anat/sub-09_T1w.txt", "ds/sub-09/anat/sub-09_T1w.nii.gz", "../../etc/sub-01_T2w.nii.gz"]
    cfg = tmp_path / "test.json"
    cfg.write_text(json.dumps({"TYPE": "IMAGE", "CONTRASTS": "t1_t2", "DATASETS_PATH": str(ds.parent),
                               "TESTING": good + bad}))
    settings = Settings(fake_model_dir(tmp_path))
    assert run_predict(select_items(items_from_config(cfg)), settings, model_factory=Loads()) == 1
    captured = capsys.readouterr()
    failed = [ln for ln in captured.err.splitlines() if ln.startswith("predict: failed")]
    assert len(failed) == len(bad)
    for name, reason in reasons.items():
        assert sum(name in ln and ln.endswith(reason) for ln in failed) == 1, (name, failed)
    assert captured.out.strip().splitlines()[-1] == SUMMARY.format(2, 0, 0, 5)
    assert mask_of(ds, "sub-01/anat/sub-01_T2w.nii.gz").is_file()


def test_busy_lock_exits_zero_without_work(tmp_path, capsys):
    ds = small_dataset(tmp_path)
    settings = Settings(fake_model_dir(tmp_path))
    loads = Loads()
    with folder_lock(ds / "derivatives" / "labels"):
        assert run_predict(select_items(items_from_bids(ds)), settings, model_factory=loads) == 0
    assert capsys.readouterr().out.strip() == f"predict: another run is writing {ds / 'derivatives' / 'labels'}; exiting"
    assert loads.count == 0 and not list((ds / "derivatives" / "labels").rglob("*.nii.gz"))


def test_shards_run_side_by_side_but_not_beside_a_whole_run(tmp_path, capsys):
    """SLURM array tasks (--shard I/N, any N) share a dataset's lock; a whole-list run excludes them, and
    vice versa; an image claimed by another run is left to it ("busy"), whatever that run's N."""
    from sacrum_masks.claims import Claims
    from sacrum_masks.predict import output_paths

    ds = small_dataset(tmp_path)
    folder = ds / "derivatives" / "labels"
    items = select_items(items_from_bids(ds))
    model = fake_model_dir(tmp_path)
    shard2 = select_items(items, (2, 2))
    other = Claims()   # stands for another run (say --shard 1/3) writing shard 2/2's first image
    with folder_lock(folder, shared=True), other.try_claim(output_paths(shard2[0])[0], folder):
        # shard 2/2 is running: shard 1/2 goes ahead, a whole run does not
        shard1 = select_items(items, (1, 2))
        assert run_predict(shard1, Settings(model, shard=(1, 2)), model_factory=Loads()) == 0
        assert len(list(folder.rglob("*_label-sacrum_seg.nii.gz"))) == len(shard1) > 0
        capsys.readouterr()
        loads = Loads()
        assert run_predict(items, Settings(model), model_factory=loads) == 0
        assert loads.count == 0
        assert capsys.readouterr().out.count("another run is writing") == 1
        # a shard of another N beside it: writes all but the claimed image, which it reports busy
        assert run_predict(shard2, Settings(model, shard=(2, 2)), model_factory=Loads()) == 0
        out = capsys.readouterr().out
        assert f"predict: busy  {shard2[0].entry}: another run is writing it" in out
        assert out.strip().splitlines()[-1] == SUMMARY.format(len(shard2) - 1, 0, 0, 0) + ", 1 busy"
    with folder_lock(folder):  # a whole run holds it: shards wait their turn elsewhere
        loads = Loads()
        assert run_predict(select_items(items, (2, 2)), Settings(model, shard=(2, 2)),
                           model_factory=loads) == 0
        assert loads.count == 0


def test_interrupted_rewrite_is_redone_not_kept(tmp_path, capsys):
    """States a SIGKILL can leave between the two atomic writes are redone by the next run."""
    ds = small_dataset(tmp_path)
    settings = Settings(fake_model_dir(tmp_path))
    items = select_items(items_from_bids(ds))
    run_predict(items, settings, model_factory=Loads())
    m = mask_of(ds, "sub-01/anat/sub-01_T2w.nii.gz")
    side = m.with_name(m.name.replace(".nii.gz", ".json"))
    # new mask written: sidecar without its mask
    m.unlink()
    # a rewrite killed after the new mask: old sidecar (another input checksum) with the new mask
    m3 = mask_of(ds, "sub-03/anat/sub-03_T2w.nii.gz")
    s3 = m3.with_name(m3.name.replace(".nii.gz", ".json"))
    s3.write_text(json.dumps({**json.loads(s3.read_text()), "SourcesSHA256": {"bids:raw:x": "0" * 64}}))
    # a temporary file left by a kill during a write
    (m.parent / f".{m.name}.abc123.tmp.nii.gz").write_bytes(b"partial")
    capsys.readouterr()
    run_predict(items, settings, model_factory=Loads())
    assert last_line(capsys) == SUMMARY.format(2, 1, 0, 0)
    assert m.is_file() and side.is_file()
    assert not list((ds / "derivatives").rglob(".*.tmp*"))


# ---------------------------------------------------------------------------------------- the script

def script_env(tmp_path: Path, **extra) -> dict[str, str]:
    from conftest import demo_env

    env = demo_env(tmp_path / "data")
    env.update(extra)
    return env


def test_script_help_lists_every_option():
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    for opt, var in [("--config", "SACRUM_CONFIG"), ("--bids", None), ("--model", "SACRUM_MODEL"),
                     ("--model-zip", "MODEL_ZIP"), ("--fold", "FOLD"), ("--checkpoint", "CHECKPOINT"),
                     ("--gpu", "GPU"), ("--force", "FORCE"), ("--wait", "WAIT"), ("--shard", "SHARD"),
                     ("--tile-step", "TILE_STEP"), ("--mirroring", "MIRRORING"), ("--contrast", "SACRUM_CONTRAST"),
                     ("--output-dir", "SACRUM_OUTPUT_DIR")]:
        assert opt in out and (var is None or var in out)


def test_script_unreachable_model_zip_is_one_line(tmp_path):
    ds = small_dataset(tmp_path)
    env = script_env(tmp_path, MODEL_ZIP="http://127.0.0.1:9/Dataset300_SacrumDataset.zip", GPU="cpu")
    proc = subprocess.run(["bash", str(SCRIPT), "--bids", str(ds)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sacrum-masks: error: cannot download http://127.0.0.1:9/Dataset300_SacrumDataset.zip: [Errno 111] "
        "Connection refused; download it on a connected machine and pass --model-zip PATH"]
    assert not (ds / "derivatives").exists()


def test_script_bad_option_values(tmp_path):
    env = script_env(tmp_path)
    proc = subprocess.run(["bash", str(SCRIPT), "--checkpoint", "latest", "--bids", str(tmp_path)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "Error: Invalid value for '--checkpoint' (env var: 'CHECKPOINT'): 'latest' is not one of 'best', 'final'."
    proc = subprocess.run(["bash", str(SCRIPT), "--fold"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Error: Option '--fold' requires an argument." in proc.stderr
    # the environment variables are the options' own (declared once, on the click option)
    proc = subprocess.run(["bash", str(SCRIPT), "--bids", str(tmp_path)], capture_output=True, text=True,
                          env={**env, "FOLD": "0-4"})
    assert proc.returncode == 2 and "Invalid value for '--fold' (env var: 'FOLD')" in proc.stderr


def test_script_is_thin():
    """bin/generate_sacrum.sh sets the environment and execs the CLI: no option parsing of its own."""
    text = SCRIPT.read_text()
    assert "exec sacrum-masks predict \"$@\"" in text and "case " not in text and len(text.splitlines()) < 30


def trained_model_at(results: Path, dnum: str, dname: str, trainer: str, configuration: str) -> Path:
    """A stand-in model folder where `make train DNUM=... TRAINER=... CONFIGURATION=...` writes one."""
    model = results / f"Dataset{dnum}_{dname}" / f"{trainer}__nnUNetPlans__{configuration}"
    shutil.copytree(fake_model_dir(results.parent / "stand-in"), model)
    return model


def test_script_default_model_follows_the_training_variables(tmp_path):
    env = script_env(tmp_path, GPU="cpu", DNUM="301", DNAME="Other", TRAINER="nnUNetTrainer_SacrumCPU",
                     CONFIGURATION="3d_fullres_small")
    model = trained_model_at(tmp_path / "data" / "nnUNet" / "results", "301", "Other", "nnUNetTrainer_SacrumCPU",
                             "3d_fullres_small")
    empty = tmp_path / "empty-bids"
    (empty / "sub-01" / "anat").mkdir(parents=True)   # a dataset without images: 0 of everything, exit 0
    proc = subprocess.run(["bash", str(SCRIPT), "--bids", str(empty)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines() == [
        f"predict: model {model} fold 0 checkpoint best device cpu", SUMMARY.format(0, 0, 0, 0)]
    help_text = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, env=env).stdout
    help_text = "".join(help_text.split())   # click wraps long words: compare without whitespace
    assert "<TRAINER>__nnUNetPlans__<CONFIGURATION>" in help_text and f"now{model}" in help_text
    for var in ("DNUM", "DNAME", "TRAINER", "CONFIGURATION"):
        assert var in help_text


def test_script_sigterm_reaches_predict(tmp_path):
    """The script execs predict: its pid becomes predict's, so SIGTERM stops the work, not only bash."""
    ds = small_dataset(tmp_path)
    env = script_env(tmp_path, GPU="cpu")
    trained_model_at(tmp_path / "data" / "nnUNet" / "results", "300", "SacrumDataset", "nnUNetTrainer", "3d_fullres")
    cmdline = b""
    with folder_lock(ds / "derivatives" / "labels"):   # predict --wait blocks here, holding its pid
        proc = subprocess.Popen(["bash", str(SCRIPT), "--bids", str(ds), "--wait"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            for _ in range(600):
                cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
                if b"predict" in cmdline.split(b"\0") or proc.poll() is not None:
                    break
                time.sleep(0.1)
            assert b"predict" in cmdline.split(b"\0"), cmdline
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGTERM
    assert not list((ds / "derivatives" / "labels").rglob("*.nii.gz"))


# --------------------------------------------------------------------------- end to end (small model)

def truth_of(bids: Path, mask: Path) -> Path:
    rel = mask.relative_to(bids)
    dataset, inner = rel.parts[0], Path(*rel.parts[3:])
    return bids / "truth" / dataset / inner


def counts(output: str) -> str:
    """The summary line of a run without its "; N empty: ..." tail (the demo model may miss a sacrum)."""
    return output.strip().splitlines()[-1].split("; ", 1)[0]


def run_script(env, *args, **kw):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def e2e(demo_run, tmp_path_factory):
    """A private copy of the demo's test datasets (masks removed) and the arguments for the small model."""
    work = tmp_path_factory.mktemp("predict_e2e")
    sets = []
    for name in ("whole-spine", "spider-challenge-2023"):
        dst = work / name
        shutil.copytree(demo_run.bids / name, dst, ignore=shutil.ignore_patterns("derivatives"))
        sets.append(dst)
    args = ["--model", str(demo_run.model_dir), "--fold", "0", "--checkpoint", "final", "--gpu", "cpu"]
    return demo_run, sets, args


@pytest.mark.slow
def test_e2e_demo_masks_match_truth(demo_run):
    """bin/demo.sh ran generate_sacrum.sh on both test datasets: mean Dice vs the hidden truth >= 0.7."""
    from sacrum_masks.metrics import dice

    scores = []
    for name in ("whole-spine", "spider-challenge-2023"):
        labels = demo_run.bids / name / "derivatives" / "labels"
        images = sorted(p for p in (demo_run.bids / name).glob("sub-*/**/anat/*.nii.gz") if "_CT" not in p.name)
        assert images
        for image in images:
            rel = image.relative_to(demo_run.bids / name)
            m = labels / rel.parent / image.name.replace(".nii.gz", "_label-sacrum_seg.nii.gz")
            pred, truth = nib.load(m), nib.load(demo_run.bids / "truth" / name / rel.parent / m.name)
            assert same_grid(pred, nib.load(image), atol=1e-5) and pred.get_data_dtype() == np.uint8
            scores.append(dice(np.asanyarray(pred.dataobj) > 0, np.asanyarray(truth.dataobj) > 0))
    print(f"mean Dice {np.mean(scores):.3f} over {len(scores)} masks (min {np.min(scores):.3f})")
    assert np.mean(scores) >= 0.7


@pytest.mark.slow
def test_e2e_grids_second_run_force_and_manual(e2e, tmp_path):
    demo_run, sets, args = e2e
    ws = sets[0]
    # one image again as a new subject, in RAS and LPS voxel order (same anatomy in the same world
    # space) and tilted by 12 degrees (same voxels; the closest axes, hence the RPI array, unchanged)
    src = sorted(ws.glob("sub-*/anat/*_T2w.nii.gz"))[0]
    img = nib.load(src)
    anat = ws / "sub-90" / "anat"
    anat.mkdir(parents=True)
    to_src = {}
    for acq, codes in [("ras", "RAS"), ("lps", "LPS")]:
        ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                               nib.orientations.axcodes2ornt(codes))
        nib.save(img.as_reoriented(ornt), anat / f"sub-90_acq-{acq}_T2w.nii.gz")
        to_src[acq] = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(codes),
                                                      nib.orientations.io_orientation(img.affine))
    tilt = np.eye(4)
    tilt[:3, :3] = rotation(0, 12)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), tilt @ img.affine), anat / "sub-90_acq-obl_T2w.nii.gz")
    env = demo_run.env
    proc = run_script(env, "--bids", str(ws), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(list(ws.glob("sub-*/anat/*.nii.gz")))
    assert counts(proc.stdout) == SUMMARY.format(n, 0, 0, 0)
    for image in sorted(ws.glob("sub-*/anat/*.nii.gz")):
        m = mask_of(ws, image.relative_to(ws).as_posix())
        out = nib.load(m)
        assert same_grid(nib.load(image), out, atol=1e-5), image
        np.testing.assert_allclose(out.get_qform(), nib.load(image).affine, atol=1e-4)
    # same anatomy, other voxel order or a tilt: the same mask voxel for voxel
    ref = np.asanyarray(nib.load(mask_of(ws, src.relative_to(ws).as_posix())).dataobj)
    assert ref.any()
    for acq in ("ras", "lps", "obl"):
        got = np.asanyarray(nib.load(mask_of(ws, f"sub-90/anat/sub-90_acq-{acq}_T2w.nii.gz")).dataobj)
        if acq in to_src:
            got = nib.orientations.apply_orientation(got, to_src[acq])
        np.testing.assert_array_equal(got, ref)

    proc = run_script(env, "--bids", str(ws), *args)
    assert proc.returncode == 0 and counts(proc.stdout) == SUMMARY.format(0, n, 0, 0)

    manual = mask_of(ws, src.relative_to(ws).as_posix())
    manual.with_name(manual.name.replace(".nii.gz", ".json")).unlink()   # now it is a manual mask
    before = manual.read_bytes()
    proc = run_script(env, "--bids", str(ws), "--force", *args)
    assert proc.returncode == 0 and counts(proc.stdout) == SUMMARY.format(n - 1, 0, 1, 0)
    assert manual.read_bytes() == before


@pytest.mark.slow
def test_e2e_sigkill_midway_then_rerun(e2e):
    demo_run, sets, args = e2e
    sp = sets[1]
    shutil.rmtree(sp / "derivatives", ignore_errors=True)
    images = sorted(sp.glob("sub-*/**/anat/*.nii.gz"))
    proc = subprocess.Popen(["bash", str(SCRIPT), "--bids", str(sp), *args], env=demo_run.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    written = 0
    for line in proc.stdout:
        written += line.startswith("predict: written")
        if written == 2:
            break
    time.sleep(0.3)   # somewhere inside the next image
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    labels = sp / "derivatives" / "labels"
    done = list(labels.rglob("*_label-sacrum_seg.nii.gz"))
    assert 2 <= len(done) < len(images)
    for m in done:   # every visible mask is complete and has its sidecar
        assert np.asanyarray(nib.load(m).dataobj).shape == nib.load(sp / m.relative_to(labels).parent /
                                                                       m.name.replace("_label-sacrum_seg", "")).shape
        assert m.with_name(m.name.replace(".nii.gz", ".json")).is_file()
    rerun = run_script(demo_run.env, "--bids", str(sp), *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    last = counts(rerun.stdout)
    assert last == SUMMARY.format(len(images) - len(done), len(done), 0, 0)
    # the folder's lock, its claims folder and .bidsignore are meant to stay; no temporary file may
    assert not [p for p in labels.rglob(".*")
                if p.name not in (".sacrum-masks.lock", ".sacrum-masks-claims", ".bidsignore")]


def start_and_pause_after_first_write(env, *args):
    """Start the script; once it has written one mask (so it holds the lock), stop it with SIGSTOP."""
    proc = subprocess.Popen(["bash", str(SCRIPT), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("predict: written"):
            break
    os.killpg(proc.pid, signal.SIGSTOP)
    return proc


@pytest.mark.slow
def test_e2e_concurrent_runs_do_not_interleave(e2e):
    demo_run, sets, args = e2e
    ws = sets[0]
    shutil.rmtree(ws / "derivatives", ignore_errors=True)
    n = len(list(ws.glob("sub-*/anat/*.nii.gz")))
    first = start_and_pause_after_first_write(demo_run.env, "--bids", str(ws), *args)
    try:
        second = run_script(demo_run.env, "--bids", str(ws), *args, timeout=300)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    rest = first.stdout.read()
    first.wait()
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.strip().splitlines()[-1] == \
        f"predict: another run is writing {ws / 'derivatives' / 'labels'}; exiting"
    assert first.returncode == 0 and counts(rest) == SUMMARY.format(n, 0, 0, 0)

    # --wait: the second run waits for the lock, then finds everything up to date
    third = start_and_pause_after_first_write(demo_run.env, "--bids", str(ws), "--force", *args)
    waiting = subprocess.Popen(["bash", str(SCRIPT), "--bids", str(ws), "--wait", *args], env=demo_run.env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(5)   # let it reach the lock (if it has not, it still finds the lock held)
    os.killpg(third.pid, signal.SIGCONT)
    third_out = third.stdout.read()
    third.wait()
    waited = waiting.communicate(timeout=300)[0]
    assert third.returncode == 0 and counts(third_out) == SUMMARY.format(n, 0, 0, 0)
    assert waiting.returncode == 0 and counts(waited) == SUMMARY.format(0, n, 0, 0)


@pytest.mark.slow
def test_e2e_bad_entries_in_config(e2e, tmp_path):
    demo_run, sets, args = e2e
    root = sets[0].parent
    reasons = write_bad_inputs(sets[0])
    good = sorted(p.relative_to(root).as_posix() for p in sets[0].glob("sub-0*/anat/*_T2w.nii.gz"))[:2]
    bad = ["whole-spine/sub-09/anat/sub-09_T2w.nii.gz", "whole-spine/sub-09/anat/sub-09_acq-4d_T2w.nii.gz",
           "whole-spine/sub-09/anat/sub-09_T1w.txt", "whole-spine/sub-09/anat/sub-09_T1w.nii.gz",
           "../../etc/sub-01_T2w.nii.gz"]
    shutil.rmtree(sets[0] / "derivatives", ignore_errors=True)
    cfg = tmp_path / "test.json"
    cfg.write_text(json.dumps({"TYPE": "IMAGE", "CONTRASTS": "t1_t2", "DATASETS_PATH": "${MY_DATA}",
                               "TRAINING": [], "VALIDATION": [], "TESTING": good + bad}))
    env = {**demo_run.env, "SACRUM_CONFIG": str(cfg), "MY_DATA": str(root)}
    proc = run_script(env, *args, "--force")
    assert proc.returncode == 1
    failed = [ln for ln in proc.stderr.splitlines() if ln.startswith("predict: failed")]
    assert len(failed) == len(bad)
    for name, reason in reasons.items():
        assert sum(name in ln and ln.endswith(reason) for ln in failed) == 1, (name, failed)
    assert counts(proc.stdout) == SUMMARY.format(2, 0, 0, 5)
    shutil.rmtree(sets[0] / "sub-09")
