import json
import multiprocessing
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest

from jaxdiff.data import ArraySource, get_dataset, make_iterator
from jaxdiff.data.pipeline import augment_keys, random_flip


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
    import orbax.checkpoint as ocp

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


def _stamp_keys(batch, keys):
    """Test augmentation whose effect is the keys themselves (top level: it must pickle)."""
    return {**batch, "key": keys}


def _asymmetric_source(n):
    """Images whose columns differ (so a flip is visible) and that identify the example."""
    image = np.arange(n * 2 * 3 * 1, dtype=np.float32).reshape(n, 2, 3, 1)
    return ArraySource(image, np.arange(n) % 4)


def _concat(parts, key):
    return np.concatenate([p[key] for p in parts])


def test_two_processes_equal_one_for_order_and_augmentation():
    kwargs = dict(global_batch_size=8, seed=9, augment=random_flip)
    single = make_iterator(_asymmetric_source(13), process_index=0, process_count=1, **kwargs)
    parts = [
        make_iterator(_asymmetric_source(13), process_index=p, process_count=2, **kwargs)
        for p in range(2)
    ]
    flips = 0
    for _ in range(5):  # crosses epoch boundaries (13 is not a multiple of 8)
        whole, halves = next(single), [next(it) for it in parts]
        np.testing.assert_array_equal(whole["image"], _concat(halves, "image"))
        np.testing.assert_array_equal(whole["label"], _concat(halves, "label"))
        flips += int((whole["image"][:, 0, 0, 0] % 3 == 2).sum())  # column 2 came first
    assert 5 <= flips <= 35  # about half of the 40 images, so the flip really ran


def test_augment_keys_follow_the_global_position():
    kwargs = dict(global_batch_size=6, seed=4, augment=_stamp_keys, process_count=3)
    for p in range(3):
        it = make_iterator(_index_source(10), process_index=p, **kwargs)
        for step in range(3):
            expected = augment_keys(4, step * 6 + 2 * p + np.arange(2))
            np.testing.assert_array_equal(next(it)["key"], expected)
    keys = augment_keys(4, np.arange(1000))
    assert keys.dtype == np.uint64 and len(np.unique(keys)) == 1000
    assert not np.array_equal(augment_keys(5, np.arange(4)), keys[:4])  # seed matters
    assert 400 < int((keys >> np.uint64(63)).sum()) < 600  # top bit is a fair coin


def test_transform_and_augment_are_deterministic_and_restore():
    def scale(batch):
        return {**batch, "image": batch["image"] * 2}

    kwargs = dict(
        global_batch_size=8,
        seed=5,
        process_index=0,
        process_count=1,
        transform=scale,
        augment=random_flip,
    )
    source = get_dataset("digits")
    first = _take(make_iterator(source, **kwargs), 6)
    again = _take(make_iterator(source, **kwargs), 6)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert first[0]["image"].min() == -2.0  # transform ran
    plain = _take(make_iterator(source, **{**kwargs, "augment": None}), 6)
    assert (_concat(first, "image") != _concat(plain, "image")).any()
    it = make_iterator(source, **kwargs)
    _take(it, 3)
    fresh = make_iterator(source, **kwargs)
    fresh.set_state(it.get_state())
    np.testing.assert_array_equal(next(fresh)["image"], first[3]["image"])


def test_workers_match_in_process_and_resume_across_worker_counts():
    # One worker pipeline for the whole test: spawning workers costs seconds each.
    source = _asymmetric_source(21)
    kwargs = dict(global_batch_size=4, seed=2, process_index=0, process_count=1)
    kwargs["augment"] = _stamp_keys
    reference = _take(make_iterator(source, **kwargs), 9)
    before = set(multiprocessing.active_children())
    it = make_iterator(source, workers=2, prefetch=2, **kwargs)
    it.set_state({"next_index": 3})  # resumes a workers=0 run with 2 workers
    for expected in reference[3:8]:
        got = next(it)
        for key in ("image", "label", "key"):
            np.testing.assert_array_equal(got[key], expected[key])
    assert len(set(multiprocessing.active_children()) - before) == 2
    state = json.loads(json.dumps(it.get_state()))
    assert state == {"next_index": 8}
    it.close()
    assert not set(multiprocessing.active_children()) - before  # close stops the workers
    with pytest.raises(ValueError, match="closed"):
        next(it)
    back = make_iterator(source, **kwargs)  # ... and a 2-worker run resumes in-process
    back.set_state(state)
    np.testing.assert_array_equal(next(back)["key"], reference[8]["key"])


@pytest.mark.slow
def test_interpreter_exits_with_workers_left_open():
    script = textwrap.dedent(
        """
        import numpy as np
        from jaxdiff.data import ArraySource, make_iterator

        if __name__ == "__main__":
            it = make_iterator(ArraySource(np.zeros((8, 2))), global_batch_size=2, seed=0,
                               process_index=0, process_count=1, workers=2)
            next(it)
            print("done", flush=True)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "done" in run.stdout, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


def test_random_flip_mirrors_width():
    image = np.arange(2 * 3 * 4 * 1, dtype=np.float32).reshape(2, 3, 4, 1)
    keys = np.array([0, 2**63], np.uint64)
    out = random_flip({"image": image}, keys)["image"]
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
        (dict(workers=-1), "workers=-1"),
        (dict(prefetch=1.5), "prefetch=1.5"),
        (dict(threads=-2), "threads=-2"),
        (dict(augment="flip"), "augment='flip'"),
    ],
)
def test_other_bad_arguments(kwargs, match):
    base = dict(global_batch_size=4, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match=match):
        make_iterator(_index_source(40), **{**base, **kwargs})


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar11'.*digits.*moons.*tfds:"):
        get_dataset("cifar11")


@pytest.mark.parametrize("state", [{"next_index": -1}, {"last_seen": 3}, {"next_index": "3"}])
def test_bad_state_names_the_state(state):
    it = make_iterator(
        _index_source(10), global_batch_size=2, seed=0, process_index=0, process_count=1
    )
    with pytest.raises(ValueError, match="next_index"):
        it.set_state(state)


def test_image_folder_two_processes_equal_one(tmp_path):
    from PIL import Image

    from jaxdiff.data.imagefolder import ImageFolderSource

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        for i in range(5):  # 10 JPEG/PNG images of odd sizes, cropped to 8x8
            pixels = rng.integers(0, 256, (9 + i, 12, 3), dtype=np.uint8)
            name = f"{i}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(pixels).save(tmp_path / f"class{c}" / name)
    kwargs = dict(global_batch_size=4, seed=1, augment=random_flip)
    source = ImageFolderSource(tmp_path, image_size=8)
    single = make_iterator(source, process_index=0, process_count=1, **kwargs)
    parts = [make_iterator(source, process_index=p, process_count=2, **kwargs) for p in range(2)]
    for _ in range(4):  # 16 images: crosses the epoch boundary at 10
        whole, halves = next(single), [next(it) for it in parts]
        assert whole["image"].shape == (4, 8, 8, 3)
        np.testing.assert_array_equal(whole["image"], _concat(halves, "image"))
        np.testing.assert_array_equal(whole["label"], _concat(halves, "label"))
