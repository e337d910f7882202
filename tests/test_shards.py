"""ArrayRecord shards: write_arrays round trips, prepare (parallel, resumable), errors, CLI."""

import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from test_imagefolder import make_tree

from jaxdiff.data import DataSource, get_dataset, make_iterator, prepare
from jaxdiff.data.imagefolder import CorruptImageError, ImageFolderSource
from jaxdiff.data.prepare import MARKER_DIR, prepare_image_folder
from jaxdiff.data.shard_writer import write_arrays
from jaxdiff.data.shards import (
    METADATA_FILE,
    ArrayRecordSource,
    ShardError,
    read_metadata,
    shard_name,
)
from jaxdiff.errors import InvalidArgumentError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_write_arrays_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((10, 4, 4, 4)).astype(dtype)
    labels = rng.integers(0, 5, 10)
    write_arrays(tmp_path / "ds", latents, labels, num_shards=3, classes=list("abcde"))
    source = ArrayRecordSource(tmp_path / "ds")
    assert len(source) == 10 and source.info.image_shape == (4, 4, 4)
    assert source.info.num_classes == 5 and source.classes == list("abcde")
    order = np.array([9, 0, 4, 3, 3, 7])  # across shards, repeated, unsorted
    batch = source.get_batch(order)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"], latents[order].astype(np.float32))
    np.testing.assert_array_equal(batch["label"], labels[order])
    np.testing.assert_array_equal(source.read_raw([2])["image"][0], latents[2])  # stored dtype
    np.testing.assert_array_equal(source[-1]["image"], latents[9].astype(np.float32))
    assert [s["num_examples"] for s in source.metadata["shards"]] == [3, 3, 4]


def test_uint8_encoding_and_unlabelled(tmp_path):
    pixels = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3) * 4
    write_arrays(tmp_path, pixels, encoding="uint8")
    source = ArrayRecordSource(tmp_path)
    assert source.info.num_classes is None and set(source.get_batch([0])) == {"image"}
    expected = pixels[[1, 0]].astype(np.float32) / np.float32(127.5) - np.float32(1)
    np.testing.assert_array_equal(source.get_batch([1, 0])["image"], expected)
    with pytest.raises(InvalidArgumentError, match="already holds a dataset"):
        write_arrays(tmp_path, pixels, encoding="uint8")
    write_arrays(tmp_path, pixels[:1], encoding="uint8", overwrite=True)
    assert len(ArrayRecordSource(tmp_path)) == 1
    with pytest.raises(InvalidArgumentError, match="needs uint8"):
        write_arrays(tmp_path / "x", pixels.astype(np.float32), encoding="uint8")
    with pytest.raises(InvalidArgumentError, match="label must be"):
        write_arrays(tmp_path / "x", pixels, np.zeros(3, int))


def test_pickled_source_reads_in_a_new_process_state(tmp_path):
    write_arrays(tmp_path, np.arange(12, dtype=np.float32).reshape(6, 2), np.arange(6))
    source = ArrayRecordSource(tmp_path)
    source.get_batch([0, 5])  # opens readers, which must not be pickled
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone.get_batch([5, 1])["image"], [[10, 11], [2, 3]])
    assert get_dataset("arrayrecord", path=str(tmp_path)).info == source.info
    with pytest.raises(ValueError, match="--config.data.path"):
        get_dataset("arrayrecord")


def test_damaged_datasets_name_the_file(tmp_path):
    write_arrays(tmp_path, np.zeros((6, 3), np.float32), num_shards=2)
    shard = tmp_path / shard_name(1, 2)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=f"{shard_name(1, 2)} is truncated"):
        ArrayRecordSource(tmp_path)
    shard.unlink()
    with pytest.raises(ShardError, match=f"{shard_name(1, 2)} is missing"):
        ArrayRecordSource(tmp_path)
    shard.write_bytes(data)
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    meta["shards"][1]["num_examples"] = 4
    meta["num_examples"] = 7
    (tmp_path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=f"{shard_name(1, 2)} holds 3 records but"):
        ArrayRecordSource(tmp_path)
    (tmp_path / METADATA_FILE).unlink()
    with pytest.raises(ShardError, match="not a prepared dataset"):
        ArrayRecordSource(tmp_path)
    with pytest.raises(ShardError, match="local files and gs://"):
        ArrayRecordSource("s3://bucket/data")


@pytest.fixture
def images(tmp_path):
    return make_tree(tmp_path / "images")


def _assert_same_as_folder(dst, folder, image_size):
    source, shards = ImageFolderSource(folder, image_size=image_size), ArrayRecordSource(dst)
    everything = np.arange(len(source))
    expected, got = source.get_batch(everything), shards.get_batch(everything)
    np.testing.assert_array_equal(got["image"], expected["image"])  # same uint8 -> same floats
    np.testing.assert_array_equal(got["label"], expected["label"])
    assert shards.classes == source.classes and shards.info.image_shape == (image_size,) * 2 + (3,)


def test_prepare_round_trip_equals_folder(images, tmp_path):
    summary = prepare_image_folder(
        images, tmp_path / "out", image_size=8, num_shards=3, workers=1, progress=False
    )
    assert summary.num_examples == 8 and summary.num_shards == 3 and summary.reused_shards == 0
    _assert_same_as_folder(tmp_path / "out", images, 8)
    meta = read_metadata(tmp_path / "out")
    assert meta["image_size"] == 8 and meta["skipped"] == [] and meta["num_classes"] == 3
    assert len(get_dataset("arrayrecord", path=str(tmp_path / "out"), image_size=8)) == 8
    with pytest.raises(ValueError, match="prepared at image_size=8.*image_size=16"):
        get_dataset("arrayrecord", path=str(tmp_path / "out"), image_size=16)


def test_prepare_resumes_after_interruption(images, tmp_path):
    out = tmp_path / "out"
    prepare_image_folder(images, out, image_size=8, num_shards=4, workers=1, progress=False)
    # Simulate a crash: one shard lost, another half-written under its temporary name,
    # and no metadata yet.
    (out / shard_name(2, 4)).unlink()
    (out / f".{shard_name(2, 4)}.tmp-deadbeef").write_bytes(b"partial")
    (out / METADATA_FILE).unlink()
    summary = prepare_image_folder(
        images, out, image_size=8, num_shards=4, workers=1, progress=False
    )
    assert summary.reused_shards == 3
    assert not list(out.glob(".*.tmp-*"))
    _assert_same_as_folder(out, images, 8)
    # Changing the crop size invalidates every shard.
    again = prepare_image_folder(images, out, image_size=4, num_shards=4, workers=1, progress=False)
    assert again.reused_shards == 0
    _assert_same_as_folder(out, images, 4)


def test_prepare_failed_task_keeps_finished_shards(images, tmp_path):
    out = tmp_path / "out"
    good = (images / "cat" / "c1.jpeg").read_bytes()
    (images / "cat" / "c1.jpeg").write_bytes(good[:40])  # truncated, in the last shard
    with pytest.raises(CorruptImageError, match="c1.jpeg.*--skip_corrupt"):
        prepare_image_folder(images, out, image_size=8, num_shards=3, workers=1, progress=False)
    assert not (out / METADATA_FILE).exists()
    assert len(list((out / MARKER_DIR).glob("*.json"))) == 2  # shards 0 and 1 finished
    (images / "cat" / "c1.jpeg").write_bytes(good)  # the user replaces the file
    summary = prepare_image_folder(
        images, out, image_size=8, num_shards=3, workers=1, progress=False
    )
    assert summary.reused_shards == 2
    _assert_same_as_folder(out, images, 8)


def test_prepare_skip_corrupt_counts_and_lists(images, tmp_path, capsys):
    (images / "bee" / "broken.png").write_bytes(b"")
    flags = {"src": images, "dst": tmp_path / "out", "image_size": 8, "num_shards": 3}
    flags.update(workers=1, skip_corrupt=True, progress=False)
    prepare.main(["prepare"], {k: SimpleNamespace(value=v) for k, v in flags.items()})
    printed = capsys.readouterr().out
    assert "wrote 8 images in 3 shards" in printed and "skipped 1 unreadable images" in printed
    skipped = read_metadata(tmp_path / "out")["skipped"]
    assert len(skipped) == 1 and skipped[0].endswith("bee/broken.png") and skipped[0] in printed
    (images / "bee" / "broken.png").unlink()
    _assert_same_as_folder(tmp_path / "out", images, 8)


def test_prepare_to_gs(images, fake_gcs):
    import fakegcs

    url = f"gs://{fakegcs.BUCKET}/prepared"
    prepare_image_folder(images, url, image_size=8, num_shards=3, workers=1, progress=False)
    local = Path(fakegcs.local_path(fake_gcs, url))
    (local / shard_name(1, 3)).unlink()  # resuming in the bucket redoes just that shard
    again = prepare_image_folder(images, url, image_size=8, num_shards=3, workers=1, progress=False)
    assert again.reused_shards == 2
    # array_record's own GCS reader would go to the network, so read the fake's files.
    _assert_same_as_folder(local, images, 8)


def test_cli_parallel_corrupt_file_is_one_line_and_resumes(images, tmp_path):
    # The command-line tool never starts JAX, so its pool forks (cheap); the failing
    # worker's error must come back as one "error:" line naming the file.
    (images / "cat" / "zz_bad.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jaxdiff.data.prepare", f"--src={images}", f"--dst={out}"]
    command += ["--image_size=8", "--num_shards=3", "--workers=2", "--noprogress"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "zz_bad.jpg" in error[0] and "--skip_corrupt" in error[0]
    assert "Traceback" not in result.stderr and not (out / METADATA_FILE).exists()
    (images / "cat" / "zz_bad.jpg").unlink()  # fixed: now a rerun with 8 images
    summary = prepare_image_folder(
        images, out, image_size=8, num_shards=3, workers=1, progress=False
    )
    assert summary.reused_shards == 0  # the file list changed, so every slice did
    _assert_same_as_folder(out, images, 8)


def test_pool_avoids_fork_once_jax_runs():
    assert prepare._mp_context().get_start_method() != "fork"  # conftest started JAX


def test_make_iterator_reads_prepared_shards(tmp_path):
    latents = np.random.default_rng(5).standard_normal((12, 2, 2, 4)).astype(np.float32)
    write_arrays(tmp_path, latents, np.arange(12) % 3, num_shards=4)
    source = ArrayRecordSource(tmp_path)
    assert isinstance(source, DataSource)
    it = make_iterator(
        source, global_batch_size=6, seed=0, shuffle=False, process_index=0, process_count=1
    )
    batch = next(it)
    np.testing.assert_array_equal(batch["image"], latents[:6])
    assert batch["label"].tolist() == [0, 1, 2, 0, 1, 2]
