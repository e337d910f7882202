"""VAE latents: encode an image folder into shards (resumable), read them back for training."""

import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
from tiny import write_image_folder

from jaxdiff.data import (
    ImageFolderSource,
    LatentSource,
    get_dataset,
    make_iterator,
    write_arrays,
    write_latents,
)
from jaxdiff.data.shards import METADATA_FILE, ArrayRecordSource, read_metadata, shard_name
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.pretrained import encode, registry
from jaxdiff.pretrained import vae as vae_lib
from jaxdiff.pretrained.encode import MARKER_DIR, encode_dataset
from jaxdiff.pretrained.vae_handle import PretrainedVAE

ROOT = Path(__file__).resolve().parents[1]
SIZE = 8  # images; the tiny VAE has 2 levels (downscale 2), so latents are 4x4x4


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A 2-level SD-VAE of width 8 with random weights (fast to compile), and its file."""
    config = dict(vae_lib.PRESETS["sd-vae-ft-mse"], block_out_channels=[8, 8])
    config.update(layers_per_block=1, norm_num_groups=4, sample_shape=[SIZE, SIZE, 3])
    module, _ = vae_lib.build(config)
    params = module.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))["params"]
    params = jax.tree.map(np.asarray, nn.unbox(params))
    file = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    registry.save_converted(file, config, params)
    return PretrainedVAE.from_params(config, params), file


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "images")  # 2 classes x 8


def _encode(tiny_vae, src, dst, **kwargs):
    vae, file = tiny_vae
    kwargs = {"image_size": SIZE, "batch_size": 4, "num_shards": 3, "progress": False, **kwargs}
    return encode_dataset(src, dst, vae=vae, vae_file=file, **kwargs)


def _shard_bytes(folder, num_shards=3):
    return [(Path(folder) / shard_name(i, num_shards)).read_bytes() for i in range(num_shards)]


@pytest.fixture(scope="session")
def encoded(tiny_vae, images, tmp_path_factory):
    """The tiny folder encoded with --flip (shared read-only)."""
    out = tmp_path_factory.mktemp("latents") / "flip"
    _encode(tiny_vae, images, out, flip=True)
    return out


def test_stored_moments_are_the_vaes(tiny_vae, images, encoded):
    vae, file = tiny_vae
    pixels = ImageFolderSource(images, image_size=SIZE).get_batch(np.arange(16))
    raw = ArrayRecordSource(encoded).read_raw(np.arange(16))
    for stored, flipped in (("image", False), ("image_flipped", True)):
        mean, std = vae.encode_moments(pixels["image"][:, :, ::-1] if flipped else pixels["image"])
        std_key = stored.replace("image", "std")
        np.testing.assert_allclose(raw[stored], mean, rtol=1e-5, atol=1e-5 * np.abs(mean).max())
        np.testing.assert_allclose(raw[std_key], std, rtol=1e-5, atol=1e-7)
    assert raw["image"].dtype == np.float32 and raw["std"].shape == (16, 4, 4, 4)
    np.testing.assert_array_equal(raw["label"], pixels["label"])
    meta = read_metadata(encoded)
    latents = meta["latents"]
    assert latents["latent_shape"] == [4, 4, 4] and latents["scale"] == [0.18215]
    assert latents["vae"]["config"]["block_out_channels"] == [8, 8]
    assert latents["vae"]["path"] == str(file) and len(latents["vae"]["sha256"]) == 64
    assert meta["image_size"] == SIZE and meta["num_examples"] == 16
    assert meta["classes"] == ["cats", "dogs"] and meta["source"]["dataset"] == "imagefolder"
    # Read for training: "mean" is the scaled mean; the registry scales with the metadata.
    source = get_dataset("latents", path=str(encoded), latents="mean", latent_flip=False)
    np.testing.assert_allclose(source.get_batch(np.arange(16))["image"], raw["image"] * 0.18215)
    assert source.info.image_shape == (4, 4, 4) and source.info.num_classes == 2


def test_interrupted_encode_resumes_to_identical_shards(tiny_vae, images, tmp_path, monkeypatch):
    _encode(tiny_vae, images, tmp_path / "whole", dtype="bfloat16")
    reads = {"n": 0}
    real = ImageFolderSource.get_batch

    def failing(self, indices):
        reads["n"] += 1
        if reads["n"] > 1:  # one batch per shard (4 rounds up to the 8 devices)
            raise RuntimeError("interrupted")
        return real(self, indices)

    out = tmp_path / "resumed"
    monkeypatch.setattr(ImageFolderSource, "get_batch", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        _encode(tiny_vae, images, out, dtype="bfloat16")
    assert not (out / METADATA_FILE).exists() and not list(out.glob(".*.tmp-*"))
    assert [p.name for p in (out / MARKER_DIR).glob("*.json")] == [shard_name(0, 3) + ".json"]
    monkeypatch.setattr(ImageFolderSource, "get_batch", real)
    summary = _encode(tiny_vae, images, out, dtype="bfloat16")
    assert summary.reused_shards == 1 and summary.num_examples == 16
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "whole")
    assert ArrayRecordSource(out).read_raw([0])["image"].dtype == ml_dtypes.bfloat16
    # Another dtype (or VAE, source slice, flip) invalidates every shard.
    assert _encode(tiny_vae, images, out).reused_shards == 0


def test_encode_to_gs_resumes_in_the_bucket(tiny_vae, images, fake_gcs):
    import fakegcs

    url = f"gs://{fakegcs.BUCKET}/latents"
    _encode(tiny_vae, images, url)
    local = Path(fakegcs.local_path(fake_gcs, url))
    (local / shard_name(2, 3)).unlink()
    assert _encode(tiny_vae, images, url).reused_shards == 2
    assert len(LatentSource(local)) == 16 and not list(Path.cwd().iterdir())


def _moments(n=32, shape=(2, 2, 3), seed=0):
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal((n, *shape)).astype(np.float32)
    std = rng.uniform(0.5, 1.5, (n, *shape)).astype(np.float32)
    return mean, std


def _stream(source, steps, **kwargs):
    kwargs = {"global_batch_size": 8, "seed": 3, "process_index": 0, "process_count": 1, **kwargs}
    it = make_iterator(source, augment=source.augmentation, **kwargs)
    return np.concatenate([next(it)["image"] for _ in range(steps)])


def test_sample_noise_is_keyed_by_seed_and_global_position(tmp_path):
    mean, std = _moments()
    path = write_latents(tmp_path, mean, std, np.arange(32) % 4, scale=(0.5, 2.0, 1.0), shift=0.3)
    source = LatentSource(path, mode="sample")
    stream = _stream(source, 8)  # two epochs of 32
    # Same stream for any batch size or process layout; a resumed iterator continues it.
    np.testing.assert_array_equal(stream, _stream(source, 16, global_batch_size=4))
    halves = [_stream(source, 8, process_index=p, process_count=2) for p in range(2)]
    np.testing.assert_array_equal(
        stream.reshape(8, 2, 4, 2, 2, 3),
        np.stack([h.reshape(8, 4, 2, 2, 3) for h in halves], axis=1),
    )
    it = make_iterator(
        source,
        global_batch_size=8,
        seed=3,
        augment=source.augmentation,
        process_index=0,
        process_count=1,
    )
    it.set_state({"next_index": 5})
    np.testing.assert_array_equal(next(it)["image"], stream[40:48])
    assert not np.allclose(stream, _stream(source, 8, seed=4))
    # Unshuffled, position p holds example p % 32: scale * (mean + std * eps - shift), with
    # eps from the position's key alone (the same for another scaling), new every epoch.
    plain = _stream(source, 8, shuffle=False)
    scale, tiled = np.array([0.5, 2.0, 1.0], np.float32), np.arange(64) % 32
    eps = (plain / scale + 0.3 - mean[tiled]) / std[tiled]
    again = _stream(LatentSource(path, mode="sample", scale=1.0, shift=0.0), 8, shuffle=False)
    np.testing.assert_allclose(eps, (again - mean[tiled]) / std[tiled], atol=1e-4)
    assert np.abs(eps[:32] - eps[32:]).min() > 0  # epoch 2 draws fresh noise
    # Grain workers get a pickled copy of the source and augmentation.
    copy = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(_stream(copy, 8, shuffle=False), plain)


def test_sample_statistics_and_exact_mean_for_zero_std(tmp_path):
    mean, std = _moments(n=16, shape=(8, 8, 4))
    write_latents(tmp_path / "s", mean, np.full_like(std, 0.5), scale=2.0, shift=1.0)
    kwargs = {"global_batch_size": 16, "shuffle": False}
    stream = _stream(LatentSource(tmp_path / "s"), 32, **kwargs)  # 32 epochs
    eps = (stream / 2.0 + 1.0 - np.tile(mean, (32, 1, 1, 1))) / 0.5
    assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1.0) < 0.02, (eps.mean(), eps.std())
    write_latents(tmp_path / "z", mean, np.zeros_like(std), scale=2.0, shift=1.0)
    for mode in ("sample", "mean"):
        got = _stream(LatentSource(tmp_path / "z", mode=mode), 2, **kwargs)
        np.testing.assert_array_equal(got, np.tile((mean - 1.0) * 2.0, (2, 1, 1, 1)))


def test_flips_pick_the_mirrored_moments_for_about_half(tmp_path):
    mean, std = _moments(n=64)
    write_latents(tmp_path, mean, std, mean_flipped=-mean - 10, std_flipped=std)
    got = _stream(LatentSource(tmp_path, mode="mean"), 8, shuffle=False)
    flipped = got < -5
    assert flipped.all(axis=(1, 2, 3)).sum() + (~flipped).all(axis=(1, 2, 3)).sum() == 64
    assert 20 < flipped.all(axis=(1, 2, 3)).sum() < 44
    assert LatentSource(tmp_path, mode="mean", flip=False).augmentation is None


def test_latent_source_errors(tmp_path, encoded):
    mean, std = _moments()
    write_latents(tmp_path / "plain", mean, std)
    with pytest.raises(InvalidArgumentError, match="without --flip.*random_flip=False"):
        LatentSource(tmp_path / "plain", flip=True)
    with pytest.raises(InvalidArgumentError, match="latent scale.*3 numbers.*latent_scale"):
        LatentSource(tmp_path / "plain", scale=(1.0, 2.0))
    with pytest.raises(InvalidArgumentError, match="'samples'.*data.latents"):
        LatentSource(tmp_path / "plain", mode="samples")
    with pytest.raises(InvalidArgumentError, match="holds VAE latents.*data.name=latents"):
        get_dataset("arrayrecord", path=str(encoded))
    with pytest.raises(InvalidArgumentError, match="does not hold VAE latents"):
        LatentSource(write_arrays(tmp_path / "arrays", mean))
    with pytest.raises(InvalidArgumentError, match="needs a path"):
        get_dataset("latents")


def test_encode_argument_errors(tiny_vae, images, tmp_path):
    with pytest.raises(InvalidArgumentError, match="inside --src"):
        _encode(tiny_vae, images, images / "latents")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgumentError, match="is a file"):
        _encode(tiny_vae, images, tmp_path / "file")
    with pytest.raises(InvalidArgumentError, match="--dst.*ftp"):
        _encode(tiny_vae, images, "ftp://host/x")
    write_arrays(tmp_path / "pixels", np.zeros((2, 4, 4, 1), np.uint8), encoding="uint8")
    with pytest.raises(InvalidArgumentError, match="not VAE latents"):
        _encode(tiny_vae, images, tmp_path / "pixels")
    with pytest.raises(InvalidArgumentError, match="square RGB"):
        _encode(
            tiny_vae, tmp_path / "pixels", tmp_path / "out", dataset="arrayrecord", image_size=None
        )
    with pytest.raises(InvalidArgumentError, match="--dtype"):
        _encode(tiny_vae, images, tmp_path / "out", dtype="float16")


def test_cli_missing_vae_is_one_line(images, tmp_path):
    command = [sys.executable, "-m", "jaxdiff.pretrained.encode", f"--src={images}"]
    command += [f"--dst={tmp_path / 'out'}", f"--vae={tmp_path / 'nope.safetensors'}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "nope.safetensors does not exist" in error[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_main_prints_a_summary(tiny_vae, images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(encode, "_load_vae", lambda path, scaling: tiny_vae[0])
    flags = {
        "src": images,
        "dst": tmp_path / "out",
        "vae_file": tiny_vae[1],
        "dataset": "imagefolder",
    }
    flags.update(split="train", image_size=SIZE, batch_size=8, flip=False, dtype="float32")
    flags.update(num_shards=None, threads=2, progress=False, scaling=None)
    encode.main(["encode"], {k: SimpleNamespace(value=v) for k, v in flags.items()})
    assert "wrote latents [4, 4, 4] of 16 images in 8 shards" in capsys.readouterr().out


def test_latents_feed_a_tiny_dit(encoded, tmp_path):
    from jaxdiff.experiment import train_and_evaluate
    from jaxdiff.experiment.builders import build_data
    from train.configs.dit_b2_latents import get_config

    config = get_config()
    config.data.name, config.data.path = "latents", str(encoded)
    config.model.update(depth=1, hidden_size=32, num_heads=2)
    config.train.update(num_steps=3, batch_size=16, log_every=1, checkpoint_every=3)
    config.sample.update(steps=2, grid_size=0)
    source, data, num_classes = build_data(config)
    batch = next(data)
    assert source.info.image_shape == (4, 4, 4) and num_classes == 2
    assert set(batch) == {"image", "label"} and batch["image"].shape == (16, 4, 4, 4)
    state = train_and_evaluate(config, tmp_path / "run")
    losses = [json.loads(x).get("loss") for x in (tmp_path / "run/metrics.jsonl").open()]
    assert int(state.step) == 3 and all(np.isfinite([x for x in losses if x is not None]))
    config.data.augment = "edm"
    with pytest.raises(InvalidArgumentError, match="transforms pixels, not VAE latents"):
        build_data(config)
