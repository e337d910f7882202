"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``): converter, latent scalings, handle.

Published weights (diffusers format, ``diffusion_pytorch_model.safetensors`` on the
Hugging Face Hub; convert once with ``python -m jaxdiff.pretrained.convert --src FILE
--dst OUT.safetensors``):

* ``stabilityai/sd-vae-ft-mse`` and ``stabilityai/sd-vae-ft-ema``: the VAEs of DiT, SiT
  and EDM2 (presets ``"sd-vae-ft-mse"`` / ``"sd-vae-ft-ema"``);
* ``stabilityai/sdxl-vae`` (``"sdxl-vae"``; in float16 it overflows, use float32/bf16);
* ``vae/`` of ``stabilityai/stable-diffusion-3-medium-diffusers`` (``"sd3-vae"``) and of
  ``black-forest-labs/FLUX.1-dev`` / ``-schnell`` (``"flux-vae"``): 16 latent channels,
  no quant convs.

The VAE is not a denoiser: :func:`build` returns no formulation. A diffusion model works
on *scaled* latents ``(raw - shift) * scale`` (:class:`LatentScaling`); the scaling
belongs to the diffusion model's latent space, not to the VAE (DiT and EDM2 use the same
VAE with different scalings, see :data:`LATENT_SCALINGS`).
:class:`~jaxdiff.pretrained.vae_handle.PretrainedVAE` wraps module, params and scaling
into jitted, batched ``encode`` / ``decode`` on numpy arrays.

Preset values are those of each repository's ``config.json`` (``block_out_channels``
``[128, 256, 512, 512]``, ``layers_per_block`` 2, ``norm_num_groups`` 32;
``scaling_factor`` 0.18215, the diffusers default the SD1 VAEs rely on, SDXL 0.13025, SD3
1.5305 with ``shift_factor`` 0.0609, FLUX 0.3611 with 0.1159; SD3/FLUX set
``use_quant_conv``/``use_post_quant_conv`` false); the scale/shift pairs agree with
ComfyUI's ``comfy/latent_formats.py``. ``sample_size`` (256 for the SD1 VAEs, 1024 for
the others) only sets the informational ``sample_shape``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.models.vae import AutoencoderKL
from jaxdiff.pretrained.weights_io import StateDict, WeightsError

ARCH = "vae"

_SD = dict(
    arch=ARCH,
    sample_shape=[256, 256, 3],
    num_classes=0,
    in_channels=3,
    out_channels=3,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    norm_num_groups=32,
    latent_channels=4,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
    scaling_factor=0.18215,
    shift_factor=None,
)
_NO_QUANT = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
_BIG = dict(sample_shape=[1024, 1024, 3])
PRESETS: dict[str, dict] = {
    name: copy.deepcopy(config)  # no lists shared between presets
    for name, config in {
        "sd-vae-ft-mse": _SD,
        "sd-vae-ft-ema": _SD,
        "sdxl-vae": {**_SD, **_BIG, "scaling_factor": 0.13025},
        "sd3-vae": {**_SD, **_BIG, **_NO_QUANT, "scaling_factor": 1.5305, "shift_factor": 0.0609},
        "flux-vae": {**_SD, **_BIG, **_NO_QUANT, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    }.items()
}
"""Published VAE configs by name (see the module docstring for the sources)."""

_STRUCTURE = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)


@dataclasses.dataclass(frozen=True)
class LatentScaling:
    """Maps raw VAE latents to a diffusion model's latents: ``(raw - shift) * scale``.

    ``scale`` and ``shift`` are scalars or per-channel tuples (last axis). ``pixel_range``
    is the range of the images the VAE saw when this latent space was defined: SD, DiT, SiT
    feed ``[-1, 1]``; EDM2 feeds ``[0, 1]`` (``x / 255``), so its latent statistics hold
    only for that. ``PretrainedVAE`` (:mod:`jaxdiff.pretrained.vae_handle`) converts
    from/to ``[-1, 1]`` accordingly.

    Attributes:
      scale: Multiplier(s) applied after the shift.
      shift: Offset(s) subtracted from the raw latents.
      pixel_range: ``(low, high)`` of the VAE's input/output images.
    """

    scale: float | tuple[float, ...] = 1.0
    shift: float | tuple[float, ...] = 0.0
    pixel_range: tuple[float, float] = (-1.0, 1.0)

    def _arrays(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        scale, shift = (jnp.asarray(v, jnp.float32) for v in (self.scale, self.shift))
        for v in (scale, shift):
            if v.ndim and v.shape[0] != x.shape[-1]:
                raise InvalidArgumentError(
                    f"LatentScaling has {v.shape[0]} per-channel values but the latents have "
                    f"{x.shape[-1]} channels (shape {tuple(x.shape)}); use a scaling made for "
                    "this VAE"
                )
        return scale, shift

    def to_model(self, raw: jax.Array) -> jax.Array:
        """Raw VAE latents ``[..., C]`` to model latents."""
        scale, shift = self._arrays(raw)
        return (raw - shift) * scale

    def to_raw(self, latents: jax.Array) -> jax.Array:
        """Model latents ``[..., C]`` back to raw VAE latents (inverse of :meth:`to_model`)."""
        scale, shift = self._arrays(latents)
        return latents / scale + shift

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LatentScaling:
        """The diffusers-style scaling of a VAE config (``scaling_factor``, ``shift_factor``).

        Raises:
          InvalidArgumentError: If the config does not know its scaling (a converted file
            without a diffusers ``config.json``); pass one of :data:`LATENT_SCALINGS`.
        """
        if config.get("scaling_factor") is None:
            raise InvalidArgumentError(
                "this VAE config has no scaling_factor (its weights came without a diffusers "
                "config.json); pass a scaling explicitly, e.g. LATENT_SCALINGS['dit'], "
                f"one of {sorted(LATENT_SCALINGS)}"
            )
        return cls(float(config["scaling_factor"]), float(config.get("shift_factor") or 0.0))


_EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)  # edm2 training/encoders.py StabilityVAEEncoder
_EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)
LATENT_SCALINGS: dict[str, LatentScaling] = {
    "dit": LatentScaling(0.18215),  # DiT/SiT (sd-vae-ft-mse/ema, images in [-1, 1])
    "edm2": LatentScaling(
        tuple(0.5 / s for s in _EDM2_RAW_STD), _EDM2_RAW_MEAN, pixel_range=(0.0, 1.0)
    ),
    "sdxl": LatentScaling(0.13025),
    "sd3": LatentScaling(1.5305, 0.0609),
    "flux": LatentScaling(0.3611, 0.1159),
}
"""Latent spaces by name. EDM2's is ``final_std / raw_std`` with ``final_std = 0.5``."""


def _shape(sd: StateDict, key: str) -> tuple[int, ...]:
    return tuple(sd.take(key).shape)


def infer_config(sd: StateDict, extra: Mapping[str, Any] | None = None) -> dict:
    """Reads an AutoencoderKL config from diffusers key names and shapes.

    Shapes cannot tell ``norm_num_groups`` (default 32, as every published VAE), the
    latent scaling (None unless given: SD1 and SDXL VAEs have identical shapes) or the
    image size (256); ``extra`` may carry the diffusers ``config.json``, whose values
    then fill these in (``sample_size`` too) and whose structural fields are checked.

    Raises:
      WeightsError: Naming the key if the weights are no diffusers AutoencoderKL.
    """
    extra = dict(extra or {})
    keys = sd.keys()
    foreign = (
        ("first_stage_model.", "a full Stable Diffusion checkpoint"),
        ("encoder.down.0.", "an original (CompVis ldm) VAE checkpoint"),
    )
    for marker, what in foreign:
        if any(k.startswith(marker) for k in keys):
            raise WeightsError(
                f"{sd.source}: keys like {marker!r}... mean {what}; download the diffusers "
                "format (diffusion_pytorch_model.safetensors of the VAE repository) instead"
            )
    conv_in = _shape(sd, "encoder.conv_in.weight")
    widths, layers = [], 0
    while sd.has(f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight"):
        widths.append(_shape(sd, f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight")[0])
    while sd.has(f"encoder.down_blocks.0.resnets.{layers}.conv1.weight"):
        layers += 1
    if not widths:
        sd.take("encoder.down_blocks.0.resnets.0.conv1.weight")  # raises, naming the key
    attn = "encoder.mid_block.attentions.0"
    config = {
        **copy.deepcopy(PRESETS["sd-vae-ft-mse"]),
        "in_channels": conv_in[1],
        "out_channels": _shape(sd, "decoder.conv_out.weight")[0],
        "block_out_channels": widths,
        "layers_per_block": layers,
        "latent_channels": _shape(sd, "encoder.conv_out.weight")[0] // 2,
        "use_quant_conv": sd.has("quant_conv.weight"),
        "use_post_quant_conv": sd.has("post_quant_conv.weight"),
        "mid_block_add_attention": sd.has(f"{attn}.group_norm.weight"),
        "scaling_factor": None,
    }
    for name in _STRUCTURE:
        if name in extra and extra[name] != config[name]:
            raise WeightsError(
                f"{sd.source}: the given config says {name}={extra[name]!r} but the weights "
                f"have {config[name]!r}; the config.json belongs to another VAE"
            )
    for name in ("norm_num_groups", "scaling_factor", "shift_factor", "sample_shape"):
        if name in extra:
            config[name] = extra[name]
    size = extra.get("sample_size")
    if size is not None:
        side = list(size) if isinstance(size, (list, tuple)) else [size, size]
        config["sample_shape"] = [*side, config["in_channels"]]
    config["sample_shape"] = [*list(config["sample_shape"])[:2], config["in_channels"]]
    for i, width in enumerate(widths):
        if width % config["norm_num_groups"]:
            raise WeightsError(
                f"{sd.source}: encoder.down_blocks.{i} has {width} channels, not divisible by "
                f"norm_num_groups={config['norm_num_groups']}; pass the right norm_num_groups"
            )
    return config


def build(config: Mapping[str, Any]) -> tuple[nn.Module, None]:
    """The :class:`~jaxdiff.models.vae.AutoencoderKL` of a config (no formulation).

    ``config["dtype"]`` (optional, default float32) sets the compute dtype.
    """
    if config.get("arch") != ARCH:
        raise InvalidArgumentError(f"config arch {config.get('arch')!r} is not {ARCH!r}")
    module = AutoencoderKL(
        **{k: config[k] for k in _STRUCTURE if k != "block_out_channels"},
        block_out_channels=tuple(config["block_out_channels"]),
        norm_num_groups=int(config["norm_num_groups"]),
        dtype=jnp.dtype(config.get("dtype", "float32")),
    )
    return module, None


def init_args(config: Mapping[str, Any]) -> tuple[jax.Array]:
    """Arguments of ``module.init(key, *args)``: one image of ``sample_shape``."""
    return (jnp.zeros((1, *config["sample_shape"]), jnp.float32),)


def _conv(sd: StateDict, key: str, cin: int, cout: int, k: int) -> dict:
    w = sd.take(f"{key}.weight", (cout, cin, k, k))
    kernel = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    return {"kernel": kernel, "bias": sd.take(f"{key}.bias", (cout,))}


def _norm(sd: StateDict, key: str, c: int) -> dict:
    return {"scale": sd.take(f"{key}.weight", (c,)), "bias": sd.take(f"{key}.bias", (c,))}


def _linear(sd: StateDict, key: str, legacy: str, c: int) -> dict:
    # Checkpoints saved before diffusers 0.14 name the projections query/key/value/
    # proj_attn; some conversions keep them as 1x1 convs [C, C, 1, 1].
    if not sd.has(f"{key}.weight") and sd.has(f"{legacy}.weight"):
        key = legacy
    w = sd.take(f"{key}.weight")
    if w.shape == (c, c, 1, 1):
        w = w[:, :, 0, 0]
    if w.shape != (c, c):
        raise WeightsError(
            f"{sd.source}: key '{key}.weight' has shape {w.shape}, expected {(c, c)} "
            "for this config"
        )
    return {"kernel": np.ascontiguousarray(w.T), "bias": sd.take(f"{key}.bias", (c,))}


def _resnet(sd: StateDict, key: str, cin: int, cout: int) -> dict:
    out = {
        "norm1": _norm(sd, f"{key}.norm1", cin),
        "conv1": _conv(sd, f"{key}.conv1", cin, cout, 3),
        "norm2": _norm(sd, f"{key}.norm2", cout),
        "conv2": _conv(sd, f"{key}.conv2", cout, cout, 3),
    }
    if cin != cout:
        out["conv_shortcut"] = _conv(sd, f"{key}.conv_shortcut", cin, cout, 1)
    return out


def _mid(sd: StateDict, key: str, c: int, attention: bool) -> dict:
    out = {f"resnets_{j}": _resnet(sd, f"{key}.resnets.{j}", c, c) for j in range(2)}
    if attention:
        a = f"{key}.attentions.0"
        out["attention"] = {"group_norm": _norm(sd, f"{a}.group_norm", c)}
        for name, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value")):
            out["attention"][name] = _linear(sd, f"{a}.{name}", f"{a}.{legacy}", c)
        out["attention"]["to_out"] = _linear(sd, f"{a}.to_out.0", f"{a}.proj_attn", c)
    return out


def params_from_torch(sd: StateDict, config: Mapping[str, Any]) -> dict:
    """Maps a diffusers AutoencoderKL state dict onto the Flax params of :func:`build`.

    Conv weights ``[O, I, kh, kw]`` become ``[kh, kw, I, O]``, linear weights are
    transposed; legacy attention names (``query``/``key``/``value``/``proj_attn``) are
    accepted. Every tensor is taken once and :meth:`StateDict.finish` rejects leftovers.

    Raises:
      WeightsError: For a missing, unexpected or wrong-shaped key (named).
    """
    widths, layers = list(config["block_out_channels"]), int(config["layers_per_block"])
    attention, lat = bool(config["mid_block_add_attention"]), int(config["latent_channels"])
    enc: dict[str, Any] = {
        "conv_in": _conv(sd, "encoder.conv_in", config["in_channels"], widths[0], 3)
    }
    prev = widths[0]
    for i, width in enumerate(widths):
        for j in range(layers):
            key = f"encoder.down_blocks.{i}.resnets.{j}"
            enc[f"down_blocks_{i}_resnets_{j}"] = _resnet(sd, key, prev if j == 0 else width, width)
        if i != len(widths) - 1:
            key = f"encoder.down_blocks.{i}.downsamplers.0.conv"
            enc[f"down_blocks_{i}_downsample"] = _conv(sd, key, width, width, 3)
        prev = width
    enc["mid_block"] = _mid(sd, "encoder.mid_block", widths[-1], attention)
    enc["conv_norm_out"] = _norm(sd, "encoder.conv_norm_out", widths[-1])
    enc["conv_out"] = _conv(sd, "encoder.conv_out", widths[-1], 2 * lat, 3)

    dec: dict[str, Any] = {"conv_in": _conv(sd, "decoder.conv_in", lat, widths[-1], 3)}
    dec["mid_block"] = _mid(sd, "decoder.mid_block", widths[-1], attention)
    rev, prev = widths[::-1], widths[-1]
    for i, width in enumerate(rev):
        for j in range(layers + 1):
            key = f"decoder.up_blocks.{i}.resnets.{j}"
            dec[f"up_blocks_{i}_resnets_{j}"] = _resnet(sd, key, prev if j == 0 else width, width)
        if i != len(rev) - 1:
            key = f"decoder.up_blocks.{i}.upsamplers.0.conv"
            dec[f"up_blocks_{i}_upsample"] = _conv(sd, key, width, width, 3)
        prev = width
    dec["conv_norm_out"] = _norm(sd, "decoder.conv_norm_out", widths[0])
    dec["conv_out"] = _conv(sd, "decoder.conv_out", widths[0], config["out_channels"], 3)

    params: dict[str, Any] = {"encoder": enc, "decoder": dec}
    if config["use_quant_conv"]:
        params["quant_conv"] = _conv(sd, "quant_conv", 2 * lat, 2 * lat, 1)
    if config["use_post_quant_conv"]:
        params["post_quant_conv"] = _conv(sd, "post_quant_conv", lat, lat, 1)
    sd.finish()
    return params


def smoke_test(pre: Any) -> None:
    """Encodes and decodes one small random image; raises if anything is non-finite."""
    side = 2 * pre.model.downscale
    x = jax.random.uniform(jax.random.key(0), (1, side, side, pre.model.in_channels), minval=-1)
    out = pre.model.apply({"params": pre.params}, x)
    if not bool(jnp.all(jnp.isfinite(out))):
        raise WeightsError(f"{pre.path}: the converted VAE gives non-finite outputs")


__all__ = [
    "ARCH",
    "LATENT_SCALINGS",
    "PRESETS",
    "LatentScaling",
    "build",
    "infer_config",
    "init_args",
    "params_from_torch",
    "smoke_test",
]
