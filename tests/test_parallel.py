"""Scale and reliability: sharded == single-device, multi-process, resume anywhere, signals."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny import TINY_MODEL_FLAGS, tiny_config

from jaxdiff.experiment import build_experiment, init_state, train_and_evaluate
from jaxdiff.parallel import global_batch, make_mesh
from jaxdiff.training import Checkpointer, jit_train_step, make_train_step

ROOT = Path(__file__).resolve().parents[1]
TINY_FLAGS = [
    "--config=train/configs/digits.py",
    *TINY_MODEL_FLAGS,
    "--config.train.log_every=2",
    "--config.sample.steps=2",
    "--config.sample.grid_size=4",
]


def _losses(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {json.loads(x)["step"]: json.loads(x)["loss"] for x in lines}


def _train_steps(mesh_kw, steps, tmp_path):
    config = tiny_config(steps)
    config.mesh.update(mesh_kw)
    exp = build_experiment(config)
    state, _ = init_state(exp, Checkpointer(tmp_path / "none"))
    step_fn = jit_train_step(
        make_train_step(exp.model, exp.formulation, exp.tx, num_classes=10, label_dropout=0.1),
        exp.state_shardings,
        exp.mesh,
    )
    losses = []
    for _ in range(steps):
        batch = global_batch(exp.to_model_batch(next(exp.data)), exp.mesh)
        state, metrics = step_fn(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="session")
def single_device_run(tmp_path_factory):
    """Three single-device steps, the reference of every mesh below (computed once)."""
    return _train_steps(dict(num_devices=1), 3, tmp_path_factory.mktemp("single"))


@pytest.mark.xdist_group("parallel_single_device_reference")  # one worker computes it
@pytest.mark.parametrize(
    "mesh_kw",
    [dict(data=8), dict(data=1, fsdp=8), dict(data=2, fsdp=2, tensor=2)],
    ids=["data8", "fsdp8", "mixed2x2x2"],
)
def test_sharded_step_equals_single_device(mesh_kw, tmp_path, single_device_run):
    single, single_losses = single_device_run
    sharded, sharded_losses = _train_steps(mesh_kw, 3, tmp_path)
    # Only the order of floating-point reductions differs between meshes: losses agree to
    # float32 rounding. Params get an absolute tolerance of 5e-4 (a quarter of one lr=2e-3
    # step, so a wrong gradient, which moves a param by ~lr per step, still fails): biases
    # that feed a GroupNorm have an exactly-zero gradient, so theirs is pure rounding noise,
    # which Adam's normalisation magnifies to 1e-5..2e-4 depending on the mesh and on XLA's
    # optimisation level (the tests compile at level 0, see conftest.py).
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-4)
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(sharded.params)}
    if mesh_kw.get("fsdp", 1) > 1:
        assert any("fsdp" in s for s in specs), specs
        leaf = max(jax.tree.leaves(sharded.params), key=lambda x: x.size)
        shard_shape = leaf.addressable_shards[0].data.shape
        assert np.prod(shard_shape) < leaf.size  # really split, not replicated
        mu = jax.tree.leaves(sharded.opt_state)
        assert any("fsdp" in str(x.sharding.spec) for x in mu)  # Adam moments follow params
    if mesh_kw.get("tensor", 1) > 1:
        assert any("tensor" in s for s in specs), specs


def _predictions(state, exp):
    """The denoiser's output on a fixed batch: what a user of the params observes."""
    x = np.linspace(-1, 1, 16 * 64, dtype=np.float32).reshape(16, 8, 8, 1)
    sigma = np.geomspace(0.01, 50.0, 16).astype(np.float32)
    labels = np.arange(16) % 10
    net = lambda xi, t, c: exp.model.apply({"params": state.params}, xi, t, c)  # noqa: E731
    return np.asarray(exp.formulation.denoise(net, x, sigma, labels))


# 94 s: resume across topologies end to end; loading onto any mesh and exact resume
# stay in the default run (test_cli, test_training).
@pytest.mark.slow
def test_resume_on_fewer_and_more_devices(tmp_path):
    def config(steps, devices):
        c = tiny_config(steps, checkpoint_every=2)
        c.mesh.num_devices = devices
        return c

    full = train_and_evaluate(config(6, 8), tmp_path / "full")
    train_and_evaluate(config(2, 8), tmp_path / "moved")  # saved on 8 devices
    train_and_evaluate(config(4, 1), tmp_path / "moved")  # resumed on 1 (fewer)
    resumed = train_and_evaluate(config(6, 4), tmp_path / "moved")  # then on 4 (more)
    assert int(resumed.step) == 6
    full_losses, moved = _losses(tmp_path / "full"), _losses(tmp_path / "moved")
    assert sorted(moved) == sorted(full_losses) == [2, 4, 5, 6]
    np.testing.assert_allclose([moved[s] for s in full_losses], list(full_losses.values()), 1e-5)
    # Compare what the params compute, not each raw weight: biases feeding a GroupNorm have
    # an exactly-zero gradient, so Adam turns rounding noise into a random walk in them that
    # differs between meshes and has no effect on the output.
    exp = build_experiment(config(6, 4))
    np.testing.assert_allclose(
        _predictions(resumed, exp), _predictions(full, exp), rtol=1e-4, atol=1e-4
    )


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_cli(workdir, *flags, devices=2, extra_env=None, wait=True):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        **(extra_env or {}),
    )
    cmd = [sys.executable, "-m", "train", *TINY_FLAGS, f"--workdir={workdir}", *flags]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if wait:
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-3000:]
        return out
    return proc


# 222 s: two real processes; in-process 8-device sharding stays in the default run.
@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume(tmp_path):
    # Also a slow-host test: process 1 is frozen with SIGSTOP (no progress, no heartbeats)
    # for 20 s in the middle of the first run, the kind of stall a loaded or descheduled
    # host produces. With the default timeouts the job waits for it and finishes.
    def two_procs(steps, stall=0.0):
        port = _free_port()
        procs = [
            _train_cli(
                tmp_path / "two",
                f"--config.train.num_steps={steps}",
                "--config.train.checkpoint_every=3",
                "--config.sample.grid_size=0",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                wait=False,
            )
            for i in range(2)
        ]
        if stall:
            metrics = tmp_path / "two" / "metrics.jsonl"
            deadline = time.time() + 300
            while not (metrics.exists() and metrics.read_text().strip()):
                assert time.time() < deadline and all(p.poll() is None for p in procs)
                time.sleep(0.2)
            os.kill(procs[1].pid, signal.SIGSTOP)
            time.sleep(stall)
            os.kill(procs[1].pid, signal.SIGCONT)
        outs = [p.communicate(timeout=400)[0] for p in procs]
        for p, out in zip(procs, outs, strict=True):
            assert p.returncode == 0, out[-3000:]
        return outs

    outs = two_procs(6, stall=20.0)
    assert "process 0 of 2: 2 local / 4 global devices" in outs[0]
    assert "process 1 of 2: 2 local / 4 global devices" in outs[1]
    # Same global batch (4 devices) in one process: equal losses up to reduction order.
    _train_cli(
        tmp_path / "one",
        "--config.train.num_steps=6",
        "--config.train.checkpoint_every=3",
        "--config.sample.grid_size=0",
        devices=4,
    )
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == [2, 3, 4, 6]
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=1e-5)
    # Both processes saved and both restore: the two-process run resumes at step 6.
    assert Checkpointer(tmp_path / "two" / "checkpoints").all_steps() == [3, 6]
    two_procs(8)
    assert sorted(_losses(tmp_path / "two")) == [2, 3, 4, 6, 8]


def test_sigterm_checkpoints_and_resumes(tmp_path):
    proc = _train_cli(
        tmp_path,
        "--config.train.num_steps=100000",
        "--config.train.checkpoint_every=100000",
        "--config.train.log_every=1",
        devices=1,
        wait=False,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stopping at step" in out
    steps = Checkpointer(tmp_path / "checkpoints").all_steps()
    assert len(steps) == 1 and steps[0] >= 3
    state = train_and_evaluate(tiny_config(steps[0] + 2), tmp_path)
    assert int(state.step) == steps[0] + 2


def test_kill_9_during_async_save_never_breaks_resume(tmp_path):
    proc = _train_cli(
        tmp_path,
        "--config.train.num_steps=100000",
        "--config.train.checkpoint_every=1",
        "--config.train.keep_checkpoints=2",
        devices=1,
        wait=False,
    )
    ckpt_dir = tmp_path / "checkpoints"
    deadline = time.time() + 300
    caught_tmp = False
    # Kill as soon as a save is in flight (a tmp directory exists) after two completed ones.
    while time.time() < deadline and proc.poll() is None:
        names = [p.name for p in ckpt_dir.glob("*")] if ckpt_dir.exists() else []
        done = [n for n in names if n.isdigit()]
        if len(done) >= 2 and any("tmp" in n for n in names):
            caught_tmp = True
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=60)
    ckpt = Checkpointer(ckpt_dir)
    last = max(ckpt.all_steps())
    state = train_and_evaluate(tiny_config(last + 2, checkpoint_every=1), tmp_path)
    assert int(state.step) == last + 2
    assert caught_tmp or len(ckpt.all_steps()) >= 2  # the kill landed during or between saves


def test_mesh_errors_name_the_fix():
    with pytest.raises(ValueError, match="data=3 x fsdp=1 x tensor=1 = 3 does not match the 8"):
        make_mesh(data=3)
    with pytest.raises(ValueError, match="num_devices=9"):
        make_mesh(num_devices=9)


def test_dit_fsdp_tensor_step_equals_single_device(tmp_path):
    def run(mesh_kw):
        c = tiny_config(2)
        c.model = type(c.model)(
            dict(name="dit", patch_size=2, hidden_size=32, depth=2, num_heads=4)
        )
        c.mesh.update(mesh_kw)
        exp = build_experiment(c)
        state, _ = init_state(exp, Checkpointer(tmp_path / "none"))
        step_fn = jit_train_step(
            make_train_step(exp.model, exp.formulation, exp.tx, num_classes=10),
            exp.state_shardings,
            exp.mesh,
        )
        losses = []
        for _ in range(2):
            batch = global_batch(exp.to_model_batch(next(exp.data)), exp.mesh)
            state, m = step_fn(state, batch, jax.random.key(0))
            losses.append(float(m["loss"]))
        return exp, losses

    exp, sharded = run(dict(data=2, fsdp=2, tensor=2))
    assert exp.model.activation_sharding is not None  # activations pinned between blocks
    _, single = run(dict(num_devices=1))
    np.testing.assert_allclose(sharded, single, rtol=1e-5)


def test_timeouts_come_from_flags_then_environment_then_defaults(monkeypatch):
    from jaxdiff.parallel import Timeouts, initialize_distributed

    monkeypatch.setenv("JAXDIFF_HEARTBEAT_TIMEOUT", "42")
    t = Timeouts.from_env(shutdown=7)
    assert (t.init, t.heartbeat, t.shutdown) == (600, 42, 7)
    with pytest.raises(ValueError, match="heartbeat=0"):
        Timeouts.from_env(heartbeat=0)
    seen = {}
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: seen.update(kw))
    assert initialize_distributed("localhost:1", 2, 0, timeouts=t)
    assert seen == dict(initialization_timeout=600, heartbeat_timeout_seconds=42,
                        shutdown_timeout_seconds=7)  # fmt: skip


def test_a_cloud_tpu_vm_starts_the_distributed_runtime_without_variables(monkeypatch):
    from jaxdiff.parallel import distributed

    for var in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    for var in ("JAXDIFF_COORDINATOR", "TPU_SKIP_MDS_QUERY"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append(kw))
    assert not distributed.on_cloud_tpu_vm()  # this CPU host has no TPU chips
    assert not distributed.initialize_distributed() and not calls
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: True)
    assert distributed.initialize_distributed()
    assert calls[0]["heartbeat_timeout_seconds"] == 300  # the timeouts reach JAX

    def no_slice(**kw):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_slice)
    assert not distributed.initialize_distributed()  # one process, with a warning
