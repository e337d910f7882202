import json
import logging
import sys
import types

import numpy as np
import pytest
from PIL import Image

from jaxdiff.training import writers as writers_lib
from jaxdiff.training.writers import (
    JsonlWriter,
    LoggingWriter,
    MetricWriter,
    MultiWriter,
    create_default_writer,
    progress,
)


def test_jsonl_scalars_append(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    writer = JsonlWriter(path)
    writer.write_scalars(1, {"loss": np.float32(0.5), "steps_per_s": 5.0})
    writer.write_scalars(2, {"loss": 0.25, "count": np.int64(3)})
    writer.close()
    writer = JsonlWriter(path)  # a resumed run appends
    writer.write_scalars(3, {"loss": float("nan")})
    writer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[:2] == [
        {"step": 1, "loss": 0.5, "steps_per_s": 5.0},
        {"step": 2, "loss": 0.25, "count": 3},
    ]
    assert lines[2]["step"] == 3 and np.isnan(lines[2]["loss"])


def test_jsonl_images_and_hparams(tmp_path):
    writer = JsonlWriter(tmp_path / "metrics.jsonl")
    gray = np.full((6, 5), 7, np.uint8)
    rgb = np.zeros((4, 4, 3), np.float32)
    rgb[..., 1] = 1.0
    batch = np.ones((3, 2, 2, 1), np.uint8) * 255
    writer.write_images(100, {"samples/ema": gray, "rgb": rgb, "batch": batch})
    writer.write_hparams({"lr": 1e-3, "model": {"depth": 2}})
    writer.close()
    with Image.open(tmp_path / "images" / "samples_ema_100.png") as im:
        assert im.size == (5, 6)
        np.testing.assert_array_equal(np.asarray(im), gray)
    with Image.open(tmp_path / "images" / "rgb_100.png") as im:
        np.testing.assert_array_equal(np.asarray(im)[0, 0], [0, 255, 0])
    with Image.open(tmp_path / "images" / "batch_100.png") as im:
        assert im.size == (2 * 3 + 1, 2 * 3 + 1)  # 2x2 tiles of 2 px, 1 px padding
    assert json.loads((tmp_path / "hparams.json").read_text()) == {
        "lr": 1e-3,
        "model": {"depth": 2},
    }


def test_out_of_range_float_image_is_an_error(tmp_path):
    writer = JsonlWriter(tmp_path / "metrics.jsonl")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        writer.write_images(1, {"samples": np.full((2, 2, 3), 200.0)})
    with pytest.raises(ValueError, match="shape"):
        writer.write_images(1, {"samples": np.zeros((2, 2, 2), np.uint8)})
    writer.close()


def test_logging_writer_line(caplog):
    writer = LoggingWriter()
    with caplog.at_level(logging.INFO, logger="jaxdiff.training.writers"):
        writer.write_scalars(100, {"loss": 0.123, "steps_per_s": 5.1})
        writer.write_hparams({"lr": 0.1})
    messages = [r.getMessage() for r in caplog.records]
    assert "step 100 | loss 0.123 | steps_per_s 5.1" in messages
    assert any(m.startswith("hparams") and '"lr": 0.1' in m for m in messages)


class _Recorder:
    def __init__(self):
        self.calls = []

    def write_scalars(self, step, scalars):
        self.calls.append(("scalars", step, dict(scalars)))

    def write_images(self, step, images):
        self.calls.append(("images", step, sorted(images)))

    def write_hparams(self, hparams):
        self.calls.append(("hparams", dict(hparams)))

    def flush(self):
        self.calls.append(("flush",))

    def close(self):
        self.calls.append(("close",))


def test_multi_writer_fans_out():
    a, b = _Recorder(), _Recorder()
    assert isinstance(a, MetricWriter)
    writer = MultiWriter([a, b])
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"x": np.zeros((2, 2), np.uint8)})
    writer.write_hparams({"lr": 1})
    writer.flush()
    writer.close()
    expected = [
        ("scalars", 1, {"loss": 1.0}),
        ("images", 1, ["x"]),
        ("hparams", {"lr": 1}),
        ("flush",),
        ("close",),
    ]
    assert a.calls == expected and b.calls == expected


def test_default_writer_process0_writes_files(tmp_path, monkeypatch):
    monkeypatch.setattr(writers_lib.importlib.util, "find_spec", lambda name: None)
    writer = create_default_writer(tmp_path, just_logging=False)
    writer.write_scalars(5, {"loss": 0.5})
    writer.write_images(5, {"samples": np.zeros((4, 4, 3), np.uint8)})
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 5, "loss": 0.5}
    assert (tmp_path / "images" / "samples_5.png").is_file()


def test_just_logging_writes_no_files(tmp_path, caplog):
    writer = create_default_writer(tmp_path, just_logging=True)
    assert isinstance(writer, LoggingWriter)
    with caplog.at_level(logging.INFO, logger="jaxdiff.training.writers"):
        writer.write_scalars(5, {"loss": 0.5})
        writer.write_images(5, {"samples": np.zeros((4, 4, 3), np.uint8)})
        writer.write_hparams({"lr": 1})
    writer.close()
    assert list(tmp_path.iterdir()) == []
    assert "step 5 | loss 0.5" in caplog.text


def test_tensorboard_used_when_importable(tmp_path, monkeypatch):
    events = []

    class FakeSummaryWriter:
        def __init__(self, logdir):
            events.append(("init", logdir))

        def add_scalar(self, tag, value, global_step):
            events.append(("scalar", tag, value, global_step))

        def add_image(self, tag, img, global_step, dataformats):
            events.append(("image", tag, img.shape, global_step, dataformats))

        def add_text(self, tag, text, global_step):
            events.append(("text", tag))

        def flush(self):
            events.append(("flush",))

        def close(self):
            events.append(("close",))

    module = types.ModuleType("tensorboardX")
    module.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "tensorboardX", module)
    monkeypatch.setattr(writers_lib.importlib.util, "find_spec", lambda name: object())
    writer = create_default_writer(tmp_path)
    writer.write_scalars(3, {"loss": 0.25})
    writer.write_images(3, {"samples": np.zeros((4, 4, 1), np.uint8)})
    writer.write_hparams({"lr": 1})
    writer.close()
    assert events == [
        ("init", str(tmp_path)),
        ("scalar", "loss", 0.25, 3),
        ("image", "samples", (4, 4, 1), 3, "HWC"),
        ("text", "hparams"),
        ("close",),
    ]


def test_progress_log_mode(caplog):
    with caplog.at_level(logging.INFO, logger="jaxdiff.training.writers"):
        bar = progress(100, 20, mode="log", log_every_s=0.0)
        bar.update(60, loss=0.5)
        bar.update(100)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("step 60/100 (60.0%)") and "loss 0.5" in lines[0]
    assert "ETA" in lines[0] and "steps/s" in lines[0]
    assert lines[1].startswith("step 100/100 (100.0%)")


def test_progress_auto_logs_when_not_a_tty(caplog, monkeypatch):
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = progress(10, 0)
    assert bar.mode == "log"
    with caplog.at_level(logging.INFO, logger="jaxdiff.training.writers"):
        bar.update(5)  # within log_every_s of the start: no line yet
    assert caplog.records == []
    bar.close()


def test_progress_tqdm_mode(capsys):
    with progress(10, 2, mode="tqdm") as bar:
        bar.update(6, loss=1.0)
        assert bar._bar.n == 6
        bar.update(4)  # never moves backwards
        assert bar._bar.n == 6
    with pytest.raises(ValueError, match="mode"):
        progress(10, mode="fancy")
