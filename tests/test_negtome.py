"""NegToMe: the token merge against float64 numpy, the DiT variant, the guidance protocol."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import EDM, karras_sigmas
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.generate import model_denoiser
from jaxdiff.guidance import NegToMe, cfg, negtome, parse_guidance
from jaxdiff.models import DiT
from jaxdiff.models.dit import stack_blocks
from jaxdiff.models.dit_blocks import TokenMerge, merge_tokens
from jaxdiff.samplers import euler, per_sample_normal, sample

B = 4
X = jnp.asarray(np.random.default_rng(0).standard_normal((B, 4, 4, 1)), jnp.float32)
C = jnp.array([0, 1, 2, 1], jnp.int32)
U = jnp.full((B,), 3, jnp.int32)
KW = dict(patch_size=2, hidden_size=16, depth=2, num_heads=2, num_classes=3, frequency_features=16)
MODEL = DiT(**KW)


def random_params(model, scale=0.3):
    """Non-zero params (zero-initialised output layers would hide the merge)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), X, jnp.ones((B,)), C)
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) * scale, s.dtype), shapes
    )["params"]
    return nn.unbox(params)


PARAMS = random_params(MODEL)
DEN = model_denoiser(MODEL, EDM(), PARAMS)


def merge_reference(h, alpha, tau, groups, mode):
    """The merge rule written out with loops, in float64."""
    h = np.asarray(h, np.float64)
    b, t, _ = h.shape
    n = b // groups
    alpha = np.broadcast_to(np.asarray(alpha, np.float64), (b,))
    unit = h / np.linalg.norm(h, axis=-1, keepdims=True)
    out = h.copy()
    for g in range(groups):
        for i in range(n):
            row = g * n + i
            refs = [0] if mode == "first" else [j for j in range(n) if j != i]
            if mode == "first" and i == 0:
                continue
            cand = [(g * n + j, s) for j in refs for s in range(t)]
            for k in range(t):
                sims = [unit[row, k] @ unit[r, s] for r, s in cand]
                best = int(np.argmax(sims))
                if sims[best] > tau:
                    r, s = cand[best]
                    out[row, k] = (1 + alpha[row]) * h[row, k] - alpha[row] * h[r, s]
    return out


@pytest.mark.parametrize("mode", ["others", "first"])
def test_merge_rule_matches_float64_numpy(mode):
    rng = np.random.default_rng(0)
    # Tokens share a few directions, so some matches pass the threshold and some do not.
    basis = rng.standard_normal((3, 8))
    h = basis[rng.integers(0, 3, (6, 5))] + 0.8 * rng.standard_normal((6, 5, 8))
    alpha = np.array([0.9, 0.5, 0.0, 1.3, 0.9, 0.2])
    want = merge_reference(h, alpha, 0.6, 2, mode)
    got = merge_tokens(jnp.asarray(h, jnp.float32), alpha, 0.6, groups=2, mode=mode)
    changed = np.any(want != h, axis=-1)
    assert 0 < changed.sum() < changed.size  # the threshold matters in this example
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="groups"):
        merge_tokens(jnp.asarray(h, jnp.float32), 0.9, 0.6, groups=4)


def test_dit_variant_alpha_0_is_the_network_and_scan_matches_unrolled():
    sig = jnp.full((B,), 1.3)
    scanned = DiT(**KW, scan_blocks=True)
    den_scan = model_denoiser(scanned, EDM(), stack_blocks(PARAMS, KW["depth"]))

    @jax.jit
    def go(x, alpha):
        m = TokenMerge(alpha, 0.2, 1, "others")
        return {
            "plain": DEN(x, sig, C),
            "zero": DEN(x, sig, C, variant="negtome", merge=TokenMerge(0.0, 0.2)),
            "merged": DEN(x, sig, C, variant="negtome", merge=m),
            "scan": den_scan(x, sig, C, variant="negtome", merge=m),
            "first": DEN(x, sig, C, variant="negtome", merge=TokenMerge(alpha, 0.2, 1, "first")),
        }

    out = go(X, jnp.float32(0.9))
    np.testing.assert_array_equal(out["zero"], out["plain"])
    assert np.abs(out["merged"] - out["plain"]).max() > 1e-3
    np.testing.assert_allclose(out["scan"], out["merged"], rtol=1e-5, atol=1e-5)
    # "first": the reference image keeps its tokens, so its output is the plain network's.
    np.testing.assert_allclose(out["first"][0], out["plain"][0], rtol=1e-6, atol=1e-6)
    assert np.abs(out["first"][1:] - out["plain"][1:]).max() > 1e-3
    with pytest.raises(ValueError, match="merge= is for"):
        DEN(X, sig, C, merge=TokenMerge())
    with pytest.raises(ValueError, match="token model"):
        from jaxdiff.models.layers import check_variant

        check_variant("negtome")


def test_guidance_alpha_0_and_empty_window_are_cfg_bit_for_bit_and_count_nfe():
    n, w = 5, jnp.array([1.0, 2.0, 3.0, 4.5])
    calls = []

    def den(x, sigma, cond, **kw):
        merge = kw.get("merge")
        calls.append((x.shape[0], kw.get("variant"), None if merge is None else merge.groups))
        return DEN(x, sigma, cond, **kw)

    @jax.jit
    def go(noise):
        def run(g):
            return sample(
                den, noise, karras_sigmas(n), guidance=g, solver=euler(), cond=C, uncond=U
            )

        return {
            "cfg": run(cfg(w)),
            "zero": run(negtome(0.0, w, stop=1.0)),
            "empty": run(negtome(0.9, w, 0.2, 0.5, 0.5)),
            "on": run(negtome(0.9, w, 0.2, 0.0, 0.4)),
        }

    out = go(X * 80.0)
    np.testing.assert_array_equal(out["zero"][0], out["cfg"][0])
    np.testing.assert_array_equal(out["empty"][0], out["cfg"][0])
    assert np.abs(out["on"][0] - out["cfg"][0]).max() > 1e-4
    assert negtome(stop=0.4).window(n) == (0, 2)
    for k in out:
        assert int(out[k][1]["nfe"]) == 2 * n, k
    # CFG's two branches share one call; the merge knows they are two groups.
    assert (2 * B, "negtome", 2) in calls and (2 * B, None, None) in calls


def test_one_compile_for_any_alpha_and_sharded_equals_one_device():
    sigmas = karras_sigmas(3)
    b = 8
    noise = per_sample_normal(jax.random.key(0), (b, 4, 4, 1))
    c, u = jnp.arange(b, dtype=jnp.int32) % 3, jnp.full((b,), 3, jnp.int32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(noise, c, u, alpha):
        g = NegToMe(base=cfg(2.0), alpha=alpha, tau=0.2, start=0.0, stop=0.7)
        return sample(DEN, noise, sigmas, solver=euler(), guidance=g, cond=c, uncond=u)[0]

    one = run(noise, c, u, jnp.float32(0.9))
    other = run(noise, c, u, jnp.float32(0.4))
    assert np.abs(one - other).max() > 1e-4
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    put = [jax.device_put(v, shard) for v in (noise, c, u)]
    chex.clear_trace_counter()
    sharded = run(*put, jnp.float32(0.9))
    chex.clear_trace_counter()
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(sharded, one, rtol=1e-5, atol=1e-5)


def test_spec_builds_negtome_around_cfg_and_refuses_bad_values():
    g = parse_guidance("negtome:0.5,scale=2,tau=0.7,stop=0.2,mode=first")
    assert isinstance(g, NegToMe) and g.base.scale == 2 and g.mode == "first"
    assert (g.alpha, g.tau, g.start, g.stop) == (0.5, 0.7, 0.0, 0.2)
    for bad in ("negtome:-1", "negtome:0.9,tau=2", "negtome:0.9,start=0.5,stop=0.1",
                "negtome:0.9,mode=all"):  # fmt: skip
        with pytest.raises(InvalidArgumentError, match="negtome"):
            parse_guidance(bad)
