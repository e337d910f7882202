"""Compositions: ``within_interval(g, lo, hi)`` and GFCG on top of autoguidance."""

import jax
import jax.numpy as jnp
import numpy as np
from mixture import clean_logits, ctx, denoiser, points

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.guidance import apg, autoguidance, cfgpp, gfcg, within_interval
from jaxdiff.samplers import euler, heun, sample

DEN, BAD = denoiser(), denoiser(s=0.9)


def test_within_interval_is_the_inner_guidance_inside_and_conditional_outside():
    x, c, u = points(6)
    inner = apg(jnp.linspace(1.5, 4.0, 6), eta=0.3, beta=-0.5, r=1.0)
    g = within_interval(inner, 0.5, 2.0)
    m0 = inner.init(x.shape, x.dtype)._replace(m=jnp.ones(x.shape))

    @jax.jit
    def go(x):
        state = (m0, jnp.zeros((), bool))
        res = {}
        # Inside: exactly the inner guidance, state updated.
        res["in"] = g(DEN, x, ctx(1.3, 6), c, u, state)
        res["inner"] = inner(DEN, x, ctx(1.3, 6), c, u, m0)
        # Outside: D_c, one evaluation, inner state untouched.
        res["out"] = g(DEN, x, ctx(3.0, 6), c, u, state)
        # A corrector evaluation follows its step's decision (per_step=True) ...
        res["corr"] = g(DEN, x, ctx(3.0, 6, substep=1), c, u, res["in"][1])
        res["inner_corr"] = inner(DEN, x, ctx(3.0, 6, substep=1), c, u, res["inner"][1])
        # ... unless every evaluation tests its own sigma.
        g_eval = within_interval(inner, 0.5, 2.0, per_step=False)
        res["corr_eval"] = g_eval(DEN, x, ctx(3.0, 6, substep=1), c, u, res["in"][1])
        # Harmonised outputs: CFG++ inside, D_c (renoise = D_c) outside.
        pp = within_interval(cfgpp(0.5), 0.5, 2.0)
        res["pp_out"] = pp(DEN, x, ctx(3.0, 6), c, u, pp.init(x.shape, x.dtype))[0]
        res["d_c3"] = DEN(x, jnp.full((6,), 3.0), c)
        return res

    r = go(x)
    (out_in, (st_in, on_in)), (ref, st_ref) = r["in"], r["inner"]
    np.testing.assert_array_equal(out_in.x0, ref.x0)
    np.testing.assert_array_equal(st_in.m, st_ref.m)
    assert bool(on_in) and int(out_in.nfe) == 2
    out_out, (st_out, on_out) = r["out"]
    np.testing.assert_allclose(out_out.x0, r["d_c3"], rtol=1e-6)
    np.testing.assert_array_equal(st_out.m, m0.m)
    assert not bool(on_out) and int(out_out.nfe) == 1
    np.testing.assert_array_equal(r["corr"][0].x0, r["inner_corr"][0].x0)
    np.testing.assert_allclose(r["corr_eval"][0].x0, r["d_c3"], rtol=1e-6)
    np.testing.assert_allclose(r["pp_out"].x0_renoise, r["d_c3"], rtol=1e-6)


def test_compositions_reduce_to_their_parts_in_sampling():
    x, c, u = points(8)
    w = jnp.linspace(1.0, 3.0, 8)
    inner = apg(w, eta=0.0, beta=-0.5, r=1.0)

    @jax.jit
    def go(noise):
        kw = dict(cond=c, uncond=u)
        heun_ = dict(solver=heun(), **kw)
        return {
            "apg": sample(DEN, noise, karras_sigmas(5), guidance=inner, **heun_),
            "apg_all": sample(
                DEN, noise, karras_sigmas(5), guidance=within_interval(inner, 0, 1e3), **heun_
            ),
            "apg_none": sample(
                DEN, noise, karras_sigmas(5), guidance=within_interval(inner, 1e3, 2e3), **heun_
            ),
            "cond": sample(DEN, noise, karras_sigmas(5), **heun_),
            "auto": sample(
                DEN,
                noise,
                karras_sigmas(4),
                solver=euler(),
                guidance=autoguidance(w, guide_denoise=BAD),
                **kw,
            ),  # fmt: skip
            "gfcg0_auto": sample(
                DEN,
                noise,
                karras_sigmas(4),
                solver=euler(),
                guidance=gfcg(
                    0.0, logits_fn=clean_logits, autoguide=autoguidance(w, guide_denoise=BAD)
                ),
                **kw,
            ),  # fmt: skip
        }

    r = go(x)
    np.testing.assert_allclose(r["apg_all"][0], r["apg"][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
        r["apg_all"][1]["guidance_state"][0].m, r["apg"][1]["guidance_state"].m
    )
    np.testing.assert_allclose(r["apg_none"][0], r["cond"][0], rtol=1e-6, atol=1e-6)
    assert int(r["apg_none"][1]["nfe"]) == int(r["cond"][1]["nfe"]) == 9
    np.testing.assert_array_equal(r["apg_none"][1]["guidance_state"][0].m, 0.0)
    np.testing.assert_allclose(r["gfcg0_auto"][0], r["auto"][0], rtol=1e-6, atol=1e-6)
    assert int(r["gfcg0_auto"][1]["nfe"]) == 3 * 4
