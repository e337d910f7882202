"""Power-function EMA and post-hoc EMA reconstruction (EDM2) against float64 references.

The central test (``test_posthoc_reconstruction_equals_a_directly_tracked_ema``) tracks two
stored profiles (sigma_rel 0.05 and 0.10, EDM2's) and the targets directly over a random-walk
parameter trajectory, reconstructs each target from the stored profiles' snapshots and
compares. Tolerances:

* a target equal to a stored profile at the last snapshot: the solve returns that profile's
  unit vector (up to float64 rounding), so the reconstruction equals the tracked EMA up to
  float32 rounding;
* a target in between: the tracked EMA after ``T`` updates weights ``p_t`` by exactly
  ``w(t) = F(t) - F(t-1)``, ``F(s) = (min(s, T_i)/T_i)^(gamma+1)`` (see
  :mod:`jaxdiff.training.phema`), so the reconstruction error is exactly ``sum_t dw(t) p_t``
  with ``dw`` the difference of the combined and the target weights (both sum to 1). Hence
  ``|error| <= ||dw||_1 max_t |p_t - p_T|`` for *any* trajectory; the test asserts that bound
  (plus float32 rounding), that ``||dw||_1 < 1e-3`` (the least-squares fit moves less than
  0.1% of the averaging mass), and, more sharply, that the error equals ``dw @ p`` up to the
  float32 rounding of the output.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fakegcs import BUCKET

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.phema import reconstruct_run
from jaxdiff.pretrained.weights_io import read_weights
from jaxdiff.training import phema
from jaxdiff.training.state import update_ema
from jaxdiff.utils import storage

EPS32 = np.finfo(np.float32).eps
ROOT = Path(__file__).resolve().parents[1]


def _beta_std(gamma):
    # The profile (gamma+1) s^gamma on [0, 1] is the Beta(gamma+1, 1) density, whose variance
    # is a / ((a+1)^2 (a+2)) with a = gamma+1: an independent route to EDM2's eq. 123.
    a = np.float64(gamma) + 1
    return np.sqrt(a / ((a + 1) ** 2 * (a + 2)))


def _gamma_by_bisection(std):
    lo, hi = 0.0, 1e6  # sigma_rel falls monotonically in gamma for gamma >= 0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _beta_std(mid) > std else (lo, mid)
    return 0.5 * (lo + hi)


def test_std_and_exponent_match_edm2_and_a_float64_rederivation():
    # EDM2 (Karras et al. 2024, sec. 3.1): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94.
    np.testing.assert_allclose(phema.std_to_exp([0.05, 0.10]), [16.97, 6.94], atol=5e-3)
    stds = np.array([0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.28])
    gammas = phema.std_to_exp(stds)
    assert gammas.shape == stds.shape and gammas.dtype == np.float64
    np.testing.assert_allclose(gammas, [_gamma_by_bisection(s) for s in stds], rtol=1e-10)
    np.testing.assert_allclose(phema.exp_to_std(gammas), stds, rtol=1e-12)
    np.testing.assert_allclose(phema.exp_to_std(gammas), _beta_std(gammas), rtol=1e-12)
    assert abs(phema.exp_to_std(0.0) - np.sqrt(1 / 12)) < 1e-15  # the uniform average
    assert phema.std_key(0.05) == "std0.050" and phema.key_std("std0.100") == 0.1
    assert phema.key_std("0.999") is None


@pytest.mark.parametrize("std", [0.0, -0.1, 0.289, 0.5, float("nan")])
def test_unsupported_std_is_rejected_with_the_range(std):
    with pytest.raises(InvalidArgumentError, match=r"\(0, 0.289\)"):
        phema.check_std(std, "--std")


def test_std_with_more_than_three_decimals_is_rejected():
    with pytest.raises(InvalidArgumentError, match="three decimals"):
        phema.check_std(0.0505)


def test_power_beta_copies_first_then_follows_edm2():
    gamma = float(phema.std_to_exp(0.1))
    assert float(phema.power_beta(0, gamma)) == 0.0 and float(phema.power_weight(0, gamma)) == 1
    steps = np.array([1, 9, 99, 9999, 10**7])
    t = steps.astype(np.float64) + 1
    want = (1 - 1 / t) ** (gamma + 1)  # EDM2 eq. 127 with t_delta / t_next = 1 / t
    np.testing.assert_allclose(phema.power_beta(steps, gamma), want, rtol=1e-6)
    # 1 - beta keeps its relative precision for large t (it is the weight the update uses).
    np.testing.assert_allclose(phema.power_weight(steps, gamma), 1 - want, rtol=1e-5)


def _track64(traj, stds):
    """EDM2's update loop in float64: ema = beta ema + (1 - beta) p, t = updates so far."""
    out = {s: [] for s in stds}
    for s in stds:
        gamma, ema = phema.std_to_exp(s), np.zeros(traj.shape[1])
        for t, p in enumerate(traj, start=1):
            beta = (1 - 1 / t) ** (gamma + 1)
            ema = beta * ema + (1 - beta) * p
            out[s].append(ema)
    return {s: np.stack(v) for s, v in out.items()}


def _track32(traj, stds):
    """The EMA of :func:`update_ema` (the train step's), every step, in float32."""
    keys = [phema.std_key(s) for s in stds]

    def body(ema, xs):
        ema = update_ema(ema, {"w": xs[1]}, xs[0], warmup=True)  # warm-up: rates only
        return ema, ema

    init = {k: {"w": jnp.full(traj.shape[1], 7.0)} for k in keys}  # overwritten at step 0
    scan = jax.jit(lambda t: jax.lax.scan(body, init, (jnp.arange(len(t)), t))[1])
    hist = scan(jnp.asarray(traj, jnp.float32))
    return {s: np.asarray(hist[k]["w"]) for s, k in zip(stds, keys, strict=True)}


def _weights(std, end, total):
    """Exact per-step weights of the power EMA ending at ``end``, on steps 1..total."""
    g, t = phema.std_to_exp(std), np.arange(1, total + 1, dtype=np.float64)
    cdf = lambda s: (np.minimum(s, end) / end) ** (g + 1)  # noqa: E731
    return cdf(t) - cdf(t - 1)


@pytest.fixture(scope="session")
def walk():
    rng = np.random.default_rng(0)
    return np.cumsum(rng.normal(size=(3000, 16)), axis=0)  # p_1 .. p_T, 16 scalar walks


def test_tracked_power_ema_equals_float64_power_ema(walk):
    stds = (0.05, 0.1, 0.2)
    ema32, ema64 = _track32(walk, stds), _track64(walk, stds)
    scale = np.abs(walk).max()
    for s in stds:
        np.testing.assert_array_equal(ema32[s][0], walk[0].astype(np.float32))  # a copy
        np.testing.assert_allclose(ema32[s], ema64[s], rtol=0, atol=2e-6 * scale)
        # and the float64 loop is the closed form (t^(g+1) - (t-1)^(g+1)) / T^(g+1)
        np.testing.assert_allclose(ema64[s][-1], _weights(s, len(walk), len(walk)) @ walk)


def test_posthoc_reconstruction_equals_a_directly_tracked_ema(walk):
    total, every, stored = len(walk), 100, (0.05, 0.1)
    targets = (0.06, 0.075, 0.09)
    ema32 = _track32(walk, stored + targets)
    ema64 = _track64(walk, stored + targets)
    steps = [s for s in range(every, total + 1, every) for _ in stored]
    stds = [d for _ in range(every, total + 1, every) for d in stored]
    snaps32 = [{"w": ema32[d][s - 1]} for s, d in zip(steps, stds, strict=True)]
    snaps64 = [{"w": ema64[d][s - 1]} for s, d in zip(steps, stds, strict=True)]
    scale = np.abs(walk).max()

    # A stored length: exact up to float rounding, on the float32 EMA of the train step.
    for std in stored:
        x = phema.solve_coefficients(steps, stds, total, std)[:, 0]
        rec = phema.reconstruct(snaps32, x)["w"]
        assert rec.dtype == np.float32
        np.testing.assert_allclose(rec, ema32[std][-1], rtol=0, atol=4 * EPS32 * scale)

    # Lengths in between: the bound of the module docstring, and the exact error it predicts.
    spread = np.abs(walk - walk[-1]).max(axis=0)
    for std in targets:
        x = phema.solve_coefficients(steps, stds, total, std)[:, 0]
        assert abs(x.sum() - 1) < 1e-12
        combined = sum(c * _weights(d, s, total) for c, s, d in zip(x, steps, stds, strict=True))
        dw = combined - _weights(std, total, total)
        assert np.abs(dw).sum() < 1e-3, (std, np.abs(dw).sum())
        rec64 = phema.reconstruct(snaps64, x)["w"]
        err = rec64 - ema64[std][-1]
        assert np.all(np.abs(err) <= np.abs(dw).sum() * spread + 2 * EPS32 * scale)
        np.testing.assert_allclose(err, dw @ walk, rtol=0, atol=2 * EPS32 * scale)
        # The float32 train-step EMAs agree within the same bound plus float32 tracking.
        rec32 = phema.reconstruct(snaps32, x)["w"]
        bound = np.abs(dw).sum() * spread + 2e-6 * scale * (1 + np.abs(x).sum())
        assert np.all(np.abs(rec32 - ema32[std][-1]) <= bound)
        assert phema.fit_error(steps, stds, total, std, x) < 3e-3  # relative L2, not L1


def test_reconstruct_takes_several_outputs_and_checks_counts():
    trees = [{"a": np.ones(2)}, {"a": np.full(2, 3.0)}]
    outs = phema.reconstruct(iter(trees), np.array([[0.5, 0.25], [0.5, 0.75]]))
    np.testing.assert_allclose(outs[0]["a"], 2.0)
    np.testing.assert_allclose(outs[1]["a"], 2.5)
    with pytest.raises(InvalidArgumentError, match="2 snapshots for 3 coefficients"):
        phema.reconstruct(trees, np.ones(3) / 3)


def _params(value):
    return {"dense": {"kernel": np.full((2, 3), value, np.float32)}, "bias": np.zeros(3)}


def test_snapshots_and_reconstruction_through_a_bucket(fake_gcs):
    run = f"gs://{BUCKET}/run"
    directory = storage.join(run, "phema")
    for step in (10, 20):
        phema.write_snapshot(directory, step, {0.05: _params(step), 0.1: _params(2 * step)})
    assert [s for s, _ in phema.list_snapshots(directory)] == [10, 20]
    meta = phema.read_metadata(phema.snapshot_path(directory, 20))
    assert meta["step"] == "20" and meta["stds"] == "[0.05, 0.1]"
    (rec,) = reconstruct_run(run, [0.1])
    assert rec.path == f"{directory}/reconstructed-std0.100.safetensors"
    assert rec.step == 20 and len(rec.inputs) == 4 and rec.fit_error < 1e-12
    params, meta = phema.read_reconstruction(rec.path, _params(0.0))
    np.testing.assert_allclose(params["dense"]["kernel"], 40.0, rtol=1e-12)
    assert meta["std"] == "0.100" and meta["step"] == "20"
    (early,) = reconstruct_run(run, [0.05], step=10)
    assert early.step == 10 and len(early.inputs) == 2
    assert "reconstructed-std0.050" in early.describe()
    with pytest.raises(InvalidArgumentError, match=r"--step=15.*\[10, 20\]"):
        reconstruct_run(run, [0.05], step=15)
    assert os.listdir(".") == []


def test_reconstruction_errors_name_the_fix(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"ema_stds.*phema_every"):
        reconstruct_run(str(tmp_path), [0.1])
    phema.write_snapshot(str(tmp_path / "phema"), 5, {0.1: _params(1.0)})
    with pytest.raises(InvalidArgumentError, match=r"--std=0.3 .*\(0, 0.289\)"):
        reconstruct_run(str(tmp_path), [0.3])
    phema.write_snapshot(str(tmp_path / "phema"), 6, {0.1: {"other": np.zeros(2)}})
    with pytest.raises(InvalidArgumentError, match="model changed"):
        reconstruct_run(str(tmp_path), [0.1])


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", "jaxdiff.experiment.phema", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # 53 s: trains a run; the reconstruction is tested exactly in this file
def test_command_end_to_end_on_a_tiny_run(tmp_path):
    from tiny import tiny_config

    from jaxdiff.experiment import (
        load_run,
        train_and_evaluate,
    )

    run = tmp_path / "run"
    train_and_evaluate(tiny_config(10, ema_stds=(0.05, 0.1), phema_every=4), run)
    assert sorted(os.listdir(run / "phema")) == [
        f"snapshot-{s:08d}.safetensors"
        for s in (4, 8, 10)  # every 4 steps and the last
    ]
    tensors, meta = read_weights(str(run / "phema" / "snapshot-00000010.safetensors"))
    assert meta["step"] == "10" and json.loads(meta["stds"]) == [0.05, 0.1]
    assert {k.split("/")[0] for k in tensors} == {"std0.050", "std0.100"}

    result = _cli(f"--workdir={run}", "--std=0.1", "--std=0.07")
    assert result.returncode == 0, result.stderr
    assert "reconstructed-std0.070.safetensors" in result.stdout
    assert "sigma_rel 0.100" in result.stdout and "coefficients: sum |c|" in result.stdout

    # The stored length at the last snapshot is the tracked profile itself.
    rebuilt, tracked = load_run(run, ema="phema:0.1"), load_run(run, ema="std0.100")
    assert rebuilt.which == "phema:0.100" and rebuilt.step == 10
    for a, b in zip(jax.tree.leaves(rebuilt.params), jax.tree.leaves(tracked.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    mid = load_run(run, ema="phema:0.07")  # what `python -m sample --ema=phema:0.07` loads
    assert mid.which == "phema:0.070" and mid.step == 10
    for a, b in zip(jax.tree.leaves(mid.params), jax.tree.leaves(tracked.params), strict=True):
        assert a.sharding == b.sharding and np.all(np.isfinite(np.asarray(a)))

    with pytest.raises(FileNotFoundError, match=r"python -m jaxdiff.experiment.phema .*0.2"):
        load_run(run, ema="phema:0.2")
    with pytest.raises(InvalidArgumentError, match="must be a number"):
        load_run(run, ema="phema:abc")
    with pytest.raises(InvalidArgumentError, match=r"'std0.200' not in this run.*phema:STD"):
        load_run(run, ema="std0.200")


def test_command_errors_are_one_line_with_the_fix(tmp_path):
    result = _cli(f"--workdir={tmp_path}", "--std=0.1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.ema_stds" in result.stderr and "train.phema_every" in result.stderr
