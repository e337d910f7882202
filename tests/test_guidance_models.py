"""PAG and SLG on tiny real networks (UNet, DiT): the perturbed pass differs, s = 0 is CFG."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import EDM
from jaxdiff.generate import model_denoiser
from jaxdiff.guidance import StepCtx, cfg, pag, slg
from jaxdiff.models import DiT, UNet

B = 4
X = jnp.asarray(np.random.default_rng(0).standard_normal((B, 4, 4, 1)), jnp.float32)
C = jnp.array([0, 1, 2, 1], jnp.int32)
U = jnp.full((B,), 3, jnp.int32)
MODELS = {
    "unet": UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_classes=3),
    "dit": DiT(
        patch_size=2, hidden_size=16, depth=2, num_heads=2, num_classes=3, frequency_features=16
    ),  # fmt: skip
}


def random_params(model, scale=0.3):
    """Non-zero params (zero-initialised output layers would hide the perturbation)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), X, jnp.ones((B,)), C)
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) * scale, s.dtype), shapes
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_perturbed_pass_differs_and_zero_scale_is_cfg(name):
    model = MODELS[name]
    base = model_denoiser(model, EDM(), random_params(model)["params"])
    calls = []

    def den(x, sigma, cond, **kw):
        calls.append((x.shape[0], kw.get("variant")))
        return base(x, sigma, cond, **kw)

    w = jnp.array([1.0, 2.0, 3.0, 4.5])
    ctx = StepCtx(jnp.int32(0), jnp.float32(1.7), jnp.float32(1.0), None, 1)

    @jax.jit
    def go(x):
        sig = jnp.full((B,), 1.7)
        d = {v or "none": base(x, sig, C, variant=v) for v in (None, "pag", "slg")}
        out = {
            "cfg": cfg(w)(base, x, ctx, C, U, ())[0].x0,
            "pag0": pag(0.0, scale=w)(base, x, ctx, C, U, ())[0].x0,
            "slg0": slg(0.0, scale=w, start=0.0, stop=1.0)(base, x, ctx, C, U, ())[0].x0,
            "slg_only": slg(2.8, start=0.0, stop=1.0)(base, x, ctx, C, U, ())[0].x0,
        }
        calls.clear()
        out["pag"] = pag(2.0, scale=w)(den, x, ctx, C, U, ())[0].x0
        return d, out

    d, out = go(X)
    assert calls == [(2 * B, None), (B, "pag")]  # cond + uncond share one call
    for v in ("pag", "slg"):
        assert np.abs(np.asarray(d[v]) - np.asarray(d["none"])).max() > 1e-5, v
    np.testing.assert_allclose(out["pag0"], out["cfg"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["slg0"], out["cfg"], rtol=1e-5, atol=1e-5)
    wpag = out["cfg"] + 2.0 * (d["none"] - d["pag"])
    np.testing.assert_allclose(out["pag"], wpag, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["slg_only"], d["none"] + 2.8 * (d["none"] - d["slg"]), atol=1e-4)
