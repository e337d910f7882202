"""Writes the EDM2 parity goldens tests/goldens/edm2_*.npz and the pickle edm2_tiny.pkl.

Reference: ``training/networks_edm2.py`` (``Precond`` wrapping ``UNet``) of NVlabs/edm2 at
commit 4bf8162f601bcc09472ce8a32dd0cbe8889dc8fc, run with torch 2.13.0 on CPU in float32
and in eval mode. Each golden builds ``Precond`` at a tiny size the way EDM2's training
loop does (``dnnlib.util.construct_class_by_name`` with keyword arguments, so the
persistent object records them), with seeded random weights: the MPConv weights are
``N(0, 1)`` already; every gain that starts at zero (``out_gain``, each block's
``emb_gain``) is set to ``U(0.5, 1.5)`` times a random sign so that every path matters.
Each ``.npz`` holds

* ``config``: the jaxdiff config (JSON string, see :mod:`jaxdiff.pretrained.edm2`) and
  ``extra``: the ``Precond`` init kwargs as JSON (what a pickle reader returns);
* ``state/<key>``: ``Precond.state_dict()`` (float32, torch layout; includes the
  ``emb_fourier`` / ``logvar_fourier`` buffers ``freqs`` and ``phases``);
* ``x`` ``[3, 16, 16, C]`` (NHWC, ``N(0, 1) * sqrt(sigma^2 + 0.25)``), ``sigma``
  ``[0.02, 0.5, 3.0]`` and, when conditional, ``labels`` (int class ids; torch gets the
  one-hot vectors);
* ``denoised``: ``Precond(x, sigma, one_hot(labels))`` (NHWC), ``raw``: the UNet output
  ``F`` (NHWC), ``logvar`` ``[3]``; conditional goldens also ``denoised_nolabel``:
  ``Precond(x, sigma, None)`` (EDM2 then uses an all-zero label vector).

Goldens: ``edm2_cond`` (4 channels, 10 classes, two levels, attention at 8, defaults
otherwise) and ``edm2_uncond`` (3 channels, unconditional, three levels, attention at 8
and 4, ``resample_filter [1, 3, 3, 1]``, explicit noise/embedding widths, non-default
balances and ``clip_act 2`` so the clipping triggers).

``edm2_tiny.pkl``: ``pickle.dump`` of the snapshot dict EDM2's ``training_loop`` writes
(``dnnlib.EasyDict(encoder=StabilityVAEEncoder(), dataset_kwargs=..., loss_fn=EDM2Loss(),
ema=net)`` with ``ema`` a deep copy of the ``edm2_cond`` network in eval mode, without
gradients, cast to float16), so the persistent classes embed their module sources, for
the torch-free pickle reader. ``training_loop.py`` imports ``psutil``, which the scratch
environment lacks; an empty stand-in module is inserted into ``sys.modules`` (nothing in
it is used; the embedded source still says ``import psutil``).

Rerun (never in CI; needs torch and the EDM2 sources)::

    /tmp/torchenv/bin/python tests/goldens/make_edm2_golden.py
"""

import copy
import json
import os
import pickle
import sys
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
EDM2 = "/tmp/upstream/NVlabs+edm2"
sys.path.insert(0, EDM2)
sys.modules.setdefault("psutil", types.ModuleType("psutil"))  # see the docstring

import dnnlib  # noqa: E402  (from the EDM2 checkout above)

GOLDENS = {
    "edm2_cond": dict(
        img_resolution=16,
        img_channels=4,
        label_dim=10,
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
        channels_per_head=4,
        logvar_channels=16,
        use_fp16=True,
        dropout=0.0,
    ),
    "edm2_uncond": dict(
        img_resolution=16,
        img_channels=3,
        label_dim=0,
        model_channels=4,
        channel_mult=[1, 2, 2],
        channel_mult_noise=2,
        channel_mult_emb=3,
        num_blocks=2,
        attn_resolutions=[8, 4],
        channels_per_head=4,
        concat_balance=0.6,
        res_balance=0.4,
        attn_balance=0.2,
        clip_act=2.0,
        resample_filter=[1, 3, 3, 1],
        logvar_channels=8,
        use_fp16=False,
        dropout=0.1,
    ),
}

# Precond/UNet/Block defaults, filled in for the jaxdiff config.
DEFAULTS = dict(
    channel_mult_noise=None,
    channel_mult_emb=None,
    label_balance=0.5,
    concat_balance=0.5,
    channels_per_head=64,
    dropout=0.0,
    res_balance=0.3,
    attn_balance=0.3,
    clip_act=256,
    resample_filter=[1, 1],
    logvar_channels=128,
    sigma_data=0.5,
)


def build(spec: dict, seed: int) -> torch.nn.Module:
    """Builds Precond as train_edm2.py/training_loop.py do, with randomised gains."""
    torch.manual_seed(seed)
    net = dnnlib.util.construct_class_by_name(class_name="training.networks_edm2.Precond", **spec)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for key, p in net.named_parameters():
            if key.endswith("gain"):
                sign = 1.0 if torch.rand([], generator=gen) < 0.5 else -1.0
                p.fill_(sign * (0.5 + float(torch.rand([], generator=gen))))
    return net.eval()


def jaxdiff_config(spec: dict) -> dict:
    """The config jaxdiff.pretrained.edm2.infer_config should produce for ``spec``."""
    full = {**DEFAULTS, **spec}
    c = full["img_channels"]
    return {
        "arch": "edm2",
        "sample_shape": [full["img_resolution"], full["img_resolution"], c],
        "num_classes": full["label_dim"],
        "img_resolution": full["img_resolution"],
        "model_channels": full["model_channels"],
        "channel_mult": full["channel_mult"],
        "channel_mult_noise": full["channel_mult_noise"],
        "channel_mult_emb": full["channel_mult_emb"],
        "num_blocks": full["num_blocks"],
        "attn_resolutions": full["attn_resolutions"],
        "label_balance": full["label_balance"],
        "concat_balance": full["concat_balance"],
        "channels_per_head": full["channels_per_head"],
        "dropout": full["dropout"],
        "res_balance": full["res_balance"],
        "attn_balance": full["attn_balance"],
        "clip_act": full["clip_act"],
        "resample_filter": full["resample_filter"],
        "logvar_channels": full["logvar_channels"],
        "sigma_data": full["sigma_data"],
        "p_mean": -0.4 if c == 4 else -0.8,
        "p_std": 1.0 if c == 4 else 1.6,
    }


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy().astype(np.float32)


def make(name: str, spec: dict, seed: int) -> torch.nn.Module:
    net = build(spec, seed)
    rng = np.random.default_rng(seed)
    sigma = np.array([0.02, 0.5, 3.0], np.float32)
    res, c, label_dim = spec["img_resolution"], spec["img_channels"], spec["label_dim"]
    x = rng.standard_normal((3, res, res, c)).astype(np.float32)
    x *= np.sqrt(sigma**2 + 0.25)[:, None, None, None]
    labels = rng.integers(0, max(label_dim, 1), 3)
    xt, st = torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(sigma)
    onehot = torch.eye(label_dim)[labels] if label_dim else None
    with torch.no_grad():
        denoised, logvar = net(xt, st, onehot, return_logvar=True)
        s = st.reshape(-1, 1, 1, 1)
        x_in = xt / (s**2 + 0.25).sqrt()
        raw = net.unet(x_in, st.log() / 4, onehot)
        out = {
            "denoised": nhwc(denoised),
            "raw": nhwc(raw),
            "logvar": logvar.reshape(-1).numpy().astype(np.float32),
        }
        if label_dim:
            out["denoised_nolabel"] = nhwc(net(xt, st, None))
            out["labels"] = labels.astype(np.int32)
    state = {f"state/{k}": v.numpy().astype(np.float32) for k, v in net.state_dict().items()}
    path = os.path.join(HERE, f"{name}.npz")
    np.savez(
        path,
        config=np.array(json.dumps(jaxdiff_config(spec))),
        extra=np.array(json.dumps(dict(net.init_kwargs))),
        x=x,
        sigma=sigma,
        **out,
        **state,
    )
    print(f"{path}: {os.path.getsize(path) / 1024:.0f} KiB, {len(state)} tensors")
    for k in ("denoised", "raw", "logvar"):
        print(f"  {k}: std {out[k].std():.3f} max |.| {np.abs(out[k]).max():.3f}")
    return net


def write_pickle(net: torch.nn.Module) -> None:
    """Pickles ``net`` the way EDM2's training loop writes a network snapshot."""
    encoder = dnnlib.util.construct_class_by_name(
        class_name="training.encoders.StabilityVAEEncoder"
    )
    loss_fn = dnnlib.util.construct_class_by_name(
        class_name="training.training_loop.EDM2Loss", P_mean=-0.4, P_std=1.0
    )
    dataset_kwargs = dnnlib.EasyDict(
        class_name="training.dataset.ImageFolderDataset", path="tiny.zip", use_labels=True
    )
    data = dnnlib.EasyDict(encoder=encoder, dataset_kwargs=dataset_kwargs, loss_fn=loss_fn)
    data.ema = copy.deepcopy(net).cpu().eval().requires_grad_(False).to(torch.float16)
    path = os.path.join(HERE, "edm2_tiny.pkl")
    with open(path, "wb") as f:
        pickle.dump(data, f)
    print(f"{path}: {os.path.getsize(path) / 1024:.0f} KiB")


if __name__ == "__main__":
    nets = {name: make(name, spec, seed=i) for i, (name, spec) in enumerate(GOLDENS.items())}
    write_pickle(nets["edm2_cond"])
