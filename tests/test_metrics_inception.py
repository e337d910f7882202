"""FID Inception network: structure, preprocessing, weight files and the FID evaluator."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fakegcs import BUCKET

from jaxdiff.metrics import (
    INCEPTION_FEATURE,
    INCEPTION_WEIGHTS_ENV,
    ChecksumMismatchError,
    InceptionWeightsNotFoundError,
    ReferenceStatistics,
    evaluate_samples,
    get_evaluator,
    inception_features,
    load_inception_variables,
    load_statistics,
    save_reference_statistics,
    save_statistics,
)
from jaxdiff.metrics.convert_inception import convert_state_dict
from jaxdiff.metrics.inception import preprocess
from jaxdiff.metrics.inception_weights import (
    inception_variable_shapes,
    random_inception_variables,
    save_inception_variables,
)
from jaxdiff.parallel import make_mesh
from jaxdiff.utils.trees import flatten_tree

FEATURES = jax.jit(inception_features)
IMAGES = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)


@pytest.fixture(scope="session")
def variables():
    return random_inception_variables(0)


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory, variables):
    path = tmp_path_factory.mktemp("inception") / "fid_inception.npz"
    digest = save_inception_variables(path, variables)
    return path, digest


def test_structure_matches_the_fid_network():
    shapes = inception_variable_shapes()
    convs = [k for k in shapes if k.endswith("conv/kernel")]
    assert len(convs) == 94 and len(shapes) == 5 * 94  # conv + BN scale/bias/mean/var
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    assert n_params == 21_820_000  # pool3 part of the pytorch-fid network (no fc, no aux)
    assert shapes["params/Conv2d_1a_3x3/conv/kernel"] == (3, 3, 3, 32)
    assert shapes["params/Mixed_6b/branch7x7_2/conv/kernel"] == (1, 7, 128, 128)
    assert shapes["params/Mixed_7c/branch_pool/conv/kernel"] == (1, 1, 2048, 192)
    assert shapes["batch_stats/Mixed_7c/branch3x3dbl_3b/bn/var"] == (384,)


def test_forward_shape_and_determinism(variables):
    a = FEATURES(variables, IMAGES)
    b = FEATURES(variables, IMAGES)
    assert a.shape == (2, 2048) and a.dtype == jnp.float32
    assert np.all(np.isfinite(a)) and np.all(np.asarray(a) >= 0)  # mean of ReLU outputs
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1])


def test_preprocess_ranges_channels_and_resize():
    u8 = np.random.default_rng(1).integers(0, 256, (2, 5, 5, 3)).astype(np.uint8)
    from_u8 = preprocess(u8, input_range="uint8", size=5)
    from_float = preprocess(u8 / 127.5 - 1.0, size=5)
    np.testing.assert_allclose(from_u8, from_float, atol=1e-6)
    gray = preprocess(IMAGES)
    assert gray.shape == (2, 299, 299, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    const = preprocess(np.full((1, 8, 8, 1), 0.2, np.float32), quantize=False)
    np.testing.assert_allclose(const, 0.2, atol=1e-6)  # bilinear keeps constants
    q = preprocess(np.full((1, 4, 4, 1), 0.2, np.float32), size=4)
    np.testing.assert_allclose(q, np.round(1.2 * 127.5) / 127.5 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="input_range"):
        preprocess(IMAGES, input_range="0_1")


def test_weight_file_round_trip(weights_file, variables):
    path, digest = weights_file
    loaded = load_inception_variables(path, expected_sha256=digest)
    flat_in, flat_out = flatten_tree(variables), flatten_tree(loaded)
    assert flat_in.keys() == flat_out.keys()
    for k in flat_in:
        np.testing.assert_array_equal(flat_in[k], flat_out[k])
    assert (path.parent / (path.name + ".sha256")).read_text().split()[0] == digest
    load_inception_variables(path)  # default: checked against the converter's sidecar


def test_weights_on_a_bucket_keep_their_checksum_sidecar(fake_gcs, variables, monkeypatch):
    url = f"gs://{BUCKET}/fid_inception.npz"
    digest = save_inception_variables(url, variables)
    sidecar = fake_gcs / BUCKET / "fid_inception.npz.sha256"
    assert sidecar.read_text() == f"{digest}  fid_inception.npz\n"
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, url)
    loaded = load_inception_variables()  # found through the variable, checked by the sidecar
    assert np.array_equal(
        loaded["params"]["Conv2d_1a_3x3"]["conv"]["kernel"],
        variables["params"]["Conv2d_1a_3x3"]["conv"]["kernel"],
    )
    sidecar.write_text("ab" * 32 + "  fid_inception.npz\n")
    with pytest.raises(ChecksumMismatchError, match=f"{url}.*{digest}"):
        load_inception_variables()
    assert os.listdir(".") == []  # nothing went to a local "gs:" folder


def test_checksum_mismatch_names_both_hashes_and_the_path(weights_file):
    path, digest = weights_file
    with pytest.raises(ChecksumMismatchError) as err:
        load_inception_variables(path, expected_sha256="ab" * 32)
    msg = str(err.value)
    assert digest in msg and "ab" * 32 in msg and str(path) in msg


def test_missing_weights_say_exactly_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    for call in (
        lambda: get_evaluator("fid", reference_stats="x.npz"),
        lambda: load_inception_variables(tmp_path / "nope.npz"),
    ):
        with pytest.raises(InceptionWeightsNotFoundError) as err:
            call()
        msg = str(err.value)
        for needle in (
            "pt_inception-2015-12-05-6726825d.pth",
            "python -m jaxdiff.metrics.convert_inception",
            INCEPTION_WEIGHTS_ENV,
        ):
            assert needle in msg


def test_wrong_file_is_rejected(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, **{"params/Conv2d_1a_3x3/conv/kernel": np.zeros((3, 3, 3, 8))})
    with pytest.raises(ValueError, match="not a converted FID Inception file"):
        load_inception_variables(path, expected_sha256=None)


def test_converter_maps_a_pytorch_state_dict(variables):
    # Build the state dict pytorch-fid's module would hold, from our variables.
    state = {"fc.weight": np.zeros((1008, 2048)), "fc.bias": np.zeros(1008)}
    names = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    for key, value in flatten_tree(variables).items():
        collection, *module, layer, leaf = key.split("/")
        prefix = ".".join(module)
        if leaf == "kernel":
            state[f"{prefix}.conv.weight"] = value.transpose(3, 2, 0, 1)
        else:
            state[f"{prefix}.bn.{names[leaf]}"] = value
            state[f"{prefix}.bn.num_batches_tracked"] = np.zeros((), np.int64)
    converted = flatten_tree(convert_state_dict(state))
    expected = flatten_tree(variables)
    assert converted.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(converted[k], expected[k])
    with pytest.raises(ValueError, match="unexpected key"):
        convert_state_dict({"Mixed_5b.branch1x1.lin.weight": np.zeros(1)})


def test_fid_reference_statistics_are_those_of_the_features(weights_file, variables, tmp_path):
    path, _ = weights_file
    feats = np.asarray(FEATURES(variables, IMAGES), np.float64)
    stats = tmp_path / "ref.npz"
    # One device and batch 2: the same XLA program as FEATURES, so float32 round-off
    # matches (the covariance of 2 samples magnifies any difference in the features).
    one = make_mesh(num_devices=1)
    save_reference_statistics("fid", IMAGES, stats, inception_weights=path, mesh=one)
    mu, sigma = load_statistics(stats)
    meta = ReferenceStatistics.load(stats)
    assert (meta.evaluator, meta.feature, meta.num, meta.image_shape) == (
        "fid",
        INCEPTION_FEATURE,
        2,
        (8, 8, 1),
    )
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="reference statistics"):
        get_evaluator("fid", inception_weights=path)
    digits = tmp_path / "digits.npz"
    save_statistics(digits, np.zeros(128), np.eye(128), feature="digits_classifier:05c3")
    with pytest.raises(ValueError, match="'digits_classifier:05c3' features.*reference_stats"):
        get_evaluator("fid", inception_weights=path, reference_stats=digits)
    small = tmp_path / "small.npz"
    save_statistics(small, np.zeros(128), np.eye(128))  # a pytorch-fid-like file, wrong size
    with pytest.raises(ValueError, match="128-d features.*2048-d"):
        get_evaluator("fid", inception_weights=path, reference_stats=small)


# The whole --eval=fid path (weights file -> features -> statistics -> distance); a 2048-d
# eigendecomposition takes 5-15 s on a loaded 2-core CPU, acceptable in the default run.
def test_fid_evaluator_matches_a_closed_form(weights_file, variables, tmp_path):
    path, _ = weights_file
    feats = np.asarray(FEATURES(variables, IMAGES), np.float64)
    # Reference N(mu + 0.1, I): with two samples the sample covariance is
    # delta delta^T / 2 (delta = f1 - f2), so FID has a closed form.
    ref = tmp_path / "ref_eye.npz"
    save_statistics(ref, feats.mean(0) + 0.1, np.eye(2048))
    fid = evaluate_samples("fid", IMAGES, reference_stats=ref, inception_weights=path)["fid"]
    lam = np.sum((feats[0] - feats[1]) ** 2) / 2
    assert fid == pytest.approx(2048 * 0.01 + lam + 2048 - 2 * np.sqrt(lam), rel=1e-4)
