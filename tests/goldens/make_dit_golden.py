"""Writes the DiT/SiT parity goldens: upstream PyTorch networks on fixed inputs.

Upstream code (read-only copies, imported from disk, not vendored):

* DiT: facebookresearch/DiT at commit ed81ce2229091fd4ecc9a223645f95cf379d582b
  (``models.py``, ``diffusion/``);
* SiT: willisma/SiT at commit 947f95bd3a510e9af441d38c1e9f72e0eee873c5
  (``models.py``, ``transport/``);

run with torch 2.13.0 (CPU) and timm 1.0.31. Rerun (never in CI) with::

    /tmp/torchenv/bin/python tests/goldens/make_dit_golden.py \
        --dit /tmp/upstream/facebookresearch+DiT \
        --sit /tmp/upstream/willisma+SiT

Stubs, because the scratch environment lacks some packages the upstream imports need:

* ``torchvision``: timm imports it at module level (``FrozenBatchNorm2d``, datasets,
  ``InterpolationMode`` ...) but DiT uses only timm's ``PatchEmbed``, ``Attention`` and
  ``Mlp``, which never touch it. A meta-path finder answers every ``torchvision.*`` import
  with an empty module whose attributes are dummy ``nn.Module`` classes.
* ``torchdiffeq``: SiT's ``transport.integrators`` imports ``odeint``; the goldens only use
  the transport's score/path maths, never the ODE solver, so a module whose ``odeint``
  raises is enough.

The networks are built at small sizes (the three files must each stay under ~400 KB of
float32 weights, so width 32 rather than 64), and EVERY parameter is overwritten with
seeded ``N(0, 0.05^2)`` values: DiT zero-initialises the adaLN modulations and the final
layer, so the initial network outputs exactly zero and would make parity trivial. The
frozen ``pos_embed`` buffer keeps the reference's sin-cos values.

Each ``tests/goldens/<name>.npz`` holds ``config`` (a one-element JSON string array),
``sd/<torch key>`` (the full state dict), inputs ``x`` ``[B, C, H, W]``, ``t``, ``y`` and
``out``, the network's full ``[B, out_channels, H, W]`` output (all ``2 C`` channels with
``learn_sigma``; SiT's ``forward`` drops the second half, so it is run with
``learn_sigma`` switched off on the instance to return everything). DiT goldens also hold
``ddpm_t`` (integer steps) and ``ddpm_x0``, the ``pred_xstart`` of DiT's own
``GaussianDiffusion.p_mean_variance`` (1000-step linear schedule, learned sigma); the SiT
golden holds ``sit_x0``, the Tweedie estimate ``x / alpha + sigma^2 / alpha * score``
from SiT's ``Transport.get_score`` and ``ICPlan`` (Linear path, velocity model) at ``t``.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PARAM_STD = 0.05
MODEL_KWARGS = (
    "input_size",
    "patch_size",
    "in_channels",
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_ratio",
    "class_dropout_prob",
    "num_classes",
    "learn_sigma",
)
DIT_COMMIT = "facebookresearch/DiT@ed81ce2229091fd4ecc9a223645f95cf379d582b"
SIT_COMMIT = "willisma/SiT@947f95bd3a510e9af441d38c1e9f72e0eee873c5"
VERSIONS: dict[str, str] = {}
BASE = dict(
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    depth=2,
    num_heads=4,
    mlp_ratio=4.0,
    class_dropout_prob=0.1,
    num_classes=10,
    learn_sigma=True,
    param_std=PARAM_STD,
)


class _DummyMeta(type):
    # Attribute access on a dummy class (e.g. InterpolationMode.NEAREST) yields a string.
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _DummyMeta(name, (torch.nn.Module,), {})


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import torchvision[.anything]`` with a :class:`_StubModule`."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install_stubs() -> None:
    """Fakes ``torchvision`` and ``torchdiffeq`` (see the module docstring)."""
    sys.meta_path.insert(0, _TorchvisionStub())
    fake = types.ModuleType("torchdiffeq")

    def odeint(*args, **kwargs):
        raise RuntimeError("torchdiffeq is stubbed out in make_dit_golden.py")

    fake.odeint = odeint
    sys.modules["torchdiffeq"] = fake


def load(name: str, path: str, package_dir: str | None = None) -> types.ModuleType:
    """Imports a file (or a package's ``__init__``) under a unique module name."""
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[package_dir] if package_dir else None
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Overwrites every parameter except the frozen ``pos_embed`` with N(0, PARAM_STD^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen) * PARAM_STD)


def inputs(seed: int, cfg: dict, t: list[float], y: list[int]):
    """Seeded ``x`` ``[B, C, H, W]`` and the given ``t`` and ``y`` as torch tensors."""
    rng = np.random.default_rng(seed)
    size, ch = cfg["input_size"], cfg["in_channels"]
    x = rng.standard_normal((len(t), ch, size, size)).astype(np.float32)
    return torch.from_numpy(x), torch.tensor(t, dtype=torch.float32), torch.tensor(y)


def save(name: str, cfg: dict, model: torch.nn.Module, arrays: dict) -> None:
    """Writes config, state dict (``sd/`` prefix) and arrays to ``<name>.npz``."""
    out = {"config": np.array([json.dumps(cfg, sort_keys=True)])}
    for key, value in model.state_dict().items():
        out[f"sd/{key}"] = value.detach().numpy().astype(np.float32)
    out.update({k: np.asarray(v) for k, v in arrays.items()})
    path = os.path.join(HERE, f"{name}.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)")


def dit_golden(upstream: str, name: str, cfg: dict, t: list[float], y: list[int], seed: int):
    """Official DiT forward (and, with learn_sigma, DDPM pred_xstart) on fixed inputs."""
    models = load("dit_models", os.path.join(upstream, "models.py"))
    diffusion = load(
        "dit_diffusion",
        os.path.join(upstream, "diffusion", "__init__.py"),
        os.path.join(upstream, "diffusion"),
    )
    torch.manual_seed(seed)
    kwargs = {k: cfg[k] for k in MODEL_KWARGS}
    model = models.DiT(**kwargs).eval()
    randomise(model, seed)
    x, tt, yy = inputs(seed, cfg, t, y)
    arrays = {"x": x, "t": tt, "y": yy}
    with torch.no_grad():
        arrays["out"] = model(x, tt, yy)
        if cfg["learn_sigma"]:
            # DiT's own DDPM at integer steps: pred_xstart = sqrt(1/abar) x - sqrt(1/abar-1) eps.
            steps = torch.tensor([int(v) for v in t], dtype=torch.int64)
            gd = diffusion.create_diffusion("")
            res = gd.p_mean_variance(model, x, steps, clip_denoised=False, model_kwargs={"y": yy})
            arrays["ddpm_t"], arrays["ddpm_x0"] = steps, res["pred_xstart"]
    save(name, {**cfg, "model": "DiT", "upstream": DIT_COMMIT, **VERSIONS}, model, arrays)


def sit_golden(upstream: str, name: str, cfg: dict, t: list[float], y: list[int], seed: int):
    """Official SiT forward (all channels) and its Tweedie data estimate on fixed inputs."""
    models = load("sit_models", os.path.join(upstream, "models.py"))
    transport = load(
        "sit_transport",
        os.path.join(upstream, "transport", "__init__.py"),
        os.path.join(upstream, "transport"),
    )
    torch.manual_seed(seed)
    model = models.SiT(**{k: cfg[k] for k in MODEL_KWARGS}).eval()
    randomise(model, seed)
    x, tt, yy = inputs(seed, cfg, t, y)
    arrays = {"x": x, "t": tt, "y": yy}
    with torch.no_grad():
        velocity = model(x, tt, yy)  # SiT's forward: the first C channels only
        model.learn_sigma = False  # the instance now returns all out_channels
        arrays["out"] = model(x, tt, yy)
        model.learn_sigma = cfg["learn_sigma"]
        c = cfg["in_channels"]
        assert torch.equal(arrays["out"][:, :c], velocity)
        tr = transport.create_transport("Linear", "velocity")
        score = tr.get_score()(x, tt, model, y=yy)
        texp = tt.view(-1, 1, 1, 1)
        alpha, _ = tr.path_sampler.compute_alpha_t(texp)
        sigma, _ = tr.path_sampler.compute_sigma_t(texp)
        arrays["sit_x0"] = x / alpha + sigma**2 / alpha * score
    save(name, {**cfg, "model": "SiT", "upstream": SIT_COMMIT, **VERSIONS}, model, arrays)


def main() -> None:
    """Writes the three goldens."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dit", default="/tmp/upstream/facebookresearch+DiT")
    parser.add_argument("--sit", default="/tmp/upstream/willisma+SiT")
    args = parser.parse_args()
    install_stubs()
    import timm  # noqa: PLC0415 (after the stubs)

    VERSIONS.update(torch=torch.__version__, timm=timm.__version__)
    torch.set_num_threads(1)
    # 1) DiT, learn_sigma, patch 2; t hits an early and a fractional late step; y has the
    #    null class (10).
    dit_golden(args.dit, "dit_p2_sigma", BASE, [3.0, 617.25], [3, 10], seed=0)
    # 2) DiT without learn_sigma, patch 4, one block, 2 heads, mlp ratio 2; the end steps.
    p4 = dict(BASE, patch_size=4, depth=1, num_heads=2, mlp_ratio=2.0, learn_sigma=False)
    dit_golden(args.dit, "dit_p4_eps", p4, [0.0, 999.0], [10, 7], seed=1)
    # 3) SiT (same network, t in [0, 1]), learn_sigma as the published SiT-XL/2 256.
    sit = dict(BASE, depth=1)
    sit_golden(args.sit, "sit_p2_sigma", sit, [0.13, 0.8], [10, 2], seed=2)


if __name__ == "__main__":
    main()
