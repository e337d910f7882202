"""``python -m train`` / ``python -m sample`` as a user runs them, and sampling invariances."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import tiny_config

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.guidance import cfg
from jaxdiff.inference import generate_samples, load_run, parse_labels
from jaxdiff.samplers import heun
from jaxdiff.training import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    train_and_evaluate(tiny_config(5), workdir)
    return workdir


def _cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_same_seed_same_images_at_any_batch_size(trained):
    run = load_run(trained)
    kw = dict(
        solver=heun(),
        sigmas=karras_sigmas(4),
        guidance=cfg(2.0),
        labels=parse_labels(None, 64, run.num_classes),
        seed=3,
    )
    big, nfe = generate_samples(run, num=64, batch_size=64, **kw)
    small, _ = generate_samples(run, num=8, batch_size=8, **kw)
    chunked, _ = generate_samples(run, num=24, batch_size=7, **kw)
    np.testing.assert_allclose(big[:8], small, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(big[:24], chunked, rtol=1e-5, atol=1e-5)
    assert nfe == 2 * (2 * 4 - 1)
    other, _ = generate_samples(run, num=8, batch_size=8, **{**kw, "seed": 4})
    assert not np.allclose(other, small)


def test_sample_cli_writes_grid_and_npz(trained, tmp_path):
    out = tmp_path / "grid.png"
    res = _cli(
        "sample",
        f"--workdir={trained}",
        "--solver=heun",
        "--steps=3",
        "--guidance=cfg:2.0",
        "--num=12",
        "--labels=1,7",
        "--seed=0",
        f"--out={out}",
        "--scale=2",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "wrote 12 samples (10 network evaluations each)" in res.stdout
    # 12 images of 8x8 in a 4-column grid with 1-pixel padding: 4 x 3 cells, upscaled by 2.
    assert Image.open(out).size == ((4 * 9 + 1) * 2, (3 * 9 + 1) * 2)
    data = np.load(tmp_path / "grid.npz")
    assert data["samples"].shape == (12, 8, 8, 1)
    np.testing.assert_array_equal(data["labels"], [1, 7] * 6)


def test_sample_cli_without_checkpoint_says_how_to_train(tmp_path):
    res = _cli("sample", f"--workdir={tmp_path}")
    assert res.returncode != 0
    assert "no checkpoint" in res.stderr and "python -m train" in res.stderr


def test_train_cli_rejects_unknown_config_key(tmp_path):
    res = _cli("train", f"--workdir={tmp_path}", "--config.train.num_stepz=5", timeout=120)
    assert res.returncode != 0
    assert "num_stepz" in res.stderr and "num_steps" in res.stderr


def test_parse_labels_errors():
    np.testing.assert_array_equal(parse_labels("3", 3, 10), [3, 3, 3])
    with pytest.raises(ValueError, match="out of range"):
        parse_labels("11", 2, 10)
    with pytest.raises(ValueError, match="integers"):
        parse_labels("a,b", 2, 10)


def test_sample_cli_eval_prints_metrics(trained, tmp_path):
    res = _cli(
        "sample",
        f"--workdir={trained}",
        "--steps=3",
        "--num=24",
        "--batch_size=8",
        "--eval=fd_digits",
        f"--out={tmp_path / 'g.png'}",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("{"))
    import json

    scores = json.loads(line)
    assert scores["num"] == 24 and scores["nfe"] == 10
    for key in ("fd_digits", "precision", "recall", "class_accuracy"):
        assert np.isfinite(scores[key]), key


def test_every_guidance_is_reachable_from_a_spec(trained):
    from jaxdiff.guidance import GUIDANCE
    from jaxdiff.inference import build_guidance

    run = load_run(trained)
    extra = {
        "autoguidance": f",guide={trained}",
        "classifier": None,  # needs a noise-aware classifier file: checked below
        "minority": None,
    }
    for name in GUIDANCE:
        if extra.get(name, "") is None:
            continue
        g = build_guidance(f"{name}:1.5{extra.get(name, '')}")
        assert g is not None, name
    with pytest.raises(ValueError, match="noise-aware"):
        build_guidance("classifier:1.0")
    with pytest.raises(ValueError, match="guide="):
        build_guidance("autoguidance:2.0")
    x, _ = generate_samples(
        run,
        num=4,
        solver=heun(),
        sigmas=karras_sigmas(3),
        guidance=build_guidance(f"autoguidance:2.0,guide={trained}"),
        labels=parse_labels(None, 4, 10),
        seed=0,
    )
    assert np.all(np.isfinite(x))
