"""``gs://`` workdirs end to end, on the fake bucket of tests/fakegcs.py (no network).

Training, resuming, ``load_run`` and ``python -m sample`` must read and write only
through the cloud code path: every file lands in the fake bucket, and the working
directory (where a ``gs:/bucket`` folder would appear if a URL were treated as a local
path) stays empty.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fakegcs import BUCKET
from tiny import tiny_imagefolder_config, write_image_folder

from jaxdiff.experiment import load_run, train_and_evaluate
from jaxdiff.training.lock import LOCK_NAME, WorkdirLock, WorkdirLockedError
from jaxdiff.utils import storage

ROOT = Path(__file__).resolve().parents[1]
FAKEGCS = Path(__file__).resolve().parent / "fakegcs.py"


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_storage_reads_and_writes_through_the_bucket(fake_gcs):
    url = f"gs://{BUCKET}/a/b.txt"
    assert storage.to_str(url) == url  # the scheme's double slash survives
    storage.write_text(url, "hello")
    storage.append_text(f"gs://{BUCKET}/a/log.jsonl", "1\n")
    storage.append_text(f"gs://{BUCKET}/a/log.jsonl", "2\n")
    storage.save_npz(f"gs://{BUCKET}/a/x.npz", x=np.arange(3))
    assert storage.read_text(url) == "hello"
    assert storage.read_text(f"gs://{BUCKET}/a/log.jsonl") == "1\n2\n"
    np.testing.assert_array_equal(storage.load_npz(f"gs://{BUCKET}/a/x.npz")["x"], np.arange(3))
    assert storage.listdir(f"gs://{BUCKET}/a") == ["b.txt", "log.jsonl", "x.npz"]
    assert storage.isdir(f"gs://{BUCKET}/a") and storage.isfile(url)
    assert (fake_gcs / BUCKET / "a" / "b.txt").read_text() == "hello"
    assert os.listdir(".") == []


def test_unknown_scheme_is_an_error_not_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"memory://.*not one of gs://"):
        storage.write_text("memory://bucket/x.txt", "x")
    assert os.listdir(tmp_path) == []


def test_local_writes_are_atomic_and_leave_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "f.json"
    storage.write_text(path, "1")
    storage.write_text(path, "2")
    assert path.read_text() == "2"
    assert os.listdir(path.parent) == ["f.json"]


def test_bucket_workdir_lock_is_exclusive_and_released(fake_gcs):
    url = f"gs://{BUCKET}/locked"
    with WorkdirLock(url):
        assert (fake_gcs / BUCKET / "locked" / LOCK_NAME).exists()
        with pytest.raises(WorkdirLockedError, match=f"gsutil rm {url}/{LOCK_NAME}"):
            WorkdirLock(url).acquire()
    assert not (fake_gcs / BUCKET / "locked" / LOCK_NAME).exists()


def test_train_resume_and_sample_on_a_bucket(fake_gcs):
    # The imagefolder config reads its images from the bucket and writes its run there.
    write_image_folder(fake_gcs / BUCKET / "images")
    url = f"gs://{BUCKET}/runs/faces"
    config = tiny_imagefolder_config(f"gs://{BUCKET}/images")
    config.train.update(num_steps=4, checkpoint_every=2, log_every=2, sample_every=4)
    train_and_evaluate(config, url)
    config.train.num_steps = 6  # resume from step 4 and go on
    train_and_evaluate(config, url)

    run_dir = fake_gcs / BUCKET / "runs" / "faces"
    files = _tree(run_dir)
    for name in ("metrics.jsonl", "hparams.json", "samples/step_000004.png"):
        assert name in files, files
    assert any(f.startswith("checkpoints/6/") for f in files), files
    assert LOCK_NAME not in files
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6]  # resumed at 4

    run = load_run(url)
    assert run.config.train.num_steps == 6 and run.num_classes == 2

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    args = ["sample", f"--workdir={url}", "--num=4", "--steps=2", "--batch_size=4"]
    proc = subprocess.run(
        [sys.executable, str(FAKEGCS), str(fake_gcs), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"to {url}/samples/grid.png" in proc.stdout
    samples = np.load(run_dir / "samples" / "grid.npz")["samples"]
    assert samples.shape == (4, 32, 32, 3)
    assert os.listdir(".") == []  # nothing went to a local "gs:" folder
