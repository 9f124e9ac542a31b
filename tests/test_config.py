"""Split configs: init-config (list -> config) and load_config (portable DATASETS_PATH, no escape)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from sacrum_masks.cli import main
from sacrum_masks.config import (
    CONTRASTS, contrasts_code, image_from_label, load_config, make_config, split_entries, subject_key,
)
from sacrum_masks.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = ROOT.parent / "shared" / "data" / "test_sacrum_original.json"


def write_nii(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), str(path))
    return path


def make_datasets(root: Path, spec: dict[str, dict[str, list[str]]], labels: bool = True) -> list[Path]:
    """spec: dataset -> subject label -> contrasts; writes images (+ reg-labels); returns sorted label paths."""
    out = []
    for ds, subjects in spec.items():
        for sub, contrasts in subjects.items():
            for c in contrasts:
                img = write_nii(root / ds / f"sub-{sub}" / "anat" / f"sub-{sub}_{c}.nii.gz")
                if labels:
                    out.append(write_nii(root / ds / "derivatives" / "reg-labels" / f"sub-{sub}" / "anat"
                                         / f"sub-{sub}_{c}_seg.nii.gz"))
                else:
                    out.append(img)
    return sorted(out)


SPEC = {"dsA": {f"{i:02d}": ["T1w", "T2w"] for i in range(1, 9)},
        "dsB": {f"{i:02d}": ["T2w"] for i in range(1, 5)}}


# ------------------------------------------------------------------------------------ names


def test_image_from_label_drops_derivatives_and_suffix():
    assert image_from_label("/d/ds/derivatives/reg-labels/sub-01/anat/sub-01_acq-x_T1w_seg.nii.gz") == \
        Path("/d/ds/sub-01/anat/sub-01_acq-x_T1w.nii.gz")
    assert image_from_label("/d/ds/derivatives/labels/sub-01/ses-2/anat/sub-01_ses-2_T2w_label-sacrum_seg.nii.gz") == \
        Path("/d/ds/sub-01/ses-2/anat/sub-01_ses-2_T2w.nii.gz")
    with pytest.raises(InputError, match="not a label file name"):
        image_from_label("/d/ds/derivatives/labels/sub-01/anat/sub-01_T2w.nii.gz")
    with pytest.raises(InputError, match="derivatives"):
        image_from_label("/d/ds/sub-01/anat/sub-01_T2w_seg.nii.gz")


def test_contrasts_code_is_the_original_table():
    assert contrasts_code(["T1w", "T2w", "T1w"]) == "t1_t2"
    assert contrasts_code(["STIR", "PSIR", "T2w", "T1w"]) == "t1_t2_psir_stir"
    assert set(CONTRASTS) == {"t1", "t2", "t2s", "t1_t2", "psir", "stir", "psir_stir", "t1_t2_psir_stir"}
    with pytest.raises(InputError, match="FLAIR\\+T2w is not a set of the CONTRASTS table"):
        contrasts_code(["T2w", "FLAIR"])


# ------------------------------------------------------------------------------------ split


@st.composite
def subject_sets(draw):
    """Random datasets, subjects, sessions and contrasts, as entries relative to DATASETS_PATH."""
    entries = []
    for d in range(draw(st.integers(1, 3))):
        for s in range(draw(st.integers(1, 9))):
            sessions = draw(st.sampled_from([[None], ["01"], ["01", "02"]]))
            contrasts = draw(st.lists(st.sampled_from(["T1w", "T2w", "PSIR"]), min_size=1, max_size=3, unique=True))
            for ses in sessions:
                for c in contrasts:
                    folder = f"ds{d}/derivatives/reg-labels/sub-{s:03d}" + (f"/ses-{ses}" if ses else "")
                    name = f"sub-{s:03d}" + (f"_ses-{ses}" if ses else "") + f"_{c}_seg.nii.gz"
                    entries.append(f"{folder}/anat/{name}")
    return entries


fractions = st.tuples(st.floats(0, 1), st.floats(0, 1)).filter(lambda t: t[0] + t[1] <= 1)


@settings(max_examples=150, deadline=None)
@given(subject_sets(), fractions, st.integers(0, 2**32 - 1), st.randoms(use_true_random=False))
def test_split_never_puts_a_subject_in_two_splits(entries, frac, seed, rnd):
    val, test = frac
    shuffled = list(entries)
    rnd.shuffle(shuffled)
    split = split_entries(shuffled, validation=val, test=test, seed=seed)
    owner = {}
    for key, items in split.items():
        assert items == sorted(items)
        for e in items:
            assert owner.setdefault(subject_key(e), key) == key, f"{subject_key(e)} in {owner[subject_key(e)]} and {key}"
    # every entry exactly once
    assert sorted(e for items in split.values() for e in items) == sorted(entries)
    # same inputs (any order) and seed: same split
    assert split_entries(sorted(entries), validation=val, test=test, seed=seed) == split
    # subject counts follow the fractions
    n = len({subject_key(e) for e in entries})
    n_test = len({subject_key(e) for e in split["TESTING"]})
    n_val = len({subject_key(e) for e in split["VALIDATION"]})
    assert n_test == min(n, int(n * test + 0.5))
    assert n_val == min(n - n_test, int(n * val + 0.5))


def test_split_spreads_datasets_over_splits():
    entries = [f"{ds}/sub-{i:02d}/anat/sub-{i:02d}_T2w.nii.gz" for ds in ("a", "b") for i in range(10)]
    split = split_entries(entries, validation=0.2, test=0.2, seed=3)
    for key, expected in (("TESTING", 2), ("VALIDATION", 2), ("TRAINING", 6)):
        assert sorted(sum(e.startswith(ds + "/") for e in split[key]) for ds in "ab") == [expected, expected]


def test_split_fraction_refusals():
    entries = ["a/sub-1/anat/sub-1_T2w.nii.gz"]
    with pytest.raises(InputError, match="sum 1.1 is over 1"):
        split_entries(entries, validation=0.6, test=0.5)
    with pytest.raises(InputError, match="--split-test: 1.5 is not in"):
        split_entries(entries, validation=0, test=1.5)
    with pytest.raises(InputError, match="listed more than once"):
        split_entries(entries * 2)


# ------------------------------------------------------------------------------------ init-config


def test_make_config_label_type(tmp_path):
    root = tmp_path / "bids"
    labels = make_datasets(root, SPEC)
    cfg = make_config(labels, "LABEL", validation=0.25, test=0.25, seed=7)
    assert list(cfg) == ["TYPE", "CONTRASTS", "DATASETS_PATH", "SEED", "TRAINING", "VALIDATION", "TESTING"]
    assert (cfg["TYPE"], cfg["CONTRASTS"], cfg["DATASETS_PATH"], cfg["SEED"]) == ("LABEL", "t1_t2", str(root), 7)
    all_entries = sorted(e for k in ("TRAINING", "VALIDATION", "TESTING") for e in cfg[k])
    assert all_entries == sorted(p.relative_to(root).as_posix() for p in labels)
    assert all(e.split("/")[1] == "derivatives" for e in all_entries)
    # 12 subjects: 3 test, 3 validation, 6 training
    assert [len({subject_key(e) for e in cfg[k]}) for k in ("TRAINING", "VALIDATION", "TESTING")] == [6, 3, 3]
    assert make_config(labels, "LABEL", 0.25, 0.25, seed=7) == cfg


def test_init_config_cli_writes_json_next_to_list(tmp_path):
    root = tmp_path / "bids"
    labels = make_datasets(root, SPEC)
    txt = tmp_path / "labels.txt"
    txt.write_text("".join(f"{p}\n" for p in labels))
    res = CliRunner().invoke(main, ["init-config", "--txt", str(txt), "--type", "LABEL", "--seed", "3"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "labels.json").read_text())
    assert cfg["SEED"] == 3 and cfg["DATASETS_PATH"] == str(root)
    assert "init-config: wrote" in res.output and "t1_t2" in res.output
    # same seed, same config (explicit -o)
    res = CliRunner().invoke(main, ["init-config", "--txt", str(txt), "--type", "LABEL", "--seed", "3",
                                    "-o", str(tmp_path / "again.json")])
    assert res.exit_code == 0
    assert json.loads((tmp_path / "again.json").read_text()) == cfg
    # the result loads
    loaded = load_config(tmp_path / "labels.json", env={})
    assert sum(len(loaded[k]) for k in ("TRAINING", "VALIDATION", "TESTING")) == len(labels)


def test_init_config_portable(tmp_path, monkeypatch):
    root = tmp_path / "data" / "bids"
    labels = make_datasets(root, {"ds": {"01": ["T2w"]}})
    monkeypatch.setenv("SACRUM_DATA", str(tmp_path / "data"))
    cfg = make_config(labels, "LABEL", 0, 0, portable="SACRUM_DATA")
    assert cfg["DATASETS_PATH"] == "${SACRUM_DATA}/bids"
    monkeypatch.setenv("SACRUM_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(InputError, match=r"is not inside \$SACRUM_DATA"):
        make_config(labels, "LABEL", 0, 0, portable="SACRUM_DATA")


def test_init_config_lists_all_missing_files(tmp_path):
    root = tmp_path / "bids"
    labels = make_datasets(root, SPEC)
    gone_image = image_from_label(labels[0])
    gone_image.unlink()
    ghost = root / "dsA" / "derivatives" / "reg-labels" / "sub-99" / "anat" / "sub-99_T2w_seg.nii.gz"
    txt = tmp_path / "l.txt"
    txt.write_text("\n".join(map(str, labels + [ghost])) + "\n")
    res = CliRunner().invoke(main, ["init-config", "--txt", str(txt), "--type", "LABEL"])
    assert res.exit_code == 2
    line = res.output.strip()
    assert "\n" not in line
    assert line.startswith(f"sacrum-masks: error: {txt}: 3 missing file(s): ")
    for p in (gone_image, ghost, image_from_label(ghost)):
        assert str(p) in line


def test_init_config_refusals(tmp_path):
    a = make_datasets(tmp_path / "one", {"ds1": {"01": ["T2w"]}})
    b = make_datasets(tmp_path / "two", {"ds2": {"01": ["T2w"]}})
    with pytest.raises(InputError, match="one parent folder.*one, .*two"):
        make_config(a + b, "LABEL", 0.1, 0.1)
    c = make_datasets(tmp_path / "three", {"ds": {"01": ["T2w", "FLAIR"]}})
    with pytest.raises(InputError, match="contrasts: FLAIR\\+T2w is not a set of the CONTRASTS table"):
        make_config(c, "LABEL", 0.1, 0.1)
    txt = tmp_path / "x.txt"
    txt.write_text("\n".join(map(str, a)))
    for args, msg in ((["--split-validation", "0.7", "--split-test", "0.4"], "sum 1.1 is over 1"),
                      (["--split-test", "1.2"], "Invalid value for '--split-test'")):
        res = CliRunner().invoke(main, ["init-config", "--txt", str(txt), "--type", "LABEL", *args])
        assert res.exit_code == 2 and msg in res.output, res.output


def test_init_config_image_type(tmp_path):
    root = tmp_path / "bids"
    images = make_datasets(root, {"ds": {"01": ["T1w"], "02": ["T1w"]}}, labels=False)
    cfg = make_config(images, "IMAGE", 0, 0.5, seed=1)
    assert cfg["CONTRASTS"] == "t1"
    assert sorted(cfg["TRAINING"] + cfg["TESTING"]) == ["ds/sub-01/anat/sub-01_T1w.nii.gz",
                                                       "ds/sub-02/anat/sub-02_T1w.nii.gz"]


# ------------------------------------------------------------------------------------ load_config


def write_cfg(path: Path, datasets_path: str, testing: list[str], type_="IMAGE") -> Path:
    path.write_text(json.dumps({"TYPE": type_, "CONTRASTS": "t2", "DATASETS_PATH": datasets_path,
                                "TRAINING": [], "VALIDATION": [], "TESTING": testing}))
    return path


def test_load_original_config_with_absolute_path(tmp_path):
    root = tmp_path / "bids"
    make_datasets(root, {"ds": {"01": ["T2w"]}}, labels=False)
    cfg = load_config(write_cfg(tmp_path / "c.json", str(root), ["ds/sub-01/anat/sub-01_T2w.nii.gz"]), env={})
    assert cfg["DATASETS_PATH"] == root.resolve()
    assert cfg["TESTING"] == [root.resolve() / "ds/sub-01/anat/sub-01_T2w.nii.gz"]
    assert cfg["TRAINING"] == [] and cfg["TYPE"] == "IMAGE" and cfg["CONTRASTS"] == "t2"


def test_datasets_path_precedence_and_vars(tmp_path):
    roots = {}
    for name in ("cfg", "env", "opt", "var"):
        roots[name] = tmp_path / name
        make_datasets(roots[name], {"ds": {"01": ["T2w"]}}, labels=False)
    entry = ["ds/sub-01/anat/sub-01_T2w.nii.gz"]
    c = write_cfg(tmp_path / "c.json", str(roots["cfg"]), entry)
    assert load_config(c, env={})["DATASETS_PATH"] == roots["cfg"]
    assert load_config(c, env={"DATASETS_PATH": str(roots["env"])})["DATASETS_PATH"] == roots["env"]
    assert load_config(c, roots["opt"], env={"DATASETS_PATH": str(roots["env"])})["DATASETS_PATH"] == roots["opt"]
    v = write_cfg(tmp_path / "v.json", "${SACRUM_DATA}/var", entry)
    assert load_config(v, env={"SACRUM_DATA": str(tmp_path)})["DATASETS_PATH"] == roots["var"]
    with pytest.raises(InputError, match=r"v.json: DATASETS_PATH uses \$\{SACRUM_DATA\}, which is not set"):
        load_config(v, env={})
    blank = write_cfg(tmp_path / "b.json", "", entry)
    with pytest.raises(InputError, match="b.json: DATASETS_PATH is blank: pass --datasets-path DIR or set DATASETS_PATH"):
        load_config(blank, env={})


def test_entries_that_escape_are_refused(tmp_path):
    root = tmp_path / "bids"
    make_datasets(root, {"ds": {"01": ["T2w"]}}, labels=False)
    outside = make_datasets(tmp_path / "outside", {"ds": {"02": ["T2w"]}}, labels=False)[0]
    (root / "ds" / "sub-02").symlink_to(outside.parent.parent)          # folder link out
    (root / "ds" / "sub-01" / "anat" / "sub-01_T1w.nii.gz").symlink_to(outside)  # file link out
    (root / "ds" / "sub-01" / "anat" / "sub-01_PD.nii.gz").symlink_to("sub-01_T2w.nii.gz")  # link inside: fine
    ok = "ds/sub-01/anat/sub-01_T2w.nii.gz"
    for bad, reason in (("../outside/ds/sub-02/anat/sub-02_T2w.nii.gz", "'..' leaves DATASETS_PATH"),
                        ("ds/sub-01/../../../outside/x.nii.gz", "'..' leaves DATASETS_PATH"),
                        (str(outside), "absolute path (entries are relative to DATASETS_PATH)"),
                        ("ds/sub-02/anat/sub-02_T2w.nii.gz", "a symbolic link leads outside DATASETS_PATH"),
                        ("ds/sub-01/anat/sub-01_T1w.nii.gz", "a symbolic link leads outside DATASETS_PATH")):
        c = write_cfg(tmp_path / "c.json", str(root), [ok, bad])
        with pytest.raises(InputError) as info:
            load_config(c, env={})
        assert str(info.value) == f"{c}: 1 bad entry: TESTING[1] {bad!r}: {reason}" + (
            f" (to {outside})" if "symbolic" in reason else "")
        with pytest.raises(InputError):
            load_config(c, env={}, check_exists=False)
    linked = load_config(write_cfg(tmp_path / "c.json", str(root), ["ds/sub-01/anat/sub-01_PD.nii.gz"]), env={})
    assert linked["TESTING"] == [root / "ds/sub-01/anat/sub-01_PD.nii.gz"]


def test_missing_entries_listed_or_left_to_caller(tmp_path):
    root = tmp_path / "bids"
    make_datasets(root, {"ds": {"01": ["T2w"]}}, labels=False)
    c = write_cfg(tmp_path / "c.json", str(root), ["ds/sub-01/anat/sub-01_T2w.nii.gz", "ds/a/sub-05_T2w.nii.gz",
                                                   "ds/b/sub-06_T2w.nii.gz"])
    with pytest.raises(InputError, match=r"2 missing file\(s\) under .*TESTING\[1\] ds/a/sub-05_T2w.nii.gz; "
                                         r"TESTING\[2\] ds/b/sub-06_T2w.nii.gz"):
        load_config(c, env={})
    assert len(load_config(c, env={}, check_exists=False)["TESTING"]) == 3


def test_shipped_test_config_is_the_original_list():
    if not ORIGINAL.is_file():
        pytest.skip(f"the original config {ORIGINAL} is not here (it comes with ../shared)")
    raw = json.loads((ROOT / "resources" / "configs" / "test_sacrum.json").read_text())
    original = json.loads(ORIGINAL.read_text())
    assert raw["TESTING"] == original["TESTING"] and raw["TYPE"] == original["TYPE"] == "IMAGE"


def test_resources_test_config_is_the_original_list(tmp_path):
    cfg_path = ROOT / "resources" / "configs" / "test_sacrum.json"
    raw = json.loads(cfg_path.read_text())
    assert raw["DATASETS_PATH"] == "${SACRUM_DATA}/bids"
    cfg = load_config(cfg_path, tmp_path, check_exists=False, env={})
    assert len(cfg["TESTING"]) == 453
    firsts = [p.relative_to(tmp_path.resolve()).parts[0] for p in cfg["TESTING"]]
    assert (firsts.count("spider-challenge-2023"), firsts.count("whole-spine")) == (447, 6)
    cfg2 = load_config(cfg_path, check_exists=False, env={"SACRUM_DATA": str(tmp_path)})
    assert cfg2["DATASETS_PATH"] == tmp_path.resolve() / "bids"


def test_resources_configs_carry_no_machine_path():
    for cfg in sorted((ROOT / "resources" / "configs").glob("*.json")):
        value = json.loads(cfg.read_text()).get("DATASETS_PATH", "")
        assert value == "" or value.startswith("${"), f"{cfg.name}: DATASETS_PATH {value!r}"
        assert os.path.expanduser("~") not in cfg.read_text()
