"""EDM2 loader: parity with NVlabs/edm2 (goldens from tests/goldens/make_edm2_golden.py)."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import EDM
from jaxdiff.pretrained import edm2
from jaxdiff.pretrained.weights_io import StateDict, WeightsError

GOLDENS = Path(__file__).parent / "goldens"
NAMES = ("edm2_cond", "edm2_uncond")


def load(name):
    z = np.load(GOLDENS / f"{name}.npz")
    config = json.loads(str(z["config"]))
    extra = {"class_name": "Precond", "init_args": [], "init_kwargs": json.loads(str(z["extra"]))}
    tensors = {k[len("state/") :]: z[k] for k in z.files if k.startswith("state/")}
    arrays = {k: z[k] for k in z.files if not k.startswith("state/")}
    return config, extra, tensors, arrays


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="session", params=NAMES)
def golden(request):
    return (request.param, *load(request.param))


def test_parity_with_upstream(golden):
    name, config, _, tensors, z = golden
    model, formulation = edm2.build(config)
    assert formulation == EDM(sigma_data=0.5, p_mean=config["p_mean"], p_std=config["p_std"])
    params = edm2.params_from_torch(StateDict(tensors, name), config)
    apply = jax.jit(model.apply, static_argnames=("return_logvar",))

    def net(x, c_noise, cond):
        return apply({"params": params}, x, c_noise, cond)

    x, sigma = jnp.asarray(z["x"]), jnp.asarray(z["sigma"])
    labels = jnp.asarray(z["labels"]) if "labels" in z else None
    assert rel(formulation.denoise(net, x, sigma, labels), z["denoised"]) < 1e-4
    c = formulation.precondition(sigma)
    raw, logvar = apply({"params": params}, x * c.c_in[:, None, None, None], c.c_noise, labels,
                        return_logvar=True)  # fmt: skip
    assert rel(raw, z["raw"]) < 1e-4
    assert rel(logvar, z["logvar"]) < 1e-4
    if labels is not None:  # EDM2 without labels = jaxdiff's None and null class
        assert rel(formulation.denoise(net, x, sigma, None), z["denoised_nolabel"]) < 1e-4
        null = jnp.full_like(labels, config["num_classes"])
        assert rel(formulation.denoise(net, x, sigma, null), z["denoised_nolabel"]) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_infer_config(name):
    config, extra, tensors, _ = load(name)
    assert edm2.infer_config(StateDict(tensors), extra) == config
    assert edm2.infer_config(StateDict(tensors), extra["init_kwargs"]) == config  # flat kwargs
    # The goldens use 4 channels per head; EDM2's default of 64 gives them no attention.
    with pytest.raises(WeightsError, match="channels_per_head"):
        edm2.infer_config(StateDict(tensors), None)


def test_infer_config_rejects_bad_extra():
    _, extra, tensors, _ = load("edm2_cond")
    kwargs = extra["init_kwargs"]
    cases = [
        ({**kwargs, "use_bias": True}, "use_bias"),
        ({**kwargs, "img_channels": 3}, "img_channels"),
        ({**kwargs, "channel_mult": [1, 3]}, "channel_mult"),
        ({**kwargs, "attn_resolutions": [16]}, "attn_resolutions"),
    ]
    for bad, word in cases:
        with pytest.raises(WeightsError, match=word):
            edm2.infer_config(StateDict(tensors), {"init_kwargs": bad})
    with pytest.raises(WeightsError, match="SongUNet"):
        edm2.infer_config(StateDict(tensors), {"class_name": "SongUNet", "init_kwargs": {}})
    unet_only = {k: v for k, v in tensors.items() if k.startswith("unet.")}
    with pytest.raises(WeightsError, match="logvar_fourier.freqs"):
        edm2.infer_config(StateDict(unet_only), extra)


def test_bad_weights_name_the_key():
    config, _, tensors, _ = load("edm2_cond")
    key = "unet.dec.8x8_block0.conv_res1.weight"
    missing = {k: v for k, v in tensors.items() if k != key}
    with pytest.raises(WeightsError, match=f"missing key '{key}'"):
        edm2.params_from_torch(StateDict(missing, "net.pkl"), config)
    wrong = {**tensors, key: tensors[key][:, :, :1]}
    with pytest.raises(WeightsError, match=rf"key '{key}' has shape \(16, 16, 1, 3\)"):
        edm2.params_from_torch(StateDict(wrong, "net.pkl"), config)
    extra_key = "unet.enc.16x16_block9.emb_gain"
    unexpected = {**tensors, extra_key: np.zeros(())}
    with pytest.raises(WeightsError, match=extra_key):
        edm2.params_from_torch(StateDict(unexpected, "net.pkl"), config)


def test_weight_layout():
    config, _, tensors, _ = load("edm2_cond")
    params = edm2.params_from_torch(StateDict(tensors), config)
    conv = tensors["unet.enc.8x8_block0.conv_res0.weight"]  # [O, I, kh, kw]
    np.testing.assert_array_equal(params["enc_8x8_block0"]["conv_res0"]["weight"],
                                  conv.transpose(2, 3, 1, 0))  # fmt: skip
    np.testing.assert_array_equal(params["emb_noise"]["weight"], tensors["unet.emb_noise.weight"].T)
    np.testing.assert_array_equal(params["logvar_fourier"]["phases"],
                                  tensors["logvar_fourier.phases"])  # fmt: skip
    assert params["out_gain"].shape == () and params["out_gain"] == tensors["unet.out_gain"]


def synthetic_state_dict(config):
    """Zero tensors (stride-0 views, no memory) with the torch names/shapes of ``config``."""
    model, _ = edm2.build(config)
    shape = (1, *config["sample_shape"])
    cond = jnp.zeros((1,), jnp.int32) if config["num_classes"] else None
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape), jnp.zeros(1), cond)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract["params"]))[0]:
        names = tuple(p.key for p in path)
        s = leaf.shape
        if names[-1] == "weight":
            s = (s[3], s[2], s[0], s[1]) if len(s) == 4 else (s[1], s[0])
        out[edm2._torch_key(names)] = np.broadcast_to(np.float16(0), s)
    return out


@pytest.mark.parametrize("name", ["edm2-img512-xs-uncond", "edm2-img64-m"])
def test_presets_round_trip_through_infer_config(name):
    preset = edm2.PRESETS[name]
    tensors = synthetic_state_dict(preset)
    assert len(tensors) == (203 if preset["num_classes"] else 202)  # upstream's key count
    kwargs = dict(model_channels=preset["model_channels"], dropout=preset["dropout"])
    assert edm2.infer_config(StateDict(tensors), {"init_kwargs": kwargs}) == preset


def test_preset_table():
    assert set(edm2.PRESETS) >= {f"edm2-img512-{s}" for s in ("xs", "s", "m", "l", "xl", "xxl")}
    assert set(edm2.PRESETS) >= {f"edm2-img64-{s}" for s in ("s", "m", "l", "xl")}
    widths = {"xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}
    for name, cfg in edm2.PRESETS.items():
        space, size = name.split("-")[1:3]
        assert cfg["arch"] == "edm2" and cfg["model_channels"] == widths[size]
        assert cfg["sample_shape"] == ([64, 64, 4] if space == "img512" else [64, 64, 3])
        assert cfg["num_classes"] == (0 if name.endswith("uncond") else 1000)
        assert cfg["channel_mult"] == [1, 2, 3, 4] and cfg["attn_resolutions"] == [16, 8]
        json.dumps(cfg)
        model, formulation = edm2.build(cfg)
        assert model.model_channels == widths[size] and formulation.sigma_data == 0.5
    gen = edm2.GENERATION_PRESETS
    assert len(gen) == 36
    assert all(
        p["net"].startswith(edm2.MODEL_ROOT) and p["net"].endswith(".pkl") for p in gen.values()
    )
    s = gen["edm2-img512-s-fid"]
    assert s == {"net": f"{edm2.MODEL_ROOT}/edm2-img512-s-2147483-0.130.pkl", "gnet": None,
                 "guidance": 1.0}  # fmt: skip
    autog = gen["edm2-img512-s-autog-fid"]
    assert autog["gnet"].endswith("/edm2-img512-xs-0134217-0.125.pkl") and autog["guidance"] == 2.1


def test_latent_scaling():
    scale, bias = edm2.latent_scale_bias()
    np.testing.assert_allclose(scale, 0.5 / np.array([4.17, 4.62, 3.71, 3.28]), rtol=1e-6)
    raw = np.array([5.81, 3.25, 0.12, -2.15], np.float32)  # the assumed raw means map to 0
    np.testing.assert_allclose(raw * scale + bias, 0.0, atol=1e-6)


def test_published_pickle_format():
    """edm2_tiny.pkl is an EDM2 training-loop snapshot (float16 ema) of the edm2_cond net."""
    from jaxdiff.pretrained.registry import convert_state_dict
    from jaxdiff.pretrained.torch_pickle import read_torch_file

    config, _, tensors, z = load("edm2_cond")
    found = read_torch_file(str(GOLDENS / "edm2_tiny.pkl"))
    assert found.extra["class_name"] == "Precond" and found.extra["entry"] == "ema"
    assert set(found.tensors) == set(tensors)
    got_config, params = convert_state_dict(
        found.tensors, extra=found.extra, source="edm2_tiny.pkl"
    )
    assert got_config == config
    model, formulation = edm2.build(got_config)
    apply = jax.jit(model.apply)

    def net(x, c_noise, cond):
        return apply({"params": params}, x, c_noise, cond)

    d = formulation.denoise(net, jnp.asarray(z["x"]), jnp.asarray(z["sigma"]), z["labels"])
    assert rel(d, z["denoised"]) < 1e-2  # the pickle holds float16 weights
