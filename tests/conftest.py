"""Shared fixtures.

* ``demo_root``: the synthetic demo datasets (seed 0), written once per session; read-only for tests.
* ``real_dir``: ../shared/data/real (real volumes); tests using it skip, saying why, when it is absent.
* ``demo_run``: bin/demo.sh run once per session in a temporary SACRUM_DATA (trains the small CPU model).
  For development only, ``SACRUM_TEST_DEMO_CACHE=DIR`` copies a finished demo run's SACRUM_DATA from DIR
  instead (CI never sets it; a cache made by older code may not match the tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DIR = ROOT.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    from sacrum_masks.synth import write_demo_datasets

    out = tmp_path_factory.mktemp("demo") / "bids"
    write_demo_datasets(out, seed=0)
    return out


@pytest.fixture(scope="session")
def real_dir() -> Path:
    if not (REAL_DIR / "totalseg_ct.nii.gz").is_file():
        pytest.skip(f"real volumes not found in {REAL_DIR} (they come with ../shared; see its README)")
    return REAL_DIR


def demo_env(data: Path) -> dict[str, str]:
    """Environment for running bin/ scripts against SACRUM_DATA=data (nnU-Net folders below it)."""
    env = dict(os.environ)
    # make exports its variables (DNUM, GPU, TRAINER, ...) to `make test`: scripts must see their defaults
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "TOTALSPINESEG_DATA",
                "SACRUM_CONFIG", "SACRUM_MODEL", "MODEL_ZIP", "DATASETS_PATH", "DNUM", "DNAME", "GPU", "FOLD",
                "TRAINER", "CONFIGURATION", "CONFIG", "FORCE", "SKIP_INVALID", "CHECKPOINT", "SHARD", "WAIT",
                "TILE_STEP", "MIRRORING", "CUDA_VISIBLE_DEVICES"):
        env.pop(var, None)
    env["SACRUM_DATA"] = str(data)
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("demo_run")
    env = demo_env(data)
    log = data / "demo.log"
    cache = os.environ.get("SACRUM_TEST_DEMO_CACHE")
    if cache:
        shutil.copytree(cache, data, dirs_exist_ok=True, symlinks=True)
    with open(log, "w") as fh:
        proc = subprocess.run(["bash", str(ROOT / "bin" / "demo.sh")], cwd=ROOT, env=env,
                              stdout=fh, stderr=subprocess.STDOUT)
    text = log.read_text()
    if proc.returncode != 0:
        pytest.fail(f"bin/demo.sh failed ({proc.returncode}); last lines:\n" + "\n".join(text.splitlines()[-40:]))
    model_dir = (data / "nnUNet" / "results" / "Dataset300_SacrumDataset"
                 / "nnUNetTrainer_SacrumCPU__nnUNetPlans__3d_fullres_small")
    return types.SimpleNamespace(data=data, env=env, model_dir=model_dir, bids=data / "bids", log=text)
