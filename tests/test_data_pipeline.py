import json

import grain
import numpy as np
import pytest

from jaxdiff.data import ArraySource, get_dataset, make_iterator, random_flip_left_right


def _index_source(n):
    """Source whose image is the example's own index, so batches reveal what was read."""
    ids = np.arange(n)
    return ArraySource(np.repeat(ids[:, None], 2, axis=1), ids % 3, name="ids")


class _PlainSource:
    """Bare random-access source: no get_batch, no info (the generic path)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((1,), i, np.float32), "label": np.int32(i % 2)}


def _ids(batch):
    return batch["image"][:, 0].astype(int).tolist()


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_local_batch_shapes_digits():
    source = get_dataset("digits")
    it = make_iterator(source, global_batch_size=32, seed=0, process_index=1, process_count=4)
    batch = next(it)
    assert batch["image"].shape == (8, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_toy_batches_use_image_key():
    it = make_iterator(get_dataset("moons"), global_batch_size=16, seed=0)  # jax defaults
    batch = next(it)
    assert batch["image"].shape == (16, 2) and batch["label"].shape == (16,)


def test_processes_read_disjoint_parts_and_cover_each_epoch_once():
    n, count, local = 100, 2, 10
    per_process = []
    for index in range(count):
        it = make_iterator(
            _index_source(n),
            global_batch_size=local * count,
            seed=7,
            process_index=index,
            process_count=count,
        )
        epoch1 = sum((_ids(b) for b in _take(it, 5)), [])
        epoch2 = sum((_ids(b) for b in _take(it, 5)), [])
        assert len(set(epoch1)) == 50
        assert epoch1 != epoch2  # reshuffled every epoch
        per_process.append(set(epoch1))
    assert not per_process[0] & per_process[1]
    assert per_process[0] | per_process[1] == set(range(n))


@pytest.mark.parametrize("count", [2, 4])
def test_global_batches_do_not_depend_on_process_count(count):
    # Concatenating the processes' local batches in process order gives exactly the batch
    # a single process reads, so multi-host runs equal single-host ones and resume anywhere.
    kwargs = dict(global_batch_size=8, seed=5)
    single = make_iterator(_index_source(37), process_index=0, process_count=1, **kwargs)
    parts = [
        make_iterator(_index_source(37), process_index=p, process_count=count, **kwargs)
        for p in range(count)
    ]
    for _ in range(12):  # crosses several epoch boundaries (37 is not a multiple of 8)
        assert _ids(next(single)) == sum((_ids(next(it)) for it in parts), [])


def test_same_seed_same_batches_other_seed_differs():
    def run(seed):
        it = make_iterator(
            _index_source(64), global_batch_size=8, seed=seed, process_count=1, process_index=0
        )
        return [_ids(b) for b in _take(it, 12)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_no_shuffle_keeps_source_order_across_epochs():
    it = make_iterator(
        _index_source(10),
        global_batch_size=8,
        seed=0,
        shuffle=False,
        process_index=1,
        process_count=2,
    )
    # Global batches are 0-7, then 8 9 0 1 2 3 4 5 (running across the epoch boundary);
    # process 1 of 2 reads the second half of each.
    assert _ids(next(it)) == [4, 5, 6, 7]
    assert _ids(next(it)) == [2, 3, 4, 5]


@pytest.mark.parametrize("make_source", [_index_source, _PlainSource])
def test_state_restore_continues_exact_order(make_source):
    kwargs = dict(global_batch_size=6, seed=11, process_index=0, process_count=2)
    reference = [_ids(b) for b in _take(make_iterator(make_source(40), **kwargs), 12)]
    it = make_iterator(make_source(40), **kwargs)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip
    fresh = make_iterator(make_source(40), **kwargs)
    fresh.set_state(state)
    assert [_ids(b) for b in _take(fresh, 7)] == reference[5:]


def test_orbax_checkpoint_of_iterator(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    kwargs = dict(global_batch_size=4, seed=0, process_index=0, process_count=1)
    it = make_iterator(_index_source(30), **kwargs)
    _take(it, 9)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        expected = [_ids(b) for b in _take(it, 4)]
        fresh = make_iterator(_index_source(30), **kwargs)
        manager.restore(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert [_ids(b) for b in _take(fresh, 4)] == expected


def test_finite_epochs_stop():
    it = make_iterator(
        _index_source(25),
        global_batch_size=10,
        seed=0,
        num_epochs=2,
        process_index=0,
        process_count=1,
    )
    batches = list(it)
    assert len(batches) == 5  # 2 epochs * 25 examples // 10
    ids = sum((_ids(b) for b in batches), [])
    assert sorted(ids) == sorted(list(range(25)) * 2)


def test_plain_source_is_stacked():
    it = make_iterator(
        _PlainSource(9), global_batch_size=4, seed=0, process_index=0, process_count=1
    )
    batch = next(it)
    assert batch["image"].shape == (4, 1) and batch["label"].dtype == np.int32


def test_transforms_are_applied_deterministically_and_restore():
    def scale(batch):
        return {**batch, "image": batch["image"] * 2}

    kwargs = dict(
        global_batch_size=8,
        seed=5,
        process_index=0,
        process_count=1,
        transform=scale,
        random_transform=random_flip_left_right,
    )
    source = get_dataset("digits")
    first = _take(make_iterator(source, **kwargs), 6)
    again = _take(make_iterator(source, **kwargs), 6)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert first[0]["image"].min() == -2.0  # transform ran
    plain = _take(make_iterator(source, **{**kwargs, "random_transform": None}), 6)
    flipped = np.concatenate([f["image"] for f in first]) != np.concatenate(
        [p["image"] for p in plain]
    )
    assert flipped.any()
    it = make_iterator(source, **kwargs)
    _take(it, 3)
    fresh = make_iterator(source, **kwargs)
    fresh.set_state(it.get_state())
    np.testing.assert_array_equal(next(fresh)["image"], first[3]["image"])


def test_random_flip_left_right_mirrors_width():
    image = np.arange(2 * 3 * 4 * 1, dtype=np.float32).reshape(2, 3, 4, 1)
    out = random_flip_left_right({"image": image}, np.random.default_rng(0))["image"]
    for orig, new in zip(image, out, strict=True):
        assert np.array_equal(new, orig) or np.array_equal(new, orig[:, ::-1])


def test_bad_global_batch_size_names_both_numbers():
    with pytest.raises(ValueError, match=r"global_batch_size=10.*process_count=4.*12"):
        make_iterator(
            _index_source(40), global_batch_size=10, seed=0, process_index=0, process_count=4
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(process_index=2, process_count=2), "process_index=2"),
        (dict(seed=-1), "seed"),
        (dict(num_epochs=1, global_batch_size=64), "num_epochs=1"),
    ],
)
def test_other_bad_arguments(kwargs, match):
    base = dict(global_batch_size=4, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match=match):
        make_iterator(_index_source(40), **{**base, **kwargs})


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar11'.*digits.*moons.*tfds:"):
        get_dataset("cifar11")
