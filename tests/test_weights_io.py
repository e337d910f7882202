"""Torch-free weight files: safetensors round trips, checksums and clear errors."""

import json
import pickle
import struct

import ml_dtypes
import numpy as np
import pytest

from jaxdiff.pretrained.registry import (
    check_params,
    detect_arch,
    flatten_params,
    load_pretrained,
    unflatten_params,
)
from jaxdiff.pretrained.weights_io import (
    CHECKSUM_KEY,
    StateDict,
    WeightsError,
    read_weights,
    write_weights,
)

TENSORS = {
    "a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.array([1.5, -2.0], ml_dtypes.bfloat16),
    "c": np.arange(4, dtype=np.int64),
    "d": np.array([[True, False]]),
    "e": np.float16([0.25]),
    "scalar": np.array(2.5, np.float32),  # 0-d, like EDM2's gains
    "strided": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
}


def test_round_trip_keeps_values_dtypes_and_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    digest = write_weights(path, TENSORS, {"note": "hi"})
    tensors, meta = read_weights(path)
    assert meta["note"] == "hi" and meta[CHECKSUM_KEY] == digest
    assert set(tensors) == set(TENSORS)
    for name, want in TENSORS.items():
        assert tensors[name].dtype == want.dtype and tensors[name].shape == want.shape
        np.testing.assert_array_equal(tensors[name], want)


def test_header_is_plain_safetensors(tmp_path):
    # Other readers (the safetensors package) rely on this exact layout.
    path = tmp_path / "w.safetensors"
    write_weights(path, {"x": np.ones((2, 2), np.float32)})
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    assert header["x"] == {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    assert (8 + size) % 8 == 0 and len(blob) == 8 + size + 16


def test_altered_file_fails_its_checksum(tmp_path):
    path = tmp_path / "w.safetensors"
    write_weights(path, TENSORS)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        read_weights(path)


@pytest.mark.parametrize(
    "blob, match",
    [
        (pickle.dumps({"w": [1.0]}), "PyTorch pickle.*jaxdiff.pretrained.convert"),
        (b"PK\x03\x04" + b"\0" * 40, "PyTorch pickle"),
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 2**40) + b"{}", "header length"),
        (struct.pack("<Q", 2) + b"{]", "corrupt safetensors header"),
    ],
)
def test_foreign_or_broken_files_are_named(tmp_path, blob, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(WeightsError, match=match) as err:
        read_weights(path)
    assert "bad.safetensors" in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match="nope.safetensors not found"):
        read_weights(tmp_path / "nope.safetensors")


def test_unconverted_safetensors_is_refused_by_the_loader(tmp_path):
    path = tmp_path / "raw.safetensors"
    write_weights(path, TENSORS)
    with pytest.raises(WeightsError, match="not a converted jaxdiff file.*convert"):
        load_pretrained(path)


def test_state_dict_tracks_keys_and_names_them():
    sd = StateDict({"w": np.ones((2, 3)), "b": np.zeros(3), "n": np.arange(2)}, source="x.pt")
    assert sd.take("w", (2, 3)).dtype == np.float32
    assert sd.take("n").dtype == np.int64  # integers keep their type
    with pytest.raises(WeightsError, match=r"x.pt: missing key 'q'"):
        sd.take("q")
    with pytest.raises(WeightsError, match=r"key 'b' has shape \(3,\), expected \(4,\)"):
        sd.take("b", (4,))
    with pytest.raises(WeightsError, match=r"unexpected keys \['b'\]"):
        sd.finish()


def test_flatten_unflatten_and_check_params():
    params = {"blk": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}, "out": np.ones(1)}
    flat = flatten_params(params)
    assert set(flat) == {"blk/kernel", "blk/bias", "out"}
    assert flatten_params(unflatten_params(flat)).keys() == flat.keys()
    abstract = {"blk": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}, "out": np.ones(1)}
    check_params(params, abstract, "f")
    with pytest.raises(WeightsError, match="missing parameter 'out'"):
        check_params({"blk": params["blk"]}, abstract, "f")
    with pytest.raises(WeightsError, match="unexpected parameter 'extra'"):
        check_params({**params, "extra": np.ones(1)}, abstract, "f")
    with pytest.raises(WeightsError, match=r"'blk/bias' has shape \(4,\)"):
        check_params({**params, "blk": {**params["blk"], "bias": np.zeros(4)}}, abstract, "f")


def test_detect_arch_from_keys():
    assert detect_arch(["x_embedder.proj.weight"], "DiT-XL-2-256x256.pt") == "dit"
    assert detect_arch(["x_embedder.proj.weight"], "SiT-XL-2-256x256.pt") == "sit"
    assert detect_arch(["encoder.conv_in.weight", "decoder.conv_in.weight"]) == "vae"
    assert detect_arch(["unet.enc.64x64_conv.weight"]) == "edm2"
    with pytest.raises(WeightsError, match="cannot tell its architecture.*--arch"):
        detect_arch(["fc.weight"], "mystery.pt")
