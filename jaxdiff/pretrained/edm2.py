"""EDM2's published ImageNet networks (Karras et al., CVPR 2024) for jaxdiff.

Weights: the post-hoc EMA reconstructions published by NVlabs/edm2 at
``https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/`` (file names in
:data:`GENERATION_PRESETS`, e.g. ``edm2-img512-s-2147483-0.130.pkl``), licensed CC
BY-NC-SA 4.0. Each ``.pkl`` is the snapshot dict of EDM2's training loop; its ``"ema"``
entry is a float16 ``Precond`` whose state dict (``unet.enc.64x64_conv.weight``, ...,
``logvar_linear.weight``) and constructor kwargs ``python -m jaxdiff.pretrained.convert``
reads without torch. The network is :class:`jaxdiff.models.edm2.EDM2UNet` and the
formulation :class:`jaxdiff.diffusion.edm.EDM` with ``sigma_data=0.5``: EDM2's ``Precond``
uses exactly EDM's ``c_skip``, ``c_out``, ``c_in`` and ``c_noise = ln(sigma) / 4``.

Data spaces (the sample shapes of :data:`PRESETS`):

* ``edm2-img64-*``: 64x64x3 pixels in ``[-1, 1]`` (``StandardRGBEncoder``);
* ``edm2-img512-*``: 64x64x4 latents of the ``stabilityai/sd-vae-ft-mse`` VAE, standardised
  per channel (:data:`LATENT_SCALING`, ``training/encoders.py``): EDM2 does *not* use the
  VAE's 0.18215 factor but ``z = (raw - raw_mean) * final_std / raw_std + final_mean``, so
  decoding with a jaxdiff VAE takes ``raw = (z - bias) / scale`` (:func:`latent_scale_bias`).

Guidance: EDM2's sampler evaluates ``D_g + w (D - D_g)`` with a second network ``D_g``,
jaxdiff's :class:`~jaxdiff.guidance.autoguidance.Autoguidance` with ``guide_denoise`` the
second network's denoiser. Two families are published (:data:`GENERATION_PRESETS`):
``*-guid-*`` guide each size with the small *unconditional* ``edm2-img512-xs-uncond``
network (classifier-free guidance with a separate unconditional model), and ``*-autog-*``
guide ``S`` with an ``XS`` (``XXL`` with an ``M``) network trained for a shorter time,
conditional on the same class (autoguidance). The guide is given the class labels too; the
unconditional one ignores them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import reduce
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.edm import EDM
from jaxdiff.models.edm2 import EDM2_TRAINING, EDM2UNet
from jaxdiff.pretrained.weights_io import StateDict, WeightsError

ARCH = "edm2"

MODEL_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"
"""Where NVlabs publishes the EDM2 network pickles."""

# Precond's positional parameters, in order, then the UNet's and Block's keyword options.
_PRECOND_ARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data",
                 "logvar_channels")  # fmt: skip
_DEFAULTS: dict[str, Any] = dict(
    use_fp16=True, sigma_data=0.5, logvar_channels=128, model_channels=192,
    channel_mult=[1, 2, 3, 4], channel_mult_noise=None, channel_mult_emb=None, num_blocks=3,
    attn_resolutions=[16, 8], label_balance=0.5, concat_balance=0.5, resample_filter=[1, 1],
    channels_per_head=64, dropout=0.0, res_balance=0.3, attn_balance=0.3, clip_act=256,
)  # fmt: skip
_MODEL_FIELDS = ("img_resolution", "num_classes", "model_channels", "channel_mult",
                 "channel_mult_noise", "channel_mult_emb", "num_blocks", "attn_resolutions",
                 "label_balance", "concat_balance", "channels_per_head", "dropout",
                 "res_balance", "attn_balance", "clip_act", "resample_filter",
                 "logvar_channels")  # fmt: skip
_SIZES = {"xs": (128, 0.0), "s": (192, 0.0), "m": (256, 0.1), "l": (320, 0.1),
          "xl": (384, 0.1), "xxl": (448, 0.1)}  # fmt: skip


def _preset(space: str, size: str, num_classes: int = 1000) -> dict[str, Any]:
    channels, dropout = _SIZES[size]
    c = 4 if space == "img512" else 3
    cfg = {k: v for k, v in _DEFAULTS.items() if k in _MODEL_FIELDS}
    cfg.update(model_channels=channels, dropout=dropout)
    return {"arch": ARCH, "sample_shape": [64, 64, c], "num_classes": num_classes,
            "img_resolution": 64, **cfg, **EDM2_TRAINING[space]}  # fmt: skip


PRESETS: dict[str, dict[str, Any]] = {
    **{f"edm2-img512-{s}": _preset("img512", s) for s in ("xs", "s", "m", "l", "xl", "xxl")},
    **{f"edm2-img64-{s}": _preset("img64", s) for s in ("xs", "s", "m", "l", "xl")},
    "edm2-img512-xs-uncond": _preset("img512", "xs", 0),
    "edm2-img512-s-uncond": _preset("img512", "s", 0),
}
"""Configs of the published networks: ImageNet-512 (64x64x4 latents) XS..XXL, ImageNet-64
(64x64x3 pixels) XS..XL, both with 1000 classes, and the unconditional XS/S ImageNet-512
networks used as guides. The EMA length (the ``0.130`` in a file name) does not change the
architecture."""

_GUIDED = [  # (upstream preset, main network, guiding network, guidance weight)
    ("edm2-img512-xs-guid-fid", "xs-2147483-0.045", "xs-uncond-2147483-0.045", 1.40),
    ("edm2-img512-xs-guid-dino", "xs-2147483-0.150", "xs-uncond-2147483-0.150", 1.70),
    ("edm2-img512-s-guid-fid", "s-2147483-0.025", "xs-uncond-2147483-0.025", 1.40),
    ("edm2-img512-s-guid-dino", "s-2147483-0.085", "xs-uncond-2147483-0.085", 1.90),
    ("edm2-img512-m-guid-fid", "m-2147483-0.030", "xs-uncond-2147483-0.030", 1.20),
    ("edm2-img512-m-guid-dino", "m-2147483-0.015", "xs-uncond-2147483-0.015", 2.00),
    ("edm2-img512-l-guid-fid", "l-1879048-0.015", "xs-uncond-2147483-0.015", 1.20),
    ("edm2-img512-l-guid-dino", "l-1879048-0.035", "xs-uncond-2147483-0.035", 1.70),
    ("edm2-img512-xl-guid-fid", "xl-1342177-0.020", "xs-uncond-2147483-0.020", 1.20),
    ("edm2-img512-xl-guid-dino", "xl-1342177-0.030", "xs-uncond-2147483-0.030", 1.70),
    ("edm2-img512-xxl-guid-fid", "xxl-0939524-0.015", "xs-uncond-2147483-0.015", 1.20),
    ("edm2-img512-xxl-guid-dino", "xxl-0939524-0.015", "xs-uncond-2147483-0.015", 1.70),
    ("edm2-img512-s-autog-fid", "s-2147483-0.070", "xs-0134217-0.125", 2.10),
    ("edm2-img512-s-autog-dino", "s-2147483-0.120", "xs-0134217-0.165", 2.45),
    ("edm2-img512-xxl-autog-fid", "xxl-0939524-0.075", "m-0268435-0.155", 2.05),
    ("edm2-img512-xxl-autog-dino", "xxl-0939524-0.130", "m-0268435-0.205", 2.30),
    ("edm2-img512-s-uncond-autog-fid", "s-uncond-2147483-0.070", "xs-uncond-0134217-0.110", 2.85),
    ("edm2-img512-s-uncond-autog-dino", "s-uncond-2147483-0.090", "xs-uncond-0134217-0.125", 2.90),
    ("edm2-img64-s-autog-fid", "s-1073741-0.045", "xs-0134217-0.110", 1.70),
    ("edm2-img64-s-autog-dino", "s-1073741-0.105", "xs-0134217-0.175", 2.20),
]  # fmt: skip
_UNGUIDED = [  # (size, training length in kimg, EMA std for FID, EMA std for FD-DINOv2)
    ("img512-xs", "2147483", "0.135", "0.200"), ("img512-s", "2147483", "0.130", "0.190"),
    ("img512-m", "2147483", "0.100", "0.155"), ("img512-l", "1879048", "0.085", "0.155"),
    ("img512-xl", "1342177", "0.085", "0.155"), ("img512-xxl", "0939524", "0.070", "0.150"),
    ("img64-s", "1073741", "0.075", None), ("img64-m", "2147483", "0.060", None),
    ("img64-l", "1073741", "0.040", None), ("img64-xl", "0671088", "0.040", None),
]  # fmt: skip


def _url(space: str, tail: str) -> str:
    return f"{MODEL_ROOT}/edm2-{space}-{tail}.pkl"


GENERATION_PRESETS: dict[str, dict[str, Any]] = {
    **{
        f"edm2-{name}-{metric}": dict(
            net=_url(name.split("-")[0], f"{name.split('-')[1]}-{n}-{s}"), gnet=None, guidance=1.0
        )
        for name, n, fid, dino in _UNGUIDED
        for metric, s in (("fid", fid), ("dino", dino))
        if s is not None
    },
    **{
        name: dict(
            net=_url(name.split("-")[1], main), gnet=_url(name.split("-")[1], guide), guidance=w
        )
        for name, main, guide, w in _GUIDED
    },
}
"""NVlabs/edm2 ``generate_images.py`` presets: ``net`` and guiding ``gnet`` pickle URLs
and the guidance weight ``w`` of ``D_gnet + w (D_net - D_gnet)`` (1 = no guidance),
tuned for FID (``-fid``) or FD-DINOv2 (``-dino``). Sample with EDM2's sampler: Heun, 32
steps, ``sigma_min=0.002``, ``sigma_max=80``, ``rho=7``."""

LATENT_SCALING: dict[str, Any] = dict(
    vae="stabilityai/sd-vae-ft-mse",
    raw_mean=[5.81, 3.25, 0.12, -2.15],
    raw_std=[4.17, 4.62, 3.71, 3.28],
    final_mean=0.0,
    final_std=0.5,
)
"""EDM2's ``StabilityVAEEncoder``: the VAE's raw latents (posterior samples, *without* the
0.18215 factor) are standardised per channel to mean ``final_mean``, std ``final_std``."""


def latent_scale_bias() -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(scale, bias)`` with ``z = raw * scale + bias`` (EDM2's encoder).

    Decode EDM2 samples with ``raw = (z - bias) / scale`` before the VAE decoder.
    """
    scale = np.float32(LATENT_SCALING["final_std"]) / np.float32(LATENT_SCALING["raw_std"])
    bias = np.float32(LATENT_SCALING["final_mean"]) - np.float32(LATENT_SCALING["raw_mean"]) * scale
    return scale.astype(np.float32), bias.astype(np.float32)


def _kwargs(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Precond constructor kwargs from a pickle reader's ``extra`` (or a flat kwargs dict)."""
    if not extra:
        return {}
    if extra.get("class_name") not in (None, "Precond"):
        raise WeightsError(
            f"the pickled network is a {extra['class_name']!r}, expected EDM2's 'Precond' "
            "(read the pickle's 'ema' entry)"
        )
    if "init_kwargs" in extra or "init_args" in extra:
        kwargs = dict(extra.get("init_kwargs") or {})
        args = list(extra.get("init_args") or ())
        if len(args) > len(_PRECOND_ARGS):
            raise WeightsError(
                f"EDM2 Precond takes {len(_PRECOND_ARGS)} positional args, got {args}"
            )
        kwargs.update(zip(_PRECOND_ARGS[: len(args)], args, strict=True))
    else:
        kwargs = {k: v for k, v in extra.items() if k in _DEFAULTS or k in _PRECOND_ARGS}
    unknown = sorted(set(kwargs) - set(_DEFAULTS) - set(_PRECOND_ARGS))
    if unknown:
        raise WeightsError(
            f"EDM2 constructor kwargs {unknown} are not supported by jaxdiff's EDM2UNet "
            f"(known: {sorted({*_DEFAULTS, *_PRECOND_ARGS})})"
        )
    return kwargs


def _shape(sd: StateDict, key: str) -> tuple[int, ...]:
    return tuple(sd.take(key).shape)


def infer_config(sd: StateDict, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Reads an EDM2 ``Precond`` state dict's shapes (and constructor kwargs) into a config.

    Widths, levels, blocks, attention resolutions, classes, image size and channels come
    from the shapes. The options shapes cannot show (``channels_per_head``, the balances,
    ``clip_act``, ``resample_filter``, ``sigma_data``, ``dropout``) come from ``extra``
    (the pickle's ``init_kwargs``) or take EDM2's defaults, which every published network
    uses. ``p_mean``/``p_std`` (training only) follow the ImageNet-512 preset for 4-channel
    latents and the ImageNet-64 one otherwise.

    Args:
      sd: The state dict (keys ``unet.*`` and ``logvar_*``).
      extra: A pickle reader's extra facts with ``init_kwargs``/``init_args``, or the
        kwargs themselves; may be None.

    Returns:
      The JSON-serialisable config.

    Raises:
      WeightsError: Naming the key or kwarg that fits no EDM2 network.
    """
    kw = _kwargs(extra)
    keys = sd.keys()
    if not sd.has("logvar_fourier.freqs"):
        raise WeightsError(
            f"{sd.source}: no key 'logvar_fourier.freqs'; expected an EDM2 Precond state dict "
            "(keys 'unet.*' plus the logvar head), e.g. the 'ema' entry of an EDM2 pickle"
        )
    convs = [m for k in keys if (m := re.fullmatch(r"unet\.enc\.(\d+)x\1_conv\.weight", k))]
    if len(convs) != 1:
        raise WeightsError(f"{sd.source}: expected one key 'unet.enc.<R>x<R>_conv.weight'")
    res = int(convs[0].group(1))
    img_channels = _shape(sd, f"unet.enc.{res}x{res}_conv.weight")[1] - 1
    levels = len({m.group(1) for k in keys if (m := re.match(r"unet\.enc\.(\d+)x\1_", k))})
    cblock = [_shape(sd, f"unet.dec.{res >> i}x{res >> i}_block0.conv_res1.weight")[0]
              for i in range(levels)]  # fmt: skip
    num_blocks = sum(sd.has(f"unet.enc.{res}x{res}_block{i}.emb_gain") for i in range(64))
    cnoise = _shape(sd, "unet.emb_fourier.freqs")[0]
    cemb = _shape(sd, "unet.emb_noise.weight")[0]
    label_dim = _shape(sd, "unet.emb_label.weight")[1] if sd.has("unet.emb_label.weight") else 0
    attn = sorted((res >> i for i in range(levels)
                   if sd.has(f"unet.dec.{res >> i}x{res >> i}_block0.attn_qkv.weight")),
                  reverse=True)  # fmt: skip
    out = {**_DEFAULTS, **kw}
    mc = int(kw.get("model_channels") or reduce(math.gcd, [*cblock, cnoise, cemb]))
    mult = [c // mc for c in cblock]
    if [mc * m for m in mult] != cblock:
        raise WeightsError(
            f"{sd.source}: widths {cblock} (keys 'unet.dec.*_block0.conv_res1.weight') are "
            f"not multiples of model_channels={mc}"
        )
    facts = dict(img_resolution=res, img_channels=img_channels, label_dim=label_dim)
    for name, value in facts.items():
        if name in kw and kw[name] != value:
            raise WeightsError(
                f"{sd.source}: constructor kwarg {name}={kw[name]!r} but the shapes say {value}"
            )
    if "channel_mult" in kw and list(kw["channel_mult"]) != mult:
        raise WeightsError(
            f"{sd.source}: constructor kwarg channel_mult={kw['channel_mult']} but the shapes "
            f"say {mult} (key 'unet.dec.{res}x{res}_block0.conv_res1.weight')"
        )
    if "attn_resolutions" in kw:
        listed = {int(r) for r in kw["attn_resolutions"]}
        if not set(attn) <= listed:
            raise WeightsError(
                f"{sd.source}: attention weights at {attn} but attn_resolutions={sorted(listed)}"
            )
        attn = sorted(listed, reverse=True)
    cph = int(out["channels_per_head"])
    lowest = res >> (levels - 1)
    for r in [
        lowest,
        *(r for r in attn if r in {res >> i for i in range(levels)}),
    ]:  # the lowest level's in0 always has attention
        width = cblock[int(math.log2(res // r))]
        block = "in0" if r == lowest else "block0"
        has = sd.has(f"unet.dec.{r}x{r}_{block}.attn_qkv.weight")
        if has != (width // cph > 0):
            raise WeightsError(
                f"{sd.source}: attention at {r}x{r} ({width} channels) does not match "
                f"channels_per_head={cph}; pass the network's channels_per_head in extra"
            )
    c = img_channels
    return {
        "arch": ARCH,
        "sample_shape": [res, res, c],
        "num_classes": label_dim,
        "img_resolution": res,
        "model_channels": mc,
        "channel_mult": mult,
        "channel_mult_noise": None if cnoise == cblock[0] else cnoise // mc,
        "channel_mult_emb": None if cemb == max(cblock) else cemb // mc,
        "num_blocks": num_blocks,
        "attn_resolutions": attn,
        **{
            k: out[k]
            for k in (
                "label_balance",
                "concat_balance",
                "channels_per_head",
                "dropout",
                "res_balance",
                "attn_balance",
                "clip_act",
            )
        },  # fmt: skip
        "resample_filter": list(out["resample_filter"]),
        "logvar_channels": _shape(sd, "logvar_fourier.freqs")[0],
        "sigma_data": float(out["sigma_data"]),
        **{
            k: v
            for k, v in EDM2_TRAINING["img512" if c == 4 else "img64"].items()
            if k != "sigma_data"
        },  # fmt: skip
    }


def build(config: Mapping[str, Any]) -> tuple[EDM2UNet, EDM]:
    """Builds the EDM2 U-Net and its EDM formulation from a config.

    Args:
      config: A config from :data:`PRESETS` or :func:`infer_config`; an optional
        ``"dtype"`` (e.g. ``"bfloat16"``) sets the compute dtype.

    Returns:
      ``(EDM2UNet, EDM(sigma_data, p_mean, p_std))``.
    """
    fields = {k: config[k] for k in _MODEL_FIELDS if k in config}
    for k in ("channel_mult", "attn_resolutions", "resample_filter"):
        if k in fields:
            fields[k] = tuple(fields[k])
    model = EDM2UNet(**fields, dtype=jnp.dtype(config.get("dtype", "float32")))
    formulation = EDM(
        sigma_data=float(config.get("sigma_data", 0.5)),
        p_mean=float(config.get("p_mean", -0.4)),
        p_std=float(config.get("p_std", 1.0)),
    )
    return model, formulation


def _torch_key(path: tuple[str, ...]) -> str:
    top, rest = path[0], list(path[1:])
    if top.startswith("logvar_"):
        return ".".join([top, *rest])
    for part in ("enc", "dec"):
        if top.startswith(part + "_"):
            return ".".join(["unet", part, top[len(part) + 1 :], *rest])
    return ".".join(["unet", top, *rest])


def params_from_torch(sd: StateDict, config: Mapping[str, Any]) -> dict[str, Any]:
    """Maps an EDM2 ``Precond`` state dict onto the :class:`EDM2UNet` params.

    Conv weights ``[O, I, kh, kw]`` become HWIO kernels, linear weights ``[O, I]`` become
    ``[I, O]``; gains and the Fourier ``freqs``/``phases`` buffers are copied. Every key is
    taken through ``sd.take`` and ``sd.finish()`` rejects leftovers.

    Raises:
      WeightsError: For a missing, wrong-shaped or unexpected key (named).
    """
    model, _ = build(config)
    shape = (1, *config["sample_shape"])
    cond = jnp.zeros((1,), jnp.int32) if config.get("num_classes", 0) else None
    args = (jnp.zeros(shape, jnp.float32), jnp.zeros((1,), jnp.float32), cond)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])
    params: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        names = tuple(p.key for p in path)
        s = tuple(leaf.shape)
        key = _torch_key(names)
        if names[-1] == "weight" and len(s) == 4:
            value = sd.take(key, (s[3], s[2], s[0], s[1])).transpose(2, 3, 1, 0)
        elif names[-1] == "weight":
            value = sd.take(key, (s[1], s[0])).T
        else:
            value = sd.take(key, s)
        node = params
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = np.array(value, np.float32, order="C")  # a copy; keeps 0-d
    sd.finish()
    return params


__all__ = [
    "ARCH",
    "GENERATION_PRESETS",
    "LATENT_SCALING",
    "MODEL_ROOT",
    "PRESETS",
    "build",
    "infer_config",
    "latent_scale_bias",
    "params_from_torch",
]
