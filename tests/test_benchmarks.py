"""Every benchmark's ``--smoke`` mode, run in-process, so that none of them rots.

Each test runs a benchmark's ``main`` at tiny size (on the shared 5-step ``trained_run``
where it needs a run) and checks that its table comes out with the expected rows, exact
network-evaluation counts where the solver fixes them, and finite numbers elsewhere.
"""

import json
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

from jaxdiff.errors import InvalidArgumentError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed: it runs from the repo root
    sys.path.insert(0, str(ROOT))


def _table(text, header):
    """The rows (lists of cells) of the first Markdown table whose header starts so."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    assert set(lines[start + 1]) <= set("|-"), lines[start + 1]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _assert_finite(cells):
    for cell in cells:
        assert math.isfinite(float(cell.replace(",", "").rstrip("%"))), cells


def test_eval_digits_smoke(trained_run, tmp_path, capsys):
    from benchmarks import eval_digits

    jsonl = tmp_path / "r.jsonl"
    eval_digits.main(["--smoke", f"--workdir={trained_run}", f"--jsonl={jsonl}"])
    rows = _table(capsys.readouterr().out, "| setting | NFE | N | FD-digits")
    assert [r[0] for r in rows] == [
        "real held-out digits (test split)",
        "heun 2 steps, guidance cfg:2.0",
        "heun 2 steps, guidance none",
    ]
    # Heun's 2 steps cost 2N - 1 = 3 evaluations; CFG doubles them.
    assert [r[1:3] for r in rows] == [["-", "297"], ["6", "24"], ["3", "24"]]
    for row in rows:
        _assert_finite(row[3:])
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        _assert_finite(str(v) for k, v in record.items() if k != "setting")


def test_every_eval_digits_setting_resolves():
    # The smoke run samples two settings; a renamed solver or guidance in the others
    # must still fail here, without a compile.
    from tiny import tiny_config

    from benchmarks import eval_digits
    from jaxdiff.experiment import resolve_sampler

    for solver, steps, guidance in eval_digits.SETTINGS:
        spec = resolve_sampler(
            tiny_config().sample, num_classes=10, solver=solver, steps=steps, guidance=guidance
        )
        assert spec.steps == steps and (spec.guidance is None) == (guidance == "none")


def test_guidance_smoke_mixture(capsys):
    from benchmarks import guidance

    guidance.main(["--smoke"])
    out = capsys.readouterr().out
    rows = _table(out, "| method | NFE/sample")
    assert [r[0].strip("`") for r in rows] == list(guidance.mixture_methods())
    nfe = {r[0].strip("`"): int(r[1]) for r in rows}
    assert nfe["none (conditional)"] == 4 and nfe["cfg:2"] == 8  # Euler, 4 steps
    for row in rows:
        _assert_finite(row[1:])
    ag_rows = _table(out, "| AG threshold")
    assert [float(r[0]) for r in ag_rows] == [0.95, 0.99, 0.999]
    for row in ag_rows:
        assert int(row[1]) <= int(row[2]) == 8
        _assert_finite(row[1:])
    assert "## Trained run" not in out


def test_guidance_smoke_on_a_run(trained_run, capsys):
    from benchmarks import guidance

    guidance.main(["--smoke", "--skip_mixture", f"--workdir={trained_run}"])
    out = capsys.readouterr().out
    assert "Gaussian mixture" not in out
    rows = _table(out, "| method | NFE/sample")
    assert [r[0].strip("`") for r in rows] == list(guidance.SMOKE_DIGITS_METHODS)
    nfe = {r[0].strip("`"): int(r[1]) for r in rows}
    assert nfe["none (conditional)"] == 4 and nfe["cfg:2"] == 8
    for row in rows:
        _assert_finite(row[1:])


def test_guidance_grid_smoke(trained_run, tmp_path, capsys):
    from benchmarks import guidance_grid

    out = tmp_path / "grid.png"
    guidance_grid.main(["--smoke", f"--workdir={trained_run}", f"--out={out}"])
    lines = capsys.readouterr().out.splitlines()
    sampled = {
        line.split()[0]: int(line.split("nfe=")[1].split()[0]) for line in lines if "nfe=" in line
    }
    # Heun's 2 steps: 3 evaluations (6 with two networks); CFG++ runs Euler: 2 x 2.
    assert sampled == {"cfgpp:0.6": 4, "autoguidance:2.0": 6, "classifier:2.0": 3}
    parsed = [line for line in lines if "parsed, not sampled" in line]
    assert len(parsed) == len(guidance_grid.specs(None, None)) - 1  # all but CFG++
    assert lines[-1] == f"wrote {out}"
    with Image.open(out) as image:  # 3 rows of 10 8x8 digits, 1 px apart, 4x; 260 px names
        assert image.size == (260 + 4 * (10 * 9 + 1), 4 * (3 * 9 + 1))


def test_few_step_grid_takes_the_first_of_each_class(tmp_path):
    import numpy as np

    from benchmarks import few_step_grid
    from jaxdiff.utils import storage

    labels = np.arange(25) % 10
    samples = np.broadcast_to(labels[:, None, None, None] / 10.0, (25, 8, 8, 1))
    storage.save_npz(tmp_path / "a.npz", samples=samples, labels=labels)
    picked = few_step_grid.first_of_each_class(str(tmp_path / "a.npz"))
    np.testing.assert_allclose(picked[:, 0, 0, 0], np.arange(10) / 10.0)
    out = tmp_path / "g.png"
    few_step_grid.main([f"one={tmp_path / 'a.npz'}", f"two={tmp_path / 'a.npz'}", f"--out={out}"])
    with Image.open(out) as image:  # 2 rows of 10 8x8 digits, 1 px apart, 4x; 260 px names
        assert image.size == (260 + 4 * (10 * 9 + 1), 4 * (2 * 9 + 1))


def test_distill_rates_smoke(trained_run, tmp_path, capsys):
    from benchmarks import distill_rates

    out = tmp_path / "rates.json"
    distill_rates.main(["--smoke", f"--teacher={trained_run}", f"--json={out}"])
    rows = _table(capsys.readouterr().out, "| method | steps/s")
    assert [r[0] for r in rows] == ["ct"]
    _assert_finite(rows[0][1:])
    (record,) = json.loads(out.read_text())["tables"].values()
    rate = record[0]["steps/s"]
    assert record[0]["steps in 6 min"] == int(rate * 360)  # the budget is rate x minutes


def test_distill_rates_reads_steady_windows(tmp_path):
    from benchmarks import distill_rates

    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 50, "steps_per_s": 1.0}, {"step": 100, "loss": 0.5, "steps_per_s": 6.0}]
    lines += [{"step": 150, "steps_per_s": 8.0}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert distill_rates.steady_rate(str(path)) == 7.0  # the compiling window is dropped
    path.write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(InvalidArgumentError, match="--steps >= 2 \\* --log_every"):
        distill_rates.steady_rate(str(path))
    with pytest.raises(InvalidArgumentError, match="unknown method 'dmd'"):
        distill_rates.method_config("dmd", "runs/t", 4, 2, 8)


@pytest.mark.slow  # trains a MeanFlow student (a JVP step to compile); the suite is at its budget
def test_meanflow_jumps_smoke(trained_run, capsys):
    from benchmarks import meanflow_jumps

    meanflow_jumps.main(["--smoke", f"--teacher={trained_run}"])
    rows = _table(capsys.readouterr().out, "| to sigma | flow gap")
    assert [float(r[0]) for r in rows] == [0.0, 2.5]
    for _, gap, student, euler in rows:
        _assert_finite([gap, student, euler])
        # Two updates from the teacher's weights (aux_time embedding zero): a jump is still
        # the teacher's Euler step over the same interval, which checks the time mapping.
        assert float(student) == pytest.approx(float(euler), rel=0.05)
    assert float(rows[0][1]) == pytest.approx(80 / 81, abs=1e-3)  # the whole flow interval


def test_input_pipeline_smoke(capsys):
    from benchmarks import input_pipeline

    input_pipeline.main(["--smoke"])
    out = capsys.readouterr().out
    rows = _table(out, "| data | workers")
    # Workers 0 and 1 (threads 0 and 8 without workers) for JPEGs, latents and NpySource
    # and ArrayRecordSource; decode-only rows for both JPEG folders.
    assert len(rows) == 4 + 3 + 2 * 2
    assert rows[0][0] == "JPEG 80x60 -> 48: decode + crop only"
    assert {r[1] for r in rows} == {"- (1 thread)", "0", "1"}
    for row in rows:
        _assert_finite(row[3:])
        assert float(row[3].replace(",", "")) > 0
    assert "Command: `python -m benchmarks.input_pipeline --smoke`" in out


def test_flags_that_cannot_work_are_refused_before_any_work(capsys):
    from benchmarks import guidance, guidance_grid, input_pipeline

    with pytest.raises(SystemExit):
        guidance_grid.main([])
    assert "--workdir is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        guidance.main(["--skip_mixture"])
    assert "--workdir=RUN" in capsys.readouterr().err
    with pytest.raises(InvalidArgumentError, match="drop --write"):  # smoke never writes docs/
        input_pipeline.main(["--smoke", "--write"])
