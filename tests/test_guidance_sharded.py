"""Every method: one compile for a sweep of per-sample scales, and sharded == unsharded."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from mixture import NULL, clean_logits, denoiser, log_prob

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.guidance import (
    ag,
    apg,
    autoguidance,
    cfg,
    cfg_zero_star,
    cfgpp,
    classifier_guidance,
    elucd,
    gfcg,
    interval,
    minority,
    pag,
    rescale,
    slg,
    within_interval,
)
from jaxdiff.samplers import euler, per_sample_normal, sample

DEN, BAD = denoiser(), denoiser(s=0.9)


def methods(w):
    """Every method with scale(s) ``w`` (a ``[B]`` array): name -> guidance."""
    return {
        "cfg": cfg(w),
        "interval": interval(w, 0.3, 3.0),
        "rescale": rescale(w, phi=0.7, space="x0"),
        "apg": apg(w, eta=0.2, beta=-0.5, r=1.0),
        "ag": ag(w),
        "autoguidance": autoguidance(w, guide_denoise=BAD),
        "classifier": classifier_guidance(w, log_prob_fn=log_prob),
        "elucd": elucd(0.02 * w, logits_fn=clean_logits),
        "gfcg": gfcg(w - 1.0, logits_fn=clean_logits, autoguide=autoguidance(w, guide_denoise=BAD)),
        "minority": minority(w, log_prob_fn=log_prob, target=1),
        "cfgpp": cfgpp(w / 4.0),
        "cfg_zero_star": cfg_zero_star(w),
        "pag": pag(w, scale=w),
        "slg": slg(w, scale=w, start=0.25, stop=0.75),
        "interval_apg": within_interval(apg(w), 0.3, 3.0),
    }


def run_all(noise, c, u, w, keys):
    # Per-sample "unsafe_rbg" keys: XLA:CPU compiles threefry (the default) slowly, and
    # sample() derives step keys even for deterministic solvers.
    sigmas = karras_sigmas(3)
    return {
        k: sample(DEN, noise, sigmas, solver=euler(), guidance=g, cond=c, uncond=u, key=keys)[0]
        for k, g in methods(w).items()
    }


def test_scale_sweep_compiles_once_and_sharded_equals_unsharded():
    b = 8  # a sweep over 8 scales, one sample per device
    args = {
        "noise": per_sample_normal(jax.random.key(0), (b, 2)),
        "c": jnp.arange(b) % 3,
        "u": jnp.full((b,), NULL),
        "w": jnp.linspace(1.0, 4.5, b),
        "keys": jax.random.split(jax.random.key(0, impl="unsafe_rbg"), b),
    }

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(noise, c, u, w, keys):
        return run_all(noise, c, u, w, keys)

    sweep = run(**args)
    for j in (0, 5):
        single = run(**{**args, "w": jnp.full((b,), args["w"][j])})
        for k in sweep:
            if k == "ag":  # a batch-wide decision: other samples' scales change it
                continue
            np.testing.assert_allclose(sweep[k][j], single[k][j], rtol=1e-5, atol=1e-5, err_msg=k)

    # The same function on a batch sharded over 8 devices ('data' axis, Auto mesh).
    chex.clear_trace_counter()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    out = run(**{k: jax.device_put(v, shard) for k, v in args.items()})
    chex.clear_trace_counter()
    for k, x in out.items():
        assert len(x.sharding.device_set) == 8, k
        np.testing.assert_allclose(x, sweep[k], rtol=1e-4, atol=1e-4, err_msg=k)
