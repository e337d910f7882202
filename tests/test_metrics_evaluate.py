"""Evaluators by name, and sharded sample-then-evaluate on 8 vs 1 devices."""

import jax
import numpy as np
import pytest

from jaxdiff.data import get_dataset, ring_gaussian_mixture
from jaxdiff.experiment import (
    generate_samples,
    load_run,
    resolve_sampler,
    sample_and_evaluate,
)
from jaxdiff.metrics import EVALUATORS, evaluate_samples, get_evaluator
from jaxdiff.parallel import make_mesh

NUM, SEED = 24, 3


@pytest.fixture(scope="session")
def workdir(trained_run):
    return trained_run


@pytest.fixture(scope="session")
def run(workdir):
    return load_run(workdir)


def _spec(run):
    return resolve_sampler(run.config.sample, num_classes=10, solver="euler", guidance="none")


@pytest.fixture(scope="session")
def sampled(workdir):
    results = {}
    for n in (8, 1):
        run = load_run(workdir, mesh=make_mesh(devices=jax.devices()[:n]))
        results[n] = sample_and_evaluate(
            run, "fd_digits", NUM, SEED, spec=_spec(run), batch_size=16, return_samples=True
        )
    return results


def test_eight_and_one_device_give_the_same_samples_and_metrics(sampled):
    r8, r1 = sampled[8], sampled[1]
    assert r8.samples.shape == (NUM, 8, 8, 1)
    np.testing.assert_allclose(r8.samples, r1.samples, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(r8.labels, np.arange(NUM) % 10)
    assert r8.nfe == r1.nfe == 3
    expected = {"fd_digits", "precision", "recall", "density", "coverage", "class_accuracy"}
    assert set(r8.metrics) == expected
    for name, value in r8.metrics.items():
        assert np.isfinite(value)
        assert value == pytest.approx(r1.metrics[name], rel=1e-3, abs=1e-3), name


def test_samples_are_seeded_by_global_index_like_the_sample_cli(run, sampled):
    # batch_size 16 with NUM 24: the second batch is padded; the samples must still be
    # those of `python -m sample` (generate_samples) at any batch size.
    ref, _ = generate_samples(
        run, _spec(run), num=NUM, labels=sampled[8].labels, seed=SEED, batch_size=NUM
    )
    np.testing.assert_allclose(sampled[8].samples, ref, rtol=1e-4, atol=1e-4)
    metrics = evaluate_samples("fd_digits", ref, sampled[8].labels)
    for name, value in metrics.items():
        assert value == pytest.approx(sampled[8].metrics[name], rel=1e-3, abs=1e-3), name


def test_toy_evaluator_on_true_samples_and_a_shifted_set():
    source = get_dataset("toy_gmm", split="train")
    x = source.get_batch(np.arange(1000))["image"]
    ev = get_evaluator("toy", dataset="toy_gmm", num_reference=2000)
    good = evaluate_samples(ev, x)
    bad = evaluate_samples(ev, x + 0.5)
    assert set(good) == {"nll", "swd", "mmd"}
    entropy = -np.mean(ring_gaussian_mixture().log_prob(x))
    assert good["nll"] == pytest.approx(entropy)
    assert good["swd"] < 0.2 and abs(good["mmd"]) < 5e-3  # sampling noise only
    assert bad["swd"] > 2 * good["swd"] and bad["mmd"] > 0.05 and bad["nll"] > good["nll"] + 1
    moons = evaluate_samples("toy", x[:50], dataset="moons", num_reference=500)
    assert set(moons) == {"swd", "mmd"}  # no closed-form density for two moons


def test_unknown_evaluator_lists_the_known_ones():
    with pytest.raises(ValueError, match="fd_digits"):
        get_evaluator("inception_score")
    assert EVALUATORS == (
        "fd_digits",
        "fid",
        "sfid",
        "is",
        "prec_recall",
        "kid",
        "fd_dinov2",
        "toy",
    )
