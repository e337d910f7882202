"""Writes the AutoencoderKL parity goldens tests/goldens/vae_*.npz from diffusers.

Reference: ``diffusers.AutoencoderKL`` of diffusers 0.31.0 (PyPI), run with torch on CPU in
float32. Each golden builds the network at a tiny size, replaces every parameter by seeded
random values (weights and biases ``N(0, 0.2^2)``, GroupNorm scales ``1 + N(0, 0.2^2)``)
so that no layer is an identity and the mid-block attention map is far from uniform,
then records

* ``config``: the jaxdiff config (JSON string, see :mod:`jaxdiff.pretrained.vae`);
* ``state/<key>``: the diffusers state dict (float32, torch layout);
* ``images`` ``[2, 16, 16, 3]`` (NHWC, uniform in [-1, 1]) and the encoder's posterior
  ``mean`` / ``logvar`` (NHWC, logvar clipped to [-30, 20] as diffusers does);
* ``latents`` (NHWC, standard normal) and ``decoded``: ``vae.decode(latents)`` (NHWC);
* ``images_odd`` ``[1, 15, 13, 3]`` and its posterior ``mean_odd`` (odd sizes exercise the
  one-sided padding of the downsampling convs).

Goldens: ``vae_tiny`` (two levels, quant convs, mid attention), ``vae_tiny_noquant``
(three levels, 16 latent channels, no quant convs: the SD3/FLUX layout) and
``vae_tiny_noattn`` (two resnets per level, no mid-block attention).

Rerun (never in CI; needs torch + diffusers==0.31.0)::

    /tmp/torchenv/bin/python tests/goldens/make_vae_golden.py
"""

import json
import os

import numpy as np
import torch
from diffusers import AutoencoderKL

HERE = os.path.dirname(os.path.abspath(__file__))

GOLDENS = {
    "vae_tiny": dict(
        block_out_channels=[8, 16],
        layers_per_block=1,
        latent_channels=4,
        use_quant_conv=True,
        mid_block_add_attention=True,
    ),
    "vae_tiny_noquant": dict(
        block_out_channels=[8, 8, 16],
        layers_per_block=1,
        latent_channels=16,
        use_quant_conv=False,
        mid_block_add_attention=True,
    ),
    "vae_tiny_noattn": dict(
        block_out_channels=[8, 16],
        layers_per_block=2,
        latent_channels=4,
        use_quant_conv=True,
        mid_block_add_attention=False,
    ),
}


def make(name: str, spec: dict, seed: int) -> None:
    levels = len(spec["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(spec["block_out_channels"]),
        layers_per_block=spec["layers_per_block"],
        latent_channels=spec["latent_channels"],
        norm_num_groups=4,
        sample_size=16,
        use_quant_conv=spec["use_quant_conv"],
        use_post_quant_conv=spec["use_quant_conv"],
        mid_block_add_attention=spec["mid_block_add_attention"],
    ).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            is_norm_scale = key.endswith(".weight") and p.ndim == 1
            p.copy_(1.0 + noise if is_norm_scale else noise)

    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    side = 16 // 2 ** (levels - 1)
    latents = rng.standard_normal((2, side, side, spec["latent_channels"])).astype(np.float32)
    with torch.no_grad():
        post = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
        decoded = vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample
        # Odd sizes check the downsampling's one-sided padding (15 -> 8 -> ..., 13 -> 7).
        odd = rng.uniform(-1, 1, (1, 15, 13, 3)).astype(np.float32)
        odd_mean = vae.encode(torch.from_numpy(odd).permute(0, 3, 1, 2)).latent_dist.mean

    def nhwc(t: torch.Tensor) -> np.ndarray:
        return t.permute(0, 2, 3, 1).numpy().astype(np.float32)

    config = {
        "arch": "vae",
        "sample_shape": [16, 16, 3],
        "num_classes": 0,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": spec["block_out_channels"],
        "layers_per_block": spec["layers_per_block"],
        "norm_num_groups": 4,
        "latent_channels": spec["latent_channels"],
        "use_quant_conv": spec["use_quant_conv"],
        "use_post_quant_conv": spec["use_quant_conv"],
        "mid_block_add_attention": spec["mid_block_add_attention"],
        "scaling_factor": 0.18215,
        "shift_factor": None,
    }
    out = {f"state/{k}": v.numpy().astype(np.float32) for k, v in vae.state_dict().items()}
    out.update(
        config=np.array(json.dumps(config)),
        images=images,
        mean=nhwc(post.mean),
        logvar=nhwc(post.logvar),
        latents=latents,
        decoded=nhwc(decoded),
        images_odd=odd,
        mean_odd=nhwc(odd_mean),
    )
    path = os.path.join(HERE, f"{name}.npz")
    np.savez(path, **out)
    print(f"{path}: {os.path.getsize(path) / 1024:.0f} KiB, {len(vae.state_dict())} tensors")
    for k in ("mean", "logvar", "decoded"):
        print(f"  {k}: std {out[k].std():.3f} max |.| {np.abs(out[k]).max():.3f}")


if __name__ == "__main__":
    for i, (name, spec) in enumerate(GOLDENS.items()):
        make(name, spec, seed=i)
