"""The Inception table (FID, sFID, IS, precision/recall, KID), streaming, combined evaluators.

Random Inception weights and tiny images: every metric is checked against the float64
reference functions applied to the network's own outputs, computed apart.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.metrics import (
    Evaluator,
    FeatureAccumulator,
    RunningStatistics,
    combine,
    feature_moments,
    frechet_distance,
    get_evaluators,
    inception_evaluator,
    inception_outputs,
    inception_score,
    kid,
    load_adm_reference,
    make_sample_and_evaluate_fn,
    precision_recall,
    save_adm_reference,
    save_inception_fc,
)
from jaxdiff.metrics.adm_reference import make_adm_reference, to_uint8_rgb
from jaxdiff.metrics.convert_inception import check_source
from jaxdiff.metrics.inception_weights import random_inception_variables, save_inception_variables
from jaxdiff.metrics.weights import ChecksumMismatchError, file_sha256
from jaxdiff.parallel import make_mesh

# One xdist worker for the whole module, so the Inception fixtures are computed once.
pytestmark = pytest.mark.xdist_group("inception_table")

RNG = np.random.default_rng(0)
REF_IMAGES = RNG.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """Random pool3 weights, a random logits layer and an ADM batch of images only."""
    root = tmp_path_factory.mktemp("table")
    variables = random_inception_variables(0)
    save_inception_variables(root / "w.npz", variables)
    fc = {
        "kernel": (RNG.standard_normal((2048, 1008)) * 0.05).astype(np.float32),
        "bias": RNG.standard_normal(1008).astype(np.float32),
    }
    save_inception_fc(root / "fc.npz", fc)
    save_adm_reference(root / "ref_images.npz", REF_IMAGES)
    return {"root": root, "variables": variables, "fc": fc}


def _outputs(files, samples):
    """Pool3, spatial and unbiased logits of samples and reference, computed apart (float64)."""
    fn = jax.jit(inception_outputs, static_argnames=("input_range", "quantize"))
    fake = fn(files["variables"], jnp.asarray(samples), fc=files["fc"])
    real = fn(files["variables"], jnp.asarray(REF_IMAGES), fc=None, input_range="uint8")
    return jax.tree.map(lambda a: np.asarray(a, np.float64), (fake, real))


def _generate(params, labels, keys):
    del params, labels
    x = jax.vmap(lambda k: jax.random.uniform(k, (8, 8, 3), minval=-1, maxval=1))(keys)
    return x, {"nfe": jnp.int32(1)}


@pytest.fixture(scope="session")
def streamed(files):
    """The whole table, sampled and evaluated batch by batch on a 2-device mesh."""
    root = files["root"]
    ev = get_evaluators(
        ["fid", "sfid", "is", "prec_recall", "kid"],
        {"inception": {"ref_batch": root / "ref_images.npz", "inception_fc": root / "fc.npz",
                       "is_split_size": 2, "kid_subset_size": 4, "kid_subsets": 3},
         "fid": {"inception_weights": root / "w.npz"}},
    )  # fmt: skip
    mesh = make_mesh(num_devices=2)
    fn = make_sample_and_evaluate_fn(_generate, ev, mesh=mesh, num=5, batch_size=4)
    out = fn(None, seed=3, return_samples=True)  # two batches, the second padded
    return ev, out, _outputs(files, out.samples)


def test_the_table_equals_the_reference_functions(streamed):
    ev, out, (fake, real) = streamed
    got = out.metrics
    assert list(got) == [
        "fid", "sfid", "inception_score", "precision", "recall", "kid", "kid_std"
    ]  # fmt: skip  # the papers' column order
    fid = frechet_distance(*feature_moments(fake["pool3"]), *feature_moments(real["pool3"]))
    sfid = frechet_distance(*feature_moments(fake["spatial"]), *feature_moments(real["spatial"]))
    assert fake["spatial"].shape == (5, 17 * 17 * 7)  # ADM's mixed_6/conv[..., :7]
    assert got["fid"] == pytest.approx(fid, rel=1e-3)
    assert got["sfid"] == pytest.approx(sfid, rel=1e-3)
    score = inception_score(fake["logits_unbiased"], split_size=2)
    assert got["inception_score"] == pytest.approx(score, rel=1e-4)
    pr = precision_recall(real["pool3"], fake["pool3"], k=3)
    assert (got["precision"], got["recall"]) == (pr["precision"], pr["recall"])
    ref_kid = kid(real["pool3"], fake["pool3"], num_subsets=3, subset_size=4)
    assert got["kid"] == pytest.approx(ref_kid["kid"], rel=1e-3, abs=1e-6)


def test_streaming_keeps_moments_not_rows(files, streamed):
    """sFID's spatial features reach the metric as float64 running moments, batch by batch."""
    ev, out, (fake, _) = streamed
    assert ev.moments == ("spatial",)  # pool3 rows are kept: precision/recall need them
    spatial = out.features["spatial"]
    assert isinstance(spatial, RunningStatistics) and spatial.num == 5
    cov = np.cov(fake["spatial"], rowvar=False)
    np.testing.assert_allclose(spatial.covariance(), cov, atol=1e-4 * np.abs(cov).max())
    assert out.features["features"].shape == (5, 2048)
    root = files["root"]
    only_fid = inception_evaluator(
        ("fid", "sfid"), ref_batch=root / "ref_images.npz", inception_weights=root / "w.npz"
    )
    assert only_fid.moments == ("features", "spatial")  # no rows at all without them


def test_reference_statistics_come_from_the_batch_when_stored(files, streamed, tmp_path):
    _, _, (fake, real) = streamed
    stored = tmp_path / "ref_stats.npz"
    w = files["root"] / "w.npz"
    digest = make_adm_reference(REF_IMAGES, stored, inception_weights=w, progress=False)
    assert digest == file_sha256(stored)
    batch = load_adm_reference(stored)
    np.testing.assert_array_equal(batch.images, REF_IMAGES)
    for got, want in ((batch.mu, real["pool3"]), (batch.mu_s, real["spatial"])):
        np.testing.assert_allclose(got, want.mean(0), atol=1e-4 * np.abs(want).max())
    cov = np.cov(real["pool3"], rowvar=False)
    np.testing.assert_allclose(batch.sigma, cov, atol=1e-4 * np.abs(cov).max())
    # Stored statistics are used as they are: doubling sigma changes FID accordingly.
    save_adm_reference(
        tmp_path / "scaled.npz", REF_IMAGES[:2], mu=batch.mu, sigma=2 * batch.sigma,
        mu_s=batch.mu_s, sigma_s=batch.sigma_s,
    )  # fmt: skip
    ev = inception_evaluator("fid", ref_batch=tmp_path / "scaled.npz", inception_weights=w)
    got = ev.reduce_fn({"features": fake["pool3"]}, None)["fid"]
    want = frechet_distance(*feature_moments(fake["pool3"]), batch.mu, 2 * batch.sigma)
    assert got == pytest.approx(want, rel=1e-9)


def test_uint8_conversion_inverts_the_data_sources():
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = u.astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # as sources read PNGs
    back = to_uint8_rgb(x)
    assert back.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(back[..., 0], u[..., 0])
    with pytest.raises(ValueError, match="decode latents"):
        to_uint8_rgb(np.zeros((2, 4, 4, 4)))


def test_missing_references_name_the_fix(files, tmp_path):
    w = files["root"] / "w.npz"
    with pytest.raises(ValueError, match="sfid.*ref_batch.*--evaluator=adm"):
        inception_evaluator(("fid", "sfid"), reference_stats=None, inception_weights=w)
    with pytest.raises(FileNotFoundError, match="--fc-out"):
        inception_evaluator("is", inception_weights=w)
    np.savez(tmp_path / "no_images.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="no images 'arr_0'.*prec_recall"):
        inception_evaluator(
            "prec_recall", ref_batch=tmp_path / "no_images.npz", inception_weights=w
        )
    np.savez(tmp_path / "small.npz", mu=np.zeros(8), sigma=np.eye(8), arr_0=REF_IMAGES)
    with pytest.raises(ValueError, match="8-d 'mu'"):
        inception_evaluator("sfid", ref_batch=tmp_path / "small.npz", inception_weights=w)
    with pytest.raises(ValueError, match="unknown Inception metrics"):
        inception_evaluator("precision", inception_weights=w)


def test_get_evaluators_groups_and_checks_names(files):
    opts = {
        "inception": {
            "inception_weights": files["root"] / "w.npz",
            "inception_fc": files["root"] / "fc.npz",
        }
    }
    ev = get_evaluators("is,fd_digits", opts)
    assert ev.name == "inception+fd_digits"
    for bad in (["fid", "fid"], ["nope"], []):
        with pytest.raises(ValueError, match="distinct names"):
            get_evaluators(bad)
    with pytest.raises(ValueError, match="disagree on inception_weights"):
        get_evaluators(
            ["is", "fid"],
            {**opts, "fid": {"inception_weights": "other.npz"}, "is": {"inception_weights": "x"}},
        )


def test_combine_and_accumulator_reduce_like_one_pass():
    pts = np.random.default_rng(1).standard_normal((7, 3))

    def mean_metric(f, labels):
        mu, sigma = feature_moments(f["x"])
        return {"trace": float(np.trace(sigma)), "m0": float(mu[0])}

    a = Evaluator("a", None, lambda p, x: {"x": x}, mean_metric, batch_size=3, moments=("x",))
    b = Evaluator("b", None, lambda p, x: {"y": 2 * x}, lambda f, l: {"n": len(f["y"])}, 2)
    both = combine([a, b])
    assert both.moments == ("0/x",)
    got = both(pts)
    assert got == pytest.approx(
        {"trace": np.trace(np.cov(pts, rowvar=False)), "m0": pts[:, 0].mean(), "n": 7}
    )
    acc = FeatureAccumulator(("x",), keep=True)
    for chunk in np.array_split(pts, 3):
        acc.update({"x": chunk, "z": chunk[:, :1]})
    res = acc.result()
    np.testing.assert_allclose(res["x"].covariance(), np.cov(pts, rowvar=False), atol=1e-12)
    np.testing.assert_array_equal(res["x/rows"], pts)
    assert res["z"].shape == (7, 1) and acc.num == 7
    with pytest.raises(ValueError, match="report 'n'"):
        combine([b, b])(pts)


def test_the_converter_checks_the_published_hash_prefix(tmp_path, monkeypatch):
    fake = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    fake.write_bytes(b"not the weights")
    with pytest.raises(ChecksumMismatchError, match="6726825d.*--any-source"):
        check_source(str(fake))
    import jaxdiff.metrics.convert_inception as conv

    monkeypatch.setattr(conv, "PTH_SHA256_PREFIX", file_sha256(fake)[:8])
    assert check_source(str(fake)) == file_sha256(fake)


def test_config_eval_files_reach_the_evaluators(files):
    """config.eval's reference files become evaluator options; several names are one pass."""
    from jaxdiff.experiment.evaluate import build_evaluator, eval_config_options
    from train.configs.digits import get_config

    ec = get_config().eval
    assert eval_config_options(ec)["inception"] == {
        "reference_stats": None, "ref_batch": None, "inception_weights": None, "inception_fc": None
    }  # fmt: skip  # "" = not given
    ec.ref_batch = str(files["root"] / "ref_images.npz")
    ec.inception_weights = str(files["root"] / "w.npz")
    options = eval_config_options(ec)
    assert options["inception"]["ref_batch"] == ec.ref_batch
    ev = build_evaluator("sfid,toy", dataset="toy_gmm", options=options)
    assert ev.name == "inception+toy" and ev.moments == ("0/features", "0/spatial")
