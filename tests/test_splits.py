"""splits_final.json from the config (sacrum_masks.splits): fold 0 = config, folds 1-4 grouped by person.

Fast tests on conversion records written here; the slow tests in test_folds.py check that nnU-Net really
trains on the file (its validation case list) on the demo dataset.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, demo_env
from sacrum_masks.splits import SplitError, ensure_splits, make_splits, person_of, training_cases


def conversion(n_people: dict[str, int], n_val: dict[str, int], seed: int = 0, images=("T1w", "T2w")) -> dict:
    """A conversion.json: per dataset ``n`` people with one case per contrast; the first n_val in VALIDATION."""
    cases, k = {}, 0
    for dataset, n in n_people.items():
        for i in range(n):
            for contrast in images:
                key = "VALIDATION" if i < n_val.get(dataset, 0) else "TRAINING"
                sub = f"sub-{i:02d}"
                cases[f"X-{sub}_{k:03d}"] = {"split": "Tr", "config_split": key,
                                             "image": f"{dataset}/{sub}/anat/{sub}_{contrast}.nii.gz",
                                             "label": f"{dataset}/derivatives/labels/{sub}/anat/{sub}_{contrast}_seg.nii.gz"}
                k += 1
    cases[f"X-sub-99_{k:03d}"] = {"split": "Ts", "config_split": "TESTING", "image": "t/sub-99/anat/sub-99_T2w.nii.gz",
                                  "label": "t/derivatives/labels/sub-99/anat/sub-99_T2w_seg.nii.gz"}
    return {"Cases": cases, "Seed": seed}


def write_raw(tmp_path: Path, record: dict) -> Path:
    raw = tmp_path / "raw" / "Dataset300_X"
    raw.mkdir(parents=True)
    (raw / "conversion.json").write_text(json.dumps(record))
    return raw


def people_of(cases, names):
    return {cases[c][1] for c in names}


def test_fold0_is_the_config_and_no_person_is_on_both_sides():
    rec = conversion({"a": 7, "b": 5, "c": 3}, {"a": 1, "b": 1, "c": 1})
    cases = training_cases(rec)
    splits = make_splits(cases, seed=0)
    assert len(splits) == 5
    assert splits[0]["val"] == sorted(c for c, (k, _) in cases.items() if k == "VALIDATION")
    assert splits[0]["train"] == sorted(c for c, (k, _) in cases.items() if k == "TRAINING")
    for fold in splits:
        assert not people_of(cases, fold["train"]) & people_of(cases, fold["val"])
        assert sorted(fold["train"] + fold["val"]) == sorted(cases)
    # every case validated exactly once over the five folds; the test case never appears
    assert sorted(c for f in splits for c in f["val"]) == sorted(cases)
    # spread over datasets: folds 1-4 each validate someone of the datasets with >= 4 people left
    for fold in splits[1:]:
        assert {d for d, _ in people_of(cases, fold["val"])} >= {"a", "b"}


def test_same_subject_label_in_two_datasets_is_two_people():
    rec = conversion({"a": 3, "b": 3}, {})
    cases = training_cases(rec)
    assert len({p for _, p in cases.values()}) == 6
    assert person_of("a/sub-01/anat/sub-01_T2w.nii.gz") != person_of("b/sub-01/anat/sub-01_T2w.nii.gz")
    splits = make_splits(cases, seed=0)            # no VALIDATION: five grouped folds
    for fold in splits:
        assert fold["val"] and not people_of(cases, fold["train"]) & people_of(cases, fold["val"])


def test_seed_decides_folds_1_to_4_and_is_reproducible():
    cases = training_cases(conversion({"a": 12}, {"a": 2}))
    assert make_splits(cases, 0) == make_splits(cases, 0)
    assert make_splits(cases, 0)[0] == make_splits(cases, 1)[0]
    assert make_splits(cases, 0)[1:] != make_splits(cases, 1)[1:]


def test_written_kept_when_edited_rewritten_with_force(tmp_path):
    raw = write_raw(tmp_path, conversion({"a": 6}, {"a": 1}))
    pp = tmp_path / "pp"
    lines = []
    path = ensure_splits(raw, pp, (0,), say=lines.append)
    first = json.loads(path.read_text())
    assert len(first) == 5 and lines == [f"wrote {path}: fold 0 = the config (10 train, 2 val cases), folds 1-4 "
                                         f"grouped by person (6 people, seed 0)"]
    lines.clear()
    ensure_splits(raw, pp, (0,), say=lines.append)
    assert lines == []                               # same content: nothing said, nothing written
    edited = [first[1], first[0]] + first[2:]        # a user swaps two folds by hand
    path.write_text(json.dumps(edited))
    ensure_splits(raw, pp, (0, 1), say=lines.append)
    assert json.loads(path.read_text()) == edited
    assert lines == [f"kept {path}: it differs from the config's split (edited by hand?); FORCE=1 rewrites it"]
    ensure_splits(raw, pp, (0,), force=True, say=lines.append)
    assert json.loads(path.read_text()) == first
    assert lines[-2] == f"FORCE=1: rewriting {path} with the config's split"
    # a changed config (our own file, stamp matching) is replaced, and said so
    raw2 = write_raw(tmp_path / "b", conversion({"a": 6}, {"a": 2}))
    ensure_splits(raw2, pp, (0,), say=lines.append)
    assert lines[-2] == f"replacing {path} with the config's split"
    assert len(json.loads(path.read_text())[0]["val"]) == 4


def test_hand_made_file_naming_unknown_cases_is_one_line(tmp_path):
    raw = write_raw(tmp_path, conversion({"a": 6}, {"a": 1}))
    pp = tmp_path / "pp"
    pp.mkdir()
    (pp / "splits_final.json").write_text(json.dumps([{"train": ["nope"], "val": []}]))
    with pytest.raises(SplitError, match="names 1 case.s. not in the dataset .nope.: fix it, or FORCE=1"):
        ensure_splits(raw, pp, (0,), say=lambda s: None)


def test_fewer_than_five_people(tmp_path):
    raw = write_raw(tmp_path, conversion({"a": 2, "b": 2}, {"a": 1}))
    pp = tmp_path / "pp"
    with pytest.raises(SplitError) as exc:
        ensure_splits(raw, pp, (0, 1), say=print)
    assert str(exc.value) == ("TRAINING+VALIDATION: 4 people (a dataset and subject), 5 grouped folds need 5: "
                              "FOLD=all or fold 0 (with a VALIDATION list) still work")
    assert not pp.exists()                                   # nothing half-written
    path = ensure_splits(raw, pp, (0,), say=print)           # fold 0 alone: the config
    assert [len(f["val"]) for f in json.loads(path.read_text())] == [2]
    assert ensure_splits(write_raw(tmp_path / "c", conversion({"a": 3}, {})), tmp_path / "pp2", ("all",)) is None


def test_train_with_too_few_people_is_one_line_and_writes_no_splits(tmp_path):
    """Through bin/train.sh: the prepare stage stops on the split before any training (exit 2)."""
    data = tmp_path / "data"
    raw = data / "nnUNet" / "raw" / "Dataset305_X"
    raw.mkdir(parents=True)
    (raw / "conversion.json").write_text(json.dumps(conversion({"a": 3}, {"a": 1})))
    pp = data / "nnUNet" / "preprocessed" / "Dataset305_X"
    pp.mkdir(parents=True)
    (pp / "nnUNetPlans.json").write_text("{}")     # planning up to date: the split is the next step
    from sacrum_masks.train import raw_fingerprint

    (pp / ".sacrum-raw-fingerprint-3d_fullres").write_text(raw_fingerprint(raw) + "\n")
    env = {**demo_env(data), "DNUM": "305", "GPU": "cpu", "FOLD": "0 1 2 3 4", "TRAIN_STAGE": "prepare"}
    res = subprocess.run(["bash", str(ROOT / "bin" / "train.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [
        "train: TRAINING+VALIDATION: 3 people (a dataset and subject), 5 grouped folds need 5: FOLD=all or fold 0 "
        "(with a VALIDATION list) still work"]
    assert not (pp / "splits_final.json").exists()
