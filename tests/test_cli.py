"""``python -m train`` / ``python -m sample`` as a user runs them, and sampling invariances."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from tiny import tiny_config

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment import (
    build_guidance,
    generate_samples,
    load_run,
    parse_labels,
    resolve_sampler,
    train_and_evaluate,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def trained(trained_run):
    return trained_run


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


def _spec(run, **overrides):
    return resolve_sampler(run.config.sample, num_classes=run.num_classes, **overrides)


def test_same_seed_same_images_at_any_batch_size(trained):
    run = load_run(trained)
    spec = _spec(run, solver="heun", steps=4, guidance="cfg:2.0")
    kw = dict(labels=parse_labels(None, 64, run.num_classes), seed=3)
    big, nfe = generate_samples(run, spec, num=64, batch_size=64, **kw)
    small, _ = generate_samples(
        run, spec, num=8, batch_size=8, **{**kw, "labels": kw["labels"][:8]}
    )
    chunked, _ = generate_samples(
        run, spec, num=24, batch_size=7, **{**kw, "labels": kw["labels"][:24]}
    )
    np.testing.assert_allclose(big[:8], small, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(big[:24], chunked, rtol=1e-5, atol=1e-5)
    assert nfe == 2 * (2 * 4 - 1)
    other, _ = generate_samples(run, spec, num=8, batch_size=8, seed=4, labels=kw["labels"][:8])
    assert not np.allclose(other, small)


def test_load_run_of_an_8_device_run_onto_any_mesh_gives_the_same_samples(trained):
    # The tiny run was trained on all 8 test devices; sampling it on one device and on a
    # 2x2 (data x fsdp) mesh must give the same images, params restored sharded.
    from jaxdiff.parallel import make_mesh

    one = load_run(trained)
    mesh = make_mesh(data=2, fsdp=2, num_devices=4)
    four = load_run(trained, mesh=mesh)
    leaf = max(jax.tree.leaves(four.params), key=lambda a: a.size)
    assert leaf.sharding.mesh.shape == mesh.shape
    assert one.step == four.step == 5 and one.which == four.which == "0.999"
    spec = _spec(one, steps=3)
    labels = parse_labels(None, 12, 10)
    a, _ = generate_samples(one, spec, num=12, labels=labels, seed=1, batch_size=12)
    b, _ = generate_samples(four, spec, num=12, labels=labels, seed=1, batch_size=8)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


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
    with pytest.raises(InvalidArgumentError, match="out of range"):
        parse_labels("11", 2, 10)
    with pytest.raises(InvalidArgumentError, match="integers"):
        parse_labels("a,b", 2, 10)


def test_sampler_spec_uses_the_run_config_unless_overridden(trained):
    run = load_run(trained)
    sc = run.config.sample
    spec = _spec(run)
    assert spec.solver_spec == sc.solver == "heun" and spec.steps == sc.steps == 3
    assert spec.guidance_spec == "cfg:2.0" and spec.guidance is not None
    np.testing.assert_allclose(spec.sigmas[0], sc.sigma_max, rtol=1e-6)
    over = _spec(run, solver="ddim:eta=0.5", steps=7, guidance="none")
    assert over.steps == 7 and over.guidance is None and over.solver.eta == 0.5
    assert "ddim:eta=0.5, 7 steps" in over.describe()
    with pytest.raises(InvalidArgumentError, match="steps must be >= 1"):
        _spec(run, steps=0)
    with pytest.raises(InvalidArgumentError, match="unknown solver"):
        _spec(run, solver="rk45")


def test_sample_cli_eval_prints_metrics(trained, tmp_path):
    res = _cli(
        "sample",
        f"--workdir={trained}",
        "--steps=3",
        "--num=24",
        "--batch_size=8",
        "--eval=fd_digits",
        "--save_num=5",
        f"--out={tmp_path / 'g.png'}",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("{"))
    import json

    scores = json.loads(line)
    assert scores["num"] == 24 and scores["nfe"] == 10
    for key in ("fd_digits", "precision", "recall", "class_accuracy"):
        assert np.isfinite(scores[key]), key
    saved = np.load(tmp_path / "g.npz")  # all 24 evaluated, the first 5 kept
    assert saved["samples"].shape[0] == 5 and saved["labels"].tolist() == [0, 1, 2, 3, 4]


@pytest.fixture(scope="session")
def noise_aware_classifier(tmp_path_factory):
    from jaxdiff.experiment import train_classifier
    from train.configs.digits_classifier import get_config

    config = get_config()
    config.steps, config.noise_aware = 20, True
    workdir = tmp_path_factory.mktemp("clf")
    return train_classifier(config, workdir)


def test_every_guidance_is_reachable_from_a_spec(trained, noise_aware_classifier):
    from jaxdiff.guidance import GUIDANCE

    run = load_run(trained)
    extra = {
        "autoguidance": f",guide={trained}",
        "classifier": f",classifier={noise_aware_classifier}",
        "minority": f",classifier={noise_aware_classifier}",
    }
    for name in GUIDANCE:
        g = build_guidance(f"{name}:1.5{extra.get(name, '')}")
        assert g is not None, name
    with pytest.raises(InvalidArgumentError, match="noise-aware"):
        build_guidance("classifier:1.0")  # the shipped classifier is a clean one
    with pytest.raises(InvalidArgumentError, match="guide="):
        build_guidance("autoguidance:2.0")
    with pytest.raises(InvalidArgumentError, match="guide="):
        build_guidance(f"cfg:2.0,guide={trained}")  # a key the method does not take
    for spec in (
        f"autoguidance:2.0,guide={trained}",
        f"minority:1.0,classifier={noise_aware_classifier},target=3",
    ):
        x, _ = generate_samples(
            run, _spec(run, guidance=spec), num=4, labels=parse_labels(None, 4, 10), seed=0
        )
        assert np.all(np.isfinite(x)), spec


@pytest.mark.slow  # 56 s: trains a flow-matching run; formulations are tested in test_diffusion
def test_sample_cli_uses_the_run_sampler_of_a_flow_matching_run(tmp_path):
    # A flow-matching run configured for Euler: `python -m sample` without --solver must
    # sample with Euler (3 steps x 2 for CFG = 6 evaluations), not Heun (2 x 5 = 10).
    config = tiny_config(2)
    config.formulation = type(config.formulation)({"name": "flow"})
    config.sample.solver, config.sample.steps = "euler", 3
    config.sample.sigma_min, config.sample.sigma_max = 0.001, 999.0
    train_and_evaluate(config, tmp_path / "flow")
    res = _cli("sample", f"--workdir={tmp_path / 'flow'}", "--num=4", f"--out={tmp_path / 'g.png'}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "sampler: solver euler, 3 steps" in res.stdout and "guidance cfg:2.0" in res.stdout
    assert "(6 network evaluations each)" in res.stdout
    res = _cli(
        "sample", f"--workdir={tmp_path / 'flow'}", "--num=4", "--solver=heun",
        f"--out={tmp_path / 'g.png'}",
    )  # fmt: skip
    assert "(10 network evaluations each)" in res.stdout, res.stdout + res.stderr[-2000:]


def test_sample_cli_evaluates_several_metrics_on_one_set_of_samples(trained_run, tmp_path):
    """--eval=a,b samples once and prints every metric in one JSON line and one table."""
    import json

    from test_metrics_dinov2 import PTH, TINY

    from jaxdiff.data import load_digits
    from jaxdiff.metrics import save_reference_statistics
    from jaxdiff.metrics.convert_dinov2 import convert

    weights, stats = str(tmp_path / "dinov2.safetensors"), str(tmp_path / "ref.npz")
    convert(PTH, weights, TINY)
    digits = load_digits("test")[0][:16]
    save_reference_statistics("fd_dinov2", digits, stats, batch_size=8, dinov2_weights=weights)
    res = _cli(
        "sample",
        f"--workdir={trained_run}",
        "--steps=2",
        "--num=16",
        "--batch_size=8",
        "--eval=fd_digits,fd_dinov2",
        f"--dinov2_stats={stats}",
        f"--dinov2_weights={weights}",
        f"--out={tmp_path / 'g.png'}",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("{"))
    scores = json.loads(line)
    assert scores["eval"] == "fd_digits,fd_dinov2" and scores["nfe"] == 6  # Heun 2 + CFG
    for key in ("fd_digits", "precision", "fd_dinov2"):
        assert np.isfinite(scores[key]) and scores[key] >= 0, key
    header = next(x for x in res.stdout.splitlines() if x.startswith("| NFE"))
    assert "| fd_digits |" in header and header.endswith("| fd_dinov2 |")
