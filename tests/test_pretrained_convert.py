"""The convert command and converted files as runs: sample, guide and fail clearly.

The source checkpoints are the upstream goldens (``tests/goldens``): their state dicts
under PyTorch key names, exactly what a published checkpoint holds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment import (
    build_guidance,
    generate_fn,
    generate_samples,
    latent_scaling,
    load_run,
    resolve_sampler,
    run_vae,
)
from jaxdiff.experiment.latents import decoded_generate
from jaxdiff.parallel import make_sharded_generate
from jaxdiff.pretrained.convert import convert
from jaxdiff.pretrained.registry import load_pretrained
from jaxdiff.pretrained.weights_io import WeightsError

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "tests" / "goldens"


def golden_state_dict(name: str, folder: Path) -> tuple[Path, dict, dict]:
    """Writes the golden's PyTorch state dict as a checkpoint file; returns it and the rest."""
    with np.load(GOLDENS / f"{name}.npz") as z:
        data = {k: z[k] for k in z.files}
    src = folder / f"{name}.npz"
    prefix = "state/" if any(k.startswith("state/") for k in data) else "sd/"  # VAE: state/
    np.savez(src, **{k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)})
    return src, json.loads(str(np.ravel(data["config"])[0])), data


@pytest.fixture(scope="session")
def dit_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit")
    src, up, data = golden_state_dict("dit_p2_sigma", folder)
    dst = folder / "dit-tiny.safetensors"
    # A width of 32 is no published DiT size, so the head count is given.
    out = convert(str(src), str(dst), overrides={"num_heads": up["num_heads"]})
    return dst, out, data


@pytest.fixture(scope="session")
def vae_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    src, _, _ = golden_state_dict("vae_tiny", folder)
    dst = folder / "vae-tiny.safetensors"
    convert(str(src), str(dst), overrides={"norm_num_groups": 4})  # tiny: 4 groups
    return dst


def test_converted_file_reproduces_the_upstream_network(dit_file):
    dst, out, data = dit_file
    assert out.config["arch"] == "dit" and out.num_params > 0
    pre = load_pretrained(dst)
    x = jnp.asarray(data["x"].transpose(0, 2, 3, 1))
    eps = pre.model.apply({"params": pre.params}, x, jnp.asarray(data["t"]), data["y"])
    ref = data["out"][:, :4].transpose(0, 2, 3, 1)  # the epsilon half of the 2C outputs
    assert np.abs(np.asarray(eps) - ref).max() <= 1e-4 * np.abs(ref).max()
    assert pre.metadata["jaxdiff.source_sha256"] == out.source_sha256


def test_converted_file_samples_with_any_guidance(dit_file):
    dst, _, _ = dit_file
    run = load_run(str(dst))
    assert run.which == "pretrained" and run.sample_shape == (8, 8, 4)
    labels = np.array([1, 2], np.int32)
    for guidance in ("cfg:4.0", f"autoguidance:2.0,guide={dst}"):  # apg: the CLI test
        spec = resolve_sampler(
            run.config.sample, num_classes=run.num_classes, steps=2, guidance=guidance
        )
        samples, nfe = generate_samples(run, spec, num=2, labels=labels, seed=0, batch_size=2)
        assert samples.shape == (2, 8, 8, 4) and np.isfinite(samples).all(), guidance
        assert nfe == 6  # Heun, 2 steps: 3 evaluations, each guided with 2
    assert build_guidance(f"autoguidance:2.0,guide={dst}") is not None


def test_vae_decoding_fuses_into_the_sampler(dit_file, vae_file):
    run = load_run(str(dit_file[0]))
    assert latent_scaling(run).scale == 0.18215
    vae = run_vae(run, str(vae_file))
    spec = resolve_sampler(run.config.sample, num_classes=run.num_classes, steps=1)
    generate, params, shardings = decoded_generate(generate_fn(run, spec), run, vae)

    def draw(g, p, s):
        return make_sharded_generate(
            g, mesh=run.mesh, num=3, labels=np.arange(3), batch_size=3, param_shardings=s
        )(p, 0).samples

    images = draw(generate, params, shardings)
    latents = draw(generate_fn(run, spec), run.params, run.param_shardings)
    assert images.shape == (3, 16, 16, 3) and np.abs(images).max() <= 1.0
    np.testing.assert_allclose(images, vae.decode(latents), atol=1e-5)


def test_a_pixel_model_refuses_a_vae(vae_file, trained_run):
    with pytest.raises(InvalidArgumentError, match="samples pixels, not latents"):
        run_vae(load_run(trained_run), str(vae_file))


def test_sample_command_takes_a_converted_file(dit_file, vae_file, tmp_path):
    dst, _, _ = dit_file
    out = tmp_path / "grid.png"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = ["--workdir", str(dst), "--num=4", "--steps=2", "--guidance=apg:2.0", f"--out={out}"]
    args.append(f"--vae={vae_file}")
    proc = subprocess.run(
        [sys.executable, "-m", "sample", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    assert "sampler: solver heun, 2 steps (Karras sigmas 157 -> 0.0101" in proc.stdout
    written = np.load(tmp_path / "grid.npz")
    assert written["samples"].shape == (4, 16, 16, 3) and written["latents"].shape == (4, 8, 8, 4)


def test_expected_hash_is_checked(tmp_path):
    src, _, _ = golden_state_dict("dit_p4_eps", tmp_path)
    with pytest.raises(WeightsError, match="SHA-256 .* differs from the expected 00ff"):
        convert(str(src), str(tmp_path / "x.safetensors"), sha256="00ff")


def test_bad_destination_and_source_are_named(tmp_path):
    src, _, _ = golden_state_dict("dit_p4_eps", tmp_path)
    with pytest.raises(WeightsError, match="must end in .safetensors"):
        convert(str(src), str(tmp_path / "x.bin"))
    with pytest.raises(WeightsError, match="does not exist"):
        convert(str(tmp_path / "missing.pt"), str(tmp_path / "x.safetensors"))
    odd = tmp_path / "weights.h5"
    odd.write_bytes(b"\x89HDF")
    with pytest.raises(WeightsError, match="unknown checkpoint type"):
        convert(str(odd), str(tmp_path / "x.safetensors"))


def test_a_pickle_given_to_the_loader_says_convert(tmp_path):
    pkl = GOLDENS / "torch_state_zip.pt"
    with pytest.raises(WeightsError, match="PyTorch pickle.*jaxdiff.pretrained.convert"):
        load_pretrained(pkl)


def test_converted_file_with_a_flipped_byte_is_refused(dit_file, tmp_path):
    dst, _, _ = dit_file
    blob = bytearray(dst.read_bytes())
    blob[-3] ^= 0x10
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match="bad.safetensors: checksum mismatch"):
        load_pretrained(bad)
