"""ODE inversion and Direct Inversion on exact Gaussian denoisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian import denoiser, ode_solution

from jaxdiff.diffusion import expand_to
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance import cfg
from jaxdiff.samplers import (
    ddim,
    direct_inversion_edit,
    dpmpp_2m,
    edm_stochastic,
    euler,
    euler_ancestral,
    heun,
    inversion_sigmas,
    invert,
    regenerate,
    renoise,
    sample,
)
from jaxdiff.samplers.inversion import edit_depth

DEN = denoiser()
X = np.linspace(-2.0, 2.0, 8, dtype=np.float32).reshape(4, 2)
NULL = 3
MEANS = jnp.array([-1.0, 0.0, 1.5, 0.25])  # row NULL: the unconditional mean
STD = 0.5


def class_denoiser(x, sigma, cond):
    """Exact denoiser of x0 ~ N(MEANS[c], STD^2)."""
    mu = expand_to(MEANS[cond], x)
    return mu + STD**2 / (STD**2 + expand_to(sigma, x) ** 2) * (x - mu)


def _round_trip(solver, n):
    grid = inversion_sigmas(n)
    latent, aux = jax.jit(lambda x, s: invert(DEN, x, s, solver=solver))(X, grid)
    back, _ = jax.jit(lambda z, s: regenerate(DEN, z, s, solver=solver))(latent, grid)
    return grid, latent, aux, back


@pytest.mark.parametrize("solver,order", [(euler(), 1.0), (heun(), 2.0)], ids=["euler", "heun"])
def test_inversion_converges_with_the_solvers_order_and_regenerates_the_input(solver, order):
    steps = (8, 16, 32, 64)
    latent_err, trip_err = [], []
    for n in steps:
        grid, latent, aux, back = _round_trip(solver, n)
        exact = ode_solution(X, float(grid[0]), float(grid[-1]))
        latent_err.append(np.max(np.abs(np.asarray(latent, np.float64) - exact)))
        trip_err.append(np.max(np.abs(np.asarray(back, np.float64) - X)))
        assert aux["trajectory"].shape == (n + 1, *X.shape)
        np.testing.assert_array_equal(aux["trajectory"][0], X)
        np.testing.assert_array_equal(aux["trajectory"][-1], latent)
    assert int(aux["nfe"]) == (n if order == 1 else 2 * n)  # Heun never lands on 0 here
    latent_slope = -np.polyfit(np.log(steps), np.log(latent_err), 1)[0]
    trip_slope = -np.polyfit(np.log(steps), np.log(trip_err), 1)[0]
    assert abs(latent_slope - order) < 0.25, latent_err
    # The round trip falls at least as fast (Heun's is order 3 on this linear ODE: the
    # h^3 errors of its up and down steps cancel), and reaches solver tolerance.
    assert trip_slope > order - 0.25, trip_err
    assert trip_err[-1] < (0.2 if order == 1 else 1e-3)


@pytest.mark.parametrize("solver", [heun(), dpmpp_2m()], ids=["heun", "dpmpp_2m"])
def test_inverting_a_sample_recovers_its_start_noise(solver):
    grid = inversion_sigmas(64)
    noise = np.random.RandomState(0).randn(4, 2).astype(np.float32)

    @jax.jit
    def there_and_back(noise):
        x, _ = sample(DEN, noise, grid[::-1].copy(), solver=solver)
        return invert(DEN, x, grid, solver=solver)[0] / grid[-1]

    np.testing.assert_allclose(there_and_back(noise), noise, atol=2e-3)


def test_deterministic_variants_equal_euler_and_stochastic_solvers_are_refused():
    grid = inversion_sigmas(5)
    pairs = ((ddim(0.0), euler()), (euler_ancestral(eta=0.0), euler()))
    for same, ref in (*pairs, (edm_stochastic(s_churn=0.0), heun())):
        got = invert(DEN, X, grid, solver=same)[0]
        np.testing.assert_array_equal(got, invert(DEN, X, grid, solver=ref)[0])
    for bad in (ddim(1.0), euler_ancestral(), edm_stochastic(), renoise()):
        with pytest.raises(InvalidArgumentError, match="deterministic solver, e.g. euler"):
            invert(DEN, X, grid, solver=bad)


@pytest.mark.parametrize(
    "grid,fix",
    [
        (np.array([0.0, 1.0, 80.0]), "sigma_lo > 0"),
        (np.array([80.0, 1.0, 0.002]), "must increase"),
        (np.array([1.0]), "at least 2 levels"),
    ],
)
def test_bad_inversion_grids_name_the_fix(grid, fix):
    with pytest.raises(InvalidArgumentError, match=fix):
        invert(DEN, X, grid, solver=euler())


def _edit(mode, src, tgt, w=2.0, solver=None, n=12):
    grid = inversion_sigmas(n)
    b = len(src)
    x = np.linspace(-1.5, 1.5, 2 * b, dtype=np.float32).reshape(b, 2)
    fn = jax.jit(
        lambda x, c, t: direct_inversion_edit(
            class_denoiser, x, grid, solver=solver or heun(), cond_src=c, cond_tgt=t,
            uncond=jnp.full_like(c, NULL), guidance=cfg(w), mode=mode,
        )
    )  # fmt: skip
    return grid, x, fn


def test_direct_inversion_source_branch_reproduces_the_input_at_any_scale():
    src, tgt = jnp.array([0, 1, 2, 0]), jnp.array([1, 2, 0, 2])
    for solver in (heun(), dpmpp_2m()):
        grid, x, fn = _edit("source", src, tgt, w=4.0, solver=solver)
        edited, aux = fn(x, src, tgt)
        # Every step ends on the stored trajectory: only float rounding remains.
        np.testing.assert_allclose(aux["source"], x, atol=1e-6)
        # Heun: 2N inverting (it never lands on 0) + 2 branches x CFG's 2 x 2N editing.
        n = len(grid) - 1
        per_branch = 2 * n if isinstance(solver, type(heun())) else n
        assert int(aux["nfe"]) == per_branch + 2 * 2 * per_branch
        assert np.max(np.abs(edited - x)) > 0.1  # the target did move


def test_paper_form_target_is_naive_editing_and_both_mode_with_the_same_label_reconstructs():
    src, tgt = jnp.array([0, 1, 2, 0]), jnp.array([1, 2, 0, 2])
    grid, x, fn = _edit("source", src, tgt)
    edited, aux = fn(x, src, tgt)
    # Naive editing: invert on the source label (w = 1), sample the target with CFG.
    null = jnp.full_like(src, NULL)
    latent, _ = invert(class_denoiser, x, grid, solver=heun(), cond=src)
    naive, _ = regenerate(
        class_denoiser, latent, grid, solver=heun(), guidance=cfg(2.0), cond=tgt, uncond=null
    )
    np.testing.assert_allclose(edited, naive, rtol=1e-5, atol=1e-5)
    # "both" with target == source: the target branch is the source branch, i.e. x.
    _, _, fn_both = _edit("both", src, src)
    same, aux_both = fn_both(x, src, src)
    np.testing.assert_allclose(same, x, atol=1e-6)
    np.testing.assert_array_equal(same, aux_both["source"])
    with pytest.raises(InvalidArgumentError, match="choose 'source'"):
        direct_inversion_edit(
            class_denoiser, x, grid, solver=heun(), cond_src=src, cond_tgt=tgt, mode="target"
        )


def test_direct_inversion_sharded_over_8_devices_equals_one_device():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    src = jnp.arange(16) % 3
    tgt = (src + 1) % 3
    grid, x, _ = _edit("both", src, tgt, n=6)
    fn = jax.jit(
        lambda x, c, t: direct_inversion_edit(
            class_denoiser, x, grid, solver=dpmpp_2m(), cond_src=c, cond_tgt=t,
            uncond=jnp.full_like(c, NULL), guidance=cfg(2.5), mode="both",
        )[0],
        out_shardings=shard,
    )  # fmt: skip
    sharded = fn(*(jax.device_put(a, shard) for a in (x, src, tgt)))
    assert len(sharded.sharding.device_set) == 8
    single = fn(x, np.asarray(src), np.asarray(tgt))
    np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-6)


def test_edit_strength_edits_from_level_k_and_keeps_the_source_branch_exact():
    src, tgt = jnp.array([0, 1, 2, 0]), jnp.array([1, 2, 0, 2])
    grid, x, fn = _edit("source", src, tgt)  # 12 Heun steps
    null = jnp.full_like(src, NULL)

    def at(strength):
        return jax.jit(
            lambda x, c, t: direct_inversion_edit(
                class_denoiser, x, grid, solver=heun(), cond_src=c, cond_tgt=t, uncond=null,
                guidance=cfg(2.0), strength=strength,
            )
        )(x, src, tgt)  # fmt: skip

    full, aux_full = fn(x, src, tgt)
    same, aux_same = at(1.0)
    np.testing.assert_array_equal(same, full)  # strength 1 is the whole grid, bit for bit
    assert aux_same["steps"] == 12 and int(aux_same["nfe"]) == int(aux_full["nfe"])
    edited, aux = at(0.5)
    k = 6
    # Only float rounding on the source branch; NFE: Heun 2k inverting + 2 x CFG 2 x 2k.
    np.testing.assert_allclose(aux["source"], x, atol=1e-6)
    assert aux["steps"] == k and int(aux["nfe"]) == 2 * k + 2 * 2 * 2 * k
    # Without injection the target is naive editing from level k: invert k levels, sample.
    latent, _ = invert(class_denoiser, x, grid[: k + 1], solver=heun(), cond=src)
    np.testing.assert_allclose(aux["latent"], latent, rtol=1e-6, atol=1e-6)
    naive, _ = regenerate(
        class_denoiser, latent, grid[: k + 1], solver=heun(), guidance=cfg(2.0), cond=tgt,
        uncond=null,
    )  # fmt: skip
    np.testing.assert_allclose(edited, naive, rtol=1e-5, atol=1e-5)
    # A shallower edit keeps more of the source (on these Gaussians: moves it less).
    assert np.linalg.norm(edited - x) < np.linalg.norm(full - x)
    assert edit_depth(12, 0.3) == 4 and edit_depth(4, 0.125) == 1 and edit_depth(5, 0.5) == 3
    for bad in (0.0, 1.5, 0.02):
        with pytest.raises(InvalidArgumentError, match="strength in \\(0, 1\\]"):
            edit_depth(12, bad)


def test_attention_injection_needs_a_model_with_the_inject_variant():
    src, tgt = jnp.array([0, 1]), jnp.array([1, 2])
    grid, x, _ = _edit("source", src, tgt, n=4)
    kw = dict(solver=euler(), cond_src=src, cond_tgt=tgt, uncond=jnp.full_like(src, NULL))
    with pytest.raises(InvalidArgumentError, match="variant='inject'.*pass inject=0"):
        direct_inversion_edit(class_denoiser, x, grid, guidance=cfg(2.0), inject=0.5, **kw)
    with pytest.raises(InvalidArgumentError, match="in \\[0, 1\\]"):
        direct_inversion_edit(class_denoiser, x, grid, inject=1.5, **kw)
