"""Writes the FID Inception parity golden with pytorch-fid 0.3.0 on seeded random weights.

Reference: ``pytorch-fid==0.3.0`` (``pytorch_fid.inception.InceptionV3`` with
``use_fid_inception=True``: the FID Inception blocks, bilinear resize to 299 with
``align_corners=False``, ``2 * x - 1``) and its ``fid_score.calculate_frechet_distance``.
Run (never in CI) with torch 2.13.0 (CPU), pytorch-fid 0.3.0 and scipy::

    /tmp/torchenv/bin/pip install --no-deps pytorch-fid==0.3.0
    /tmp/torchenv/bin/pip install scipy
    /tmp/torchenv/bin/python tests/goldens/make_inception_golden.py

pytorch-fid imports torchvision, which this environment does not have (and which is only
used for the base classes of the blocks and the empty ``inception_v3`` builder). A stub
written here (:func:`install_torchvision_stub`) provides ``torchvision.models.inception``
with torchvision's module names, shapes and the forwards of the blocks pytorch-fid does
not patch (``BasicConv2d``, ``InceptionB``, ``InceptionD``). pytorch-fid's own classes
(``FIDInceptionA/C/E_1/E_2``, ``InceptionV3``) and resize run unmodified. The weights
download is replaced by the seeded state dict.

Seed rule (the full architecture at 95 MB of weights would be too big to commit; both
sides regenerate them): for tensor ``i`` in state-dict order (keys and shapes in the
golden's ``config``), ``rng = numpy.random.default_rng([SEED, i])`` and

* ``*.conv.weight`` ``[O, I, kh, kw]``: ``standard_normal * sqrt(2 / (I * kh * kw))``;
* ``*.bn.weight``: ``uniform(0.5, 1.5)``; ``*.bn.bias``: ``uniform(-0.2, 0.5)``;
  ``*.bn.running_mean``: ``uniform(-0.2, 0.2)``; ``*.bn.running_var``: ``uniform(0.5, 2)``;
* ``fc.weight`` ``[1008, 2048]``: ``standard_normal * 0.5 / sqrt(2048)``;
  ``fc.bias``: ``uniform(-1, 1)``;
* ``*.num_batches_tracked``: int64 zero (no draw),

each cast to float32. ``config["sums"]`` holds every tensor's float64 sum so a change
in numpy's streams is caught, not silently compared.

``tests/goldens/inception_tiny.npz`` holds uint8 NCHW images ``u_a`` ``[5, 3, 32, 32]``,
``u_b`` ``[5, 3, 32, 32]``, ``u_256`` ``[2, 3, 256, 256]``, ``u_299`` ``[2, 3, 299, 299]``;
for all 14 in that order: ``pool3`` ``[14, 2048]``, ``spatial`` ``[14, 2023]`` (ADM's
sFID features: ``mixed_6/conv`` = ``Mixed_6d.branch1x1``, first 7 channels, flattened in
NHWC order) and ``logits_unbiased`` ``[14, 1008]`` (ADM / improved-GAN IS: ``pool3 @
fc.weight.T``, no bias); scalars ``fid`` and ``sfid`` (``calculate_frechet_distance`` of
set a vs set b on pool3 / spatial, statistics as pytorch-fid: ``np.mean``, ``np.cov(...,
rowvar=False)``) and ``inception_score`` (ADM's ``compute_inception_score`` on all 14).
"""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import torch
from torch import nn
from torch.nn import functional as tfn

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20151205
PYTORCH_FID = "0.3.0"
SPATIAL_CHANNELS = 7


def seeded_tensor(index: int, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor ``index`` of the seed rule (see the module docstring)."""
    if key.endswith("num_batches_tracked"):
        return np.zeros(shape, np.int64)
    rng = np.random.default_rng([SEED, index])
    if key == "fc.weight":
        return (rng.standard_normal(shape) * 0.5 / np.sqrt(shape[1])).astype(np.float32)
    if key == "fc.bias":
        return rng.uniform(-1.0, 1.0, shape).astype(np.float32)
    if key.endswith("conv.weight"):
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    bounds = {
        "bn.weight": (0.5, 1.5),
        "bn.bias": (-0.2, 0.5),
        "bn.running_mean": (-0.2, 0.2),
        "bn.running_var": (0.5, 2.0),
    }
    for suffix, (lo, hi) in bounds.items():
        if key.endswith(suffix):
            return rng.uniform(lo, hi, shape).astype(np.float32)
    raise ValueError(f"no seed rule for {key!r}")


class _BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return tfn.relu(self.bn(self.conv(x)))


def _add(module: nn.Module, spec: list[tuple]) -> None:
    """Registers ``(name, cin, cout, kwargs)`` BasicConv2d children in order."""
    for name, cin, cout, kw in spec:
        setattr(module, name, _BasicConv2d(cin, cout, **kw))


class _InceptionA(nn.Module):  # forward: pytorch-fid's FIDInceptionA
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        k3 = dict(kernel_size=3, padding=1)
        _add(self, [("branch1x1", cin, 64, dict(kernel_size=1)),
                    ("branch5x5_1", cin, 48, dict(kernel_size=1)),
                    ("branch5x5_2", 48, 64, dict(kernel_size=5, padding=2)),
                    ("branch3x3dbl_1", cin, 64, dict(kernel_size=1)),
                    ("branch3x3dbl_2", 64, 96, k3), ("branch3x3dbl_3", 96, 96, k3),
                    ("branch_pool", cin, pool_features, dict(kernel_size=1))])  # fmt: skip


class _InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        _add(self, [("branch3x3", cin, 384, dict(kernel_size=3, stride=2)),
                    ("branch3x3dbl_1", cin, 64, dict(kernel_size=1)),
                    ("branch3x3dbl_2", 64, 96, dict(kernel_size=3, padding=1)),
                    ("branch3x3dbl_3", 96, 96, dict(kernel_size=3, stride=2))])  # fmt: skip

    def forward(self, x):
        d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), d, tfn.max_pool2d(x, 3, stride=2)], 1)


class _InceptionC(nn.Module):  # forward: pytorch-fid's FIDInceptionC
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7, row = channels_7x7, dict(kernel_size=(1, 7), padding=(0, 3))
        col = dict(kernel_size=(7, 1), padding=(3, 0))
        _add(self, [("branch1x1", cin, 192, dict(kernel_size=1)),
                    ("branch7x7_1", cin, c7, dict(kernel_size=1)),
                    ("branch7x7_2", c7, c7, row), ("branch7x7_3", c7, 192, col),
                    ("branch7x7dbl_1", cin, c7, dict(kernel_size=1)),
                    ("branch7x7dbl_2", c7, c7, col), ("branch7x7dbl_3", c7, c7, row),
                    ("branch7x7dbl_4", c7, c7, col), ("branch7x7dbl_5", c7, 192, row),
                    ("branch_pool", cin, 192, dict(kernel_size=1))])  # fmt: skip


class _InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        _add(self, [("branch3x3_1", cin, 192, dict(kernel_size=1)),
                    ("branch3x3_2", 192, 320, dict(kernel_size=3, stride=2)),
                    ("branch7x7x3_1", cin, 192, dict(kernel_size=1)),
                    ("branch7x7x3_2", 192, 192, dict(kernel_size=(1, 7), padding=(0, 3))),
                    ("branch7x7x3_3", 192, 192, dict(kernel_size=(7, 1), padding=(3, 0))),
                    ("branch7x7x3_4", 192, 192, dict(kernel_size=3, stride=2))])  # fmt: skip

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b)))
        return torch.cat([a, b, tfn.max_pool2d(x, 3, stride=2)], 1)


class _InceptionE(nn.Module):  # forward: pytorch-fid's FIDInceptionE_1 / E_2
    def __init__(self, cin: int):
        super().__init__()
        row, col = (
            dict(kernel_size=(1, 3), padding=(0, 1)),
            dict(kernel_size=(3, 1), padding=(1, 0)),
        )
        _add(self, [("branch1x1", cin, 320, dict(kernel_size=1)),
                    ("branch3x3_1", cin, 384, dict(kernel_size=1)),
                    ("branch3x3_2a", 384, 384, row), ("branch3x3_2b", 384, 384, col),
                    ("branch3x3dbl_1", cin, 448, dict(kernel_size=1)),
                    ("branch3x3dbl_2", 448, 384, dict(kernel_size=3, padding=1)),
                    ("branch3x3dbl_3a", 384, 384, row), ("branch3x3dbl_3b", 384, 384, col),
                    ("branch_pool", cin, 192, dict(kernel_size=1))])  # fmt: skip


class _Inception3(nn.Module):
    """torchvision's Inception3 module tree (no forward: pytorch-fid uses the children)."""

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True, **_):
        super().__init__()
        if aux_logits:
            raise NotImplementedError("the stub has no AuxLogits; pytorch-fid does not use it")
        _add(self, [("Conv2d_1a_3x3", 3, 32, dict(kernel_size=3, stride=2)),
                    ("Conv2d_2a_3x3", 32, 32, dict(kernel_size=3)),
                    ("Conv2d_2b_3x3", 32, 64, dict(kernel_size=3, padding=1))])  # fmt: skip
        self.maxpool1 = nn.MaxPool2d(3, stride=2)
        _add(self, [("Conv2d_3b_1x1", 64, 80, dict(kernel_size=1)),
                    ("Conv2d_4a_3x3", 80, 192, dict(kernel_size=3))])  # fmt: skip
        self.maxpool2 = nn.MaxPool2d(3, stride=2)
        self.Mixed_5b, self.Mixed_5c = _InceptionA(192, 32), _InceptionA(256, 64)
        self.Mixed_5d, self.Mixed_6a = _InceptionA(288, 64), _InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = _InceptionC(768, 128), _InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _InceptionC(768, 160), _InceptionC(768, 192)
        self.AuxLogits = None
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = (
            _InceptionD(768),
            _InceptionE(1280),
            _InceptionE(2048),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=0.5)
        self.fc = nn.Linear(2048, num_classes)


def install_torchvision_stub() -> None:
    """Puts a minimal ``torchvision`` (the names pytorch-fid 0.3.0 imports) in sys.modules."""
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.0.0-stub"  # parses as (0, 0): pytorch-fid then passes no init kwarg
    models = types.ModuleType("torchvision.models")
    inc = types.ModuleType("torchvision.models.inception")
    inc.BasicConv2d, inc.Inception3 = _BasicConv2d, _Inception3
    inc.InceptionA, inc.InceptionB, inc.InceptionC = _InceptionA, _InceptionB, _InceptionC
    inc.InceptionD, inc.InceptionE = _InceptionD, _InceptionE

    def inception_v3(pretrained: bool = False, **kwargs) -> nn.Module:
        if pretrained:
            raise RuntimeError("the stub has no pretrained weights")
        return _Inception3(**kwargs)

    models.inception, models.inception_v3 = inc, inception_v3
    tv.models, tv.transforms = models, types.ModuleType("torchvision.transforms")
    for name, mod in (("", tv), (".models", models), (".models.inception", inc)):
        sys.modules["torchvision" + name] = mod
    sys.modules["torchvision.transforms"] = tv.transforms


def block_images(rng: np.random.Generator, n: int, size: int, block: int) -> np.ndarray:
    """uint8 ``[n, 3, size, size]``: random colours in ``block``-pixel squares (compress well)."""
    cells = rng.integers(0, 256, (n, 3, size // block, size // block), dtype=np.uint8)
    return np.kron(cells, np.ones((block, block), np.uint8))


def main() -> int:
    """Builds the reference network, runs it and writes ``inception_tiny.npz``."""
    install_torchvision_stub()
    import pytorch_fid  # noqa: PLC0415 - needs the stub first
    from pytorch_fid import inception as pf_inception  # noqa: PLC0415
    from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: PLC0415

    assert pytorch_fid.__version__ == PYTORCH_FID, pytorch_fid.__version__
    template = _Inception3(num_classes=1008, aux_logits=False).state_dict()
    keys = list(template)
    shapes = [tuple(template[k].shape) for k in keys]
    state = {
        k: torch.from_numpy(seeded_tensor(i, k, s))
        for i, (k, s) in enumerate(zip(keys, shapes, strict=True))
    }
    pf_inception.load_state_dict_from_url = lambda *a, **k: state  # no download
    model = pf_inception.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    spatial_maps = []
    model.blocks[2][6].register_forward_hook(  # Mixed_6d (TF mixed_6); its first 192
        lambda mod, inp, out: spatial_maps.append(out[:, :SPATIAL_CHANNELS])  # = branch1x1
    )
    assert model.blocks[2][6].branch1x1.conv.out_channels == 192

    rng = np.random.default_rng(0)
    u_a = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    u_b = np.clip(rng.normal(150, 40, (5, 3, 32, 32)), 0, 255).astype(np.uint8)
    u_256, u_299 = block_images(rng, 2, 256, 16), block_images(rng, 2, 299, 13)
    pool3, spatial = [], []
    with torch.no_grad():
        for u in (u_a, u_b, u_256, u_299):
            # pytorch-fid's data path: ToTensor (u / 255) then the model's resize and 2x-1.
            (p,) = model(torch.from_numpy(u).to(torch.float32) / 255.0)
            pool3.append(p[:, :, 0, 0].numpy())
            s = spatial_maps.pop()
            spatial.append(s.permute(0, 2, 3, 1).reshape(s.shape[0], -1).numpy())  # NHWC
    pool3, spatial = np.concatenate(pool3), np.concatenate(spatial)
    logits = (torch.from_numpy(pool3) @ state["fc.weight"].T).numpy()

    def fd(f1: np.ndarray, f2: np.ndarray) -> float:
        f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
        return float(
            calculate_frechet_distance(
                f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
            )
        )

    # ADM's compute_inception_score (one split: fewer than 5000 images).
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    kl = probs * (np.log(probs) - np.log(np.mean(probs, 0, keepdims=True)))
    inception_score = float(np.exp(np.mean(np.sum(kl, 1))))
    fid, sfid = fd(pool3[:5], pool3[5:10]), fd(spatial[:5], spatial[5:10])  # slow: sqrtm
    config = dict(
        seed=SEED,
        keys=keys,
        shapes=shapes,
        sums=[float(np.sum(v.numpy(), dtype=np.float64)) for v in state.values()],
        pytorch_fid=pytorch_fid.__version__,
        torch=torch.__version__,
    )
    out = os.path.join(HERE, "inception_tiny.npz")
    np.savez_compressed(
        out,
        config=np.array([json.dumps(config)]),
        u_a=u_a,
        u_b=u_b,
        u_256=u_256,
        u_299=u_299,
        pool3=pool3.astype(np.float32),
        spatial=spatial.astype(np.float32),
        logits_unbiased=logits.astype(np.float32),
        fid=np.float64(fid),
        sfid=np.float64(sfid),
        inception_score=np.float64(inception_score),
    )
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")
    print(f"pool3 mean {pool3.mean():.4f} max {pool3.max():.4f}; spatial {spatial.shape}")
    print(f"fid {fid:.6f} sfid {sfid:.6f}")
    print(f"IS {inception_score:.6f}; logits std {logits.std():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
