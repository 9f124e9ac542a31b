"""QC report: every mask listed, every PNG a valid image of the fixed size, flags right for planted cases.

The dataset is made here in tmp_path: eight MRI-like images (one LPS, one with 4 mm slices, one in a
session) and their ``_label-sacrum_seg`` masks in ``derivatives/labels``: six small boxes of similar volume
(one without sidecar, one with a hostile file name), one empty mask, and one much larger box (volume
outlier) that also touches the image border. Nothing is mocked.
"""

from __future__ import annotations

import json
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from sacrum_masks.cli import main
from sacrum_masks.nifti import mask_like
from sacrum_masks.qc import PNG_SIZE, mask_measures, qc_slices, run_qc, volume_range

SHAPE = (20, 24, 16)


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR, after checking the signature and the IHDR CRC."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, ctype = struct.unpack(">I4s", raw[8:16])
    assert ctype == b"IHDR" and length == 13
    body = raw[16:29]
    assert struct.unpack(">I", raw[29:33])[0] == zlib.crc32(ctype + body)
    assert raw[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return struct.unpack(">II", body[:8])


def _write(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def make_dataset(root: Path) -> dict[str, dict]:
    """A BIDS dataset with images and masks; returns mask stem -> expected facts."""
    rng = np.random.default_rng(0)
    cases = {
        # stem: (folder, affine diag, box slices or None, sidecar)
        "sub-01_T2w": ("sub-01/anat", (1, 1, 1), (slice(8, 12), slice(8, 13), slice(5, 10)), True),
        "sub-02_T2w": ("sub-02/anat", (-1, -1, 1), (slice(7, 11), slice(9, 14), slice(5, 10)), True),
        "sub-03_T1w": ("sub-03/anat", (1, 1, 1), (slice(8, 12), slice(8, 13), slice(6, 11)), False),
        "sub-04_ses-01_T2w": ("sub-04/ses-01/anat", (1, 1, 1), (slice(9, 13), slice(8, 13), slice(5, 10)), True),
        "sub-05_T2w": ("sub-05/anat", (1, 1, 4), (slice(8, 12), slice(8, 14), slice(5, 9)), True),
        "sub-06_T2w": ("sub-06/anat", (1, 1, 1), None, True),
        "sub-07_T2w": ("sub-07/anat", (1, 1, 1), (slice(0, 16), slice(4, 20), slice(2, 14)), True),
        "sub-08_acq-a&b<i>$x$_T2w": ("sub-08/anat", (1, 1, 1), (slice(8, 12), slice(8, 13), slice(5, 10)), True),
    }
    expected = {}
    for stem, (folder, diag, box, sidecar) in cases.items():
        affine = np.diag([*diag, 1.0])
        affine[:3, 3] = [-10.0, -20.0, 5.0]
        image = nib.Nifti1Image(rng.normal(100, 20, SHAPE).astype(np.float32), affine)
        _write(image, root / folder / f"{stem}.nii.gz")
        data = np.zeros(SHAPE, np.uint8)
        if box is not None:
            data[box] = 1
        mstem = f"{stem}_label-sacrum_seg"
        _write(mask_like(data, image), root / "derivatives" / "labels" / folder / f"{mstem}.nii.gz")
        vol = float(data.sum()) * abs(np.prod(diag)) / 1000.0
        if sidecar:
            side = {"VolumeML": vol, "ComponentsRemoved": 2 if stem == "sub-01_T2w" else 0, "Empty": box is None}
            (root / "derivatives" / "labels" / folder / f"{mstem}.json").write_text(json.dumps(side))
        expected[mstem] = {"folder": folder, "volume_ml": vol, "flags": []}
    expected["sub-06_T2w_label-sacrum_seg"]["flags"] = ["empty"]
    expected["sub-07_T2w_label-sacrum_seg"]["flags"] = ["volume_outlier", "touches_border"]
    expected["sub-03_T1w_label-sacrum_seg"]["flags"] = ["no_sidecar"]
    # sub-05: 4 mm slices -> 4x the voxel volume: 4*6*4 voxels * 4 uL = 0.384 mL, inside the range
    return expected


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.rows, self.text = [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.links.append(a["src"])
        if tag == "a":
            self.links.append(a["href"])
        if tag in ("link", "script"):
            self.links.append(a.get("href") or a.get("src") or "")
        if tag == "tr":
            self.rows += 1

    def handle_data(self, data):
        self.text.append(data)


def test_report_lists_every_mask_with_valid_pngs_and_flags(tmp_path):
    root = tmp_path / "ds"
    expected = make_dataset(root)
    deriv = root / "derivatives" / "labels"
    entries, index = run_qc(deriv, command_line="sacrum-masks qc test")

    out = root / "derivatives" / "qc-sacrum"
    assert index == out / "index.html"
    assert sorted(Path(e.mask).name.replace(".nii.gz", "") for e in entries) == sorted(expected)

    parser = _Links()
    parser.feed(index.read_text(encoding="utf-8"))
    text = "".join(parser.text)
    assert parser.rows == len(expected) + 1  # header row
    for stem in expected:
        assert stem + ".nii.gz" in text, f"{stem} missing from index.html"
    # relative links that resolve; no network resource
    assert parser.links and all("://" not in u and not u.startswith("/") for u in parser.links)
    for url in parser.links:
        assert (out / unquote(url)).is_file(), url
    # hostile name escaped in the HTML source
    source = index.read_text(encoding="utf-8")
    assert "a&amp;b&lt;i&gt;$x$" in source and "<i>" not in source

    by_stem = {Path(e.mask).name.replace(".nii.gz", ""): e for e in entries}
    for stem, exp in expected.items():
        e = by_stem[stem]
        png = out / exp["folder"] / f"{stem}.png"
        assert e.png == f"{exp['folder']}/{stem}.png"
        assert _png_size(png) == PNG_SIZE
        assert e.volume_ml == pytest.approx(exp["volume_ml"], abs=1e-9)
        assert e.flags == exp["flags"], stem
        assert e.error is None
    assert by_stem["sub-01_T2w_label-sacrum_seg"].components_removed == 2
    assert by_stem["sub-03_T1w_label-sacrum_seg"].components_removed is None

    summary = json.loads((out / "qc.json").read_text())
    assert summary["GeneratedBy"]["CommandLine"] == "sacrum-masks qc test"
    assert len(summary["masks"]) == len(expected)
    assert summary["counts"] == {"written": 8, "up_to_date": 0, "failed": 0, "flagged": 3}
    assert (out / "dataset_description.json").is_file()
    assert not list(deriv.rglob("*.png")) and not list(out.rglob(".*.tmp*"))


def test_rerun_redraws_only_changed_and_missing_image_fails(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root)
    deriv = root / "derivatives" / "labels"
    run_qc(deriv, tmp_path / "qc")
    (root / "sub-02" / "anat" / "sub-02_T2w.nii.gz").unlink()
    result = CliRunner().invoke(main, ["qc", str(deriv), "--out", str(tmp_path / "qc")])
    assert result.exit_code == 1
    assert "qc: 0 written, 7 up to date, 1 failed (3 flagged)" in result.output
    summary = json.loads((tmp_path / "qc" / "qc.json").read_text())
    bad = [m for m in summary["masks"] if m["error"]]
    assert len(bad) == 1 and "sub-02_T2w.nii.gz: no such file" in bad[0]["error"] and bad[0]["png"] is None
    assert "sub-02_T2w_label-sacrum_seg.nii.gz" in (tmp_path / "qc" / "index.html").read_text()


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    plain = tmp_path / "plain"
    plain.mkdir()
    r = runner.invoke(main, ["qc", str(plain)])
    assert r.exit_code == 2 and "expected a derivatives folder" in r.output and len(r.output.splitlines()) == 1
    empty = tmp_path / "ds" / "derivatives" / "labels"
    empty.mkdir(parents=True)
    r = runner.invoke(main, ["qc", str(empty)])
    assert r.exit_code == 2 and "no masks" in r.output
    r = runner.invoke(main, ["qc", str(empty), "--out", str(empty)])
    assert r.exit_code == 2 and "must not be the derivatives folder" in r.output


def test_measures_and_slices_on_tiny_grids():
    m = np.zeros((3, 4, 5), np.uint8)
    m[1, 1:3, 1:4] = 1
    r = mask_measures(m, 0.002)
    assert (r["voxels"], r["volume_ml"], r["centroid"], r["touches_border"]) == (6, 0.012, [1.0, 1.5, 2.0], False)
    assert mask_measures(np.zeros((2, 2, 2)), 1.0) == {"voxels": 0, "volume_ml": 0.0, "centroid": None,
                                                       "touches_border": False}
    a = np.arange(60).reshape(3, 4, 5)
    s = qc_slices(a, a, (2, 1, 0))
    np.testing.assert_array_equal(s["sagittal"][0], a[2])
    np.testing.assert_array_equal(s["coronal"][0], a[:, 1, :])
    assert volume_range([1, 2, 3]) is None
    lo, hi = volume_range([1.0, 1.0, 1.0, 1.0, 5.0])
    assert (lo, hi) == (1.0, 1.0)


def test_rpi_views_do_not_depend_on_voxel_order(tmp_path):
    """The same mask stored RAS and LPS gives the same centroid plane and the same picture size."""
    from sacrum_masks.nifti import to_rpi

    data = np.zeros(SHAPE, np.uint8)
    data[2:5, 3:9, 4:7] = 1
    ras = nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0]))
    lps_aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_aff[:3, 3] = [SHAPE[0] - 1, SHAPE[1] - 1, 0]
    lps = nib.Nifti1Image(data[::-1, ::-1, :].copy(), lps_aff)
    a = mask_measures(np.asanyarray(to_rpi(ras).dataobj), 1)["centroid"]
    b = mask_measures(np.asanyarray(to_rpi(lps).dataobj), 1)["centroid"]
    # RPI = (L, A, S): the RAS file is flipped along x (3 -> 19 - 3), the LPS one along y
    assert a == b == [16.0, 5.5, 5.0]
