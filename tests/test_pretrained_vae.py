"""jaxdiff.pretrained.vae: config inference, weight mapping errors, latent scaling, handle."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.pretrained import vae as pv
from jaxdiff.pretrained.vae_handle import PretrainedVAE
from jaxdiff.pretrained.weights_io import StateDict, WeightsError

GOLDENS = Path(__file__).parent / "goldens"


def _golden(name="vae_tiny"):
    with np.load(GOLDENS / f"{name}.npz") as g:
        data = {k: g[k] for k in g.files}
    config = json.loads(str(data.pop("config")))
    state = {k.removeprefix("state/"): data.pop(k) for k in list(data) if k.startswith("state/")}
    return config, state, data


def _params(state, config, source="vae_tiny.npz"):
    return pv.params_from_torch(StateDict(state, source), config)


@pytest.mark.parametrize("name", ["vae_tiny", "vae_tiny_noquant", "vae_tiny_noattn"])
def test_infer_config_reads_the_architecture(name):
    config, state, _ = _golden(name)
    extra = {"norm_num_groups": 4, "sample_size": 16, "scaling_factor": 0.18215}
    assert pv.infer_config(StateDict(state), extra) == config
    inferred = pv.infer_config(StateDict(state), {"norm_num_groups": 4})
    assert inferred["scaling_factor"] is None  # shapes cannot tell the latent space


def test_infer_config_errors():
    config, state, _ = _golden()
    with pytest.raises(WeightsError, match="norm_num_groups=32"):
        pv.infer_config(StateDict(state, "f.safetensors"))  # 8 channels, default 32 groups
    with pytest.raises(WeightsError, match="latent_channels=16"):
        pv.infer_config(StateDict(state), {"norm_num_groups": 4, "latent_channels": 16})
    ldm = {"encoder.conv_in.weight": np.zeros((8, 3, 3, 3)), "encoder.down.0.block.0.x": 0}
    with pytest.raises(WeightsError, match="CompVis"):
        pv.infer_config(StateDict(ldm, "ldm.ckpt"))
    with pytest.raises(WeightsError, match="'encoder.conv_in.weight'"):
        pv.infer_config(StateDict({"decoder.conv_out.weight": np.zeros((3, 8, 3, 3))}))


def test_presets_build():
    for name, preset in pv.PRESETS.items():
        json.dumps(preset)
        module, formulation = pv.build(preset)
        assert formulation is None and module.downscale == 8, name
        assert pv.init_args(preset)[0].shape == (1, *preset["sample_shape"])
    assert not pv.PRESETS["flux-vae"]["use_quant_conv"]
    assert pv.PRESETS["sd3-vae"]["latent_channels"] == 16
    assert pv.LatentScaling.from_config(pv.PRESETS["sd3-vae"]) == pv.LATENT_SCALINGS["sd3"]
    assert pv.LatentScaling.from_config(pv.PRESETS["sd-vae-ft-ema"]) == pv.LATENT_SCALINGS["dit"]
    with pytest.raises(InvalidArgumentError, match="arch"):
        pv.build({**pv.PRESETS["sdxl-vae"], "arch": "dit"})


def test_legacy_attention_names_and_conv_shaped_projections():
    config, state, _ = _golden()
    want = _params(state, config)
    legacy = dict(state)
    for new, old in (
        ("to_q", "query"),
        ("to_k", "key"),
        ("to_v", "value"),
        ("to_out.0", "proj_attn"),
    ):
        for part in ("encoder", "decoder"):
            for leaf in ("weight", "bias"):
                value = legacy.pop(f"{part}.mid_block.attentions.0.{new}.{leaf}")
                if leaf == "weight" and old == "value":
                    value = value[:, :, None, None]  # some conversions keep 1x1 convs
                legacy[f"{part}.mid_block.attentions.0.{old}.{leaf}"] = value
    got = _params(legacy, config)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_bad_weights_name_the_key():
    config, state, _ = _golden()
    missing = {k: v for k, v in state.items() if k != "decoder.up_blocks.0.upsamplers.0.conv.bias"}
    with pytest.raises(WeightsError, match=r"vae_tiny\.npz.*decoder\.up_blocks\.0\.upsamplers"):
        _params(missing, config)
    wrong = {**state, "encoder.conv_in.weight": np.zeros((8, 3, 5, 5), np.float32)}
    with pytest.raises(WeightsError, match=r"'encoder\.conv_in\.weight' has shape \(8, 3, 5, 5\)"):
        _params(wrong, config)
    attn = {**state, "encoder.mid_block.attentions.0.to_k.weight": np.zeros((16, 8), np.float32)}
    with pytest.raises(WeightsError, match=r"attentions\.0\.to_k\.weight' has shape"):
        _params(attn, config)
    extra = {**state, "decoder.spare.weight": np.zeros(3, np.float32)}
    with pytest.raises(WeightsError, match=r"unexpected keys \['decoder\.spare\.weight'\]"):
        _params(extra, config)
    # A config of another size is caught too (here: quant convs the file lacks).
    _, noquant, _ = _golden("vae_tiny_noquant")
    config = pv.infer_config(StateDict(noquant), {"norm_num_groups": 4})
    with pytest.raises(WeightsError, match="missing key 'quant_conv.weight'"):
        _params(noquant, {**config, "use_quant_conv": True})


def test_latent_scaling_inverse_and_presets():
    x = np.random.default_rng(0).standard_normal((2, 3, 3, 4)).astype(np.float32) * 5
    for scaling in pv.LATENT_SCALINGS.values():
        np.testing.assert_allclose(scaling.to_raw(scaling.to_model(x)), x, rtol=1e-6, atol=1e-5)
    edm2 = pv.LATENT_SCALINGS["edm2"]
    raw_mean, raw_std = np.array([5.81, 3.25, 0.12, -2.15]), np.array([4.17, 4.62, 3.71, 3.28])
    np.testing.assert_allclose(edm2.scale, 0.5 / raw_std)
    np.testing.assert_allclose(edm2.shift, raw_mean)
    assert edm2.pixel_range == (0.0, 1.0)
    # EDM2's encoder: x * scale + (final_mean - raw_mean * scale), final_mean = 0.
    np.testing.assert_allclose(
        edm2.to_model(x), x * (0.5 / raw_std) - raw_mean * 0.5 / raw_std, rtol=1e-5, atol=1e-5
    )
    dit = pv.LATENT_SCALINGS["dit"]
    np.testing.assert_allclose(dit.to_model(x), x * 0.18215, rtol=1e-6)
    flux = pv.LATENT_SCALINGS["flux"]
    np.testing.assert_allclose(flux.to_model(x), (x - 0.1159) * 0.3611, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidArgumentError, match="4 per-channel values"):
        edm2.to_model(np.zeros((1, 2, 2, 16)))
    with pytest.raises(InvalidArgumentError, match="LATENT_SCALINGS"):
        pv.LatentScaling.from_config({"scaling_factor": None})
    assert hash(edm2) == hash(pv.LatentScaling(edm2.scale, edm2.shift, (0.0, 1.0)))


def _module_run(module, params, x, method):
    return jax.jit(lambda p, x: module.apply({"params": p}, x, method=method))(params, x)


def test_pretrained_vae_batches_like_one_batch():
    config, state, g = _golden()
    params = _params(state, config)
    scaling = pv.LatentScaling((0.5, 1.0, 2.0, 0.25), 0.1)
    images = np.random.default_rng(1).uniform(-1, 1, (5, 16, 16, 3)).astype(np.float32)
    small = PretrainedVAE.from_params(config, params, scaling, batch_size=2)
    whole = PretrainedVAE.from_params(config, params, scaling, batch_size=8)
    mean, std = small.encode_moments(images)
    assert mean.shape == std.shape == (5, 8, 8, 4) and mean.dtype == np.float32
    np.testing.assert_allclose(mean[:2], small.encode_moments(images[:2])[0])
    assert small._moments._cache_size() == 1  # the padded last batch reused the compile
    np.testing.assert_allclose(small.encode(images), scaling.to_model(mean), rtol=1e-5, atol=1e-5)
    key = jax.random.key(3)
    sampled = small.encode(images, key)
    # One batch of 8 (5 real + 3 padding) gives the same numbers, noise included.
    np.testing.assert_allclose(sampled, whole.encode(images, key), rtol=1e-5, atol=1e-5)
    noise = (np.asarray(scaling.to_raw(sampled)) - mean) / std  # sample = mean + std * noise
    assert 0.5 < float(np.std(noise)) < 1.5
    latents = np.asarray(scaling.to_model(g["latents"][[0, 1, 0, 1, 0]]))
    raw = small.decode(latents, clip=False)
    np.testing.assert_allclose(raw, whole.decode(latents, clip=False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(raw[:2], g["decoded"], rtol=1e-4, atol=1e-4 * np.abs(raw).max())
    assert np.abs(raw).max() > 1  # so that clipping below is tested
    np.testing.assert_array_equal(small.decode(latents), np.clip(raw, -1, 1))


def test_pretrained_vae_pixel_range_and_errors():
    config, state, g = _golden()
    params = _params(state, config)
    scaling = pv.LatentScaling(1.0, 0.0, pixel_range=(0.0, 1.0))  # EDM2 feeds [0, 1] pixels
    vae = PretrainedVAE.from_params(config, params, scaling, batch_size=2)
    mean, _ = vae.encode_moments(g["images"])
    want = _module_run(vae.module, params, (g["images"] + 1) / 2, "encode").mean
    np.testing.assert_allclose(mean, want, rtol=1e-5, atol=1e-5)
    out = vae.decode(g["latents"], clip=False)
    np.testing.assert_allclose(out, g["decoded"] * 2 - 1, rtol=1e-4, atol=1e-3)
    with pytest.raises(InvalidArgumentError, match=r"\[N, H, W, 3\]"):
        vae.encode(np.zeros((2, 16, 16, 4)))
    with pytest.raises(InvalidArgumentError, match="multiples of 2"):
        vae.encode(np.zeros((2, 15, 16, 3)))
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        PretrainedVAE(vae.module, params, scaling, batch_size=0)
    with pytest.raises(InvalidArgumentError, match="scaling_factor"):
        PretrainedVAE.from_params({**config, "scaling_factor": None}, params)


def test_convert_save_load_round_trip(tmp_path):
    from jaxdiff.pretrained import registry
    from jaxdiff.pretrained.convert import smoke_test

    _, state, g = _golden()
    config, params = registry.convert_state_dict(
        state, extra={"norm_num_groups": 4, "sample_size": 16}, source="vae_tiny.npz"
    )
    assert config["arch"] == "vae"
    path = tmp_path / "vae.safetensors"
    registry.save_converted(path, config, params, source="vae_tiny.npz")
    pre = registry.load_pretrained(path)
    assert pre.formulation is None
    smoke_test(pre)
    vae = PretrainedVAE.from_params(pre.config, pre.params, pv.LATENT_SCALINGS["dit"])
    mean, _ = vae.encode_moments(g["images"])
    np.testing.assert_allclose(mean, g["mean"], rtol=1e-4, atol=1e-4)
