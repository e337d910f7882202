"""Fast paths reachable from config: precision presets, attention choice, donation,
device prefetch, the persistent compilation cache and topology-aware meshes."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tiny import tiny_config

from jaxdiff import parallel
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment import builders
from jaxdiff.experiment.train import build_experiment, build_train_step
from jaxdiff.models import DiT
from jaxdiff.models.attention import cudnn_attention_calls, resolve_attention
from jaxdiff.parallel import batch_sharding, global_batch, make_mesh, prefetch_to_mesh


def _dit_config(**model):
    config = tiny_config(2)
    config.model = ml_collections.ConfigDict(
        dict(
            name="dit",
            patch_size=2,
            hidden_size=32,
            depth=2,
            num_heads=2,
            dtype=None,
            **model,
        )
    )
    config.formulation.name = "edm"
    return config


def _batch(mesh, shape=(8, 8, 4), n=16, seed=0):
    rng = np.random.default_rng(seed)
    host = {
        "image": rng.standard_normal((n, *shape)).astype(np.float32),
        "label": rng.integers(0, 10, n).astype(np.int32),
    }
    return global_batch(host, mesh)


def test_precision_presets_and_dtype_override():
    config = _dit_config()
    assert builders.build_precision(config).name == "default"
    assert builders.compute_dtype(config) == jnp.float32
    config.precision = "bf16"
    assert builders.compute_dtype(config) == jnp.bfloat16
    assert builders.build_model(config, 10).dtype == jnp.bfloat16
    config.model.dtype = "float32"  # an explicit model.dtype beats the preset
    assert builders.build_model(config, 10).dtype == jnp.float32
    config.model.dtype = "bf16"
    with pytest.raises(InvalidArgumentError, match=r"model\.dtype.*'bfloat16'"):
        builders.compute_dtype(config)
    config.model.dtype, config.precision = None, "half"
    with pytest.raises(InvalidArgumentError, match=r"config\.precision.*'bf16'"):
        builders.build_precision(config)
    assert builders.PRECISIONS["fp32"].matmul_precision == "highest"


@pytest.mark.slow  # 72 s: bf16 on the CPU is emulated; the precision presets stay tested here
def test_bf16_step_keeps_float32_state_and_tracks_the_float32_loss():
    """bf16 compute: params, Adam moments and EMA stay float32; losses track float32's."""
    runs, states = {}, {}
    for preset in ("default", "bf16"):
        config = _dit_config()
        config.precision, config.optim.learning_rate = preset, 1e-2
        bundle = build_train_step(config, 10, (8, 8, 4))
        state, metrics = bundle.init_fn(jax.random.key(0)), []
        # The zero-initialised output layer makes step 1 identical; later steps are not.
        for i in range(3):
            state, m = bundle.step(state, _batch(bundle.mesh, seed=i), jax.random.key(1))
            metrics.append((float(m["loss"]), float(m["grad_norm"])))
        runs[preset], states[preset] = np.asarray(metrics), state
    for leaf in jax.tree.leaves(states["bf16"]):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    gap = np.abs(runs["bf16"] - runs["default"]) / runs["default"]
    # Measured: loss and gradient-norm gaps of 2e-5..6e-4 relative over these steps.
    assert gap.max() < 1e-2
    assert gap[1:].min() > 0  # bf16 really ran


def test_the_train_step_donates_its_state():
    bundle = build_train_step(_dit_config(), 10, (8, 8, 4))
    state = bundle.init_fn(jax.random.key(0))
    old = jax.tree.leaves(state.params)[0]
    new_state, _ = bundle.step(state, _batch(bundle.mesh), jax.random.key(1))
    jax.block_until_ready(new_state)
    assert old.is_deleted(), "the old params were not donated to the step"


def test_attention_choice_and_hlo_check():
    assert resolve_attention(None, jnp.bfloat16, 64) == "xla"  # CPU: never cuDNN
    assert resolve_attention("auto", jnp.float32, 64) == "xla"
    assert resolve_attention("cudnn", jnp.float32, 64) == "cudnn"  # forced is passed on
    with pytest.raises(ValueError, match="flash"):
        resolve_attention("flash", jnp.bfloat16, 64)
    hlo = (
        'custom-call(a, b, c), custom_call_target="__cudnn$fmhaSoftmax"\n'
        'custom-call(d), custom_call_target="__cudnn$fmhaSoftmaxBackward"\n'
        'custom-call(e), custom_call_target="__cublas$gemm"'
    )
    assert cudnn_attention_calls(hlo) == 2
    model = DiT(patch_size=2, hidden_size=32, depth=1, num_heads=2, dtype=jnp.bfloat16)
    x = jnp.ones((1, 8, 8, 4))
    params = model.init(jax.random.key(0), x, jnp.zeros((1,)))
    text = jax.jit(model.apply).lower(params, x, jnp.zeros((1,))).compile().as_text()
    assert cudnn_attention_calls(text) == 0


def test_auto_picks_cudnn_on_a_gpu_for_half_precision(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_attention("auto", jnp.bfloat16, 64) == "cudnn"
    assert resolve_attention(None, jnp.float16, 128) == "cudnn"
    assert resolve_attention("auto", jnp.float32, 64) == "xla"  # cuDNN needs bf16/fp16
    assert resolve_attention("auto", jnp.bfloat16, 12) == "xla"  # not a multiple of 8
    assert resolve_attention("auto", jnp.bfloat16, 256) == "xla"  # over 128


class _Counter:
    """A checkpointable host iterator of numbered batches (state = next index)."""

    def __init__(self, n, size=16):
        self.i, self.n, self.size, self.closed = 0, n, size, False

    def __next__(self):
        if self.i >= self.n:
            raise StopIteration
        batch = {"image": np.full((self.size, 2), self.i, np.float32)}
        self.i += 1
        return batch

    def get_state(self):
        return {"next_index": self.i}

    def set_state(self, state):
        self.i = state["next_index"]

    def close(self):
        self.closed = True


def test_prefetch_yields_the_same_batches_in_order_and_checkpoints_exactly():
    mesh = make_mesh()
    host = _Counter(5)
    batches = prefetch_to_mesh(host, mesh, size=2)
    first = next(batches)
    assert first["image"].sharding.is_equivalent_to(batch_sharding(mesh), 2)
    assert float(first["image"][0, 0]) == 0
    assert batches.get_state() == {"next_index": 1}  # two more are in flight
    assert host.i == 3
    assert float(next(batches)["image"][0, 0]) == 1
    batches.set_state({"next_index": 4})  # resume: the in-flight batches are dropped
    assert [float(b["image"][0, 0]) for b in batches] == [4]
    assert batches.get_state() == {"next_index": 5}
    batches.close()
    assert host.closed
    with pytest.raises(ValueError, match="size=0"):
        prefetch_to_mesh(_Counter(1), mesh, size=0)


def test_training_reads_batches_through_the_prefetcher(monkeypatch):
    """Resume correctness with prefetch is covered by the resume tests; here: it is used."""
    calls = []
    real = parallel.prefetch_to_mesh

    def spy(*args, **kwargs):
        calls.append(kwargs.get("size"))
        return real(*args, **kwargs)

    import jaxdiff.experiment.train as train_mod

    monkeypatch.setattr(train_mod, "prefetch_to_mesh", spy)
    seen = []
    monkeypatch.setattr(train_mod, "enable_compile_cache", lambda path: seen.append(path))
    config = tiny_config(1)
    config.compile_cache_dir = "/nonexistent/cache"
    exp = build_experiment(config)
    assert seen == ["/nonexistent/cache"]
    exp.data.close()


def test_compile_cache_writes_entries(tmp_path):
    script = textwrap.dedent(
        f"""
        import jax, jax.numpy as jnp
        from jaxdiff.utils.compile_cache import enable_compile_cache
        assert enable_compile_cache({str(tmp_path)!r})
        assert not enable_compile_cache(None)
        jax.jit(lambda x: jnp.sin(x) * 3).lower(jnp.ones(7)).compile()
        """
    )
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    assert any(tmp_path.iterdir()), "no compiled program was cached"


def test_mesh_uses_the_topology_and_splits_data_over_slices(monkeypatch):
    full = make_mesh(data=2, fsdp=2, tensor=2)
    assert full.axis_names == ("data", "fsdp", "tensor")
    assert sorted(d.id for d in full.devices.flat) == sorted(d.id for d in jax.devices())
    subset = make_mesh(num_devices=4)
    assert list(subset.devices.flat) == jax.devices()[:4]  # a subset keeps device order

    recorded = {}

    def hybrid(ici, dcn, devices):
        recorded.update(ici=tuple(ici), dcn=tuple(dcn))
        return np.asarray(devices).reshape(np.multiply(ici, dcn))

    monkeypatch.setattr(parallel.mesh, "num_slices", lambda devices: 2)
    monkeypatch.setattr(parallel.mesh.mesh_utils, "create_hybrid_device_mesh", hybrid)
    mesh = make_mesh(data=-1, fsdp=2)
    assert recorded == {"ici": (2, 2, 1), "dcn": (2, 1, 1)}
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="multiple of 2"):
        make_mesh(data=1, fsdp=8)


def test_dit_checkpoints_load_in_either_block_layout(tmp_path):
    """A run trained unrolled loads scanned (and back) with the same function."""
    from jaxdiff.experiment import load_run, train_and_evaluate
    from jaxdiff.models import unstack_blocks

    config = _dit_config(scan_blocks=False)
    config.data.name = "digits"
    config.train.num_steps = config.train.checkpoint_every = 1
    train_and_evaluate(config, tmp_path)
    plain = load_run(tmp_path)
    scanned = load_run(tmp_path, scan_blocks=True)
    assert scanned.model.scan_blocks and "blocks" in scanned.params
    back = unstack_blocks(jax.device_get(scanned.params))
    jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(plain.params))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32)
    args = (x, jnp.zeros((2,)), jnp.zeros((2,), jnp.int32))
    out_plain = plain.model.apply({"params": plain.params}, *args)
    out_scan = scanned.model.apply({"params": scanned.params}, *args)
    np.testing.assert_allclose(out_scan, out_plain, rtol=1e-5, atol=1e-6)
    assert not load_run(tmp_path, scan_blocks=False).model.scan_blocks
