"""What `pip install` of the repository installs is enough for the notebooks and CLIs.

Colab users install from the repository URL, not a clone: the configs, the CLIs and the
shipped classifier must come with the package. setuptools' ``build_py`` (what a wheel
build copies) writes the installable tree; imports are then run against that tree alone,
from outside the clone.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMPORTS = """
import jaxdiff, sample, train
from train.configs import digits, distill_digits, digits_classifier
from jaxdiff.metrics import load_classifier
load_classifier()  # reads jaxdiff/metrics/assets/digits_classifier.npz
for module in (jaxdiff, sample, train, digits):
    assert module.__file__.startswith(BUILD), module.__file__
print("ok")
"""


def test_the_installed_tree_has_configs_clis_and_assets(tmp_path):
    build = tmp_path / "lib"
    res = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
         "--build-lib", str(build)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Package would be ignored" not in res.stderr, res.stderr  # data-only folders
    for rel in ("train/configs/digits.py", "sample/__main__.py", "train/__main__.py"):
        assert (build / rel).is_file(), f"{rel} is not installed"
    assert (build / "jaxdiff/metrics/assets/digits_classifier.npz").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(build), "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(
        [sys.executable, "-c", f"BUILD = {str(build)!r}\n{IMPORTS}"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
