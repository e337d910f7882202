"""DiT/SiT weight conversion against goldens of the official PyTorch code (no torch here).

The goldens (``tests/goldens/{dit,sit}_*.npz``, written by ``make_dit_golden.py``) hold a
tiny upstream network with random weights, its state dict, fixed inputs and its outputs.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import flow_sigmas
from jaxdiff.generate import class_conditions, model_denoiser
from jaxdiff.guidance import cfg
from jaxdiff.pretrained import dit
from jaxdiff.pretrained.weights_io import StateDict, WeightsError
from jaxdiff.samplers import euler, sample

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens")
NAMES = ["dit_p2_sigma", "dit_p4_eps", "sit_p2_sigma"]


def load_golden(name):
    with np.load(os.path.join(GOLDENS, f"{name}.npz")) as z:
        data = {k: z[k] for k in z.files}
    sd = {k[3:]: v for k, v in data.items() if k.startswith("sd/")}
    return json.loads(str(data["config"][0])), sd, data


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def rel_err(a, ref):
    return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


def convert(name):
    up, sd, data = load_golden(name)
    arch = "sit" if up["model"] == "SiT" else "dit"
    # Width 32 is no named DiT size, so the head count comes as side information.
    config = dit.infer_config(StateDict(sd, name), {"arch": arch, "num_heads": up["num_heads"]})
    params = dit.params_from_torch(StateDict(sd, name), config)
    return up, config, params, data


@pytest.fixture(scope="session", params=NAMES)
def converted(request):
    return convert(request.param)


def test_infer_config_reads_the_upstream_config(converted):
    up, config, _, _ = converted
    size, ch = up["input_size"], up["in_channels"]
    expect = dict(
        arch="sit" if up["model"] == "SiT" else "dit",
        sample_shape=[size, size, ch],
        num_classes=up["num_classes"],
        patch_size=up["patch_size"],
        hidden_size=up["hidden_size"],
        depth=up["depth"],
        num_heads=up["num_heads"],
        mlp_ratio=up["mlp_ratio"],
        frequency_features=256,
        learn_sigma=up["learn_sigma"],
        latent_scale=0.18215,
        vae="stabilityai/sd-vae-ft-ema",
    )
    assert config == expect
    json.dumps(config)  # serialisable


def test_params_match_module_tree(converted):
    _, config, params, _ = converted
    module, _ = dit.build(config)
    shape = (1, *config["sample_shape"])
    abstract = jax.eval_shape(
        module.init, jax.random.key(0), jnp.zeros(shape), jnp.zeros((1,)), jnp.zeros((1,), int)
    )
    want = jax.tree.map(lambda s: (s.shape, s.dtype), nn.unbox(abstract)["params"])
    have = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    assert have == want


def test_forward_matches_upstream_on_all_channels(converted):
    up, config, params, data = converted
    module, _ = dit.build(config)
    full = module.clone(return_all_channels=True)
    x, t, y = nhwc(data["x"]), jnp.asarray(data["t"]), jnp.asarray(data["y"], jnp.int32)
    out = jax.jit(full.apply)({"params": params}, x, t, y)
    ref = np.asarray(data["out"]).transpose(0, 2, 3, 1)
    assert out.shape == ref.shape == (*x.shape[:3], 2 * x.shape[3] if up["learn_sigma"] else 4)
    assert rel_err(out, ref) < 1e-4
    # The default call returns the prediction channels only, shaped like x.
    first = jax.jit(module.apply)({"params": params}, x, t, y)
    np.testing.assert_array_equal(first, out[..., : x.shape[3]])


def test_dit_denoiser_equals_ddpm_pred_xstart():
    # DiT's GaussianDiffusion.p_mean_variance at integer steps i (x is x_t in VP space):
    # pred_xstart = sqrt(1/abar_i) x_t - sqrt(1/abar_i - 1) eps. Through jaxdiff: EDM-space
    # x = x_t / alpha_i at sigma_i, the network sees c_in x = x_t and the label i.
    _, config, params, data = convert("dit_p2_sigma")
    module, form = dit.build(config)
    sigma = form.schedule.sigma(jnp.asarray(data["ddpm_t"], jnp.float32) / 1000.0)
    x_t = nhwc(data["x"])
    x = x_t * jnp.sqrt(1.0 + sigma**2)[:, None, None, None]
    den = model_denoiser(module, form, params)
    d = jax.jit(den)(x, sigma, jnp.asarray(data["y"], jnp.int32))
    assert rel_err(d, np.asarray(data["ddpm_x0"]).transpose(0, 2, 3, 1)) < 1e-4
    np.testing.assert_allclose(
        form.precondition(sigma).c_noise, data["ddpm_t"].astype(np.float32), rtol=1e-5
    )


def test_sit_denoiser_equals_sit_tweedie_estimate():
    # SiT's Linear path x_s = s x0 + (1 - s) n: EDM sigma = (1 - s) / s and x = x_s / s.
    _, config, params, data = convert("sit_p2_sigma")
    module, form = dit.build(config)
    s = jnp.asarray(data["t"], jnp.float32)
    sigma = (1.0 - s) / s
    x = nhwc(data["x"]) / s[:, None, None, None]
    d = jax.jit(model_denoiser(module, form, params))(x, sigma, jnp.asarray(data["y"], jnp.int32))
    assert rel_err(d, np.asarray(data["sit_x0"]).transpose(0, 2, 3, 1)) < 1e-4
    np.testing.assert_allclose(form.precondition(sigma).c_noise, s, rtol=1e-6)


def _state(name="dit_p2_sigma"):
    up, sd, _ = load_golden(name)
    config = dit.infer_config(StateDict(sd), {"num_heads": up["num_heads"]})
    return sd, config


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), r"missing key 'blocks\.1\.mlp\.fc2\.bias'"),
        (
            lambda sd: sd.update({"final_layer.linear.bias": np.zeros(5, np.float32)}),
            r"'final_layer\.linear\.bias' has shape \(5,\)",
        ),
        (
            lambda sd: sd.update({"blocks.0.attn.q_norm.weight": np.ones(8, np.float32)}),
            r"unexpected keys \['blocks\.0\.attn\.q_norm\.weight'\]",
        ),
        (
            lambda sd: sd.update({"pos_embed": sd["pos_embed"][:, ::-1].copy()}),
            r"'pos_embed' differs from the fixed 2-D sin-cos",
        ),
    ],
    ids=["missing", "shape", "extra", "pos_embed"],
)
def test_bad_state_dicts_name_the_key(edit, match):
    sd, config = _state()
    edit(sd)
    with pytest.raises(WeightsError, match=match):
        dit.params_from_torch(StateDict(sd, "tiny.pt"), config)


def test_infer_config_errors_name_the_key():
    sd, _ = _state()
    with pytest.raises(WeightsError, match="width 32.*num_heads"):
        dit.infer_config(StateDict(sd))
    with pytest.raises(WeightsError, match="'final_layer.linear.weight' has 24 rows"):
        dit.infer_config(
            StateDict({**sd, "final_layer.linear.weight": np.zeros((24, 32))}), {"num_heads": 4}
        )
    with pytest.raises(WeightsError, match="'pos_embed' has 15 tokens"):
        dit.infer_config(StateDict({**sd, "pos_embed": np.zeros((1, 15, 32))}), {"num_heads": 4})
    with pytest.raises(WeightsError, match="arch 'vit'"):
        dit.infer_config(StateDict(sd), {"arch": "vit", "num_heads": 4})


def _fake_xl(tokens, arch_extra=None):
    # Zero-stride arrays: XL-sized shapes without XL-sized memory (only shapes are read).
    d, c, p = 1152, 4, 2
    shapes = {
        "x_embedder.proj.weight": (d, c, p, p),
        "pos_embed": (1, tokens, d),
        "t_embedder.mlp.0.weight": (d, 256),
        "y_embedder.embedding_table.weight": (1001, d),
        "final_layer.linear.weight": (p * p * 2 * c, d),
        **{f"blocks.{i}.attn.qkv.weight": (3 * d, d) for i in range(28)},
        "blocks.0.mlp.fc1.weight": (4 * d, d),
    }
    sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    return dit.infer_config(StateDict(sd), arch_extra)


@pytest.mark.parametrize("name", sorted(dit.PRESETS))
def test_presets_are_what_the_published_shapes_infer(name):
    preset = dit.PRESETS[name]
    tokens = (preset["sample_shape"][0] // 2) ** 2
    inferred = _fake_xl(tokens, {"arch": preset["arch"]})
    assert inferred == {k: v for k, v in preset.items() if k != "url"}
    assert preset["url"].startswith("https://")


def test_xl2_param_count_is_the_reference_minus_its_frozen_pos_embed():
    # Counted with the official models.py: DiT-XL/2 at 32x32 latents has 675,129,632
    # parameters, 294,912 of them the frozen 256 x 1152 position embedding.
    module, form = dit.build(dit.PRESETS["DiT-XL/2-256"])
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
    shapes = jax.eval_shape(
        module.init, jax.random.key(0), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
    )
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.unbox(shapes)))
    assert count == 675_129_632 - 294_912
    assert form.noise_label_scale == 1000.0 and module.embedding_scale == 1.0


@pytest.mark.parametrize("name", ["dit_p2_sigma", "sit_p2_sigma"])
def test_converted_model_samples_with_cfg(name):
    _, config, params, _ = convert(name)
    module, form = dit.build(config)
    den = model_denoiser(module, form, params)
    if config["arch"] == "dit":
        table = form.schedule.sigmas()
        sigmas = np.array([table[999], table[600], table[200], 0.0], np.float32)
    else:
        sigmas = flow_sigmas(3)
    cond, uncond = class_conditions(jnp.array([1, 7]), config["num_classes"])
    noise = jax.random.normal(jax.random.key(0), (2, *config["sample_shape"]))
    run = jax.jit(
        lambda n: sample(
            den, n, sigmas, solver=euler(), guidance=cfg(4.0), cond=cond, uncond=uncond
        )
    )
    x, aux = run(noise)
    assert x.shape == noise.shape and bool(jnp.all(jnp.isfinite(x)))
    assert int(aux["nfe"]) == 2 * 3  # cond + uncond per step
