"""Writes the DINOv2 parity golden: the upstream ViT and EDM2's preprocessing, on fixed input.

Upstream code (read-only copies, imported from disk, not vendored):

* DINOv2: facebookresearch/dinov2 at commit b8931f7bf91576930313be2c6d6af376033b35f0
  (``dinov2/models/vision_transformer.py``, ``dinov2/layers``);
* EDM2's ``calculate_metrics.py`` (``DINOv2Detector``, default ``resize_mode="torch"``):
  ``F.interpolate(x.float(), size=(224, 224), mode="bicubic", antialias=True)``, then
  ``x / 255``, minus the ImageNet mean, over the ImageNet std. Those lines are repeated in
  :func:`edm2_preprocess` (with the side as a parameter) because importing EDM2's module
  needs its ``dnnlib``/``torch_utils`` packages.

Run (never in CI) with torch 2.13.0 (CPU)::

    /tmp/torchenv/bin/python tests/goldens/make_dinov2_golden.py \
        --dinov2 /tmp/upstream/facebookresearch+dinov2

The network is built as ``dinov2.hub.backbones`` builds the published ones (patch 14,
``init_values=1.0`` LayerScale, ``block_chunks=0``, no registers, ``interpolate_offset``
0.1, no antialias), but tiny: width 24, 3 heads, depth 2, native ``img_size`` 70 (a 5x5
patch grid). Every parameter is overwritten with seeded random values so that LayerScale,
the norms and the positional embedding all matter.

``tests/goldens/dinov2_tiny.npz`` holds:

* ``config``: one-element JSON string array (model kwargs, upstream commit, torch
  version, and ``param_counts``: the state-dict sizes of the full-size ViT-S/B/L/g 14);
* ``sd/<torch key>``: the tiny model's full state dict;
* ``u_a`` ``[2, 3, 32, 32]`` uint8 -> ``pre_a`` (EDM2 preprocessing to 56x56: upsampling,
  a 4x4 grid, so the positional embedding is interpolated 5 -> 4) -> ``out_a`` ``[2, 24]``;
* ``u_b`` ``[1, 3, 100, 90]`` -> ``pre_b`` (to 42x70: non-square, 3x5 grid) -> ``out_b``;
* ``u_c`` ``[1, 3, 70, 70]`` -> (same size: the resize is the identity; not stored) ->
  ``out_c`` (native grid: no interpolation);
* ``u_d`` ``[1, 3, 64, 64]`` and its 4x4 tiling (256x256) through the real 224x224 EDM2
  preprocessing, kept every 8th pixel: ``pre_d``, ``pre_e`` ``[1, 3, 28, 28]``;
* ``pos37`` ``[1, 1370, 4]`` -> ``pos37_16`` ``[1, 257, 4]``: the published geometry's
  positional-embedding interpolation (37x37 grid to EDM2's 16x16), by the upstream method.

``tests/goldens/dinov2_tiny.pth`` is the tiny state dict saved by ``torch.save``, to test
the torch-free reader on a real file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
COMMIT = "facebookresearch/dinov2@b8931f7bf91576930313be2c6d6af376033b35f0"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TINY = dict(
    img_size=70,
    patch_size=14,
    embed_dim=24,
    depth=2,
    num_heads=3,
    mlp_ratio=4,
    init_values=1.0,
    block_chunks=0,
    num_register_tokens=0,
    interpolate_antialias=False,
    interpolate_offset=0.1,
)


def edm2_preprocess(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """EDM2 ``DINOv2Detector.__call__`` (resize_mode='torch') up to the network call."""
    x = torch.nn.functional.interpolate(
        x.to(torch.float32), size=size, mode="bicubic", antialias=True
    )
    x = x.to(torch.float32) / 255
    x = x - torch.tensor(MEAN, dtype=torch.float32).reshape(1, -1, 1, 1)
    x = x / torch.tensor(STD, dtype=torch.float32).reshape(1, -1, 1, 1)
    return x


def randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("gamma"):
                p.copy_(0.5 + 0.3 * noise)
            else:
                p.copy_(0.2 * noise)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dinov2", default="/tmp/upstream/facebookresearch+dinov2")
    args = parser.parse_args()
    sys.path.insert(0, args.dinov2)
    warnings.filterwarnings("ignore", "xFormers")
    from dinov2.models import vision_transformer as vits

    torch.manual_seed(0)
    # vit_small() fixes the width and depth; the class takes the tiny dims directly.
    model = vits.DinoVisionTransformer(
        **TINY,
        block_fn=vits.partial(vits.Block, attn_class=vits.MemEffAttention),
    )
    randomise(model, seed=1)
    model.eval()

    rng = np.random.default_rng(2)
    u_a = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    u_b = rng.integers(0, 256, (1, 3, 100, 90), dtype=np.uint8)
    u_c = rng.integers(0, 256, (1, 3, 70, 70), dtype=np.uint8)
    u_d = rng.integers(0, 256, (1, 3, 64, 64), dtype=np.uint8)
    u_e = np.tile(u_d, (1, 1, 4, 4))
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for tag, u, size in (("a", u_a, (56, 56)), ("b", u_b, (42, 70)), ("c", u_c, (70, 70))):
            pre = edm2_preprocess(torch.from_numpy(u), size)
            out[f"u_{tag}"] = u
            if tag != "c":  # (the identity resize; kept out for size)
                out[f"pre_{tag}"] = pre.numpy()
            out[f"out_{tag}"] = model(pre).numpy()
        for tag, u in (("d", u_d), ("e", u_e)):
            pre = edm2_preprocess(torch.from_numpy(u), (224, 224))
            out[f"pre_{tag}"] = pre[:, :, ::8, ::8].numpy().copy()
        out["u_d"] = u_d
        # The published geometry: 518 native (37x37 grid), 224 input (16x16 grid).
        pos37 = torch.from_numpy(rng.standard_normal((1, 37 * 37 + 1, 4)).astype(np.float32))
        fake = types.SimpleNamespace(
            pos_embed=pos37, patch_size=14, interpolate_offset=0.1, interpolate_antialias=False
        )
        tokens = torch.zeros(1, 16 * 16 + 1, 4)
        pos16 = vits.DinoVisionTransformer.interpolate_pos_encoding(fake, tokens, 224, 224)
        out["pos37"] = pos37.numpy()
        out["pos37_16"] = pos16.numpy()

    counts = {}
    for arch in ("vit_small", "vit_base", "vit_large", "vit_giant2"):
        with torch.device("meta"):
            full = vits.__dict__[arch](
                img_size=518,
                patch_size=14,
                init_values=1.0,
                block_chunks=0,
                ffn_layer="swiglufused" if arch == "vit_giant2" else "mlp",
            )
        counts[arch] = int(sum(v.numel() for v in full.state_dict().values()))
        print(arch, counts[arch])

    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    config = dict(model=TINY, upstream=COMMIT, torch=torch.__version__, param_counts=counts)
    payload = {"config": np.array([json.dumps(config, sort_keys=True)])}
    payload.update({f"sd/{k}": v for k, v in sd.items()})
    payload.update(out)
    dst = os.path.join(HERE, "dinov2_tiny.npz")
    np.savez(dst, **payload)
    torch.save(model.state_dict(), os.path.join(HERE, "dinov2_tiny.pth"))
    print(f"wrote {dst} ({os.path.getsize(dst)} bytes); sd keys: {len(sd)}")


if __name__ == "__main__":
    main()
