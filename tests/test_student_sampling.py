"""Few-step students sample as trained: stored recipe, renoise solver, k of K levels, hybrid."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.distill.few_step import few_step_sample, level_indices, student_sigmas
from jaxdiff.distill.hybrid import handover, hybrid_sample
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment import generate_samples, load_run, parse_labels, resolve_sampler
from jaxdiff.samplers import get_solver, renoise, sample
from jaxdiff.utils.rng import per_sample_keys, start_noise

SHAPE = (8, 8, 1)
K = 4
LEVELS = student_sigmas(K)  # the EDM range of the digits teacher


@pytest.fixture(scope="session")
def student_dirs(tmp_path_factory):
    """A K-step student workdir as distillation saves it, and one saved the old way.

    Both hold the same TrainState (a tiny digits UNet with perturbed weights); the old
    one's config is what students stored before the recipe: Euler, no ``sample.sigmas``.
    """
    from tiny import tiny_config

    from jaxdiff.experiment.builders import build_model, run_metadata
    from jaxdiff.experiment.distill import student_config
    from jaxdiff.training import Checkpointer
    from jaxdiff.training.state import create_train_state, init_params_fn
    from train.configs.distill_digits import get_config

    teacher = tiny_config()
    distill = get_config()
    distill.distill.student_steps = K
    saved = student_config(distill, teacher, run_metadata(10, SHAPE))
    model = build_model(ml_collections.ConfigDict(saved), 10)

    def make_state(key):
        params = nn.unbox(init_params_fn(model, SHAPE, 10)(key))
        # A fresh UNet's output layer is zero: perturb every weight so the network's
        # output depends on its input, noise level and class.
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        noisy = [
            p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)
        ]
        return create_train_state(jax.tree.unflatten(tree, noisy), optax.sgd(0.1), (0.99,))

    state = jax.jit(make_state)(jax.random.key(0))  # one compile, not one per leaf
    old = dict(saved)
    old["sample"] = {
        **teacher.sample.to_dict(),
        "solver": "euler",
        "steps": K,
        "guidance": "none",
    }
    root = tmp_path_factory.mktemp("students")
    for name, config in (("new", saved), ("old", old)):
        with Checkpointer(root / name / "checkpoints") as ckpt:
            ckpt.save(1, state, config=config)
    return root / "new", root / "old"


def test_student_stores_its_recipe_and_load_run_returns_it(student_dirs):
    from jaxdiff.training.checkpoint import load_config

    new, old = student_dirs
    stored = load_config(new / "checkpoints")["sample"]
    assert stored["solver"] == "renoise" and stored["steps"] == K
    assert stored["guidance"] == "none"
    np.testing.assert_array_equal(np.asarray(stored["sigmas"], np.float32), LEVELS)
    # The K=4 levels on the EDM range (Karras K=4 steps would be 80, 9.72, 0.47).
    np.testing.assert_allclose(stored["sigmas"], [80, 17.5, 2.52, 0.17], rtol=0.01)
    assert "sigmas" not in load_config(old / "checkpoints")["sample"]
    for workdir in (new, old):  # an old student gets the same recipe from distill_config
        run = load_run(workdir)
        sc = run.config.sample
        assert (sc.solver, sc.steps, sc.guidance) == ("renoise", K, "none"), workdir
        np.testing.assert_array_equal(np.asarray(sc.sigmas, np.float32), LEVELS)
        spec = resolve_sampler(sc, num_classes=run.num_classes)
        assert spec.solver_spec == "renoise" and spec.guidance is None
        np.testing.assert_array_equal(spec.sigmas, np.append(LEVELS, 0.0).astype(np.float32))
        assert "the student's trained levels 80, 17.53, 2.515, 0.1698" in spec.describe()


def test_renoise_solver_equals_few_step_sample_exactly():
    params = {"mu": jnp.asarray([1.0, -2.0, 0.5]), "s2": jnp.float32(0.25)}

    def gen(p, x, sigma, cond=None):  # a nonlinear stand-in student
        # (tanh, not sin: XLA's CPU sin differs in the last bits between the two loops.)
        s = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])[:, None]
        return p["mu"] + p["s2"] / (p["s2"] + s**2) * (x - p["mu"]) + 0.1 * jnp.tanh(x)

    def den(x, sigma, cond=None):
        return gen(params, x, sigma, cond)

    keys = per_sample_keys(jax.random.key(3), 6)
    noise = start_noise(keys, (3,))
    schedule = np.append(LEVELS, 0.0).astype(np.float32)
    solver = jax.jit(lambda n, k: sample(den, n, schedule, solver=renoise(), key=k))
    loop = jax.jit(lambda n, k: few_step_sample(gen, params, n, None, LEVELS, k))
    (a, aux), b = solver(noise, keys), loop(noise, keys)
    np.testing.assert_array_equal(a, b)
    assert int(aux["nfe"]) == K
    # One key for the batch means per-sample keys fold_in(key, b) in both.
    np.testing.assert_array_equal(
        solver(noise, jax.random.key(3))[0], loop(noise, jax.random.key(3))
    )
    # Re-noising is fresh: other keys, other samples; one level is G(sigma_max z).
    assert not np.allclose(solver(noise, per_sample_keys(jax.random.key(4), 6))[0], a)
    one, _ = sample(den, noise, [80.0, 0.0], solver=renoise(), key=keys)
    np.testing.assert_allclose(one, den(80.0 * noise, 80.0), rtol=1e-6, atol=1e-6)


def test_k_of_K_levels_too_many_steps_and_explicit_solvers():
    table = {1: [0], 2: [0, 3], 3: [0, 2, 3], 4: [0, 1, 2, 3]}
    for k, idx in table.items():
        np.testing.assert_array_equal(level_indices(4, k), idx)
    np.testing.assert_array_equal(level_indices(7, 3), [0, 3, 6])
    np.testing.assert_array_equal(level_indices(5, 4), [0, 1, 3, 4])  # 4/3, 8/3 round
    for bad in (0, 5):
        with pytest.raises(ValueError, match="1..4 steps"):
            level_indices(4, bad)
    sc = ml_collections.ConfigDict(
        {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "guidance": "none"}
    )
    sc.update({"solver": "renoise", "steps": K, "sigmas": [float(v) for v in LEVELS]})
    for k, idx in table.items():
        spec = resolve_sampler(sc, num_classes=10, steps=k)
        np.testing.assert_array_equal(spec.sigmas, np.append(LEVELS[idx], 0.0))
    assert (
        "levels 80, 0.1698 of the student's trained"
        in resolve_sampler(sc, num_classes=10, steps=2).describe()
    )
    with pytest.raises(InvalidArgumentError, match=r"steps=5.*K=4 levels.*--steps=1\.\.4"):
        resolve_sampler(sc, num_classes=10, steps=5)
    # An explicit solver is what the user asked for: Karras levels, any step count.
    heun = resolve_sampler(sc, num_classes=10, solver="heun")
    assert heun.trained_levels is None and heun.solver_spec == "heun"
    np.testing.assert_array_equal(heun.sigmas, karras_sigmas(K))
    assert resolve_sampler(sc, num_classes=10, solver="heun", steps=18).steps == 18
    # renoise on a run without trained levels re-noises over Karras levels.
    del sc["sigmas"]
    plain = resolve_sampler(sc, num_classes=10, steps=6)
    assert plain.solver_spec == "renoise" and plain.trained_levels is None
    np.testing.assert_array_equal(plain.sigmas, karras_sigmas(6))


def test_students_sample_as_trained_at_any_batch_size_and_device_count(student_dirs):
    from jaxdiff.parallel import make_mesh

    new, old = student_dirs
    one, eight = load_run(new), load_run(new, mesh=make_mesh())
    spec = resolve_sampler(one.config.sample, num_classes=10)
    labels = parse_labels(None, 8, 10)
    # Sample j's start noise and re-noising come from fold_in(key(seed), j) only.
    a, nfe = generate_samples(one, spec, num=8, labels=labels, seed=2, batch_size=3)
    b, _ = generate_samples(eight, spec, num=8, labels=labels, seed=2, batch_size=8)
    assert nfe == K and np.isfinite(a).all()
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    # An old student (no stored levels) samples the same way: the same samples.
    old_run = load_run(old, mesh=make_mesh())
    old_spec = resolve_sampler(old_run.config.sample, num_classes=10)
    c, _ = generate_samples(old_run, old_spec, num=8, labels=labels, seed=2, batch_size=8)
    np.testing.assert_array_equal(c, b)


def _spy(mu, seen):
    def denoise(x, sigma, cond=None):
        jax.debug.callback(lambda s: seen.append(float(np.asarray(s).reshape(-1)[0])), sigma)
        sig2 = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])[:, None] ** 2
        return mu + 0.25 / (0.25 + sig2) * (x - mu)

    return denoise


def test_hybrid_calls_the_student_only_at_trained_levels():
    sigmas = karras_sigmas(18)  # 80, 57.6, 40.8, 28.4, ..., 0.296, 0.140, ...
    noise = jax.random.normal(jax.random.key(0), (4, 2))
    euler = get_solver("euler")
    # The rule: the base's last step lands on the highest trained level <= sigmas[k].
    base, tail = handover(sigmas, 3, LEVELS)
    np.testing.assert_array_equal(base, [*sigmas[:3], LEVELS[1]])
    np.testing.assert_array_equal(tail, [*LEVELS[1:], 0.0])
    for k in (0, 3, 12):
        base_seen, student_seen = [], []
        x, aux = hybrid_sample(
            _spy(jnp.asarray([1.0, 0.0]), base_seen),
            _spy(jnp.asarray([0.0, 5.0]), student_seen),
            noise,
            sigmas,
            k,
            solver=euler,
            student_levels=LEVELS,
            key=jax.random.key(1),
        )
        jax.block_until_ready(x)
        first = int(np.flatnonzero(LEVELS <= sigmas[k])[0]) if k else 0
        assert sorted(set(student_seen), reverse=True) == list(LEVELS[first:]), k
        assert set(base_seen) <= set(sigmas[:k]) | {float(LEVELS[first])}, k
        assert int(aux["nfe"]) == k + (K - first), k
    # switch_step = 0 is the student alone, exactly as its own sampler draws it.
    student = _spy(jnp.asarray([0.0, 5.0]), [])
    x0, _ = hybrid_sample(
        student,
        student,
        noise,
        sigmas,
        0,
        solver=euler,
        student_levels=LEVELS,
        key=jax.random.key(1),
    )
    alone, _ = sample(
        student, noise, np.append(LEVELS, 0.0), solver=renoise(), key=jax.random.key(1)
    )
    np.testing.assert_array_equal(x0, alone)
    # Below the lowest trained level, or any base step for a one-step student: refused.
    with pytest.raises(InvalidArgumentError, match=r"sigmas\[13\].*--switch_step=0.*1\.\.12"):
        handover(sigmas, 13, LEVELS)
    with pytest.raises(InvalidArgumentError, match=r"trained only at noise levels 80;"):
        hybrid_sample(student, student, noise, sigmas, 1, solver=euler, student_levels=[80.0])
