"""c-VSG: the Vendi score against numpy's eigenvalues, its gradient, the guidance protocol."""

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from mixture import NULL, denoiser, points

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance import (
    StepCtx,
    VendiGuidance,
    bank_add,
    bank_from_features,
    cfg,
    parse_guidance,
    vendi,
    vendi_score,
)
from jaxdiff.samplers import euler, heun, per_sample_normal, sample

DEN = denoiser()
W = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)


def features(x0):
    """A small fixed feature network of 2-D points: ``[B, 4]``."""
    return jnp.tanh(x0 @ jnp.asarray(W, x0.dtype))


def numpy_vendi(f):
    """``exp(-sum l log l)`` of the eigenvalues of the ``n x n`` cosine kernel over n."""
    f = np.asarray(f, np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    lam = np.linalg.eigvalsh(f @ f.T / f.shape[0])
    lam = lam[lam > 1e-12]
    return float(np.exp(-np.sum(lam * np.log(lam))))


def banks():
    rng = np.random.default_rng(1)
    bank_x, ex_x = rng.standard_normal((9, 2)) * 2, rng.standard_normal((6, 2)) * 2
    bank = bank_from_features(features(jnp.asarray(bank_x, jnp.float32)), np.arange(9) % 3, 3)
    ex = bank_from_features(features(jnp.asarray(ex_x, jnp.float32)), np.arange(6) % 3, 3)
    return bank, ex


def test_vendi_score_matches_numpy_eigenvalues_and_the_bank_form():
    rng = np.random.default_rng(0)
    for shape in ((5, 8), (12, 4)):  # the n x n form and the F x F form
        f = rng.standard_normal(shape)
        np.testing.assert_allclose(vendi_score(jnp.asarray(f)), numpy_vendi(f), rtol=1e-5)
    np.testing.assert_allclose(vendi_score(jnp.ones((6, 3))), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vendi_score(jnp.eye(5, 8)), 5.0, rtol=1e-5)
    repeats = np.eye(8)[[0, 1, 1, 2, 2, 2]]
    np.testing.assert_allclose(vendi_score(jnp.asarray(repeats)), numpy_vendi(repeats), rtol=1e-5)
    # A bank is its features' Gram matrix: adding to it scores the union.
    a, b = rng.standard_normal((4, 6)), rng.standard_normal((3, 6))
    bank = bank_add(bank_from_features(jnp.asarray(a)), jnp.asarray(b))
    lam = np.linalg.eigvalsh(np.asarray(bank.gram[0], np.float64) / 7)
    lam = lam[lam > 1e-9]
    got = np.exp(-np.sum(lam * np.log(lam)))
    np.testing.assert_allclose(got, numpy_vendi(np.concatenate([a, b])), rtol=1e-5)
    assert float(bank.count[0]) == 7


def test_gradient_matches_finite_differences_even_when_rank_deficient():
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        bank, ex = banks()  # float32 banks; the objective runs in float64
        g = VendiGuidance(base=cfg(1.0), bank=bank, exemplars=ex, features_fn=features)
        y = jnp.asarray([0, 1, 2, 0])
        cases = {
            "n x n": lambda x: vendi_score(features(x)),
            "F x F": lambda x: vendi_score(features(jnp.concatenate([x, x + 1.0]))),
            "objective": lambda x: g.objective(x, y)[0],  # 3 + 1 points in 4-D: rank 4 at most
            "one": lambda x: vendi_score(features(x[:1]) + jnp.zeros((3, 4))),  # rank 1 of 3
        }
        for name, fn in cases.items():
            x = jnp.asarray(rng.standard_normal((4, 2)))
            grad = np.asarray(jax.grad(fn)(x))
            assert np.all(np.isfinite(grad)), name
            num = np.zeros_like(grad)
            for idx in np.ndindex(*grad.shape):
                e = np.zeros(grad.shape)
                e[idx] = 1e-6
                num[idx] = (fn(x + e) - fn(x - e)) / 2e-6
            np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-7, err_msg=name)


def test_scale_0_is_the_base_bit_for_bit_and_nfe_is_the_base():
    n, (x, c, u) = 4, points(6)
    bank, ex = banks()
    w = jnp.array([1.0, 2.0, 3.0, 1.5, 2.5, 4.0])

    def run(guidance, solver):
        return sample(DEN, x * 5.0, karras_sigmas(n), solver=solver, guidance=guidance, cond=c,
                      uncond=u)  # fmt: skip

    @jax.jit
    def go():
        kw = dict(features_fn=features, cfg_scale=w, bank=bank, exemplars=ex)
        return {
            "cfg": run(cfg(w), heun()),
            "zero": run(vendi(0.0, **kw), heun()),
            "zero_every": run(vendi(0.0, every=2, **kw), heun()),
            "on": run(vendi(0.2, **kw), heun()),
            "cfg_euler": run(cfg(w), euler()),
            "zero_state": run(vendi(0.0, form="state", **kw), euler()),
        }

    out = go()
    for k in ("zero", "zero_every"):
        np.testing.assert_array_equal(out[k][0], out["cfg"][0], err_msg=k)
        assert int(out[k][1]["nfe"]) == int(out["cfg"][1]["nfe"]), k
    # The state form hands Euler an x0_renoise, whose update rounds differently.
    np.testing.assert_allclose(out["zero_state"][0], out["cfg_euler"][0], rtol=1e-5, atol=1e-5)
    assert np.abs(out["on"][0] - out["cfg"][0]).max() > 1e-3


def test_one_step_raises_the_objective_and_state_form_moves_the_state():
    x, c, u = points(6)
    bank, ex = banks()
    ctx = StepCtx(jnp.int32(0), jnp.float32(0.8), jnp.float32(0.5), None, 1)
    base = cfg(2.0)
    d = base(DEN, x, ctx, c, u, ())[0].x0
    y = c
    for grad in ("x0", "denoiser"):
        g = vendi(0.02, features_fn=features, cfg_scale=2.0, bank=bank, exemplars=ex, grad=grad)
        out = g(DEN, x, ctx, c, u, ())[0]
        step = out.x0 - d
        # Each sample's step has length s ||D_b||.
        np.testing.assert_allclose(
            np.linalg.norm(step, axis=1), 0.02 * np.linalg.norm(d, axis=1), rtol=1e-4
        )
        if grad == "x0":
            assert float(g.objective(out.x0, y)[0]) > float(g.objective(d, y)[0])
        else:  # the gradient through the network: J_D(x)^T grad_x0 J
            gx0 = jax.grad(lambda z: g.objective(z, y)[0])(d)
            want = jax.vjp(lambda xx: base(DEN, xx, ctx, c, u, ())[0].x0, x)[1](gx0)[0]
            want = want / np.linalg.norm(want, axis=1, keepdims=True)
            np.testing.assert_allclose(step / np.linalg.norm(step, axis=1, keepdims=True), want,
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
    g = vendi(0.02, features_fn=features, cfg_scale=2.0, bank=bank, form="state")
    out = g(DEN, x, ctx, c, u, ())[0]
    np.testing.assert_array_equal(out.x0_renoise, d)
    np.testing.assert_allclose(
        np.linalg.norm(out.x0 - d, axis=1), 0.02 * np.linalg.norm(x, axis=1), rtol=1e-4
    )
    # An empty context is not guided (the reference's first image).
    empty = bank_from_features(jnp.ones((1, 4)), jnp.array([0]), 3)
    out = vendi(0.5, features_fn=features, cfg_scale=2.0, bank=empty)(DEN, x, ctx, c, u, ())[0]
    np.testing.assert_array_equal(out.x0[np.asarray(c) != 0], d[np.asarray(c) != 0])


def test_one_compile_for_a_scale_sweep_and_sharded_equals_one_device():
    b = 8
    args = {
        "noise": per_sample_normal(jax.random.key(0), (b, 2)),
        "c": jnp.arange(b) % 3,
        "u": jnp.full((b,), NULL),
        "s": jnp.linspace(0.0, 0.1, b),
    }
    bank, ex = banks()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(noise, c, u, s, bank):
        out = {}
        for batch in (False, True):  # the batch term couples samples: test it sharded too
            g = vendi(s, features_fn=features, cfg_scale=2.0, bank=bank, exemplars=ex,
                      include_batch=batch)  # fmt: skip
            out[batch] = sample(DEN, noise, karras_sigmas(3), solver=heun(), guidance=g, cond=c,
                                uncond=u)[0]  # fmt: skip
        return out

    one = run(**args, bank=bank)
    again = run(**args, bank=bank_add(bank, jnp.ones((2, 4)), jnp.array([0, 1])))  # next batch
    assert np.abs(again[False] - one[False]).max() > 1e-6
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    chex.clear_trace_counter()
    sharded = run(**{k: jax.device_put(v, shard) for k, v in args.items()}, bank=bank)
    chex.clear_trace_counter()
    for k in one:
        assert len(sharded[k].sharding.device_set) == 8
        np.testing.assert_allclose(sharded[k], one[k], rtol=1e-4, atol=1e-4)


def test_spec_needs_a_feature_network_and_checks_values():
    g = parse_guidance("cvsg:0.05,cfg_scale=2,every=5,beta=1", features_fn=features)
    assert isinstance(g, VendiGuidance) and g.every == 5 and g.include_batch
    assert g.base.scale == 2 and g.beta == 1
    with pytest.raises(InvalidArgumentError, match="features_fn"):
        parse_guidance("vendi:0.05")
    for bad in ("vendi:0.05,beta=-1", "vendi:0.05,every=0", "vendi:0.05,form=latent"):
        with pytest.raises(InvalidArgumentError, match="vendi"):
            parse_guidance(bad, features_fn=features)


def _count_eigh(jaxpr) -> int:
    """Number of ``eigh`` equations in a closed jaxpr, sub-jaxprs included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "eigh"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count_eigh(sub)
    return n


def test_a_guided_call_makes_one_eigendecomposition():
    # Two LAPACK eigh calls that XLA:CPU runs concurrently can deadlock (jaxlib 0.10, seen
    # at batch 20 with a bank and exemplars): every score goes through one call.
    x, c, u = points(6)
    bank, ex = banks()
    ctx = StepCtx(jnp.int32(0), jnp.float32(0.8), jnp.float32(0.5), None, 1)
    for grad in ("x0", "denoiser"):
        g = vendi(0.02, features_fn=features, cfg_scale=2.0, bank=bank, exemplars=ex, grad=grad)
        jaxpr = jax.make_jaxpr(lambda xx, g=g: g(DEN, xx, ctx, c, u, ())[0].x0)(x)
        assert _count_eigh(jaxpr.jaxpr) == 1, grad
