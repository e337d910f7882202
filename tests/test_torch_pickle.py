"""The torch-free PyTorch file reader against files torch itself wrote (no torch here).

The goldens come from tests/goldens/make_torch_pickles.py (torch 2.13.0) and
make_edm2_golden.py; the expected arrays are torch's own contiguous copies.
"""

import io
import json
import os
import pickle
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.pretrained.torch_pickle import TorchFile, read_torch_file
from jaxdiff.pretrained.weights_io import WeightsError

GOLDENS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens")
ZIP = os.path.join(GOLDENS, "torch_state_zip.pt")
LEGACY = os.path.join(GOLDENS, "torch_state_legacy.pt")
CHECKPOINT = os.path.join(GOLDENS, "torch_checkpoint.pt")
PERSISTENT = os.path.join(GOLDENS, "torch_persistent.pkl")
EDM2_PICKLE = os.path.join(GOLDENS, "edm2_tiny.pkl")


def expected(stem: str) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays torch wrote for ``stem`` (in key order, real dtypes) and their meta."""
    with np.load(os.path.join(GOLDENS, "torch_expected.npz")) as npz:
        meta = json.loads(str(npz["meta"]))[stem]
        arrays = {}
        for key in meta["keys"]:
            value = npz[f"{stem}/{key}"]
            if meta["dtypes"][key] == "bfloat16":
                value = value.view(ml_dtypes.bfloat16)
            arrays[key] = value
    return arrays, meta


def assert_same(got: TorchFile, want: dict[str, np.ndarray], meta: dict) -> None:
    """Same keys in torch's order, dtypes, shapes and bit-identical values."""
    assert list(got.tensors) == meta["keys"]
    for key, value in want.items():
        arr = got.tensors[key]
        assert str(arr.dtype) == meta["dtypes"][key], key
        assert arr.dtype == value.dtype and arr.shape == value.shape, key
        assert arr.flags.c_contiguous and arr.flags.owndata, key
        assert arr.tobytes() == value.tobytes(), key  # bit-identical, NaN-safe


@pytest.mark.parametrize(
    "path, stem, fmt",
    [(ZIP, "torch_state", "zip"), (LEGACY, "torch_state_legacy", "legacy")],
)
def test_state_dict_goldens_read_exactly(path, stem, fmt):
    got = read_torch_file(path)
    assert_same(got, *expected(stem))
    assert got.extra == {"format": fmt, "entry": None}
    # Every dtype the DiT/SiT/EDM2 files use, plus the view layouts.
    dtypes = {str(a.dtype) for a in got.tensors.values()}
    assert {"float32", "float16", "bfloat16", "int64"} <= dtypes
    assert got.tensors["block.transposed"].shape == (5, 3)  # strides (1, 5) in torch
    np.testing.assert_array_equal(got.tensors["block.shared_a"], [2.0, 3.0, 4.0])
    np.testing.assert_array_equal(got.tensors["block.shared_b"], [[6.0, 7.0], [8.0, 9.0]])
    assert got.tensors["scalar"].shape == () and got.tensors["scalar"] == 2.5


def test_big_endian_archive_under_another_name_is_swapped():
    got = read_torch_file(os.path.join(GOLDENS, "torch_state_bigendian.pt"))
    assert_same(got, *expected("torch_state_bigendian"))


def test_zip_uint16_tensor_rebuilt_from_a_byte_storage():
    got = read_torch_file(ZIP).tensors["u16"]
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, [1, 40000, 65535])


def test_checkpoint_dict_prefers_ema_then_model_and_reports_the_rest():
    got = read_torch_file(CHECKPOINT)
    assert_same(got, *expected("torch_checkpoint_ema"))
    assert got.extra["entry"] == "ema"
    assert got.extra["entries"] == ["model", "ema", "opt", "args", "steps"]
    # Tensor-free entries as JSON ("model" and the optimizer state are left out).
    assert got.extra["other"] == {
        "args": {
            "class_name": "argparse.Namespace",
            "state": {"model": "SiT-XL/2", "image_size": 256, "num_classes": 1000},
        },
        "steps": 5,
    }

    model = read_torch_file(CHECKPOINT, entry="model")
    assert_same(model, *expected("torch_state"))
    assert model.extra["entry"] == "model"


def test_checkpoint_entry_errors_name_the_entry_and_the_file():
    with pytest.raises(WeightsError, match=r"torch_checkpoint\.pt: no top-level entry 'best'"):
        read_torch_file(CHECKPOINT, entry="best")
    with pytest.raises(WeightsError, match=r"\.pt: key 'param_groups' is a list, not a tensor"):
        read_torch_file(CHECKPOINT, entry="opt")
    with pytest.raises(WeightsError, match=r"torch_checkpoint\.pt: entry 'steps' is a int"):
        read_torch_file(CHECKPOINT, entry="steps")
    with pytest.raises(WeightsError, match="no top-level entry 'ema'"):
        read_torch_file(ZIP, entry="ema")  # a bare state dict has no entries


def test_persistent_class_pickle_gives_state_dict_names_and_init_kwargs():
    want, meta = expected("torch_persistent")
    got = read_torch_file(PERSISTENT)
    assert_same(got, want, meta)
    # Non-persistent buffers and unset (None) parameters are not state-dict entries.
    assert not any(k.endswith("scratch") for k in got.tensors)
    assert "layers.0.bias" not in got.tensors
    extra = got.extra
    assert extra["format"] == "pickle" and extra["entry"] == "ema"
    assert extra["class_name"] == meta["class_name"] == "TinyNet"
    assert extra["init_args"] == []
    assert extra["init_kwargs"] == meta["init_kwargs"]
    assert isinstance(extra["init_kwargs"]["img_resolution"], int)  # was np.int64
    assert extra["init_kwargs"]["cfg"]["nested"]["flags"] == [True, None]
    assert extra["other"]["dataset_kwargs"] == {
        "class_name": "training.dataset.ImageFolder",
        "resolution": 8,
    }
    assert extra["other"]["encoder"]["class_name"] == "Encoder"
    json.dumps(extra)  # JSON-serialisable throughout


def test_edm2_network_pickle_matches_its_state_dict():
    got = read_torch_file(EDM2_PICKLE)
    with np.load(os.path.join(GOLDENS, "edm2_cond.npz")) as npz:
        state = {k.removeprefix("state/"): npz[k] for k in npz.files if k.startswith("state/")}
        init_kwargs = json.loads(str(npz["extra"]))
    assert list(got.tensors) == list(state)  # Precond.state_dict() order
    assert any(k.startswith("unet.") for k in got.tensors)
    for key, value in state.items():  # the snapshot's ema is the float32 net cast to float16
        assert got.tensors[key].dtype == np.float16, key
        np.testing.assert_array_equal(got.tensors[key], value.astype(np.float16), err_msg=key)
    assert got.extra["class_name"] == "Precond" and got.extra["entry"] == "ema"
    assert got.extra["init_kwargs"] == init_kwargs
    assert got.extra["other"]["loss_fn"]["class_name"] == "EDM2Loss"


def test_persistent_class_source_is_never_executed(tmp_path, monkeypatch):
    marker = os.path.join(tmp_path, "pwned")

    def _reconstruct_persistent_obj(meta):  # what EDM2's pickles call, with its module name
        raise AssertionError("never called when pickling")

    fake = types.ModuleType("torch_utils.persistence")
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    _reconstruct_persistent_obj.__module__ = fake.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    meta = dict(
        type="class",
        version=6,
        module_src=f"open({marker!r}, 'w').close()\nclass Net:\n    pass\n",
        class_name="Net",
        state={"_parameters": {}, "_buffers": {}, "_modules": {}, "_init_kwargs": {"a": 1}},
    )
    path = _write(
        tmp_path, "src.pkl", pickle.dumps({"ema": _Evil(_reconstruct_persistent_obj, meta)})
    )
    with pytest.raises(WeightsError, match=r"src\.pkl: entry 'ema' holds no tensors"):
        read_torch_file(path)
    assert not os.path.exists(marker)


class _Evil:
    """Pickles as a call of ``func(arg)``: what a malicious checkpoint does."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _write(tmp_path, name: str, data: bytes) -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _rezip(tmp_path, name: str, replace: dict[str, bytes | None]) -> str:
    """A copy of the zip golden with some records replaced (``None`` drops one)."""
    out = io.BytesIO()
    with zipfile.ZipFile(ZIP) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            short = info.filename.split("/", 1)[1]
            data = replace.get(short, src.read(info))
            if data is not None:
                dst.writestr(info.filename, data)
    return _write(tmp_path, name, out.getvalue())


@pytest.mark.parametrize(
    "payload, name",
    [
        (_Evil(os.system, "touch {marker}"), f"{os.system.__module__}.system"),
        (_Evil(eval, "open({marker!r}, 'w')"), "builtins.eval"),
        ({"ema": {"w": _Evil(os.system, "touch {marker}")}}, f"{os.system.__module__}.system"),
    ],
)
def test_malicious_pickle_is_refused_naming_the_global(tmp_path, payload, name):
    marker = os.path.join(tmp_path, "pwned")
    if isinstance(payload, _Evil):
        payload.arg = payload.arg.format(marker=marker)
    else:
        payload["ema"]["w"].arg = payload["ema"]["w"].arg.format(marker=marker)
    path = _write(tmp_path, "evil.pkl", pickle.dumps(payload))
    with pytest.raises(WeightsError, match=rf"evil\.pkl: refusing to load global '{name}'"):
        read_torch_file(path)
    assert not os.path.exists(marker)


def test_os_system_spelled_as_os_is_refused(tmp_path):
    marker = os.path.join(tmp_path, "pwned")
    data = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # protocol 0, by hand
    path = _write(tmp_path, "evil.pt", data)
    with pytest.raises(WeightsError, match=r"evil\.pt: refusing to load global 'os\.system'"):
        read_torch_file(path)
    assert not os.path.exists(marker)


def test_malicious_data_pkl_inside_a_torch_zip_is_refused(tmp_path):
    marker = os.path.join(tmp_path, "pwned")
    evil = pickle.dumps(_Evil(eval, f"open({marker!r}, 'w')"), protocol=2)
    path = _rezip(tmp_path, "evil.pt", {"data.pkl": evil})
    with pytest.raises(WeightsError, match=r"evil\.pt: refusing to load global 'builtins\.eval'"):
        read_torch_file(path)
    assert not os.path.exists(marker)


def test_missing_storage_record_names_the_record(tmp_path):
    path = _rezip(tmp_path, "cut.pt", {"data/3": None})
    with pytest.raises(WeightsError, match=r"cut\.pt: storage record 'torch_state_zip/data/3'"):
        read_torch_file(path)


def test_short_storage_record_is_named(tmp_path):
    path = _rezip(tmp_path, "short.pt", {"data/0": b"\0" * 8})
    with pytest.raises(WeightsError, match=r"short\.pt: storage 'torch_state_zip/data/0' holds 8"):
        read_torch_file(path)


@pytest.mark.parametrize("golden", [ZIP, LEGACY, PERSISTENT])
@pytest.mark.parametrize("fraction", [0.3, 0.97])
def test_truncated_file_names_the_file(tmp_path, golden, fraction):
    with open(golden, "rb") as f:
        data = f.read()
    path = _write(tmp_path, "cut_" + os.path.basename(golden), data[: int(len(data) * fraction)])
    with pytest.raises(WeightsError, match=rf"{os.path.basename(path)}: "):
        read_torch_file(path)


@pytest.mark.parametrize("head", [b"", b"PK\x03\x04", b"\x80\x02"])
def test_random_bytes_name_the_file(tmp_path, head):
    data = head + np.random.default_rng(0).bytes(4096)
    path = _write(tmp_path, "noise.bin", data)
    with pytest.raises(WeightsError, match=r"noise\.bin: ") as info:
        read_torch_file(path)
    assert isinstance(info.value, InvalidArgumentError)


def test_missing_file_and_foreign_pickles_are_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match=r"absent\.pt: file not found"):
        read_torch_file(os.path.join(tmp_path, "absent.pt"))
    path = _write(tmp_path, "numbers.pkl", pickle.dumps({"a": 1, "b": [2, 3]}))
    with pytest.raises(WeightsError, match=r"numbers\.pkl: neither a state dict"):
        read_torch_file(path)
