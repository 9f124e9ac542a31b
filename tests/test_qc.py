"""QC report: every mask listed, every PNG a valid image of the fixed size, flags right for planted cases.

The dataset is made here in tmp_path: eight MRI-like images (one LPS, one with 4 mm slices, one in a
session) and their ``_label-sacrum_seg`` masks in ``derivatives/labels``: six small boxes of similar volume
(one without sidecar, one with a hostile file name), one empty mask, and one much larger box (volume and
extent outlier). Nothing is mocked. Faults in real demo masks: test_qc_faults.py; the page in chromium:
test_qc_browser.py.
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
from sacrum_masks import qc_checks
from sacrum_masks.qc import PNG_SIZE, mask_measures, qc_planes, run_qc

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
        "sub-05_T2w": ("sub-05/anat", (1, 1, 4), (slice(8, 12), slice(8, 13), slice(5, 6)), True),
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
            side = {"GeneratedBy": [{"Name": "sacrum-masks"}], "VolumeML": vol,
                    "ComponentsRemoved": 2 if stem == "sub-01_T2w" else 0, "Empty": box is None}
            (root / "derivatives" / "labels" / folder / f"{mstem}.json").write_text(json.dumps(side))
        expected[mstem] = {"folder": folder, "volume_ml": vol, "flags": []}
    expected["sub-06_T2w_label-sacrum_seg"]["flags"] = ["empty"]
    # 16 x 16 x 12 voxels: about 19 times the others' volume, and far larger along every axis
    expected["sub-07_T2w_label-sacrum_seg"]["flags"] = ["volume_outlier", "extent"]
    # sub-05: 4 mm slices -> 4x the voxel volume: 4*5*1 voxels * 4 uL = 0.08 mL, 4 mm along S: inside the range
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
    source = index.read_text(encoding="utf-8")
    parser.feed(source)
    text = "".join(parser.text)
    assert parser.rows == len(expected) + 1  # header row
    for stem in expected:
        assert stem + ".nii.gz" in text, f"{stem} missing from index.html"
    # relative links that resolve; no network resource (scripts and styles are inline)
    assert parser.links and all("://" not in u and not u.startswith("/") for u in parser.links)
    for url in parser.links:
        assert url == "" or (out / unquote(url)).is_file(), url
    # hostile name escaped in the HTML source
    assert "a&amp;b&lt;i&gt;$x$" in source and "<i>" not in source

    by_stem = {Path(e.mask).name.replace(".nii.gz", ""): e for e in entries}
    for stem, exp in expected.items():
        e = by_stem[stem]
        png = out / exp["folder"] / f"{stem}.png"
        assert e.png == f"{exp['folder']}/{stem}.png"
        assert _png_size(png) == PNG_SIZE
        assert e.volume_ml == pytest.approx(exp["volume_ml"], abs=1e-9)
        assert e.flags == exp["flags"], (stem, e.reasons)
        assert len(e.reasons) == len(e.flags) and all(e.reasons)
        assert e.error is None
    assert by_stem["sub-01_T2w_label-sacrum_seg"].components_removed == 2
    assert by_stem["sub-03_T1w_label-sacrum_seg"].components_removed is None
    assert by_stem["sub-03_T1w_label-sacrum_seg"].sidecar == "manual"
    assert "volume" in by_stem["sub-07_T2w_label-sacrum_seg"].reasons[0]
    # worst first, flagged above clean
    scores = [e.score for e in entries]
    assert scores == sorted(scores, reverse=True)
    assert {Path(e.mask).name for e in entries[:2]} == {"sub-06_T2w_label-sacrum_seg.nii.gz",
                                                       "sub-07_T2w_label-sacrum_seg.nii.gz"}
    # no uncertainty in these sidecars: n/a on the page
    assert all(e.boundary_entropy is None and e.fold_dice is None for e in entries)
    assert "n/a" in text

    summary = json.loads((out / "qc.json").read_text())
    assert summary["GeneratedBy"]["CommandLine"] == "sacrum-masks qc test"
    assert len(summary["masks"]) == len(expected)
    assert summary["counts"] == {"masks": 8, "written": 8, "up_to_date": 0, "failed": 0, "flagged": 2}
    assert summary["thresholds"]["holes_share"] == qc_checks.T("holes_share")
    assert (out / "dataset_description.json").is_file()
    assert not list(deriv.rglob("*.png")) and not list(out.rglob(".*.tmp*"))


def test_uncertainty_read_from_sidecars(tmp_path):
    """BoundaryEntropy and FoldAgreementDice (stage 4's keys, CONTRACTS.md) shown and checked when present."""
    root = tmp_path / "ds"
    make_dataset(root)
    labels = root / "derivatives" / "labels"
    values = {"sub-01": (0.31, 0.95), "sub-02": (0.29, 0.93), "sub-04": (0.30, None), "sub-05": (0.32, 0.94),
              "sub-08": (0.95, 0.62)}
    for side in labels.rglob("*.json"):
        sub = side.name.split("_")[0]
        if sub in values:
            d = json.loads(side.read_text())
            d["BoundaryEntropy"], d["FoldAgreementDice"] = values[sub]
            side.write_text(json.dumps(d))
    entries, index = run_qc(labels)
    by_sub = {e.subject: e for e in entries}
    assert by_sub["01"].boundary_entropy == 0.31 and by_sub["01"].fold_dice == 0.95
    assert by_sub["04"].fold_dice is None and by_sub["03"].boundary_entropy is None
    assert by_sub["08"].flags == ["fold_disagreement", "uncertain_boundary"], by_sub["08"].reasons
    assert "0.620" in by_sub["08"].reasons[0]
    assert not by_sub["01"].flags
    source = index.read_text()
    assert ">0.950<" in source and ">0.620<" in source and "n/a" in source


def test_rerun_redraws_only_changed_and_bad_inputs_are_one_line_each(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root)
    deriv = root / "derivatives" / "labels"
    run_qc(deriv, tmp_path / "qc")
    (root / "sub-02" / "anat" / "sub-02_T2w.nii.gz").unlink()                       # a mask without its image
    (root / "sub-05" / "anat" / "sub-05_T2w.nii.gz").write_bytes(b"not a nifti")     # an unreadable image
    (deriv / "sub-04" / "ses-01" / "anat" / "sub-04_ses-01_T2w_label-sacrum_seg.json").write_text("{broken")
    result = CliRunner().invoke(main, ["qc", str(deriv), "--out", str(tmp_path / "qc")])
    assert result.exit_code == 1
    out = result.output  # stdout and stderr (click >= 8.2)
    assert "qc: 0 written, 5 up to date, 3 failed" in out, out
    failed = [line for line in out.splitlines() if line.startswith("qc: failed")]
    assert len(failed) == 3
    assert any("sub-02_T2w.nii.gz" in line and "no such file" in line for line in failed)
    assert any("sub-05_T2w.nii.gz" in line for line in failed)
    assert any("sidecar is not readable" in line for line in failed)
    summary = json.loads((tmp_path / "qc" / "qc.json").read_text())
    bad = {m["subject"]: m for m in summary["masks"] if m["error"]}
    assert set(bad) == {"02", "05"} and all(m["png"] is None and m["flags"][0] == "error" for m in bad.values())
    side = next(m for m in summary["masks"] if m["subject"] == "04")
    assert side["sidecar"] == "unreadable" and "bad_sidecar" in side["flags"] and side["png"]
    # unreadable ones first, the rest of the report still written
    assert {m["subject"] for m in summary["masks"][:2]} == {"02", "05"}
    assert len(summary["masks"]) == 8
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
    assert r.exit_code == 2 and "no masks" in r.output and "empty cohort" in r.output
    assert len(r.output.splitlines()) == 1
    r = runner.invoke(main, ["qc", str(empty), "--out", str(empty)])
    assert r.exit_code == 2 and "must not be the derivatives folder" in r.output
    r = runner.invoke(main, ["qc"])
    assert r.exit_code == 2 and "--config" in r.output


def test_registration_qc_and_config_qc(tmp_path):
    """Stage 1's reg-labels (its own sidecar keys) and a training config's masks get the same report."""
    root = tmp_path / "bids" / "ds"
    make_dataset(root)
    labels = root / "derivatives" / "labels"
    reg = root / "derivatives" / "reg-labels"
    for mask in sorted(labels.rglob("*_label-sacrum_seg.nii.gz")):
        if "sub-06" in mask.name or "sub-08" in mask.name:
            continue
        dst = reg / mask.relative_to(labels).parent / mask.name.replace("_label-sacrum_seg", "_seg")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(mask.read_bytes())
        frac = 0.3 if "sub-01" in mask.name else 0.0
        dst.with_name(dst.name.replace(".nii.gz", ".json")).write_text(json.dumps(
            {"FractionOutsideFOV": frac, "VolumeBeforeML": 1.0, "VolumeAfterML": 1.0 - frac,
             "GeneratedBy": [{"Name": "sacrum-masks"}]}))
    entries, index = run_qc(reg)
    assert index == root / "derivatives" / "qc-sacrum-reg-labels" / "index.html"
    assert len(entries) == 6
    worst = entries[0]
    assert worst.subject == "01" and worst.flags[:2] == ["outside_fov", "volume_change"], worst.reasons
    assert "30.0 % of the CT label is outside" in worst.reasons[0]

    from sacrum_masks.config import make_config
    files = sorted(p for p in labels.rglob("*_label-sacrum_seg.nii.gz") if "sub-06" not in p.name)
    config = make_config(files, "LABEL", 0.2, 0.2, 0)
    cfg = tmp_path / "split.json"
    cfg.write_text(json.dumps(config))
    r = CliRunner().invoke(main, ["qc", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "split_qc" / "qc.json").read_text())
    assert sorted(m["mask"] for m in summary["masks"]) == sorted(
        str(p.relative_to(tmp_path / "bids")) for p in files)
    assert summary["masks"][0]["mask"].endswith("sub-07_T2w_label-sacrum_seg.nii.gz")


def test_thresholds_table_in_readme():
    """The README shows the thresholds the code uses (one table, generated by qc_checks.thresholds_markdown)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert qc_checks.thresholds_markdown() in readme


def test_measures_and_planes_on_tiny_grids():
    m = np.zeros((5, 4, 5), np.uint8)
    m[1:4, 1:3, 1:4] = 1
    r = mask_measures(m, (1.0, 1.0, 2.0), 0.002)
    assert (r["voxels"], r["volume_ml"], r["border"], r["holes"], r["asymmetry"]) == (18, 0.036, [0, 0], 0, 0.0)
    assert r["extent_mm"] == [3.0, 2.0, 6.0] and r["position"] == [0.5, 0.5, 0.5]
    m[2, 1, 2] = 0  # not enclosed (on the surface)
    m2 = np.zeros((5, 5, 5), np.uint8)
    m2[1:4, 1:4, 1:4] = 1
    m2[2, 2, 2] = 0
    assert mask_measures(m2, (1, 1, 1), 1.0)["holes"] == 1
    a = np.arange(60).reshape(3, 4, 5)
    s = qc_planes(a, a, (2, 1, 3))
    np.testing.assert_array_equal(s["sagittal"][0], a[2])
    np.testing.assert_array_equal(s["coronal"][0], a[:, 1, :])
    np.testing.assert_array_equal(s["axial"][0], a[:, :, 3])
    assert qc_checks.volume_limits([1, 2, 3]) is None


def test_rpi_measures_do_not_depend_on_voxel_order(tmp_path):
    """The same mask stored RAS and LPS gives the same measures."""
    from sacrum_masks.nifti import to_rpi

    data = np.zeros(SHAPE, np.uint8)
    data[2:5, 3:9, 4:7] = 1
    data[3, 9, 5] = 1
    ras = nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0]))
    lps_aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_aff[:3, 3] = [SHAPE[0] - 1, SHAPE[1] - 1, 0]
    lps = nib.Nifti1Image(data[::-1, ::-1, :].copy(), lps_aff)
    a = mask_measures(np.asanyarray(to_rpi(ras).dataobj), (1, 1, 1), 1)
    b = mask_measures(np.asanyarray(to_rpi(lps).dataobj), (1, 1, 1), 1)
    a.pop("centroid"), b.pop("centroid")
    assert a == b
