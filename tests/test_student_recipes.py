"""Each few-step method's stored sampling recipe reproduces how the method samples.

The driver stores a student's recipe in ``config.sample``; these check, on exact
Gaussian denoisers, that what the standard sampler then runs equals the method's own
sampling function: CD's re-noising with ``sigma_min``, MeanFlow's jumps, guidance
distillation's ``cfg:W`` as a network input.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff.diffusion import EDM
from jaxdiff.distill.consistency_core import multistep_sample
from jaxdiff.distill.meanflow import MeanFlowConfig, denoiser_velocity, sample_meanflow
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.sampling import resolve_sampler
from jaxdiff.samplers import get_solver, sample
from jaxdiff.utils.rng import per_sample_keys
from tests.gaussian import MU, S, denoiser, exact_edm_net, ode_solution


def test_renoise_with_sigma_min_is_multistep_consistency_sampling():
    den = denoiser()
    noise = jax.random.normal(jax.random.key(0), (6, 3))
    keys = per_sample_keys(jax.random.key(1), 6)
    levels = jnp.asarray([80.0, 2.0, 0.3], jnp.float32)
    want = multistep_sample(den, noise, None, levels, sigma_min=0.002, key=keys)
    solver = get_solver("renoise", sigma_min=0.002)
    got, aux = sample(den, noise, jnp.append(levels, 0.0), solver=solver, key=keys)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert int(aux["nfe"]) == 3
    # sigma_min = 0 is the plain re-noising solver.
    plain, _ = sample(den, noise, jnp.append(levels, 0.0), solver=get_solver("renoise"), key=keys)
    zero = multistep_sample(den, noise, None, levels, sigma_min=0.0, key=keys)
    np.testing.assert_allclose(plain, zero, rtol=1e-6, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="sigma_min=-1.0 must be"):
        get_solver("renoise", sigma_min=-1.0)


def _edm_apply_with_aux(seen):
    """The exact EDM network, recording the aux_time of every call."""
    net = exact_edm_net(EDM())

    def apply(params, x_in, label, cond, aux_time=None):
        seen.append(aux_time)
        return net(params, x_in, label, cond)

    return apply


def test_meanflow_jumps_through_a_denoiser_are_euler_steps_with_aux_time():
    """u = (z - D(z/(1-t), t/(1-t))) / t: one jump z_r = z_t - (t - r) u is one Euler step
    of D from sigma_t to sigma_r, so with the exact denoiser (for which the average
    velocity ignores aux_time) many jumps converge to the exact ODE solution."""
    seen = []
    u_apply = denoiser_velocity(_edm_apply_with_aux(seen), EDM())
    noise = jax.random.normal(jax.random.key(2), (4, 3))
    times = (0.9, 0.5, 0.2, 0.0)
    x = sample_meanflow(u_apply, None, times[0] * noise, None, cfg=MeanFlowConfig(), times=times)
    sig = np.asarray([t / (1 - t) for t in times])
    euler, _ = sample(denoiser(), noise, sig, solver=get_solver("euler"))
    np.testing.assert_allclose(x, euler, rtol=1e-5, atol=1e-5)
    # aux_time is t - r of each jump.
    np.testing.assert_allclose([float(a[0]) for a in seen], [0.4, 0.3, 0.2], rtol=1e-6)
    # Many jumps follow the exact PF-ODE (Euler is first order).
    fine = tuple(np.linspace(0.9, 0.0, 401))
    x = sample_meanflow(u_apply, None, 0.9 * noise, None, cfg=MeanFlowConfig(), times=fine)
    exact = ode_solution(np.asarray(noise, np.float64) * 9.0, 9.0, 0.0)
    np.testing.assert_allclose(x, exact, atol=2e-2)
    assert abs(MU) < 1 and S > 0


def _sample_config(**extra):
    base = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "solver": "heun", "steps": 18}
    return ml_collections.ConfigDict({**base, "guidance": "cfg:2.0", **extra})


def test_guidance_distilled_student_takes_cfg_scale_as_its_input():
    sc = _sample_config(guidance_input="aux_time", aux_scale=0.5)
    spec = resolve_sampler(sc, num_classes=10)
    assert spec.guidance is None and spec.model_kwargs == {"aux_time": 1.0}
    assert "cfg:2 (the student's input" in spec.describe()
    assert resolve_sampler(sc, num_classes=10, guidance="cfg:3").model_kwargs["aux_time"] == 1.5
    assert resolve_sampler(sc, num_classes=10, guidance="none").model_kwargs["aux_time"] == 0.5
    with pytest.raises(InvalidArgumentError, match="takes only --guidance=cfg:W"):
        resolve_sampler(sc, num_classes=10, guidance="apg:2")
    # A plain run's CFG stays a guidance.
    assert resolve_sampler(_sample_config(), num_classes=10).model_kwargs == {}


def test_stored_levels_are_used_with_the_stored_solver_only():
    levels = [80.0, 4.0, 0.5, 0.1]
    sc = _sample_config(solver="euler", steps=4, sigmas=levels, guidance="none")
    spec = resolve_sampler(sc, num_classes=10)
    np.testing.assert_allclose(spec.sigmas, [*levels, 0.0])
    assert "fresh noise" not in spec.describe()
    assert resolve_sampler(sc, num_classes=10, solver="heun").trained_levels is None
    mf = _sample_config(solver="meanflow", steps=1, sigmas=levels, guidance="none")
    np.testing.assert_allclose(resolve_sampler(mf, num_classes=10).sigmas, [80.0, 0.0])
    del mf["sigmas"]
    with pytest.raises(InvalidArgumentError, match="has none"):
        resolve_sampler(mf, num_classes=10)
