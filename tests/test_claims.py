"""Per-image claims (sacrum_masks.claims), predict's --report / --lock-dir, and the no-flock message.

Fast: real processes and real flock on the local file system, a stand-in network (tests/test_predict.py's
threshold model). The only mock is the file system without flock (a Lustre mount cannot exist here):
``fcntl.flock`` raising ENOSYS as Lustre's ``-o noflock`` does.
"""

from __future__ import annotations

import doctest
import errno
import json
import multiprocessing as mp
import time

import pytest
from click.testing import CliRunner

from sacrum_masks import claims as claims_mod
from sacrum_masks.batch import folder_lock
from sacrum_masks.claims import CLAIMS_FOLDER, Claims, LockUnsupported
from sacrum_masks.cli import main
from sacrum_masks.predict import (Settings, items_from_bids, labels_folder, mask_settings, output_paths, plan_item,
                                  run_predict, select_items)

from test_predict import fake_model_dir, mask_of, small_dataset, threshold_model


def test_doctests():
    result = doctest.testmod(claims_mod)
    assert result.attempted > 0 and result.failed == 0


def _hold(output, folder, ready, release):
    claim = Claims().try_claim(output, folder)
    assert claim is not None
    ready.set()
    release.wait(30)


def test_claim_excludes_other_processes_and_dies_with_its_holder(tmp_path):
    out, folder = tmp_path / "labels" / "sub-01" / "x.nii.gz", tmp_path / "labels"
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(out, folder, ready, release))
    p.start()
    try:
        assert ready.wait(30)
        assert Claims().try_claim(out, folder) is None
        assert Claims().try_claim(out.with_name("y.nii.gz"), folder) is not None   # another image: free
    finally:
        p.kill()
        p.join()
    Claims().try_claim(out, folder).release()   # the SIGKILLed holder left nothing behind
    assert [p.parent.name for p in folder.rglob("*.lock")] == [CLAIMS_FOLDER] * 2


def test_stale_temporary_is_removed_only_under_the_claim(tmp_path):
    ds = small_dataset(tmp_path)
    item = select_items(items_from_bids(ds))[0]
    mask, side = output_paths(item)
    mask.parent.mkdir(parents=True)
    tmp = mask.parent / f".{mask.name}.abc123.tmp.nii.gz"
    tmp.write_bytes(b"in flight")
    ident = {"Model": "m", "Fold": "0", "Checkpoint": "best", "CheckpointSHA256": {"0": "c"}}
    folder = labels_folder(ds)
    other = Claims().try_claim(mask, ds / "derivatives" / "labels")   # another run is writing this image
    assert plan_item(Claims(), folder, item, mask_settings(ident, 0.5, False)) is None
    assert tmp.read_bytes() == b"in flight"
    other.release()                                                    # its owner is gone
    plan = plan_item(Claims(), folder, item, mask_settings(ident, 0.5, False))
    assert plan.status == "write" and not tmp.exists()


class SlowLoads:
    """Stand-in network that takes a while per image (so two runs overlap)."""

    def __call__(self, settings):
        def predict(array, spacing):
            time.sleep(0.3)
            return threshold_model(array, spacing)
        return type("M", (), {"predict": staticmethod(predict)})()


def _run_shard(ds, model, shard, report, start):
    from sacrum_masks.predict import Settings as S
    start.wait(30)
    items = select_items(items_from_bids(ds), shard)
    raise SystemExit(run_predict(items, S(model, shard=shard, report=report), model_factory=SlowLoads()))


def _more_images(ds, n):
    import nibabel as nib
    from test_predict import blob_image
    for i in range(4, 4 + n):
        rel = ds / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_T2w.nii.gz"
        rel.parent.mkdir(parents=True)
        nib.save(blob_image("RAS"), rel)


def test_shards_of_different_n_never_write_one_image_twice(tmp_path):
    """--shard 1/2 and --shard 1/3 started together overlap on images 0 and 6: each is written once."""
    ds = small_dataset(tmp_path)
    _more_images(ds, 5)   # 8 images: 1/2 takes 0 2 4 6, 1/3 takes 0 3 6
    model = fake_model_dir(tmp_path)
    ctx = mp.get_context("fork")
    start = ctx.Event()
    reports = [tmp_path / "r12.json", tmp_path / "r13.json"]
    procs = [ctx.Process(target=_run_shard, args=(ds, model, sh, rep, start))
             for sh, rep in zip([(1, 2), (1, 3)], reports)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    written = [it["item"] for r in reports for it in json.loads(r.read_text())["items"] if it["status"] == "written"]
    assert len(written) == len(set(written))
    everything = select_items(items_from_bids(ds))
    overlap = {str(everything[i].image) for i in (0, 6)}
    for r in reports:   # every image of each shard is accounted for: written here, or busy / up to date
        statuses = {it["item"]: it["status"] for it in json.loads(r.read_text())["items"]}
        assert set(statuses.values()) <= {"written", "busy", "up to date"}
        assert {k for k, v in statuses.items() if v != "written"} <= overlap
    assert set(written) == {str(everything[i].image) for i in (0, 2, 3, 4, 6)}


def test_report_lists_every_image_and_the_counts(tmp_path):
    ds = small_dataset(tmp_path)
    (ds / "sub-09" / "anat").mkdir(parents=True)
    (ds / "sub-09" / "anat" / "sub-09_T2w.nii.gz").write_bytes(b"not gzip")
    report = tmp_path / "out" / "report.json"
    settings = Settings(fake_model_dir(tmp_path), shard=(1, 1), report=report)
    from test_predict import Loads
    assert run_predict(select_items(items_from_bids(ds)), settings, model_factory=Loads()) == 1
    rep = json.loads(report.read_text())
    assert rep["counts"] == {"written": 3, "up to date": 0, "kept": 0, "failed": 1}
    assert rep["exit_status"] == 1 and rep["shard"] == "1/1" and rep["folders"] == [str(ds / "derivatives" / "labels")]
    failed = [it for it in rep["items"] if it["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["item"].endswith("sub-09_T2w.nii.gz") and failed[0]["detail"]
    assert run_predict(select_items(items_from_bids(ds)), settings, model_factory=Loads()) == 1
    assert json.loads(report.read_text())["counts"] == {"written": 0, "up to date": 3, "kept": 0, "failed": 1}


def test_busy_folder_is_in_the_report(tmp_path):
    ds = small_dataset(tmp_path)
    report = tmp_path / "report.json"
    from test_predict import Loads
    with folder_lock(ds / "derivatives" / "labels"):
        assert run_predict(select_items(items_from_bids(ds), (1, 2)),
                           Settings(fake_model_dir(tmp_path), shard=(1, 2), report=report), model_factory=Loads()) == 0
    rep = json.loads(report.read_text())
    assert rep["busy_folder"] == str(ds / "derivatives" / "labels") and rep["items"] == []


def test_lock_dir_keeps_every_lock_file_out_of_the_outputs(tmp_path):
    ds = small_dataset(tmp_path)
    locks = tmp_path / "local-locks"
    from test_predict import Loads
    assert run_predict(select_items(items_from_bids(ds)), Settings(fake_model_dir(tmp_path), lock_dir=locks),
                       model_factory=Loads()) == 0
    assert mask_of(ds, "sub-01/anat/sub-01_T2w.nii.gz").is_file()
    deriv = ds / "derivatives" / "labels"
    assert not list(deriv.rglob("*.lock")) and not (deriv / CLAIMS_FOLDER).exists()
    assert len(list(locks.iterdir())) == 1 + 3   # the folder's lock and one claim per image
    # and the folder lock really is there: a whole run with the same --lock-dir is refused
    with folder_lock(deriv, lock_dir=locks):
        assert run_predict(select_items(items_from_bids(ds)), Settings(fake_model_dir(tmp_path / "m2"),
                           lock_dir=locks), model_factory=Loads()) == 0


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK])
def test_no_flock_is_one_line_naming_the_folder_and_the_mount_option(tmp_path, monkeypatch, code):
    ds = small_dataset(tmp_path)
    model = fake_model_dir(tmp_path)

    def no_flock(fd, op):
        raise OSError(code, "Function not implemented")
    monkeypatch.setattr(claims_mod.fcntl, "flock", no_flock)
    res = CliRunner().invoke(main, ["predict", "--bids", str(ds), "--model", str(model), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    deriv = ds / "derivatives" / "labels"
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sacrum-masks: error: {deriv}: this file system does not support flock")
    assert "-o flock" in lines[0] and "--lock-dir" in lines[0]
    assert not list(deriv.rglob("*.nii.gz"))


def test_lock_unsupported_is_an_input_error():
    from sacrum_masks.errors import InputError
    exc = LockUnsupported("/lustre/x", OSError(errno.ENOSYS, "x"))
    assert isinstance(exc, InputError) and str(exc).startswith("/lustre/x: this file system does not support flock")
