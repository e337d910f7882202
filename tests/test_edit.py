"""``python -m sample --edit``: reading inputs, target labels, and editing a trained run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.edit import edit_grid, parse_edit_to, read_edit_input
from jaxdiff.utils import storage

ROOT = Path(__file__).resolve().parents[1]


def test_edit_to_forms_and_bad_specs_name_the_fix():
    labels = np.array([0, 4, 9], np.int32)
    np.testing.assert_array_equal(parse_edit_to("+1", labels, 10), [1, 5, 0])
    np.testing.assert_array_equal(parse_edit_to("-1", labels, 10), [9, 3, 8])
    np.testing.assert_array_equal(parse_edit_to("3", labels, 10), [3, 3, 3])
    np.testing.assert_array_equal(parse_edit_to("2,7,1", labels, 10), [2, 7, 1])
    for bad, fix in (("1,2", "one per image"), ("x", "a shift"), ("10", "classes are 0..9")):
        with pytest.raises(InvalidArgumentError, match=fix):
            parse_edit_to(bad, labels, 10)


def test_edit_inputs_need_labels_and_grid_interleaves_rows(tmp_path):
    images = np.zeros((3, 8, 8, 1), np.float32)
    storage.save_npz(tmp_path / "nolabels.npz", samples=images)
    with pytest.raises(InvalidArgumentError, match="add labels=\\[N\\] to the .npz"):
        read_edit_input(str(tmp_path / "nolabels.npz"), (8, 8, 1))
    storage.save_npz(tmp_path / "wrong.npz", images=images)
    with pytest.raises(InvalidArgumentError, match="--edit=.*has no 'samples'"):
        read_edit_input(str(tmp_path / "wrong.npz"), (8, 8, 1))
    storage.save_npz(tmp_path / "two.npz", samples=images, labels=np.array([1, 2]))
    with pytest.raises(InvalidArgumentError, match="one label per image"):
        read_edit_input(str(tmp_path / "two.npz"), (8, 8, 1))
    src = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1)
    tiles, cols = edit_grid(src, -src, cols=3)
    assert cols == 3
    # Row 1: sources 0..2, row 2: their edits, row 3: sources 3, 4 and a blank, row 4 edits.
    np.testing.assert_array_equal(tiles[:, 0, 0, 0], [0, 1, 2, 0, -1, -2, 3, 4, 1, -3, -4, 1])


def test_trained_run_edits_exactly_on_its_source_branch_and_from_the_command_line(
    trained_run, tmp_path
):
    from jaxdiff.data.digits import load_digits
    from jaxdiff.experiment import load_run, resolve_sampler
    from jaxdiff.experiment.edit import edit_images
    from jaxdiff.parallel import make_mesh

    run = load_run(trained_run, mesh=make_mesh())
    images, labels = load_digits("test")
    images, labels = images[:6], labels[:6]
    spec = resolve_sampler(run.config.sample, num_classes=10, solver="heun", steps=2)
    out = edit_images(run, images, labels, labels, spec, mode="both", batch_size=8)
    # Target == source label with the correction on both branches is reconstruction.
    np.testing.assert_allclose(out["source"], images, atol=1e-5)
    np.testing.assert_array_equal(out["edited"], out["source"])
    assert out["edited"].shape == images.shape and out["nfe"] == 4 + 2 * 2 * 4 + 4
    # With target == source label the target's own attention is the source's: injecting
    # it changes nothing (up to the explicit softmax's rounding).
    injected = edit_images(run, images, labels, labels, spec, mode="both", inject=1.0)
    np.testing.assert_array_equal(injected["edited"], injected["source"])
    np.testing.assert_allclose(injected["edited"], out["edited"], atol=1e-5)
    # A real edit at strength 0.5 of 4 steps (k = 2), one injected step of 2: the source
    # branch stays exact; NFE: Heun 2k inverting + 2 x CFG 2 x 2k + 2 x 4 regenerating.
    spec4 = resolve_sampler(run.config.sample, num_classes=10, solver="heun", steps=4)
    shallow = edit_images(
        run, images, labels, (labels + 1) % 10, spec4, strength=0.5, inject=0.5, batch_size=8
    )
    np.testing.assert_allclose(shallow["source"], images, atol=1e-5)
    assert shallow["nfe"] == 4 + 2 * 2 * 4 + 8
    for bad, fix in (
        ({"strength": 0.0}, "strength in \\(0, 1\\]"),
        ({"inject": 2.0}, "in \\[0, 1\\]"),
    ):
        with pytest.raises(InvalidArgumentError, match=fix):
            edit_images(run, images, labels, labels, spec, **bad)
    with pytest.raises(InvalidArgumentError, match="deterministic solver"):
        edit_images(run, images, labels, labels, resolve_sampler(
            run.config.sample, num_classes=10, solver="euler_ancestral", steps=2))  # fmt: skip
    # The command: grid, npz and the reconstruction error line.
    storage.save_npz(tmp_path / "x.npz", samples=images, labels=labels)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    png = tmp_path / "edit.png"
    cmd = [sys.executable, "-m", "sample", f"--workdir={trained_run}", f"--out={png}"]
    cmd += [f"--edit={tmp_path / 'x.npz'}", "--edit_to=+1", "--steps=2", "--solver=euler"]
    cmd += ["--edit_strength=0.5", "--edit_inject=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(next(t for t in proc.stdout.splitlines() if t.startswith("{")))
    assert line["num"] == 6 and line["source_branch_rmse"] < 1e-5
    assert line["strength"] == 0.5 and line["inject"] == 1.0 and line["nfe"] == 1 + 4 + 2
    assert np.isfinite(line["reconstruction_rmse"])
    written = storage.load_npz(tmp_path / "edit.npz")
    np.testing.assert_array_equal(written["labels"], (labels + 1) % 10)
    np.testing.assert_array_equal(written["sources"], images)
    assert written["samples"].shape == images.shape and png.exists()
    # A missing input is refused before the run loads.
    bad = subprocess.run(
        cmd[:4] + ["--edit=/nonexistent.npz"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--edit=/nonexistent.npz does not exist" in bad.stderr


def test_unet_inject_variant_takes_the_donors_attention_probabilities():
    import jax
    import jax.numpy as jnp

    from jaxdiff.models import UNet

    model = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_classes=3)
    x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 1), jnp.float32)
    t, c = jnp.ones((2,)), jnp.array([0, 2])
    params = model.init(jax.random.key(0), x, t, c)["params"]
    # Zero-initialised output layers would hide the attention: perturb every weight.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    params = jax.tree.unflatten(tree, noisy)

    @jax.jit
    def run(x, c, donor):
        plain = model.apply({"params": params}, x, t, c)
        return plain, model.apply({"params": params}, x, t, c, variant="inject", attn_donor=donor)

    plain, own = run(x, c, jnp.array([0, 1]))
    np.testing.assert_allclose(own, plain, rtol=1e-5, atol=1e-5)  # own maps: plain attention
    plain, taken = run(x, c, jnp.array([0, 0]))
    np.testing.assert_allclose(taken[0], plain[0], rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(taken[1] - plain[1]))) > 1e-2  # row 1 took row 0's maps
    twin = jnp.concatenate([x[:1], x[:1]])
    plain, taken = run(twin, c[:1].repeat(2), jnp.array([0, 0]))
    np.testing.assert_allclose(taken, plain, rtol=1e-5, atol=1e-5)  # equal maps: no change
    for kwargs in ({"variant": "inject"}, {"attn_donor": jnp.array([0, 0])}):
        with pytest.raises(ValueError, match="exactly with variant='inject'"):
            model.apply({"params": params}, x, t, c, **kwargs)
