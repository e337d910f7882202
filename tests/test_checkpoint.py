import logging
import os
import pathlib

import flax.struct
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxdiff.training.checkpoint import Checkpointer, load_config

AUTO = (jax.sharding.AxisType.Auto,)

# When orbax fails to read one array of a corrupt step, the other pending tensorstore
# reads finish after orbax has closed its asyncio loop, and their callbacks raise
# "Event loop is closed" as unraisable exceptions. Harmless (the fallback still works),
# but pytest would attribute them to whichever test runs next.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning"
)


@flax.struct.dataclass
class _State:
    step: jax.Array
    params: dict
    ema: dict
    opt_state: optax.OptState


def _mesh(n):
    return jax.make_mesh((n,), ("data",), axis_types=AUTO, devices=jax.devices()[:n])


def _make_state(seed=0):
    """A train-state-like pytree sharded over all 8 devices, with non-trivial adam state."""
    sharded = NamedSharding(_mesh(8), PartitionSpec("data"))
    key = jax.random.key(seed)
    params = {
        "w": jax.device_put(jax.random.normal(key, (8, 4)), sharded),
        "b16": jax.random.normal(jax.random.fold_in(key, 1), (3,)).astype(jnp.bfloat16),
        "count": jnp.arange(5, dtype=jnp.int32),
    }
    # One real adam update on the float leaves so count/mu/nu are non-trivial.
    floats = {k: v for k, v in params.items() if k != "count"}
    tx = optax.adam(1e-2)
    _, opt_state = tx.update(floats, tx.init(floats), floats)
    ema = {"0.999": jax.tree.map(lambda x: x * 2, params)}  # dotted key, as TrainState uses
    return _State(step=jnp.int32(7 + seed), params=params, ema=ema, opt_state=opt_state)


def _abstract(state, sharding=None):
    if sharding is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def _assert_identical(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_bit_identical(tmp_path, async_save):
    state = _make_state()
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=async_save)
    assert ckpt.save(7, state)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [7] and ckpt.latest_step() == 7
    abstract = _abstract(state)
    restored, data_state, step = ckpt.restore(abstract)
    ckpt.close()
    assert step == 7 and data_state is None
    assert isinstance(restored, _State)
    _assert_identical(restored, state)
    assert restored.params["b16"].dtype == jnp.bfloat16
    assert int(restored.opt_state[0].count) == 1  # the adam update survived
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True):
        assert got.sharding == want.sharding


def test_keep_n_prunes_oldest(tmp_path):
    state = _make_state()
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            assert ckpt.save(step, state)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]


def test_data_state_and_config_round_trip_with_grain(tmp_path):
    ds = grain.MapDataset.source(np.arange(10)).shuffle(seed=0).repeat().batch(2)
    it = iter(ds.to_iter_dataset())
    for _ in range(3):
        next(it)
    data_state = it.get_state()  # grain 0.2: {"next_index": 6}, plain JSON
    expected_next = next(it)
    config = {"lr": 1e-3, "model": {"channels": [32, 64], "name": "unet"}, "ema": None}

    state = _make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, data_state=data_state, config=config)
        _, restored_data, step = ckpt.restore(_abstract(state))
    assert step == 3 and restored_data == data_state
    resumed = iter(ds.to_iter_dataset())
    resumed.set_state(restored_data)
    np.testing.assert_array_equal(next(resumed), expected_next)
    assert load_config(tmp_path) == config


def test_not_json_serialisable_is_rejected_early(tmp_path):
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(TypeError, match="config must be JSON"):
        ckpt.save(1, _make_state(), config={"shape": np.zeros(2)})
    assert ckpt.all_steps() == []
    ckpt.close()


def test_restore_onto_other_shardings(tmp_path):
    state = _make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        ckpt.wait_until_finished()
        one_device = SingleDeviceSharding(jax.devices()[0])
        restored, _, _ = ckpt.restore(_abstract(state, one_device))
        _assert_identical(restored, state)
        assert all(x.sharding == one_device for x in jax.tree.leaves(restored))

        mesh4 = _mesh(4)
        replicated4 = NamedSharding(mesh4, PartitionSpec())
        abstract = _abstract(state, replicated4)
        split = NamedSharding(mesh4, PartitionSpec("data"))
        w = state.params["w"]
        abstract.params["w"] = jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=split)
        restored, _, _ = ckpt.restore(abstract)
        _assert_identical(restored, state)
        assert restored.params["w"].sharding == split
        assert len(restored.params["w"].addressable_shards) == 4
        assert restored.params["b16"].sharding == replicated4


def test_abstract_state_without_sharding_is_rejected(tmp_path):
    state = _make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        abstract = jax.eval_shape(lambda: state)
        with pytest.raises(ValueError, match="has no sharding"):
            ckpt.restore(abstract)


def _corrupt_state_files(step_dir: pathlib.Path):
    """Truncates every array data file of a finalized step."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[:5])


def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
    old, new = _make_state(0), _make_state(1)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, old, data_state={"next_index": 2})
        ckpt.save(2, new, data_state={"next_index": 4})
    _corrupt_state_files(tmp_path / "2")
    # An interrupted save leaves only orbax's tmp directory: it is never a step.
    (tmp_path / "3.orbax-checkpoint-tmp-1700000000").mkdir()

    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() == [1, 2]
    with caplog.at_level(logging.WARNING, logger="jaxdiff.training.checkpoint"):
        restored, data_state, step = ckpt.restore(_abstract(old))
    assert step == 1 and data_state == {"next_index": 2}
    _assert_identical(restored, old)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(tmp_path / "2") in m and "could not restore" in m for m in warnings)
    assert (tmp_path / "2" / "state").is_dir()  # kept for inspection

    # Reaching step 2 again must not overwrite the unreadable directory, nor skip the save
    # silently: it is an error naming the entry (a writer moves it aside first, below).
    before = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*"))
    with pytest.raises(FileExistsError, match=str(tmp_path / "2")):
        ckpt.save(2, old)
    ckpt.wait_until_finished()
    after = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*"))
    assert before == after
    ckpt.close()


def test_corrupt_json_item_falls_back(tmp_path):
    state = _make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, data_state={"i": 1}, config={"c": 1})
        ckpt.save(2, state, data_state={"i": 2}, config={"c": 2})
    (tmp_path / "2" / "data" / "metadata").write_text("{truncated")
    (tmp_path / "2" / "config" / "metadata").write_text("{truncated")
    with Checkpointer(tmp_path) as ckpt:
        _, data_state, step = ckpt.restore(_abstract(state))
    assert (step, data_state) == (1, {"i": 1})
    assert load_config(tmp_path) == {"c": 1}


def test_all_unreadable_raises_naming_directory(tmp_path):
    state = _make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
    _corrupt_state_files(tmp_path / "1")
    with Checkpointer(tmp_path) as ckpt, pytest.raises(RuntimeError, match="none of the 1"):
        ckpt.restore(_abstract(state))
    assert (tmp_path / "1").is_dir()


def test_no_checkpoint_raises_file_not_found(tmp_path):
    directory = tmp_path / "never_trained"
    ckpt = Checkpointer(directory)
    with pytest.raises(FileNotFoundError, match="Train first") as info:
        ckpt.restore(_abstract(_make_state()))
    assert str(directory) in str(info.value)
    assert ckpt.latest_step() is None
    ckpt.close()
    assert not directory.exists()  # reading never creates the directory
    assert load_config(directory) is None


def test_missing_explicit_step(tmp_path):
    state = _make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, state)
        with pytest.raises(FileNotFoundError, match=r"available steps: \[5\]"):
            ckpt.restore(_abstract(state), step=4)
        _, _, step = ckpt.restore(_abstract(state), step=5)
    assert step == 5


def test_relative_directory_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = Checkpointer("rel")
    assert ckpt.directory == os.path.join(str(tmp_path), "rel")
    ckpt.close()


def _garble_same_size(path: pathlib.Path, at: int = 0, length: int = 4096):
    """Flips bytes in place: same size, so only a checksum can notice."""
    data = bytearray(path.read_bytes())
    assert data, path
    start = min(at, len(data) - 1)
    for i in range(start, min(start + length, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _step_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and "checksums" not in p.name)


def test_each_file_kind_garbled_in_place_falls_back_with_a_warning(tmp_path, caplog):
    # One save of two steps; then, for every kind of file in the newest step (array data,
    # ocdbt manifest, sharding and JSON metadata, orbax's markers), a same-size garbling
    # must make restore fall back to step 1 and name the garbled file.
    old, new = _make_state(0), _make_state(1)
    with Checkpointer(tmp_path / "src") as ckpt:
        ckpt.save(1, old, data_state={"i": 1})
        ckpt.save(2, new, data_state={"i": 2})
    kinds = {}
    for p in _step_files(tmp_path / "src" / "2"):
        kind = "array data" if p.parent.name == "d" else p.name
        kinds.setdefault(kind, p.relative_to(tmp_path / "src"))
    assert "array data" in kinds and len(kinds) >= 5, kinds
    for kind, rel in kinds.items():
        work = tmp_path / kind.replace(" ", "_")
        import shutil

        shutil.copytree(tmp_path / "src", work)
        _garble_same_size(work / rel)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="jaxdiff.training.checkpoint"):
            with Checkpointer(work) as ckpt:
                restored, data_state, step = ckpt.restore(_abstract(old))
                assert ckpt.last_restore.verified and ckpt.last_restore.skipped == (2,)
        assert step == 1 and data_state == {"i": 1}, kind
        _assert_identical(restored, old)
        assert any(str(work / rel) in r.getMessage() for r in caplog.records), kind


def test_all_steps_corrupt_is_one_clear_error_and_nothing_moves(tmp_path):
    state = _make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
    for step in (1, 2):
        data = [p for p in _step_files(tmp_path / str(step)) if p.parent.name == "d"]
        _garble_same_size(data[0])
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with Checkpointer(tmp_path, quarantine=True) as ckpt:
        expected = r"(?s)none of the 2 checkpoints.*nothing there was changed.*SHA-256"
        with pytest.raises(RuntimeError, match=expected):
            ckpt.restore(_abstract(state))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_a_writer_moves_corrupt_steps_aside_so_they_hold_no_kept_slot(tmp_path):
    state = _make_state()
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
    data = [p for p in _step_files(tmp_path / "2") if p.parent.name == "d"]
    _garble_same_size(data[0])
    with Checkpointer(tmp_path, max_to_keep=2, quarantine=True) as ckpt:
        _, _, step = ckpt.restore(_abstract(state))
        assert step == 1 and ckpt.all_steps() == [1]
        moved = list((tmp_path / "corrupt").iterdir())
        assert len(moved) == 1 and moved[0].name.startswith("2-")
        ckpt.save(2, state)  # the step number is free again
        ckpt.save(3, state)
    assert Checkpointer(tmp_path).all_steps() == [2, 3]


def test_non_finite_arrays_and_missing_manifest(tmp_path, caplog):
    # A step written without a manifest (older version, or killed right after saving)
    # restores as unverified; one whose arrays are NaN is skipped like a corrupt one.
    good, bad = _make_state(0), jax.tree.map(lambda a: a * jnp.nan, _make_state(1))
    with Checkpointer(tmp_path, verify=False) as ckpt:
        ckpt.save(1, good)
        ckpt.save(2, bad)
    assert not list(tmp_path.rglob("jaxdiff_checksums.json"))
    with caplog.at_level(logging.WARNING, logger="jaxdiff.training.checkpoint"):
        with Checkpointer(tmp_path) as ckpt:
            restored, _, step = ckpt.restore(_abstract(good))
            info = ckpt.last_restore
    assert step == 1 and not info.verified and "NOT verified" in info.describe()
    _assert_identical(restored, good)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "NaN or inf" in messages and "no checksum manifest" in messages


def test_a_numbered_entry_that_would_block_a_save_is_named(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _make_state())
        (tmp_path / "99999").mkdir()  # e.g. a stray copy of another run's step
        with pytest.raises(FileExistsError, match="99999.*would block saving steps after 1"):
            ckpt.check_can_save(1)
        with pytest.raises(FileExistsError, match="99999"):
            ckpt.save(2, _make_state())
