"""Real NFE savings: guidance interval, Adaptive Guidance and step windows, counted exactly."""

import gaussian
import jax
import jax.numpy as jnp
import numpy as np
from mixture import ctx, denoiser, points

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.guidance import ag, cfg, interval, interval_from_steps, pag, slg
from jaxdiff.samplers import euler, heun, sample

DEN = denoiser()


def test_interval_full_window_is_cfg_and_partial_window_costs_the_predicted_nfe():
    n = 10
    sigmas = karras_sigmas(n)
    s = np.asarray(sigmas, np.float32)
    lo, hi = interval_from_steps(sigmas, 3, 6)
    x, c, u = points(8)
    w = jnp.linspace(1.0, 4.0, 8)

    @jax.jit
    def go(noise):
        gs = {
            "cfg": cfg(w),
            "all": interval(w, 0.0, 1e3),
            "part": interval(w, lo, hi),
            "part_eval": interval(w, lo, hi, per_step=False),
            "empty": interval(w, 500.0, 600.0),
            "cond": None,
        }
        return {k: sample(DEN, noise, sigmas, solver=heun(), guidance=g, cond=c, uncond=u)
                for k, g in gs.items()}  # fmt: skip

    out = go(x)
    nfe = {k: int(v[1]["nfe"]) for k, v in out.items()}
    np.testing.assert_array_equal(np.nonzero((s[:-1] > lo) & (s[:-1] <= hi))[0], [3, 4, 5, 6])
    np.testing.assert_allclose(out["all"][0], out["cfg"][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["empty"][0], out["cond"][0], rtol=1e-6, atol=1e-6)
    assert nfe["all"] == nfe["cfg"] == 2 * (2 * n - 1) and nfe["empty"] == 2 * n - 1

    def on(sig):
        return int(lo < sig <= hi)

    evals = [1 + (s[i + 1] > 0) for i in range(n)]  # Heun: 2 per step, 1 on the last
    per_step = sum((1 + on(s[i])) * evals[i] for i in range(n))
    per_eval = sum(1 + on(s[i]) + (s[i + 1] > 0) * (1 + on(s[i + 1])) for i in range(n))
    assert nfe["part"] == per_step == 19 + 4 * 2  # steps 3..6 guided, with their correctors
    assert nfe["part_eval"] == per_eval < nfe["cfg"]
    assert not np.allclose(out["part"][0], out["cfg"][0])


def test_adaptive_guidance_is_cfg_above_1_and_saves_the_predicted_nfe():
    n, w = 12, 3.0
    sigmas = karras_sigmas(n)
    x, c, u = points(16, seed=2)

    @jax.jit
    def go(noise):
        kw = dict(solver=euler(), cond=c, uncond=u)
        return (
            sample(DEN, noise, sigmas, guidance=cfg(w), **kw),
            sample(DEN, noise, sigmas, guidance=ag(w, threshold=1.01), **kw),
            sample(DEN, noise, sigmas, guidance=ag(w), **kw),
        )

    @jax.jit
    def cfg_cosines(noise):  # the CFG trajectory, recomputing the batch-wide cosine
        xx, cos = noise * sigmas[0], []
        for i in range(n):
            out, _ = cfg(w)(DEN, xx, ctx(sigmas[i], 16), c, u, ())
            d_c, d_u = (
                DEN(xx, jnp.full((16,), sigmas[i]), c),
                DEN(xx, jnp.full((16,), sigmas[i]), u),
            )
            cos.append(jnp.sum(d_c * d_u) / jnp.sqrt(jnp.sum(d_c**2) * jnp.sum(d_u**2)))
            xx = xx + (sigmas[i + 1] - sigmas[i]) * (xx - out.x0) / sigmas[i]
        return jnp.stack(cos)

    (x_cfg, a_cfg), (x_hi, a_hi), (x_ag, a_ag) = go(x)
    np.testing.assert_array_equal(x_hi, x_cfg)
    assert int(a_hi["nfe"]) == int(a_cfg["nfe"]) == 2 * n and not bool(a_hi["guidance_state"].done)

    cos = np.asarray(cfg_cosines(x))
    k = int(np.argmax(cos >= 0.99))
    assert cos[k] >= 0.99 and 0 < k < n - 1, cos
    assert min(abs(cos[k] - 0.99), abs(cos[k - 1] - 0.99)) > 1e-5, "decision too close to call"
    state = a_ag["guidance_state"]
    assert bool(state.done) and int(state.n_guided) == k + 1
    np.testing.assert_allclose(state.cos, cos[k], rtol=1e-5)
    assert int(a_ag["nfe"]) == 2 * (k + 1) + (n - k - 1) < int(a_cfg["nfe"])


def test_perturbed_guidance_step_window_skips_the_perturbed_pass():
    n = 10
    x, c, u = points(8)

    @jax.jit
    def go(noise):
        kw = dict(solver=euler(), cond=c, uncond=u)
        return {
            "slg": sample(DEN, noise, karras_sigmas(n), guidance=slg(2.8, 2.0, 0.2, 0.6), **kw),
            "empty": sample(DEN, noise, karras_sigmas(n), guidance=slg(2.8, 2.0, 0.5, 0.5), **kw),
            "cfg": sample(DEN, noise, karras_sigmas(n), guidance=cfg(2.0), **kw),
            "pag": sample(DEN, noise, karras_sigmas(n), guidance=pag(3.0), **kw),
        }

    out = go(x)
    assert slg(2.8, 2.0, 0.2, 0.6).window(n) == (2, 6)
    assert int(out["slg"][1]["nfe"]) == 4 * 3 + 6 * 2
    assert int(out["empty"][1]["nfe"]) == 2 * n and int(out["pag"][1]["nfe"]) == 2 * n
    np.testing.assert_allclose(out["empty"][0], out["cfg"][0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out["slg"][0], out["cfg"][0])


def test_adaptive_guidance_threshold_1_never_switches_even_at_cosine_1():
    # A denoiser that ignores cond: D_c == D_u, so the cosine is 1 up to rounding (it can
    # come out as 1.0 or just above). threshold = 1 must stay CFG; 0.99 switches at once.
    n = 6
    x, c, u = points(8)
    blind = gaussian.denoiser()

    @jax.jit
    def go(noise):
        kw = dict(solver=euler(), cond=c, uncond=u)
        return [sample(blind, noise, karras_sigmas(n), guidance=ag(2.0, threshold=t), **kw)
                for t in (1.0, 0.99)]  # fmt: skip

    (x1, a1), (x99, a99) = go(x)
    s1, s99 = a1["guidance_state"], a99["guidance_state"]
    assert abs(float(s1.cos) - 1.0) < 1e-6 and abs(float(s99.cos) - 1.0) < 1e-6
    assert not bool(s1.done) and int(s1.n_guided) == n and int(a1["nfe"]) == 2 * n
    assert bool(s99.done) and int(s99.n_guided) == 1 and int(a99["nfe"]) == 2 + (n - 1)
    np.testing.assert_allclose(x99, x1, rtol=1e-6, atol=1e-6)  # D_c == D_u: same samples
