"""REPA: the exact loss, the step's frozen-encoder argument, sharding, config and CLI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import TINY_MODEL_FLAGS, tiny_config

from jaxdiff.diffusion import EDM
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.loss_terms import build_loss_terms
from jaxdiff.experiment.repa import build_repa, repa_model
from jaxdiff.models import MLP, DiT, UNet
from jaxdiff.parallel import make_mesh
from jaxdiff.training import LossInputs, jit_train_step, make_state_fns, make_train_step
from jaxdiff.training.repa import RepaEncoder, RepaTerm, classifier_encoder, resample_grid

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_classes=10)
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.uniform(-1, 1, (8, 8, 8, 1)), jnp.float32)
Y = jnp.asarray(RNG.integers(0, 10, 8), jnp.int32)


def reference_proj_loss(z, y):
    """REPA's loss.py proj_loss, sample by sample, in float64."""
    z = np.asarray(z, np.float64).reshape(z.shape[0], -1, z.shape[-1])
    y = np.asarray(y, np.float64).reshape(y.shape[0], -1, y.shape[-1])
    total = 0.0
    for zj, yj in zip(z, y, strict=True):
        zj = zj / np.maximum(np.linalg.norm(zj, axis=-1, keepdims=True), 1e-12)
        yj = yj / np.maximum(np.linalg.norm(yj, axis=-1, keepdims=True), 1e-12)
        total += np.mean(-(zj * yj).sum(-1))
    return total / z.shape[0]


def fixed_encoder(features):
    """An 'encoder' returning given features (its params), to test the loss exactly."""
    return RepaEncoder("fixed", features.shape[-1], lambda params, images: params, features)


@pytest.mark.parametrize("grid", [(4, 4), (2, 2), (8, 8)])
def test_loss_matches_repa_proj_loss_in_float64(grid):
    z = RNG.standard_normal((3, *grid, 5)).astype(np.float32)
    y = RNG.standard_normal((3, 4, 4, 5)).astype(np.float32)
    term = RepaTerm(weight=0.5, encoder=fixed_encoder(jnp.asarray(y)))
    inputs = LossInputs(None, {"image": X}, None, None, None, {"repa": (jnp.asarray(z),)}, None)
    value, metrics = term(inputs)
    # The encoder's 4x4 grid onto the model's: 2x2 block means, or each token repeated.
    h, w = grid
    if h < 4:
        y = y.reshape(3, h, 4 // h, w, 4 // w, 5).mean(axis=(2, 4))
    elif h > 4:
        y = np.repeat(np.repeat(y, h // 4, axis=1), w // 4, axis=2)
    want = reference_proj_loss(z, y)
    np.testing.assert_allclose(value, 0.5 * want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metrics["cos"], -want, rtol=1e-6, atol=1e-7)


def test_resample_grid_bilinear_for_non_integer_ratios():
    y = jnp.asarray(RNG.standard_normal((1, 3, 3, 2)), jnp.float32)
    got = resample_grid(y, (2, 2))
    np.testing.assert_allclose(got, jax.image.resize(y, (1, 2, 2, 2), "linear"))


def _repa_unet(**kw):
    return UNet(**SMALL, dropout=0.0, repa_layer="enc1", repa_dim=32, repa_hidden=16, **kw)


def _state_and_step(model, terms, mesh):
    tx = optax.adam(1e-3)
    init_fn, shardings = make_state_fns(model, tx, mesh, (8, 8, 1), 10, (0.999,))
    state = jax.device_put(init_fn(jax.random.key(0)), shardings)
    step_fn = make_train_step(model, EDM(), tx, num_classes=10, label_dropout=0.1, terms=terms)
    return state, step_fn, jit_train_step(step_fn, shardings, mesh)


def test_weight_zero_is_the_plain_step_bit_for_bit():
    """A weight-0 term on a projector model changes no denoising param, loss or grad."""
    mesh = make_mesh(num_devices=1)
    batch = {"image": X, "label": Y}
    term = RepaTerm(weight=0.0, encoder=classifier_encoder())
    plain_state, _, plain = _state_and_step(UNet(**SMALL, dropout=0.0), (), mesh)
    repa_state, _, repa = _state_and_step(_repa_unet(), (term,), mesh)
    projector0 = jax.device_get(repa_state.params["repa_projector"])
    plain_state, m0 = plain(plain_state, batch, jax.random.key(2))
    repa_state, m1 = repa(repa_state, batch, jax.random.key(2))
    params = dict(jax.device_get(repa_state.params))
    projector = params.pop("repa_projector")
    plain_params = jax.device_get(plain_state.params)
    assert jax.tree.all(jax.tree.map(np.array_equal, plain_params, params))
    assert jax.tree.all(jax.tree.map(np.array_equal, projector0, projector))  # zero grad
    assert float(m0["loss"]) == float(m1["loss"]) == float(m1["denoise_loss"])
    assert float(m0["grad_norm"]) == float(m1["grad_norm"])
    assert float(m1["repa/loss"]) == 0.0 and -1 <= float(m1["repa/cos"]) <= 1


def _constant_sizes(hlo_text):
    """Element counts of the tensor constants in StableHLO text."""
    sizes = []
    for line in hlo_text.splitlines():
        if "stablehlo.constant" in line or "= constant" in line:
            for dims in re.findall(r"tensor<([0-9x]+)x[a-z]", line):
                sizes.append(int(np.prod([int(d) for d in dims.split("x")])))
    return sizes


def test_encoder_params_are_step_arguments_and_sharded_equals_one_device():
    term = RepaTerm(weight=0.5, encoder=classifier_encoder())
    # The largest array the feature map uses (its head is unused and compiled away).
    biggest = max(np.size(v["kernel"]) for k, v in term.frozen.items() if k.startswith("conv"))
    batch = {"image": X, "label": Y}
    results = []
    for n in (8, 1):
        state, step_fn, step = _state_and_step(_repa_unet(), (term,), make_mesh(num_devices=n))
        if n == 8:
            text = step.lower(state, batch, jax.random.key(2)).as_text()
            assert max(_constant_sizes(text), default=0) < biggest
            # The same step with the encoder closed over bakes it in: the check has teeth.
            closed = jax.jit(lambda s, b, k: step_fn(s, b, k))
            text = closed.lower(state, batch, jax.random.key(2)).as_text()
            assert max(_constant_sizes(text)) >= biggest
        state, metrics = step(state, batch, jax.random.key(2))
        results.append(jax.device_get((state.params, metrics)))
    (p8, m8), (p1, m1) = results
    assert float(m8["repa/loss"]) != 0.0
    for k in ("loss", "denoise_loss", "repa/loss", "repa/cos", "grad_norm"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p8, p1)


def test_projector_only_in_training_passes_and_dit_layout():
    dit = DiT(patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=10)
    for model in (_repa_unet(), dit.clone(repa_depth=2, repa_dim=32, repa_hidden=16)):
        params = nn.unbox(model.init(jax.random.key(0), X, jnp.zeros(8), Y))["params"]
        assert "repa_projector" in params
        _, sown = model.apply({"params": params}, X, jnp.zeros(8), Y, mutable=["intermediates"])
        assert "repa" not in sown.get("intermediates", {})  # sampling never runs it
        _, sown = model.apply(
            {"params": params}, X, jnp.zeros(8), Y, train=True, mutable=["intermediates"]
        )
        assert sown["intermediates"]["repa"][0].shape == (8, 4, 4, 32)
    params = nn.unbox(dit.init(jax.random.key(0), X, jnp.zeros(8), Y))["params"]
    assert "repa_projector" not in params  # off by default: published layouts unchanged
    scanned = dit.clone(repa_depth=2, repa_dim=32, repa_hidden=16, scan_blocks=True)
    params = nn.unbox(scanned.init(jax.random.key(0), X, jnp.zeros(8), Y))["params"]
    with pytest.raises(ValueError, match="scan_blocks=False"):
        scanned.apply({"params": params}, X, jnp.zeros(8), Y, train=True)
    with pytest.raises(ValueError, match=r"repa_layer='enc5'.*'enc0', 'enc1', 'mid'"):
        UNet(**SMALL, repa_layer="enc5", repa_dim=4).init(jax.random.key(0), X, jnp.zeros(8), Y)


def _config(**repa):
    config = tiny_config(2)
    config.repa.update(repa)
    return config


def test_config_off_builds_nothing_and_errors_name_the_fix():
    plain = UNet(**SMALL)
    config = _config(weight=0.0)
    assert repa_model(config, plain) is plain
    assert build_loss_terms(config, plain, 10, (8, 8, 1)) == ()
    on = _config(weight=0.5, hidden=16)
    model = repa_model(on, plain)
    assert (model.repa_layer, model.repa_dim, model.repa_hidden) == ("enc1", 32, 16)
    (term,) = [t for t in build_loss_terms(on, model, 10, (8, 8, 1)) if t.name == "repa"]
    assert term.weight == 0.5
    dit = repa_model(on, DiT(depth=6, hidden_size=32, num_heads=2))
    assert dit.repa_depth == 2  # depth // 3
    bad = [
        (dict(weight=-1.0), plain, "config.repa.weight=-1.0.*--config.repa.weight=0.5"),
        (dict(weight=0.5, layer="enc7"), plain, r"config.repa.layer='enc7'.*\['enc0', 'enc1'"),
        (dict(weight=0.5, layer="x"), DiT(depth=6), r"config.repa.layer='x'.*1..6"),
        (dict(weight=0.5), DiT(depth=6, scan_blocks=True), "--config.model.scan_blocks=False"),
        (dict(weight=0.5), MLP(), "unet and dit.*--config.repa.weight=0"),
        (dict(weight=0.5, hidden=0), plain, "config.repa.hidden=0"),
        (dict(weight=0.5, encoder="/nope.safetensors"), plain, "convert_dinov2"),
        (dict(weight=0.5, encoder="digits_classifier:9"), plain, "stage=9 out of range"),
    ]
    for repa, net, message in bad:
        with pytest.raises(InvalidArgumentError, match=message):
            repa_model(_config(**repa), net)
    with pytest.raises(InvalidArgumentError, match="no REPA projector.*repa_model"):
        build_repa(on, plain, 10, (8, 8, 1))
    with pytest.raises(InvalidArgumentError, match="latents.*--config.repa.weight=0"):
        build_repa(on, model, 10, (4, 4, 4))


def test_train_cli_with_repa_then_sampling_ignores_the_projector(tmp_path):
    """One CLI run for every training switch: REPA, Smooth Diffusion and CEP together."""
    from jaxdiff.experiment import generate_samples, load_run, resolve_sampler

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [
        "--config=train/configs/digits.py",
        f"--workdir={tmp_path}",
        *TINY_MODEL_FLAGS,
        "--config.train.num_steps=3",
        "--config.train.log_every=3",
        "--config.sample.grid_size=0",
        "--config.repa.weight=0.5",
        "--config.repa.hidden=16",
        "--config.smooth.weight=1",
        "--config.model.cep_scale=1.0",
        "--config.model.cep_noise=uniform",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in logged if "repa/loss" in m][-1]
    assert np.isfinite(last["repa/loss"]) and -1 <= last["repa/cos"] <= 1
    assert np.isfinite(last["smooth/loss"]) and last["smooth/variation"] > 0
    run = load_run(tmp_path)
    assert "repa_projector" in run.params and run.model.repa_dim == 32
    spec = resolve_sampler(run.config.sample, num_classes=run.num_classes, steps=2)
    images, _ = generate_samples(run, spec, num=4, labels=np.arange(4), seed=0)
    assert images.shape == (4, 8, 8, 1) and np.isfinite(images).all()


def test_dinov2_patch_tokens_share_the_verified_network(tmp_path):
    """The captured, normed tokens' CLS is DINOv2ViT's output (checked against upstream)."""
    from test_metrics_dinov2 import PTH, TINY

    from jaxdiff.metrics import convert_dinov2
    from jaxdiff.metrics.dinov2 import DINOv2ViT
    from jaxdiff.training.repa import dinov2_encoder, dinov2_tokens

    weights = str(tmp_path / "tiny.safetensors")
    convert_dinov2.convert(PTH, weights, TINY)
    encoder = dinov2_encoder(weights)
    x = jnp.asarray(RNG.standard_normal((2, 28, 42, 3)), jnp.float32)
    tokens = dinov2_tokens(DINOv2ViT(TINY), encoder.params, x)
    cls = DINOv2ViT(TINY).apply({"params": encoder.params}, x)
    assert tokens.shape == (2, 1 + 2 * 3, TINY.embed_dim)
    np.testing.assert_allclose(tokens[:, 0], cls, rtol=1e-5, atol=1e-6)
    # Digits go in at 224 px (REPA's 224 * (H // 256), at least 224): a 16 x 16 patch grid.
    features = encoder.apply(encoder.params, X[:2])
    assert features.shape == (2, 16, 16, TINY.embed_dim) and encoder.dim == TINY.embed_dim
