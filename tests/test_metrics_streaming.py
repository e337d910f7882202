"""Reference statistics streamed from data sources, and their command and file."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fakegcs import BUCKET

from jaxdiff.data import ArraySource, load_digits
from jaxdiff.metrics import (
    CLASSIFIER_SHA256,
    ReferenceStatistics,
    evaluate_samples,
    feature_evaluator,
    get_evaluator,
    load_classifier,
    make_sample_and_evaluate_fn,
    reference_statistics,
    save_reference_statistics,
)
from jaxdiff.metrics.classifier import save_classifier
from jaxdiff.metrics.fd_digits import reference_statistics as split_statistics
from jaxdiff.metrics.frechet import feature_statistics
from jaxdiff.metrics.streaming import process_slice
from jaxdiff.parallel import make_mesh

ROOT = Path(__file__).resolve().parents[1]
FAKEGCS = Path(__file__).resolve().parent / "fakegcs.py"
N = 37  # prime: no batch size below divides it
IMAGES = (100.0 + np.random.default_rng(0).standard_normal((N, 3, 2, 1)) * [[[1.0], [3.0]]]).astype(
    np.float32
)


def flatten(params, x):
    del params
    return x.reshape(x.shape[0], -1)  # exact in float32: the numpy reference is exact too


class ItemsOnly:
    """A source without get_batch: read example by example."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i]}


def _assert_exact(stats, feats):
    feats = np.asarray(feats, np.float64).reshape(len(feats), -1)
    np.testing.assert_allclose(stats.mu, np.mean(feats, axis=0), rtol=1e-10)
    want = np.cov(feats, rowvar=False)
    np.testing.assert_allclose(stats.sigma, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
    assert stats.num == len(feats)


@pytest.mark.parametrize(
    "batch_size,devices", [(8, 8), (12, 8), (5, 8), (36, 8), (100, 8), (10, 1), (37, 2)]
)
def test_streamed_statistics_equal_float64_numpy(batch_size, devices):
    mesh = make_mesh(num_devices=devices)
    source = ArraySource(IMAGES, name="blobs", split="test")
    stats = reference_statistics(source, flatten, batch_size=batch_size, mesh=mesh)
    _assert_exact(stats, IMAGES)
    assert stats.image_shape == (3, 2, 1) and stats.source == "blobs split=test"


def test_item_sources_arrays_dict_outputs_and_num():
    def dict_fn(scale, x):
        return {"features": flatten(None, x) * scale, "other": x}

    by_item = reference_statistics(
        ItemsOnly(IMAGES), dict_fn, feature_params=np.float32(2.0), batch_size=16, num=30
    )
    _assert_exact(by_item, IMAGES[:30].reshape(30, -1) * np.float32(2.0))
    assert by_item.source == "array (first 30 of 37)"
    from_array = reference_statistics(IMAGES[:9], flatten, batch_size=4, progress=False)
    _assert_exact(from_array, IMAGES[:9])


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="num=40 is more than the 37 examples"):
        reference_statistics(IMAGES, flatten, num=40)
    with pytest.raises(ValueError, match="at least 2 examples"):
        reference_statistics(IMAGES, flatten, num=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        reference_statistics(IMAGES, flatten, batch_size=0)
    with pytest.raises(ValueError, match="choose one of"):
        feature_evaluator("toy")
    with pytest.raises(ValueError, match="unknown 'fid' options"):
        feature_evaluator("fid", inputs="uint8")


@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_each_process_reads_its_own_slice_once(processes):
    batch, end = 12, 30
    read, pad = [], 0
    for start in range(0, end, batch):
        for p in range(processes):
            idx, local = process_slice(start, batch, end, p, processes)
            assert local == batch // processes and np.all(np.diff(idx) == 1)
            read.extend(idx)
            pad += local - len(idx)
    np.testing.assert_array_equal(read, np.arange(end))
    assert pad == 36 - end


def test_digits_statistics_file_and_evaluator(tmp_path):
    images = load_digits("test")[0][:100]
    path = tmp_path / "digits_test.npz"
    digest = save_reference_statistics("fd_digits", images, path, batch_size=64)
    stats = ReferenceStatistics.load(path, expected_sha256=digest)
    ev = get_evaluator("fd_digits", reference_stats=path)
    mu, sigma = feature_statistics(ev.features(images)["features"])
    # The same network on other batch shapes: float32 round-off, not exact.
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-4, atol=1e-6)
    assert stats.feature == load_classifier().feature_name and stats.evaluator == "fd_digits"
    assert (stats.num, stats.source) == (100, "array")
    # FD-digits against the images' own statistics file is ~0 (the default reference,
    # the train split, gives ~1 for 100 test digits).
    assert evaluate_samples(ev, images)["fd_digits"] == pytest.approx(0.0, abs=1e-4)
    wrong = tmp_path / "fid_like.npz"
    ReferenceStatistics(np.zeros(3), np.eye(3), feature="inception_v3_pool3").save(wrong)
    with pytest.raises(ValueError, match="'inception_v3_pool3' features.*reference_stats"):
        get_evaluator("fd_digits", reference_stats=wrong)


def test_generated_samples_statistics_use_the_same_format(tmp_path):
    def generate(params, labels, keys):
        del labels
        x = jax.vmap(lambda k: jax.random.uniform(k, (8, 8, 1), minval=-1.0))(keys)
        return x * params, {"nfe": jnp.int32(1)}

    ev = get_evaluator("fd_digits")
    fn = make_sample_and_evaluate_fn(generate, ev, mesh=make_mesh(), num=20, batch_size=16)
    res = fn(np.float32(1.0), 0, return_samples=True)
    assert res.features["features"].shape == (20, 128)
    path = tmp_path / "samples.npz"
    ev.statistics(res.features, source="uniform noise", image_shape=(8, 8, 1)).save(path)
    stats = ReferenceStatistics.load(path)
    mu, sigma = feature_statistics(res.features["features"])
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-10, atol=1e-14)
    assert (stats.num, stats.evaluator, stats.source) == (20, "fd_digits", "uniform noise")
    with pytest.raises(ValueError, match="no 'pool'"):
        ev.statistics(res.features, key="pool")


def test_statistics_and_classifier_files_on_a_bucket(fake_gcs):
    stats_url = f"gs://{BUCKET}/stats/digits.npz"
    images = load_digits("test")[0][:16]
    one = make_mesh(num_devices=1)
    digest = save_reference_statistics("fd_digits", images, stats_url, mesh=one)
    assert (fake_gcs / BUCKET / "stats" / "digits.npz").is_file()
    assert ReferenceStatistics.load(stats_url, expected_sha256=digest).num == 16
    ev = get_evaluator("fd_digits", reference_stats=stats_url)
    clf_url = f"gs://{BUCKET}/clf.npz"
    clf_digest = save_classifier(clf_url, load_classifier())
    assert clf_digest == CLASSIFIER_SHA256  # the same bytes as the shipped file
    assert load_classifier(clf_url, expected_sha256=clf_digest).feature_name == ev.feature_name
    with pytest.raises(FileNotFoundError, match=f"gs://{BUCKET}/nope.npz"):
        load_classifier(f"gs://{BUCKET}/nope.npz")
    assert os.listdir(".") == []  # nothing went to a local "gs:" folder


def test_command_writes_the_digits_statistics(fake_gcs):
    url = f"gs://{BUCKET}/stats/digits_train.npz"
    args = ["--dataset=digits", "--evaluator=fd_digits", f"--out={url}", "--batch_size=512"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, str(FAKEGCS), str(fake_gcs), "jaxdiff.metrics.reference_stats", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"wrote {url}" in res.stdout and "1500 images" in res.stdout
    assert os.listdir(".") == []
    stats = ReferenceStatistics.load(fake_gcs / BUCKET / "stats" / "digits_train.npz")
    mu, sigma = split_statistics("train", load_classifier())  # in memory
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-4, atol=1e-6)
    assert (stats.num, stats.image_shape, stats.source) == (1500, (8, 8, 1), "digits split=train")
    assert stats.evaluator == "fd_digits" and stats.feature == load_classifier().feature_name
