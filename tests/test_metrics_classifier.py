"""The digits classifier (model, shipped weights, training) and FD-digits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.data import load_digits
from jaxdiff.metrics import (
    CLASSIFIER_PATH,
    CLASSIFIER_SHA256,
    ChecksumMismatchError,
    class_accuracy,
    evaluate_samples,
    fd_digits,
    load_classifier,
)
from jaxdiff.metrics.classifier import (
    DigitsClassifier,
    accuracy,
    classifier_model,
    noisy_classifier_inputs,
    save_classifier,
)
from jaxdiff.metrics.weights import file_sha256
from jaxdiff.models import LOGICAL_AXES, Classifier

X = jnp.asarray(load_digits("test")[0][:4])


def key(seed):
    return jax.random.key(seed, impl="unsafe_rbg")


def test_shipped_classifier_checksum_and_held_out_accuracy():
    assert file_sha256(CLASSIFIER_PATH) == CLASSIFIER_SHA256
    assert CLASSIFIER_PATH.stat().st_size < 300_000
    clf = load_classifier()
    assert load_classifier() is clf  # cached
    images, labels = load_digits("test")
    acc = accuracy(clf, images, labels)
    assert acc >= 0.95
    assert acc == pytest.approx(clf.meta["test_accuracy"], abs=1e-6)
    assert clf.features(X).shape == (4, 128) and clf.logits(X).shape == (4, 10)


def test_model_axes_noise_conditioning_and_errors():
    clean = Classifier(channels=(4, 8), feature_dim=16)
    noisy = Classifier(channels=(4, 8), feature_dim=16, noise_conditioned=True)
    v_clean = jax.jit(clean.init)(key(0), X)
    t = jnp.full((4,), -0.5)
    v_noisy = jax.jit(noisy.init)(key(0), X, t)
    for v in (v_clean, v_noisy):
        specs = jax.tree.leaves(
            nn.get_partition_spec(v), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)
        )
        assert specs and all(n in LOGICAL_AXES for s in specs for n in s if n is not None)
    out = jax.jit(noisy.apply)(v_noisy, X, t)
    assert out.shape == (4, 10)
    assert not np.allclose(out, jax.jit(noisy.apply)(v_noisy, X, t + 1.0))  # uses the noise
    feats = noisy.apply(v_noisy, X, t, method=Classifier.features)
    assert feats.shape == (4, 16) and feats.dtype == jnp.float32
    with pytest.raises(ValueError, match="noise_label"):
        clean.apply(v_clean, X, t)
    with pytest.raises(ValueError, match="noise_label"):
        noisy.apply(v_noisy, X)
    x_in, label = noisy_classifier_inputs(X, jnp.full((4,), 2.0))
    np.testing.assert_allclose(x_in, X / np.sqrt(4.25), rtol=1e-6)
    np.testing.assert_allclose(label, np.log(2.0) / 4, rtol=1e-6)


def test_classifier_file_round_trip_and_checksum(tmp_path):
    model = classifier_model()
    params = nn.unbox(jax.jit(model.init)(key(1), X)["params"])
    clf = DigitsClassifier(model, jax.tree.map(np.asarray, params), {"note": "random"})
    path = tmp_path / "clf.npz"
    digest = save_classifier(path, clf)
    loaded = load_classifier(path, expected_sha256=digest)
    assert loaded.meta == {"note": "random"} and loaded.model.feature_dim == 128
    np.testing.assert_array_equal(loaded.logits(X), clf.logits(X))
    with pytest.raises(ChecksumMismatchError, match=digest):
        load_classifier(path, expected_sha256="f" * 64)
    with pytest.raises(FileNotFoundError, match="configs/digits_classifier.py"):
        load_classifier(tmp_path / "missing.npz")


def test_fd_digits_of_real_digits():
    train, _ = load_digits("train")
    test, test_labels = load_digits("test")
    assert fd_digits(train) == pytest.approx(0.0, abs=1e-6)  # the reference itself
    held_out = fd_digits(test)
    noise = np.random.default_rng(0).uniform(-1, 1, test.shape).astype(np.float32)
    assert 0 < held_out < 0.1 * fd_digits(noise)
    assert class_accuracy(test, test_labels) >= 0.95
    out = evaluate_samples("fd_digits", test, test_labels)
    assert set(out) == {"fd_digits", "precision", "recall", "density", "coverage", "class_accuracy"}
    assert out["fd_digits"] == pytest.approx(held_out, rel=1e-6)
    assert out["precision"] > 0.8 and out["class_accuracy"] >= 0.95
    shuffled = evaluate_samples("fd_digits", test, np.roll(test_labels, 1))
    assert shuffled["class_accuracy"] < 0.3


def test_classifier_run_writes_a_loadable_file(tmp_path):
    from jaxdiff.experiment import run_experiment
    from train.configs.digits_classifier import get_config

    config = get_config()
    config.steps = 30
    run_experiment(config, tmp_path)
    clf = load_classifier(tmp_path / "classifier.npz")
    assert clf.meta["steps"] == 30 and not clf.model.noise_conditioned
    assert clf.meta["test_accuracy"] == pytest.approx(accuracy(clf, *load_digits("test")))


@pytest.mark.slow
def test_retraining_from_scratch_reaches_95_percent():
    from jaxdiff.experiment import train_digits_classifier

    params = train_digits_classifier(seed=0)
    clf = DigitsClassifier(classifier_model(), params)
    assert accuracy(clf, *load_digits("test")) >= 0.95
