"""Published DiT and SiT weights: config inference, model building and key mapping.

**Where the weights come from.** DiT (Peebles & Xie 2023, facebookresearch/DiT):
``https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt`` and
``.../DiT-XL-2-512x512.pt``. SiT (Ma et al. 2024, willisma/SiT): ``SiT-XL-2-256x256.pt``,
linked from the SiT README (a Dropbox URL, see ``PRESETS``). Each is a plain PyTorch state
dict (checkpoints written by the repositories' ``train.py`` hold it under ``"ema"``);
convert it once with ``python -m jaxdiff.pretrained.convert`` (a SiT file is recognised by
``sit`` in its name, or pass ``--arch sit``: the two share every key).

**Network.** Both are :class:`jaxdiff.models.DiT` with ``embedding_scale=1.0`` (the
timestep embedding receives the raw label) and, for the published files,
``learn_sigma=True`` (the final layer has ``2 C`` channels; the module returns the first
``C``). Published sizes are XL/2 (depth 28, width 1152, 16 heads) on 4-channel latents,
1000 ImageNet classes plus the null class 1000 used for guidance.

**Formulations.**

* DiT: DDPM epsilon-prediction on the 1000-step linear-beta schedule,
  ``VPEpsilon(schedule=DiscreteVPSchedule(), noise_label_scale=1000)``; the network gets
  the (fractional) step index in ``[0, 999]``. The learned variance (second half of the
  output) is not used by jaxdiff's samplers. Useful sigmas lie between ``sigma(0) ~ 0.01``
  and ``sigma(999) ~ 157`` (``DiscreteVPSchedule().sigmas()``).
* SiT: the Linear interpolant ``x_s = s x0 + (1 - s) n`` with the velocity model, i.e.
  ``FlowMatching(time_reversed=True, noise_label_scale=1.0)``; the network gets
  ``s = 1 / (1 + sigma)`` in ``[0, 1]`` (data at 1) and predicts ``x0 - n``.

**Latents.** Both models work on ``stabilityai/sd-vae-ft-ema`` / ``sd-vae-ft-mse`` latents
(8x downsampling, 4 channels) multiplied by 0.18215: decode ``vae.decode(z / 0.18215)``
(config keys ``vae`` and ``latent_scale``).

**Guidance.** The reference samplers (``sample.py`` of both repositories, via
``forward_with_cfg``) apply classifier-free guidance to the first 3 of the 4 latent
channels only ("for exact reproducibility", says the code); jaxdiff's guidance acts on the
whole denoiser output, i.e. on all channels (the standard form, which the reference's own
comment names as the alternative), so guided samples differ slightly from the reference's.

The state dict's frozen ``pos_embed`` buffer is not loaded: jaxdiff computes the same
sin-cos table, and the converter checks the file's copy against it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import FlowMatching, Formulation, VPEpsilon
from jaxdiff.diffusion.vp_schedules import DiscreteVPSchedule
from jaxdiff.models.dit import DIT_CONFIGS, DiT, sincos_2d
from jaxdiff.pretrained.weights_io import StateDict, WeightsError

ARCH = "dit"
"""The main architecture name of this module."""

ARCHS: tuple[str, ...] = ("dit", "sit")
"""Both architectures this module converts (same network, different formulation)."""

LATENT_SCALE = 0.18215
"""Factor DiT and SiT multiply the VAE latents by (decode ``z / LATENT_SCALE``)."""

_XL2 = dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, mlp_ratio=4.0)
_COMMON = dict(
    num_classes=1000,
    frequency_features=256,
    learn_sigma=True,
    latent_scale=LATENT_SCALE,
    vae="stabilityai/sd-vae-ft-ema",
)
_DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-{0}x{0}.pt"
_SIT_URL = (
    "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
    "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0"
)

PRESETS: dict[str, dict[str, Any]] = {
    "DiT-XL/2-256": dict(
        arch="dit", sample_shape=[32, 32, 4], url=_DIT_URL.format(256), **_XL2, **_COMMON
    ),
    "DiT-XL/2-512": dict(
        arch="dit", sample_shape=[64, 64, 4], url=_DIT_URL.format(512), **_XL2, **_COMMON
    ),
    "SiT-XL/2-256": dict(arch="sit", sample_shape=[32, 32, 4], url=_SIT_URL, **_XL2, **_COMMON),
}
"""Configs of the published checkpoints (256px images are 32x32x4 latents)."""

HEADS_BY_WIDTH: dict[int, int] = {c["hidden_size"]: c["num_heads"] for c in DIT_CONFIGS.values()}
"""Attention heads of the named DiT widths; the state dict cannot tell the head count."""


def _shape(sd: StateDict, key: str) -> tuple[int, ...]:
    # Reading a shape takes the key in this (throw-away) StateDict; fine for inference.
    return tuple(sd.take(key).shape)


def infer_config(sd: StateDict, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Reads a DiT/SiT config from the state dict's shapes.

    Args:
      sd: The PyTorch state dict (official key names).
      extra: Optional side information: ``arch`` (``"dit"``, the default, or ``"sit"``:
        the files cannot be told apart by shape) and ``num_heads`` (needed when the width
        is not one of the named sizes').

    Returns:
      A JSON-serialisable config (``arch``, ``sample_shape``, ``num_classes``,
      ``patch_size``, ``hidden_size``, ``depth``, ``num_heads``, ``mlp_ratio``,
      ``frequency_features``, ``learn_sigma``, and for 4-channel latents ``vae`` and
      ``latent_scale``).

    Raises:
      WeightsError: Naming the key whose shape fits no DiT, or an unknown ``arch``.
    """
    extra = dict(extra or {})
    arch = extra.get("arch", ARCH)
    if arch not in ARCHS:
        raise WeightsError(f"{sd.source}: arch {arch!r} is not one of {ARCHS}")
    patch = _shape(sd, "x_embedder.proj.weight")
    if len(patch) != 4 or patch[2] != patch[3]:
        raise WeightsError(
            f"{sd.source}: key 'x_embedder.proj.weight' has shape {patch}, expected a square "
            "patch convolution (hidden, channels, p, p)"
        )
    hidden, channels, p, _ = patch
    depth = 0
    while sd.has(f"blocks.{depth}.attn.qkv.weight"):
        depth += 1
    if depth == 0:
        raise WeightsError(f"{sd.source}: missing key 'blocks.0.attn.qkv.weight' (no blocks)")
    mlp_hidden = _shape(sd, "blocks.0.mlp.fc1.weight")[0]
    out_rows = _shape(sd, "final_layer.linear.weight")[0]
    if out_rows not in (p * p * channels, 2 * p * p * channels):
        raise WeightsError(
            f"{sd.source}: key 'final_layer.linear.weight' has {out_rows} rows, expected "
            f"{p * p * channels} or {2 * p * p * channels} (learn_sigma) for patch {p} and "
            f"{channels} channels"
        )
    table = _shape(sd, "y_embedder.embedding_table.weight")[0]
    if table < 2:
        raise WeightsError(
            f"{sd.source}: key 'y_embedder.embedding_table.weight' has {table} row(s); "
            "jaxdiff needs the classes plus the null-class row (class_dropout_prob > 0)"
        )
    tokens = _shape(sd, "pos_embed")[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise WeightsError(f"{sd.source}: key 'pos_embed' has {tokens} tokens, not a square grid")
    if int(hidden * (mlp_hidden / hidden)) != mlp_hidden:
        raise WeightsError(
            f"{sd.source}: key 'blocks.0.mlp.fc1.weight' has {mlp_hidden} rows, which no "
            f"mlp_ratio reproduces for width {hidden}"
        )
    heads = extra.get("num_heads", HEADS_BY_WIDTH.get(hidden))
    if heads is None:
        raise WeightsError(
            f"{sd.source}: width {hidden} (key 'x_embedder.proj.weight') is not a named DiT "
            f"size {sorted(HEADS_BY_WIDTH)}; pass num_heads in extra"
        )
    config: dict[str, Any] = dict(
        arch=arch,
        sample_shape=[grid * p, grid * p, channels],
        num_classes=table - 1,
        patch_size=p,
        hidden_size=hidden,
        depth=depth,
        num_heads=int(heads),
        mlp_ratio=mlp_hidden / hidden,
        frequency_features=_shape(sd, "t_embedder.mlp.0.weight")[1],
        learn_sigma=out_rows == 2 * p * p * channels,
    )
    if channels == 4:
        config.update(latent_scale=LATENT_SCALE, vae=_COMMON["vae"])
    return config


def formulation(config: Mapping[str, Any]) -> Formulation:
    """The formulation of a DiT (DDPM epsilon) or SiT (reversed-time flow) config."""
    if config["arch"] == "sit":
        return FlowMatching(time_reversed=True, noise_label_scale=1.0)
    if config["arch"] == "dit":
        return VPEpsilon(
            schedule=DiscreteVPSchedule(), t_min=0.0, t_max=0.999, noise_label_scale=1000.0
        )
    raise WeightsError(f"arch {config['arch']!r} is not one of {ARCHS}")


def build(config: Mapping[str, Any]) -> tuple[nn.Module, Formulation]:
    """Builds the network and its formulation.

    Args:
      config: From :func:`infer_config` or :data:`PRESETS`; an optional ``dtype``
        (e.g. ``"bfloat16"``) sets the compute dtype (parameters stay float32), and
        optional ``scan_blocks``, ``remat`` and ``attention_impl`` set the DiT speed
        options (the loader restacks the file's unrolled blocks for ``scan_blocks``).

    Returns:
      ``(DiT module, formulation)``.
    """
    module = DiT(
        patch_size=int(config["patch_size"]),
        hidden_size=int(config["hidden_size"]),
        depth=int(config["depth"]),
        num_heads=int(config["num_heads"]),
        mlp_ratio=float(config["mlp_ratio"]),
        num_classes=int(config["num_classes"]),
        embedding="positional",
        embedding_scale=1.0,
        frequency_features=int(config["frequency_features"]),
        learn_sigma=bool(config["learn_sigma"]),
        scan_blocks=bool(config.get("scan_blocks", False)),
        remat=config.get("remat", "none"),
        attention_impl=config.get("attention_impl"),
        dtype=jnp.dtype(config.get("dtype", "float32")),
        param_dtype=jnp.float32,
    )
    return module, formulation(config)


def _linear(sd: StateDict, prefix: str, fan_in: int, fan_out: int) -> dict[str, np.ndarray]:
    # torch Linear stores weight as (out, in); a Flax Dense kernel is (in, out).
    w = sd.take(f"{prefix}.weight", (fan_out, fan_in))
    return {"kernel": np.ascontiguousarray(w.T), "bias": sd.take(f"{prefix}.bias", (fan_out,))}


def _block(sd: StateDict, i: int, d: int, heads: int, mlp: int) -> dict[str, Any]:
    pre, hd = f"blocks.{i}", d // heads
    # timm's fused qkv rows are (q|k|v, head, head_dim): our (D, 3, heads, head_dim) kernel.
    qkv_w = sd.take(f"{pre}.attn.qkv.weight", (3 * d, d))
    qkv_b = sd.take(f"{pre}.attn.qkv.bias", (3 * d,))
    proj_w = sd.take(f"{pre}.attn.proj.weight", (d, d))
    return {
        "adaLN": _linear(sd, f"{pre}.adaLN_modulation.1", d, 6 * d),
        "attn": {
            "qkv": {
                "kernel": np.ascontiguousarray(qkv_w.T.reshape(d, 3, heads, hd)),
                "bias": qkv_b.reshape(3, heads, hd),
            },
            "out": {
                "kernel": np.ascontiguousarray(proj_w.T.reshape(heads, hd, d)),
                "bias": sd.take(f"{pre}.attn.proj.bias", (d,)),
            },
        },
        "fc1": _linear(sd, f"{pre}.mlp.fc1", d, mlp),
        "fc2": _linear(sd, f"{pre}.mlp.fc2", mlp, d),
    }


def params_from_torch(sd: StateDict, config: Mapping[str, Any]) -> dict[str, Any]:
    """Maps an official DiT/SiT state dict onto the params of :func:`build`'s module.

    Every key is taken with its expected shape; ``pos_embed`` is compared with jaxdiff's
    sin-cos table instead of being loaded.

    Args:
      sd: The state dict.
      config: The model config.

    Returns:
      Nested float32 numpy params, as ``nn.unbox(module.init(...))["params"]``.

    Raises:
      WeightsError: For a missing, wrong-shaped or unexpected key, or a ``pos_embed``
        that is not the reference's sin-cos table.
    """
    d, p, depth = int(config["hidden_size"]), int(config["patch_size"]), int(config["depth"])
    height, width, channels = (int(v) for v in config["sample_shape"])
    heads, classes = int(config["num_heads"]), int(config["num_classes"])
    mlp = int(d * float(config["mlp_ratio"]))
    out_ch = 2 * channels if config["learn_sigma"] else channels
    gh, gw = height // p, width // p

    pos = sd.take("pos_embed", (1, gh * gw, d))[0]
    ours = sincos_2d(gh, gw, d)
    if not np.allclose(pos, ours, rtol=0.0, atol=1e-5):
        worst = float(np.abs(pos - ours).max())
        raise WeightsError(
            f"{sd.source}: key 'pos_embed' differs from the fixed 2-D sin-cos table jaxdiff "
            f"computes (max abs difference {worst:.3g}); this is not an official DiT/SiT "
            "checkpoint (a learned or reordered position embedding cannot be loaded)"
        )
    # The patch conv (D, C, p, p) becomes a Dense over tokens flattened (row, col, channel).
    conv = sd.take("x_embedder.proj.weight", (d, channels, p, p))
    params: dict[str, Any] = {
        "patch_embed": {
            "kernel": np.ascontiguousarray(conv.transpose(2, 3, 1, 0).reshape(p * p * channels, d)),
            "bias": sd.take("x_embedder.proj.bias", (d,)),
        },
        "noise_embed": {
            "fc1": _linear(sd, "t_embedder.mlp.0", int(config["frequency_features"]), d),
            "fc2": _linear(sd, "t_embedder.mlp.2", d, d),
        },
        "class_embed": {
            "table": {"embedding": sd.take("y_embedder.embedding_table.weight", (classes + 1, d))}
        },
    }
    for i in range(depth):
        params[f"block_{i}"] = _block(sd, i, d, heads, mlp)
    params["final_adaLN"] = _linear(sd, "final_layer.adaLN_modulation.1", d, 2 * d)
    params["final"] = _linear(sd, "final_layer.linear", d, p * p * out_ch)
    sd.finish()
    return params


__all__ = [
    "ARCH",
    "ARCHS",
    "HEADS_BY_WIDTH",
    "LATENT_SCALE",
    "PRESETS",
    "build",
    "formulation",
    "infer_config",
    "params_from_torch",
]
