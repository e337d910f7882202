"""The zero-shot diffusion classifier on an exact class-conditional Gaussian mixture.

Class ``c`` is ``N(mu_c, S^2 I)`` with equal priors, so the Bayes classifier picks the
nearest mean, and the exact conditional denoiser is ``mu_c + S^2 / (S^2 + sigma^2)
(x - mu_c)``. With antithetic draws the class-dependent noise term cancels exactly, so
the diffusion classifier must *be* the Bayes classifier, through every elimination stage.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import EDM, get_formulation
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.metrics.diffusion_classifier import (
    DiffusionClassifier,
    _noise,
    classify,
    evaluation_levels,
    stage_levels,
)
from jaxdiff.parallel import batch_sharding, make_mesh, replicated
from jaxdiff.utils.rng import per_sample_keys

S = 0.6
MEANS = np.asarray(
    [[0.0, 0.0, 0.5], [1.0, 0.2, -0.3], [-0.8, 0.9, 0.1], [0.3, -1.0, 0.8], [0.9, 0.9, 0.9]],
    np.float32,
)


def exact_denoiser(x, sigma, labels):
    mu = jnp.asarray(MEANS)[labels]
    a = S**2 / (S**2 + sigma[:, None] ** 2)
    return mu + a * (x - mu)


def mixture(n, key=0):
    rng = np.random.default_rng(key)
    labels = rng.integers(0, len(MEANS), n)
    return (MEANS[labels] + S * rng.standard_normal((n, 3))).astype(np.float32), labels


def bayes(x):
    return np.argmin(((x[:, None] - MEANS[None]) ** 2).sum(-1), axis=1)


def test_stage_levels_follow_the_upstream_subgrid_rule():
    assert [s.tolist() for s in stage_levels(8, (2, 8))] == [[2, 6], [0, 1, 3, 4, 5, 7]]
    assert [s.tolist() for s in stage_levels(12, (3, 6, 12))] == [
        [2, 6, 10],
        [1, 3, 5, 7, 9, 11],
        [0, 4, 8],
    ]
    levels = evaluation_levels(EDM(), 5)  # quantiles of the log-normal, ascending
    np.testing.assert_allclose(levels[2], np.exp(-1.2), rtol=1e-6)
    assert np.all(np.diff(levels) > 0)
    vp = evaluation_levels(get_formulation("vp"), 7)
    assert vp.shape == (7,) and np.all(np.diff(vp) > 0)
    with pytest.raises(ValueError, match="last keeps one class"):
        DiffusionClassifier(n_samples=(4, 8), to_keep=(3, 2))
    with pytest.raises(ValueError, match="even with antithetic"):
        DiffusionClassifier(trials=3, antithetic=True)


@pytest.mark.parametrize(
    "cfg",
    [
        DiffusionClassifier(n_samples=(6,), to_keep=(1,), trials=2, antithetic=True),
        DiffusionClassifier(n_samples=(2, 4, 8), to_keep=(3, 2, 1), trials=2, antithetic=True),
    ],
    ids=["one_stage", "adaptive"],
)
def test_antithetic_classifier_is_the_bayes_classifier(cfg):
    x, _ = mixture(400)
    levels = evaluation_levels(EDM(), cfg.num_levels)
    keys = per_sample_keys(jax.random.key(1), len(x))
    run = jax.jit(
        lambda x, k: classify(exact_denoiser, x, k, num_classes=5, levels=levels, cfg=cfg)
    )
    out = run(x, keys)
    np.testing.assert_array_equal(out["pred"], bayes(x))
    # Every class was scored at the first stage; the winner has the lowest final mean.
    assert np.isfinite(np.asarray(out["errors"])).all()


def test_errors_equal_a_float64_reference_and_shard():
    cfg = DiffusionClassifier(n_samples=(3,), to_keep=(1,), trials=2)
    x, _ = mixture(16, key=2)
    levels = evaluation_levels(EDM(), 3)
    keys = per_sample_keys(jax.random.key(3), len(x))
    out = classify(exact_denoiser, x, keys, num_classes=5, levels=levels, cfg=cfg)
    eps = np.stack([np.asarray(_noise(k, (3,), 3, cfg), np.float64) for k in keys])  # [B,L,T,3]
    sig = levels.astype(np.float64)[None, :, None, None]
    xn = x[:, None, None].astype(np.float64) + sig * eps
    want = np.zeros((len(x), 5))
    for c in range(5):
        a = S**2 / (S**2 + sig**2)
        d = MEANS[c] + a * (xn - MEANS[c])
        want[:, c] = (((xn - d) / sig - eps) ** 2).mean(-1).mean((1, 2))
    np.testing.assert_allclose(out["errors"], want, rtol=2e-5)
    np.testing.assert_array_equal(out["pred"], want.argmin(1))
    # Images split over the 8 test devices give the same answer.
    mesh = make_mesh()
    run = jax.jit(
        lambda x, k: classify(exact_denoiser, x, k, num_classes=5, levels=levels, cfg=cfg),
        in_shardings=(batch_sharding(mesh), batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )
    sharded = run(x, keys)
    np.testing.assert_array_equal(sharded["pred"], out["pred"])
    np.testing.assert_allclose(sharded["errors"], out["errors"], rtol=1e-6)


def test_a_trained_run_classifies_npz_and_folders_at_any_batch_size(trained_run, tmp_path):
    """``python -m sample --classify``: inputs read, predictions independent of the batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from jaxdiff.data.digits import load_digits
    from jaxdiff.experiment import load_run
    from jaxdiff.experiment.diffusion_classify import (
        classify_images,
        parse_schedule,
        read_classify_input,
    )
    from jaxdiff.utils import storage

    run = load_run(trained_run, mesh=make_mesh())
    images, labels = load_digits("test")
    images, labels = images[:6], labels[:6]
    storage.save_npz(tmp_path / "x.npz", samples=images, labels=labels)
    x, y = read_classify_input(str(tmp_path / "x.npz"), run.sample_shape)
    np.testing.assert_array_equal(y, labels)
    schedule = parse_schedule("2:3,4:1")
    a = classify_images(run, x, schedule, seed=1, batch_size=8)
    b = classify_images(run, x, schedule, seed=1, batch_size=16)
    np.testing.assert_array_equal(a["pred"], b["pred"])
    np.testing.assert_allclose(a["errors"], b["errors"], rtol=1e-5)
    # A cap on evaluations per call (10 classes x 4 levels = 40 per image) shrinks the
    # batch to one image per device, with the same answers.
    c = classify_images(run, x, schedule, seed=1, batch_size=16, max_evals=40)
    np.testing.assert_array_equal(c["pred"], a["pred"])
    assert a["errors"].shape == (6, 10)
    # Three kept after the first stage: 7 classes keep their 2-level mean, 3 the 4-level one.
    # A folder of PNGs with integer class names reads as grey images labelled by the name.
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        (tmp_path / "f" / str(lab)).mkdir(parents=True, exist_ok=True)
        pixels = np.repeat(np.round((img + 1) * 127.5).astype(np.uint8), 3, axis=-1)
        Image.fromarray(pixels).save(tmp_path / "f" / str(lab) / f"{i}.png")
    fx, fy = read_classify_input(str(tmp_path / "f"), run.sample_shape)
    assert fx.shape == (6, 8, 8, 1) and sorted(fy.tolist()) == sorted(labels.tolist())
    with pytest.raises(InvalidArgumentError, match="last keeps one class"):
        parse_schedule("2:3,4:2")
    # The command: predictions written, accuracy printed.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "g.png"
    cmd = [sys.executable, "-m", "sample", f"--workdir={trained_run}", f"--out={out}"]
    cmd += [f"--classify={tmp_path / 'x.npz'}", "--classify_schedule=2:3,4:1", "--seed=1"]
    proc = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"accuracy": ' in proc.stdout
    written = storage.load_npz(tmp_path / "g_classify.npz")
    # One device there, eight here: a 5-step model's near-ties may break either way, so
    # check the file's own consistency rather than equality with the run above.
    assert written["pred"].shape == (6,) and written["errors"].shape == (6, 10)
    np.testing.assert_array_equal(written["labels"], labels)
    accuracy = float(np.mean(written["pred"] == labels))
    assert f'"accuracy": {accuracy}' in proc.stdout
