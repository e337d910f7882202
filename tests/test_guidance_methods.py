"""Per-call invariants of every guidance method on the exact 2-D Gaussian mixture."""

import gaussian
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mixture import MEANS, NULL, S, clean_logits, ctx, denoiser, log_prob, points

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.guidance import (
    SPACES,
    APGState,
    Autoguidance,
    ag,
    apg,
    autoguidance,
    calibrated_log_likelihood,
    cfg,
    cfg_zero_star,
    cfgpp,
    classifier_guidance,
    elucd,
    from_space,
    gfcg,
    interval,
    minority,
    pag,
    rescale,
    to_space,
)
from jaxdiff.samplers import ddim, euler, euler_update, heun, sample

DEN = denoiser()
BAD = denoiser(s=0.9)


def run(g, x, c, u, sigma=1.3, state=None, **kw):
    """Calls a guidance once (jitted by the caller or eagerly)."""
    state = g.init(x.shape, x.dtype) if state is None else state
    return g(DEN, x, ctx(sigma, x.shape[0], **kw), c, u, state)


def sig(sigma, x):
    return jnp.full(x.shape[:1], sigma, jnp.float32)


def test_spaces_round_trip():
    x, _, _ = points(6)
    x0 = x * 0.3 + 1.0
    sigma = jnp.array([0.01, 0.5, 1.0, 3.0, 20.0, 80.0])
    trip = jax.jit(
        lambda x0, x: [from_space(s, to_space(s, x0, x, sigma), x, sigma) for s in SPACES]
    )
    for space, back in zip(SPACES, trip(x0, x * 10), strict=True):
        np.testing.assert_allclose(back, x0, rtol=1e-4, atol=1e-4, err_msg=space)


def test_scale_one_gives_the_conditional_denoiser():
    x, c, u = points(12)

    @jax.jit
    def outs(x):
        d_c, d_u = DEN(x, sig(1.3, x), c), DEN(x, sig(1.3, x), u)
        gs = {
            "cfg": cfg(1.0),
            "interval_in": interval(1.0, 0.5, 2.0),
            "interval_out": interval(5.0, 2.0, 3.0),
            "ag": ag(1.0),
            "apg": apg(1.0, eta=0.3, beta=-0.5, r=0.1),
            "cfg_zero_star": cfg_zero_star(1.0, zero_init_steps=0),
            "pag_s0": pag(0.0, scale=1.0),
            "autoguidance": autoguidance(1.0, guide_denoise=BAD),
            "gfcg_w0": gfcg(0.0, logits_fn=clean_logits),
            "classifier_s0": classifier_guidance(0.0, log_prob_fn=log_prob, base="cond"),
        }
        for space in SPACES:
            gs[f"rescale_{space}"] = rescale(1.0, phi=0.7, space=space)
            gs[f"apg_{space}"] = apg(1.0, space=space)
            gs[f"zero_star_{space}"] = cfg_zero_star(1.0, zero_init_steps=0, space=space)
        res = {k: run(g, x, c, u)[0].x0 for k, g in gs.items()}
        pp = run(cfgpp(1.0), x, c, u)[0]
        res["cfgpp"], renoise = pp.x0, pp.x0_renoise
        return res, d_c, d_u, renoise

    res, d_c, d_u, renoise = outs(x)
    for name, x0 in res.items():
        np.testing.assert_allclose(x0, d_c, rtol=2e-5, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(renoise, d_u, rtol=1e-6, atol=1e-6)


def test_apg_eta1_beta0_without_threshold_is_cfg():
    b = 8
    x, c, u = points(b)
    w = jnp.linspace(0.5, 6.0, b)

    @jax.jit
    def go(noise):
        out = {}
        for name, g in {
            "cfg": cfg(w),
            "none": apg(w, eta=1.0, beta=0.0, r=None),
            "inf": apg(w, eta=1.0, beta=0.0, r=jnp.inf),
            "zero": apg(w, eta=1.0, beta=0.0, r=0.0),  # r = 0: no clip, as in the reference
        }.items():
            out[name] = sample(
                DEN, noise, karras_sigmas(5), solver=euler(), guidance=g, cond=c, uncond=u
            )[0]
        return out

    out = go(x)
    np.testing.assert_allclose(out["none"], out["cfg"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["inf"], out["cfg"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["zero"], out["cfg"], rtol=1e-5, atol=1e-5)


def test_apg_r0_is_no_clip_per_sample_and_equals_cfg_to_float32_rounding():
    b = 8
    x, c, u = points(b, seed=4)
    w = jnp.linspace(1.5, 5.0, b)
    r = jnp.where(jnp.arange(b) % 2 == 0, 0.0, 0.2)  # per sample: no clip, or a tight clip
    g_u, g_c = gaussian.denoiser(), gaussian.denoiser(mu=1.0)

    def two_gaussians(x, sigma, cond):  # exact denoisers of N(0.3, 0.8^2) and N(1, 0.8^2)
        return jnp.where((cond == NULL)[:, None], g_u(x, sigma), g_c(x, sigma))

    @jax.jit
    def go(x):
        res = {}
        for name, den in (("mixture", DEN), ("gaussian", two_gaussians)):

            def call(g, den=den):
                return g(den, x, ctx(1.3, b), c, u, g.init(x.shape, x.dtype))[0].x0

            res[name] = (
                call(apg(w, eta=1.0, beta=0.0, r=0.0)),
                call(cfg(w)),
                call(apg(w, eta=1.0, beta=0.0, r=r)),
                call(apg(w, eta=1.0, beta=0.0, r=0.2)),
            )
        return res

    for name, (zero, want, mixed, clipped) in go(x).items():
        # CFG's D_u + w Delta against APG's D_c + (w - 1) Delta: equal up to float32 rounding.
        np.testing.assert_allclose(zero, want, rtol=1e-6, atol=2e-6, err_msg=name)
        np.testing.assert_array_equal(mixed[0::2], zero[0::2])
        np.testing.assert_array_equal(mixed[1::2], clipped[1::2])
        assert np.abs(np.asarray(clipped - want)[1::2]).max() > 1e-2, name  # r = 0.2 clips


def _apg_ref(d_c, d_u, m_hist, w, eta, beta, r):
    """The paper's Algorithm 1 in float64 numpy."""
    d_c, d_u = np.asarray(d_c, np.float64), np.asarray(d_u, np.float64)
    m = d_c - d_u + beta[:, None] * m_hist
    norm = np.linalg.norm(m, axis=1, keepdims=True)
    delta = m * np.minimum(1.0, r[:, None] / norm)
    par = np.sum(delta * d_c, 1, keepdims=True) / np.sum(d_c**2, 1, keepdims=True) * d_c
    perp = delta - par
    return d_c + (w[:, None] - 1) * (perp + eta[:, None] * par), m


def test_apg_matches_algorithm_1_with_per_step_momentum():
    b = 6
    x, c, u = points(b, seed=3)
    w, eta = np.linspace(1.5, 4.0, b), np.linspace(0.0, 1.0, b)
    beta, r = np.linspace(-0.7, 0.5, b), np.linspace(0.3, 3.0, b)
    g = apg(w, eta=eta, beta=beta, r=r)
    xs = [x, x * 0.7 + 0.2, x * 0.9 - 0.1, x * 0.5]
    calls = [(2.0, 0, 0), (1.0, 0, 1), (1.0, 1, 0), (0.4, 1, 1)]  # (sigma, step, substep)

    @jax.jit
    def go():
        state, outs, refs = g.init(x.shape, x.dtype), [], []
        for xi, (s, i, sub) in zip(xs, calls, strict=True):
            out, state = run(g, xi, c, u, sigma=s, state=state, i=i, substep=sub, num_steps=2)
            outs.append((out.x0, state))
            refs.append((DEN(xi, sig(s, xi), c), DEN(xi, sig(s, xi), u)))
        return outs, refs

    outs, refs = go()
    zero = np.zeros(x.shape)
    m1 = None
    for k, ((x0, state), (d_c, d_u)) in enumerate(zip(outs, refs, strict=True)):
        hist = zero if k < 2 else m1  # both evaluations of step 0 see m = 0, of step 1 m1
        want, m = _apg_ref(d_c, d_u, hist, w, eta, beta, r)
        np.testing.assert_allclose(x0, want, rtol=1e-4, atol=1e-5, err_msg=f"call {k}")
        if k == 0:
            m1 = m
        expected_m = m1 if k < 2 else _apg_ref(*refs[2], m1, w, eta, beta, r)[1]
        assert isinstance(state, APGState)
        np.testing.assert_allclose(state.m, expected_m, rtol=1e-5, atol=1e-5)


def test_rescale_phi0_is_cfg_and_phi1_matches_the_conditional_std():
    x, c, u = points(8)
    w = jnp.linspace(1.0, 5.0, 8)

    @jax.jit
    def go(x):
        d_c, d_u = DEN(x, sig(2.0, x), c), DEN(x, sig(2.0, x), u)
        r0 = run(rescale(w, phi=0.0, space="eps"), x, c, u, sigma=2.0)[0].x0
        r1 = run(rescale(w, phi=1.0, space="eps"), x, c, u, sigma=2.0)[0].x0
        y1, y_c = to_space("eps", r1, x, 2.0), to_space("eps", d_c, x, 2.0)
        return r0, d_u + w[:, None] * (d_c - d_u), jnp.std(y1, axis=1), jnp.std(y_c, axis=1)

    r0, want, std1, std_c = go(x)
    np.testing.assert_allclose(r0, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std1, std_c, rtol=1e-4, atol=1e-6)


def test_cfgpp_euler_step_is_cfg_with_step_dependent_scale():
    x, c, u = points(6)
    lam, s, s_next = jnp.linspace(0.0, 1.0, 6), 1.7, 0.9
    x = x * s

    @jax.jit
    def go(x):
        out_pp = run(cfgpp(lam), x, c, u, sigma=s)[0]
        out_cfg = run(cfg(lam * s / (s - s_next)), x, c, u, sigma=s)[0]
        return euler_update(out_pp, x, s, s_next), euler_update(out_cfg, x, s, s_next)

    a, b = go(x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cfgpp_is_honoured_by_euler_and_ddim_alike():
    x, c, u = points(8)

    @jax.jit
    def go(noise):
        kw = dict(guidance=cfgpp(0.7), cond=c, uncond=u)
        a = sample(DEN, noise, karras_sigmas(6), solver=euler(), **kw)[0]
        b = sample(DEN, noise, karras_sigmas(6), solver=ddim(), **kw)[0]
        plain = sample(DEN, noise, karras_sigmas(6), solver=euler(), guidance=cfg(0.7), cond=c,
                       uncond=u)[0]  # fmt: skip
        return a, b, plain

    a, b, plain = go(x)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(a) - np.asarray(plain)).max() > 1e-2  # the renoise matters


def test_cfg_zero_star_scale_and_zero_init():
    x, c, u = points(8)
    w = jnp.linspace(1.0, 4.0, 8)
    sigmas = karras_sigmas(3)
    s0, s1 = float(sigmas[0]), float(sigmas[1])

    @jax.jit
    def go(noise):
        out = run(cfg_zero_star(w, zero_init_steps=0), noise, c, u)[0]
        plain = run(cfg_zero_star(w, zero_init_steps=0, use_zero_star=False), noise, c, u)[0]
        ref = run(cfg(w), noise, c, u)[0]
        d_c, d_u = DEN(noise, sig(1.3, noise), c), DEN(noise, sig(1.3, noise), u)
        kw = dict(solver=euler(), cond=c, uncond=u)
        all_zero = sample(DEN, noise, sigmas, guidance=cfg_zero_star(w, 3), **kw)
        all_zero_eps = sample(DEN, noise, sigmas, guidance=cfg_zero_star(w, 3, space="eps"), **kw)
        one = sample(DEN, noise, sigmas, guidance=cfg_zero_star(w, 1), **kw)
        shifted = noise * s0 * (1 + s1) / ((1 + s0) * s1)  # the flow state after step 0
        rest = sample(DEN, shifted, sigmas[1:], guidance=cfg_zero_star(w, 0), **kw)
        return out, plain, ref, d_c, d_u, all_zero, all_zero_eps, one, rest

    out, plain, ref, d_c, d_u, all_zero, all_zero_eps, one, rest = go(x)
    v_c, v_u = to_space("flow", d_c, x, 1.3), to_space("flow", d_u, x, 1.3)
    s_star = np.sum(v_c * v_u, 1) / np.sum(v_u * v_u, 1)
    np.testing.assert_allclose(out.aux["s_star"], s_star, rtol=1e-4)
    want = from_space("flow", s_star[:, None] * v_u + w[:, None] * (v_c - s_star[:, None] * v_u),
                      x, 1.3)  # fmt: skip
    np.testing.assert_allclose(out.x0, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(plain.x0, ref.x0, rtol=1e-4, atol=1e-4)
    # Zero velocity keeps the rectified-flow state x / (1 + sigma) fixed; zero eps keeps x.
    np.testing.assert_allclose(all_zero[0], x * s0 / (1 + s0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(all_zero_eps[0], x * s0, rtol=1e-5)
    assert int(all_zero[1]["nfe"]) == 0 and int(one[1]["nfe"]) == 4
    np.testing.assert_allclose(one[0], rest[0], rtol=1e-4, atol=1e-4)


def test_exact_classifier_on_the_unconditional_model_is_the_conditional_model():
    x, c, u = points(9, scale=3.0)
    sigmas = jnp.array([0.05, 0.3, 1.0, 4.0, 20.0, 80.0])

    @jax.jit
    def go(x):
        outs = []
        for s in sigmas:
            xs = x * jnp.sqrt(1 + s**2)
            g = run(classifier_guidance(1.0, log_prob_fn=log_prob), xs, c, u, sigma=s)[0]
            m = run(minority(1.0, log_prob_fn=log_prob, target=2), xs, c, u, sigma=s)[0]
            outs.append(
                (g.x0, DEN(xs, sig(s, x), c), m.x0, DEN(xs, sig(s, x), jnp.full_like(c, 2)))
            )
        return outs

    for (g, d_c, m, d_2), s in zip(go(x), sigmas, strict=True):
        np.testing.assert_allclose(g, d_c, rtol=1e-4, atol=1e-4 * (1 + float(s)), err_msg=str(s))
        np.testing.assert_allclose(m, d_2, rtol=1e-4, atol=1e-4 * (1 + float(s)), err_msg=str(s))


def test_classifier_guidance_samples_the_conditional_distribution():
    n = 4096
    labels = jnp.arange(n, dtype=jnp.int32) % 3
    noise = jax.random.normal(jax.random.key(7), (n, 2))

    @jax.jit
    def go(noise):
        sigmas = karras_sigmas(64, sigma_max=400.0)
        kw = dict(solver=heun(), cond=labels, uncond=jnp.full((n,), NULL))
        guided = sample(
            DEN, noise, sigmas, guidance=classifier_guidance(1.0, log_prob_fn=log_prob), **kw
        )
        return guided[0], sample(DEN, noise, sigmas, **kw)[0]

    x, x_cond = go(noise)
    x, x_cond, labels = np.asarray(x), np.asarray(x_cond), np.asarray(labels)
    np.testing.assert_allclose(x, x_cond, atol=2e-3)  # same noise, same trajectory
    for k in range(3):
        xk = x[labels == k]
        se = S / np.sqrt(len(xk))
        np.testing.assert_allclose(xk.mean(0), MEANS[k], atol=5 * se, err_msg=f"class {k}")
        np.testing.assert_allclose(xk.var(0), S**2, atol=5 * S**2 * np.sqrt(2 / len(xk)))


def test_elucd_matches_the_calibrated_gradient_on_x0():
    x, c, u = points(6)
    s, tau1, disc, boost, i, n = 2.0, 1.3, 0.5, 0.3, 2, 5

    @jax.jit
    def go(x):
        g = elucd(0.7, logits_fn=clean_logits, temperature=tau1, discount=disc, boost=boost)
        out = run(g, x, c, u, sigma=s, i=i, num_steps=n)[0]
        return out.x0, DEN(x, sig(s, x), c)

    x0, d = go(x)
    d = np.asarray(d, np.float64)
    f = -0.5 * np.sum((d[:, None] - MEANS[None]) ** 2, -1) / S**2  # clean logits
    grad_f = -(d[:, None] - MEANS[None]) / S**2  # [B, K, 2]
    p2 = np.exp(tau1 * disc * f - np.max(tau1 * disc * f, 1, keepdims=True))
    p2 /= p2.sum(1, keepdims=True)
    cc = np.asarray(c)
    g = tau1 * grad_f[np.arange(6), cc] - np.sum(p2[:, :, None] * tau1 * disc * grad_f, 1)
    weight = 0.7 * s**2 / np.sqrt(1 + s**2) * (1 + boost * np.sin(np.pi * i / (n - 1)))
    np.testing.assert_allclose(x0, d + weight * g, rtol=1e-4, atol=1e-4)
    logits = jnp.asarray(f, jnp.float32)
    ll = calibrated_log_likelihood(logits, c, 1.0, 1.0)  # discount 1: log-softmax
    np.testing.assert_allclose(ll, jax.nn.log_softmax(logits)[np.arange(6), cc], rtol=1e-5)


def test_gfcg_reference_class_rule_and_autoguidance_base():
    x, c, u = points(9, seed=5, scale=2.0)
    w = jnp.linspace(0.5, 3.0, 9)
    ag_ = autoguidance(1.8, guide_denoise=BAD)

    @jax.jit
    def go(x):
        plain = run(gfcg(w, logits_fn=clean_logits), x, c, u)[0]
        combo = run(gfcg(w, logits_fn=clean_logits, autoguide=ag_), x, c, u)[0]
        d_c = DEN(x, sig(1.3, x), c)
        return plain, combo, d_c, run(ag_, x, c, u)[0].x0

    plain, combo, d_c, auto = go(x)
    logits = np.asarray(clean_logits(d_c), np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    cc = np.asarray(c)
    others = np.where(np.eye(3, dtype=bool)[cc], -1, p)
    ref = others.argmax(1)
    w_t = np.asarray(w) * np.minimum(1.0, others.max(1) / p[np.arange(9), cc])
    d_ref = np.asarray(DEN(x, sig(1.3, x), jnp.asarray(ref)))
    np.testing.assert_array_equal(plain.aux["ref_class"], ref)
    assert not np.any(ref == cc)
    np.testing.assert_allclose(plain.aux["w_t"], w_t, rtol=1e-5)
    np.testing.assert_allclose(plain.x0, d_c + w_t[:, None] * (d_c - d_ref), rtol=1e-5, atol=1e-5)
    # Composition: the autoguided base plus the same GFCG term; one more evaluation.
    np.testing.assert_allclose(combo.x0, auto + w_t[:, None] * (d_c - d_ref), rtol=1e-5, atol=1e-5)
    assert (plain.nfe, combo.nfe) == (2, 3)


def test_autoguidance_with_the_unconditional_model_as_guide_is_cfg():
    x, c, u = points(8)
    w = jnp.linspace(1.0, 3.0, 8)
    as_uncond = lambda x, s, cond: DEN(x, s, jnp.full_like(cond, NULL))  # noqa: E731

    @jax.jit
    def go(x):
        auto = run(autoguidance(w, guide_denoise=as_uncond), x, c, u)[0].x0
        return auto, run(cfg(w), x, c, u)[0].x0

    a, b = go(x)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="guide_denoise"):
        Autoguidance(2.0).combine(x, 1.0, c, x)
