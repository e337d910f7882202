"""Nothing silent, nothing lost: workdir lock, corrupt checkpoints met by real runs."""

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny import TINY_MODEL_FLAGS, tiny_config

from jaxdiff.experiment import load_run, train_and_evaluate
from jaxdiff.training.lock import LOCK_NAME, WorkdirLock, WorkdirLockedError

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_MODEL_FLAGS,
    "--config.optim.learning_rate=2e-3",
    "--config.train.log_every=5",
    "--config.sample.steps=3",
    "--config.sample.grid_size=0",
]


def _losses(workdir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _train_cli(workdir, *flags):
    cmd = [sys.executable, "-m", "train", f"--workdir={workdir}", *TINY, *flags]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_a_second_trainer_on_a_workdir_exits_2_at_once(tmp_path):
    steps = ["--config.train.num_steps=10", "--config.train.checkpoint_every=5"]
    first = _train_cli(tmp_path / "run", *steps)
    lock = tmp_path / "run" / LOCK_NAME
    deadline = time.time() + 300
    while not lock.exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.1)
    start = time.time()
    second = _train_cli(tmp_path / "run", *steps)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2, err[-3000:]
    assert f"pid {first.pid}" in err and f"rm {lock}" in err and "Traceback" not in err
    assert time.time() - start < 60  # before any checkpoint is restored or step is run
    _, err = first.communicate(timeout=400)
    assert first.returncode == 0, err[-3000:]
    assert not lock.exists()  # released on exit
    # The first run is bit-identical to a lone run of the same config.
    config = tiny_config(10, checkpoint_every=5)
    train_and_evaluate(config, tmp_path / "lone")
    assert _losses(tmp_path / "run") == _losses(tmp_path / "lone")
    a, b = load_run(tmp_path / "run"), load_run(tmp_path / "lone")
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_a_stale_lock_is_reported_and_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_path.mkdir(exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": dead.pid, "started": "then", "command": "x"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
    with caplog.at_level(logging.WARNING, logger="jaxdiff.training.lock"):
        train_and_evaluate(tiny_config(2, checkpoint_every=2), tmp_path)
    assert any("stale lock" in r.getMessage() and str(dead.pid) in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_from_another_host_names_the_command_that_clears_it(tmp_path):
    holder = {"host": "some-other-host", "pid": 1, "started": "t", "command": "python -m train"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
    with pytest.raises(WorkdirLockedError, match=rf"pid 1 on some-other-host.*rm {tmp_path}"):
        WorkdirLock(tmp_path).acquire()
    live = WorkdirLock(tmp_path / "b").acquire()  # our own live pid: a second one fails
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
        WorkdirLock(tmp_path / "b").acquire()
    live.release()
    WorkdirLock(tmp_path / "b").acquire().release()


def _garble_newest_array_file(step_dir: Path) -> Path:
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d")
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[: min(4096, len(data))] = bytes(b ^ 0xFF for b in data[: min(4096, len(data))])
    target.write_bytes(bytes(data))
    return target


def test_a_garbled_checkpoint_is_never_trusted_by_sample_or_resume(tmp_path, caplog):
    # Bytes garbled in place (same size) in the newest step: sampling falls back to the
    # previous step with a warning naming the file; resuming does too, moves the bad
    # step aside and trains on to the end; and if the run then goes NaN, the message
    # names the step it resumed from and that its integrity was verified.
    train_and_evaluate(tiny_config(4, checkpoint_every=2), tmp_path)
    bad = _garble_newest_array_file(tmp_path / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING, logger="jaxdiff.training.checkpoint"):
        run = load_run(tmp_path)
    assert run.step == 2
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    assert (tmp_path / "checkpoints" / "4").exists()  # a reader moves nothing
    state = train_and_evaluate(tiny_config(6, checkpoint_every=2), tmp_path)
    assert int(state.step) == 6
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints" / "corrupt").iterdir()] == ["4"]
    nan = tiny_config(10, checkpoint_every=2)
    nan.optim.learning_rate = 1e30
    with pytest.raises(FloatingPointError, match=r"resumed from step 6 \(integrity verified\)"):
        train_and_evaluate(nan, tmp_path)
