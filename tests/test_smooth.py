"""Smooth Diffusion's step-wise variation regulariser: closed forms, FD, sharding, config."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from jaxdiff.diffusion import EDM
from jaxdiff.diffusion.formulation import expand_to
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.loss_terms import build_loss_terms
from jaxdiff.models import UNet
from jaxdiff.parallel import batch_sharding, make_mesh, replicated
from jaxdiff.training import LossInputs, SmoothTerm, make_loss_fn, step_variation

SHAPE = (4, 4, 1)  # d = 16
D = int(np.prod(SHAPE))
B = 8
SMALL = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_classes=10, dropout=0.0)
M = np.random.default_rng(0).standard_normal((D, D)) / 4  # not symmetric: J^T u != J u
BIAS = np.random.default_rng(1).standard_normal(D)
EDM_ = EDM(sigma_data=0.5)


def _gain(sigma):
    return 1.0 / (1.0 + sigma**2)


def linear_net(theta=1.0):
    """A raw EDM network whose denoiser is ``D(x, sigma) = theta g(sigma) M x + b``."""

    def net(x_in, label, cond, **kwargs):
        del cond, kwargs
        sigma = jnp.exp(4.0 * label)  # EDM's c_noise = log(sigma) / 4
        c = EDM_.precondition(sigma)
        x = x_in / expand_to(c.c_in, x_in)
        flat = x.reshape(x.shape[0], -1)
        d = theta * _gain(sigma)[:, None] * (flat @ jnp.asarray(M.T, jnp.float32)) + BIAS
        d = d.reshape(x.shape).astype(jnp.float32)
        return (d - expand_to(c.c_skip, x) * x) / expand_to(c.c_out, x)

    return net


def _inputs(net, x0, key, labels=None):
    return LossInputs(
        params=None,
        batch={"image": x0},
        labels=labels,
        net=net,
        formulation=EDM_,
        intermediates={},
        key=key,
    )


def _draws(key, x0):
    """The term's own draws, recomputed: sigma, eps and the direction u (float64)."""
    k_sigma, k_noise, k_dir = jax.random.split(key, 3)
    sigma = EDM_.sample_sigma(k_sigma, x0.shape[:1])
    eps = jax.random.normal(k_noise, x0.shape, jnp.float32)
    u = jax.random.normal(k_dir, x0.shape, jnp.float32)
    return (np.asarray(a, np.float64) for a in (sigma, eps, u))


def test_linear_denoiser_value_and_gradient_match_float64():
    key = jax.random.key(7)
    x0 = jnp.asarray(np.random.default_rng(2).standard_normal((B, *SHAPE)), jnp.float32)
    sigma, _, u = _draws(key, x0)
    # J = g(sigma) M, so J^T u = g M^T u; r is independent of x for a linear denoiser.
    pulled = _gain(sigma)[:, None] * (u.reshape(B, D) @ M)
    a = sigma**2 / np.sqrt(1 + sigma**2) * np.linalg.norm(pulled, axis=1) / np.sqrt(D)
    for target in ("batch", 0.05):
        term = SmoothTerm(weight=0.5, target=target)
        value, metrics = term(_inputs(linear_net(), x0, key))
        m = a.mean() if target == "batch" else target
        np.testing.assert_allclose(metrics["variation"], a.mean(), rtol=2e-5)
        np.testing.assert_allclose(metrics["penalty"], np.mean((a - m) ** 2), rtol=2e-5)
        np.testing.assert_allclose(value, 0.5 * np.mean((a - m) ** 2), rtol=2e-5)
        # Through the VJP: with D scaled by theta, r = theta a, and at theta = 1.3
        # d/dtheta mean((theta a - m)^2) = 2 mean((theta a - m) a), m fixed or the
        # stop-gradient mean (same gradient: the deviations sum to zero).
        theta = 1.3
        grad = jax.grad(lambda t, tg=term: tg(_inputs(linear_net(t), x0, key))[0])(theta)
        m = theta * a.mean() if target == "batch" else target
        expected = 0.5 * 2 * np.mean((theta * a - m) * a)
        np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-9)


@pytest.fixture(scope="session")
def unet_params():
    x = jnp.zeros((2, 8, 8, 1))
    init = jax.jit(UNet(**SMALL).init)
    return nn.unbox(init(jax.random.key(1), x, jnp.zeros(2), jnp.zeros(2, int)))["params"]


def test_vjp_matches_central_differences_of_a_unet(unet_params):
    model = UNet(**SMALL)

    def denoise(x, sigma, labels):
        net = lambda *a: model.apply({"params": unet_params}, *a)  # noqa: E731
        return EDM_.denoise(net, x, sigma, labels)

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32)
    sigma, labels = jnp.array([0.4, 2.0]), jnp.array([3, 7])
    u = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    r = jax.jit(step_variation, static_argnums=0)(denoise, x, sigma, labels, u)
    # (J^T u)_j = <u, dD/dx_j>, by central differences along each of the 64 pixels.
    h, d = 1e-2, 64
    basis = np.eye(d, dtype=np.float32).reshape(d, 8, 8, 1)
    xs = jnp.concatenate([x[i] + s * h * basis for i in range(2) for s in (1, -1)])
    big = jax.jit(denoise)(xs, jnp.repeat(sigma, 2 * d), jnp.repeat(labels, 2 * d))
    big = np.asarray(big, np.float64).reshape(2, 2, d, d)
    jtu = np.einsum("ijk,ik->ij", (big[:, 0] - big[:, 1]) / (2 * h), np.asarray(u).reshape(2, d))
    s = np.asarray(sigma, np.float64)
    expected = s**2 / np.sqrt(1 + s**2) * np.linalg.norm(jtu, axis=1) / np.sqrt(d)
    np.testing.assert_allclose(r, expected, rtol=2e-3)


def test_weight_zero_is_the_plain_step_bit_for_bit(unet_params):
    config = tiny_config(2)
    model = UNet(**SMALL)
    assert build_loss_terms(config, model, 10, (8, 8, 1)) == ()  # default: off
    config.smooth.weight = 0.0
    config.smooth.target = "0.3"
    terms = build_loss_terms(config, model, 10, (8, 8, 1))
    assert terms == ()
    batch = {"image": jnp.ones((4, 8, 8, 1)) * 0.1, "label": jnp.arange(4)}
    key = jax.random.key(0)
    plain = make_loss_fn(model, EDM_, num_classes=10, label_dropout=0.1)
    off = make_loss_fn(model, EDM_, num_classes=10, label_dropout=0.1, terms=terms)
    a = jax.jit(jax.value_and_grad(plain, has_aux=True))(unet_params, batch, key)
    b = jax.jit(jax.value_and_grad(off, has_aux=True))(unet_params, batch, key)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    config.smooth.weight = 2.0
    (term,) = build_loss_terms(config, model, 10, (8, 8, 1))
    assert term == SmoothTerm(weight=2.0, target=0.3)


def test_sharded_equals_one_device(unet_params):
    model = UNet(**SMALL)
    loss_fn = make_loss_fn(
        model, EDM_, num_classes=10, label_dropout=0.1, terms=(SmoothTerm(weight=1.0),)
    )
    rng = np.random.default_rng(4)
    batch = {
        "image": jnp.asarray(rng.standard_normal((16, 8, 8, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32),
    }
    key = jax.random.key(5)
    out = []
    for n in (1, 8):
        mesh = make_mesh(num_devices=n)
        rep = replicated(mesh)
        f = jax.jit(
            jax.value_and_grad(loss_fn, has_aux=True),
            in_shardings=(rep, batch_sharding(mesh), rep),
            out_shardings=rep,
        )
        out.append(jax.device_get(f(unet_params, batch, key)))
    (loss1, aux1), g1 = out[0]
    (loss8, aux8), g8 = out[1]
    assert aux1["smooth/penalty"] > 0 and aux1["smooth/variation"] > 0
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for k in aux1:
        np.testing.assert_allclose(aux8[k], aux1[k], rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g8, g1)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("weight", -1.0, r"config.smooth.weight=-1.0: use 0 \(off\) or a positive number"),
        ("target", "mean", r"config.smooth.target='mean': use 'batch'.*--config.smooth.target="),
        ("target", "-0.5", r"config.smooth.target='-0.5'"),
    ],
)
def test_config_errors_name_the_fix(field, value, match):
    config = tiny_config(2)
    config.smooth.weight = 1.0
    config.smooth[field] = value
    with pytest.raises(InvalidArgumentError, match=match):
        build_loss_terms(config, UNet(**SMALL), 10, (8, 8, 1))
    with pytest.raises(ValueError, match="target=-1.0: use 'batch' or a number >= 0"):
        SmoothTerm(target=-1.0)
