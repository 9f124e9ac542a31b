"""Model install from a zip: member checks before extraction, atomic install, one-line download failure."""

from __future__ import annotations

import doctest
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from sacrum_masks import model_zip
from sacrum_masks.cli import main as cli
from sacrum_masks.errors import InputError
from sacrum_masks.model_zip import install_model, install_model_zip

MODEL = "Dataset300_SacrumDataset/nnUNetTrainer__nnUNetPlans__3d_fullres"


def make_zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def good_members(prefix=MODEL):
    return {f"{prefix}/dataset.json": b"{}", f"{prefix}/plans.json": b"{}",
            f"{prefix}/fold_0/checkpoint_best.pth": b"weights"}


def test_doctests():
    result = doctest.testmod(model_zip)
    assert result.attempted > 0 and result.failed == 0


def test_install_puts_the_model_under_results(tmp_path):
    z = make_zip(tmp_path / "m.zip", good_members())
    results = tmp_path / "results"
    installed = install_model_zip(z, results, expect=MODEL)
    assert installed == [results / MODEL]
    assert (results / MODEL / "fold_0" / "checkpoint_best.pth").read_bytes() == b"weights"
    # no staging folder left behind
    assert [p.name for p in results.iterdir()] == ["Dataset300_SacrumDataset"]


@pytest.mark.parametrize("bad, reason", [
    ("../evil.txt", "leaves the destination"),
    (f"{MODEL}/../../../evil.txt", "leaves the destination"),
    ("/etc/evil.txt", "absolute path"),
    ("C:/evil.txt", "absolute path"),
    ("..\\evil.txt", "leaves the destination"),
])
def test_bad_member_refused_before_anything_is_extracted(tmp_path, bad, reason):
    members = good_members()
    members[bad] = b"x"
    z = make_zip(tmp_path / "bad.zip", members)
    results = tmp_path / "sub" / "results"
    with pytest.raises(InputError, match=reason):
        install_model_zip(z, results, expect=MODEL)
    assert not results.exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "sub" / "evil.txt").exists()


def test_symlink_member_refused(tmp_path):
    z = make_zip(tmp_path / "link.zip", good_members(), symlinks={f"{MODEL}/link": "/etc/passwd"})
    with pytest.raises(InputError, match="symbolic link"):
        install_model_zip(z, tmp_path / "results", expect=MODEL)
    assert not (tmp_path / "results").exists()


def test_zip_without_the_expected_model(tmp_path):
    z = make_zip(tmp_path / "other.zip", good_members("Dataset301_X/nnUNetTrainer__nnUNetPlans__2d"))
    with pytest.raises(InputError, match=r"does not hold the model .* \(it holds Dataset301_X"):
        install_model_zip(z, tmp_path / "results", expect=MODEL)


def test_not_a_zip(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a zip file"):
        install_model_zip(tmp_path / "x.zip", tmp_path / "results")


def test_existing_model_is_left_untouched(tmp_path):
    results = tmp_path / "results"
    (results / MODEL).mkdir(parents=True)
    (results / MODEL / "mine.txt").write_text("keep")
    install_model_zip(make_zip(tmp_path / "m.zip", good_members()), results, expect=MODEL)
    assert sorted(p.name for p in (results / MODEL).iterdir()) == ["mine.txt"]


def test_install_model_from_file_url(tmp_path):
    z = make_zip(tmp_path / "m.zip", good_members())
    model_dir = tmp_path / "results" / MODEL
    assert install_model(z.as_uri(), model_dir) == model_dir
    assert (model_dir / "plans.json").is_file()
    left = [p.name for p in (tmp_path / "results").glob(".*")]
    assert left == [".install-Dataset300_SacrumDataset.lock"]   # no download or staging left; the lock stays


def test_unreachable_url_is_one_line_and_nonzero(tmp_path):
    # a real failed connection (nothing listens on port 9 of localhost), not a mock
    model_dir = tmp_path / "results" / MODEL
    proc = subprocess.run([str(Path(sys.executable).parent / "sacrum-masks"), "install-model", "--model", str(model_dir),
                           "--model-zip", "http://127.0.0.1:9/x.zip", "--timeout", "5"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    err_lines = proc.stderr.strip().splitlines()
    assert len(err_lines) == 1, proc.stderr
    assert err_lines[0].startswith("sacrum-masks: error: cannot download http://127.0.0.1:9/x.zip: ")
    assert err_lines[0].endswith("download it on a connected machine and pass --model-zip PATH")
    assert not model_dir.exists()
    left = list((tmp_path / "results").glob("*")) + list((tmp_path / "results").glob(".*"))
    assert {p.name for p in left} == {".install-Dataset300_SacrumDataset.lock"}   # only the install lock


def test_cli_present_model_does_nothing(tmp_path):
    (tmp_path / MODEL).mkdir(parents=True)
    result = CliRunner().invoke(cli, ["install-model", "--model", str(tmp_path / MODEL), "--model-zip", "nope.zip"])
    assert result.exit_code == 0 and "model present" in result.output


def test_four_processes_at_once_install_once_and_all_use_it(tmp_path):
    """SLURM array tasks on a fresh node: one installs under the lock, the other three wait and use it."""
    zpath = make_zip(tmp_path / "model.zip", {**good_members(), f"{MODEL}/fold_0/big.bin": b"x" * (8 << 20)})
    model = tmp_path / "results" / MODEL
    code = ("import sys, time; from sacrum_masks.model_zip import ensure_model; t = float(sys.argv[3]);"
            "time.sleep(max(0.0, t - time.time())); print(ensure_model(sys.argv[1], sys.argv[2]))")
    start = str(__import__("time").time() + 3.0)   # all four enter at the same moment
    procs = [subprocess.Popen([sys.executable, "-c", code, str(zpath), str(model), start], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert sorted(o.strip() for o, _ in outs) == ["False", "False", "False", "True"]
    assert (model / "fold_0" / "big.bin").stat().st_size == 8 << 20
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.startswith(".install-model-")]
