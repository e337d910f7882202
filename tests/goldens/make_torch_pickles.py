"""Writes the PyTorch weight-file goldens tests/goldens/torch_*.pt / torch_*.pkl.

Reference: ``torch.save`` / ``pickle.dump`` of torch 2.13.0 (CPU wheel), plus the EDM2
``torch_utils.persistence`` decorator of NVlabs/edm2 commit
4bf8162f601bcc09472ce8a32dd0cbe8889dc8fc. The files feed ``tests/test_torch_pickle.py``,
which reads them with :mod:`jaxdiff.pretrained.torch_pickle` (no torch) and compares with
the expected arrays written here by torch itself.

Files:

* ``torch_state_zip.pt``: ``torch.save`` (zip format) of a state dict holding float32,
  float16, bfloat16, float64, int64, int32, uint8, bool and uint16 tensors (the last through
  ``_rebuild_tensor_v3``), a 0-d tensor, a transposed (non-contiguous) view and two views
  of one storage at different offsets;
* ``torch_state_legacy.pt``: the same dict (less the uint16 tensor, which torch cannot load
  back from this format) saved with ``_use_new_zipfile_serialization=False``;
* ``torch_state_bigendian.pt``: a small state dict as a big-endian machine writes it
  (``byteorder`` record ``big``, byte-reversed storages, archive name ``archive``),
  checked by loading it back with torch;
* ``torch_checkpoint.pt``: ``torch.save({"model": sd, "ema": sd2, "opt": ..., "args": ...,
  "steps": 5})`` like DiT/SiT training checkpoints (an optimizer state dict and an
  ``argparse.Namespace``);
* ``torch_persistent.pkl``: ``pickle.dump`` of an EasyDict ``(ema=net, dataset_kwargs=...,
  encoder=...)`` like EDM2's snapshots, where ``net`` is a tiny module tree of persistent
  classes (defined in this file, so the pickle embeds this file's source) holding a plain
  ``torch.nn.Linear``, a ``ModuleList``, a bias-free Linear, a persistent and a
  non-persistent buffer; the network is cast to float16 as EDM2 does for its ``ema``;
* ``torch_expected.npz``: torch's own (contiguous) arrays as ``<set>/<state-dict key>``
  for the sets ``torch_state``, ``torch_state_legacy``, ``torch_state_bigendian``,
  ``torch_checkpoint_ema`` and ``torch_persistent`` (bfloat16 stored as its uint16 bit
  pattern), and ``meta``, a JSON string with each set's key order and dtypes and the
  persistent network's class name and init kwargs.

Rerun (never in CI; needs torch 2.13.0 and the EDM2 sources)::

    /tmp/torchenv/bin/python tests/goldens/make_torch_pickles.py
"""

import argparse
import io
import json
import os
import pickle
import sys
import zipfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
EDM2 = "/tmp/upstream/NVlabs+edm2"
sys.path.insert(0, EDM2)

import dnnlib  # noqa: E402  (from the EDM2 checkout above)
from torch_utils import persistence  # noqa: E402

DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.uint8: "uint8",
    torch.bool: "bool",
    torch.uint16: "uint16",
}


def state_dict(seed: int) -> dict:
    """A small state dict covering every storage type and view layout the reader handles."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 5, generator=g)
    shared = torch.arange(10, dtype=torch.float32) + seed
    return {
        "w32": torch.randn(3, 4, generator=g),
        "h16": torch.randn(5, generator=g).to(torch.float16),
        "b16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "f64": torch.randn(2, generator=g).to(torch.float64),
        "i64": torch.arange(4, dtype=torch.int64) * (seed + 7) - 3,
        "i32": torch.tensor([[1, -2], [3, 2**30]], dtype=torch.int32),
        "u8": torch.tensor([0, 7, 255], dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "u16": torch.tensor([1, 40000, 65535], dtype=torch.uint16),  # _rebuild_tensor_v3
        "scalar": torch.tensor(2.5 + seed),
        "block.transposed": base.t(),  # strides (1, 5): non-contiguous
        "block.shared_a": shared[2:5],  # offset 2 in the shared storage
        "block.shared_b": shared[6:10].view(2, 2),  # offset 6, same storage
    }


@persistence.persistent_class
class Embed(torch.nn.Module):
    """A persistent leaf with a parameter and both kinds of buffer."""

    def __init__(self, channels):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(channels, 2))
        self.register_buffer("freqs", torch.randn(channels))
        self.register_buffer("scratch", torch.zeros(channels), persistent=False)


@persistence.persistent_class
class TinyNet(torch.nn.Module):
    """A persistent module tree mixing persistent and plain torch.nn submodules."""

    def __init__(self, img_resolution, channels, cfg, label_dim=0):
        super().__init__()
        self.img_resolution = img_resolution
        self.emb = Embed(channels[0])
        self.proj = torch.nn.Linear(channels[0], channels[1])
        self.layers = torch.nn.ModuleList(
            [torch.nn.Linear(channels[1], channels[1], bias=False), Embed(channels[1])]
        )
        self.gain = torch.nn.Parameter(torch.ones([]))


@persistence.persistent_class
class Encoder:
    """Like EDM2's StabilityVAEEncoder: a persistent non-module holding numpy arrays."""

    def __init__(self, vae_name, raw_std):
        self.vae_name = vae_name
        self.scale = np.float32(0.5) / np.float32(raw_std)


def expected(stem: str, tensors: dict, arrays: dict, meta: dict) -> None:
    """Records torch's own view of ``tensors`` (contiguous numpy) under ``stem``."""
    meta[stem] = {"keys": list(tensors), "dtypes": {}}
    for key, t in tensors.items():
        t = t.detach().contiguous()
        meta[stem]["dtypes"][key] = DTYPE_NAMES[t.dtype]
        if t.dtype == torch.bfloat16:
            value = t.view(torch.int16).numpy().view(np.uint16)
        else:
            value = t.numpy()
        arrays[f"{stem}/{key}"] = value.copy()


def big_endian(path: str) -> dict:
    """Saves a state dict as a big-endian machine would, under the archive name "archive".

    torch only writes native (little-endian) files here, so the records are rewritten: the
    ``byteorder`` record says ``big`` and every storage's scalars are byte-reversed. torch
    then loads the file back (swapping again), which checks the rewrite.
    """
    sd = {
        "w": torch.randn(2, 3),
        "n": torch.arange(3, dtype=torch.int64) - 1,
        "h": torch.randn(4).to(torch.float16),
        "b": torch.randn(2).to(torch.bfloat16),
    }
    itemsize = {str(i): t.element_size() for i, t in enumerate(sd.values())}  # keys "0".."3"
    buf = io.BytesIO()
    torch.save(sd, buf)
    out = io.BytesIO()
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            name = info.filename.split("/", 1)[1]
            data = src.read(info)
            if name == "byteorder":
                data = b"big"
            elif name.startswith("data/"):
                size = itemsize[name[len("data/") :]]
                data = np.frombuffer(data, np.uint8).reshape(-1, size)[:, ::-1].tobytes()
            dst.writestr("archive/" + name, data)
    with open(path, "wb") as f:
        f.write(out.getvalue())
    back = torch.load(path)
    assert all(torch.equal(back[k], v) for k, v in sd.items()), "big-endian rewrite failed"
    return sd


def main() -> None:
    """Writes every golden file and the expected arrays."""
    torch.manual_seed(0)
    arrays, meta = {}, {}

    sd = state_dict(0)
    torch.save(sd, os.path.join(HERE, "torch_state_zip.pt"))
    expected("torch_state", sd, arrays, meta)
    # torch 2.13 cannot load a uint16 tensor back from the legacy format, so it is left out.
    legacy = {k: v for k, v in sd.items() if k != "u16"}
    path = os.path.join(HERE, "torch_state_legacy.pt")
    torch.save(legacy, path, _use_new_zipfile_serialization=False)
    expected("torch_state_legacy", legacy, arrays, meta)

    sd_big = big_endian(os.path.join(HERE, "torch_state_bigendian.pt"))
    expected("torch_state_bigendian", sd_big, arrays, meta)

    sd2 = state_dict(1)
    # Like DiT/SiT training checkpoints: an optimizer state and the argparse arguments too.
    opt = {
        "state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3, 4)}},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}],
    }
    args = argparse.Namespace(model="SiT-XL/2", image_size=256, num_classes=1000)
    checkpoint = {"model": sd, "ema": sd2, "opt": opt, "args": args, "steps": 5}
    torch.save(checkpoint, os.path.join(HERE, "torch_checkpoint.pt"))
    expected("torch_checkpoint_ema", sd2, arrays, meta)

    kwargs = dict(
        img_resolution=np.int64(8),
        channels=[2, 3],
        cfg={"mode": "fast", "nested": {"depth": 2, "scale": 0.25, "flags": [True, None]}},
        label_dim=4,
    )
    net = TinyNet(**kwargs).eval().requires_grad_(False).to(torch.float16)
    data = dnnlib.EasyDict(
        dataset_kwargs=dnnlib.EasyDict(class_name="training.dataset.ImageFolder", resolution=8),
        encoder=Encoder("stabilityai/sd-vae-ft-mse", [2.0, 4.0]),
    )
    data.ema = net
    with open(os.path.join(HERE, "torch_persistent.pkl"), "wb") as f:
        pickle.dump(data, f)
    expected("torch_persistent", net.state_dict(), arrays, meta)
    meta["torch_persistent"]["init_kwargs"] = dict(kwargs, img_resolution=8)
    meta["torch_persistent"]["class_name"] = "TinyNet"

    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    np.savez(os.path.join(HERE, "torch_expected.npz"), **arrays)
    for name in sorted(os.listdir(HERE)):
        if name.startswith("torch_"):
            print(name, os.path.getsize(os.path.join(HERE, name)), "bytes")


if __name__ == "__main__":
    main()
