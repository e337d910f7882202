"""``--smoke`` runs of the train-step and sampling benchmarks, in-process.

Each test runs a benchmark's ``main`` with tiny models on the 8 forced CPU devices and
checks the printed tables: every expected row, exact FLOP and NFE counts where the model
and schedule fix them, a cache-served warm compile, and finite numbers elsewhere (n/a
only where the CPU has no number: peak memory and MFU against a datasheet peak). No
timing is asserted.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.utils.flops import dit_forward_flops

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed: it runs from the repo root
    sys.path.insert(0, str(ROOT))


def _table(text, title):
    """``{first cell: row dict}`` of the markdown table under ``### title``."""
    lines = text.splitlines()
    start = lines.index(f"### {title}") + 2
    columns = [c.strip() for c in lines[start].strip().strip("|").split("|")]
    assert set(lines[start + 1]) <= set("|-")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append(dict(zip(columns, cells, strict=True)))
    return rows


def _number(cell):
    value = float(cell.replace(",", "").rstrip("%"))
    assert math.isfinite(value), cell
    return value


def _check_finite(row, skip=()):
    for column, cell in row.items():
        if column not in skip:
            _number(cell)


@pytest.mark.slow  # 41 s: the UNet train-step smoke stays in the default run
def test_train_step_smoke_dit(capsys, tmp_path):
    from benchmarks import train_step

    out = tmp_path / "rows.json"
    text = train_step.main(["--smoke", "--model", "dit-S/2", "--json", str(out)])
    assert text in capsys.readouterr().out
    assert "device: cpu x8" in text.splitlines()[0]

    (row,) = _table(text, "Train step")
    assert (row["model"], row["batch"], row["precision"], row["blocks"]) == (
        "dit-S/2", "8", "bf16", "unrolled",
    )  # fmt: skip
    # No datasheet peak or allocator statistics on a CPU; everything else is a number,
    # and the second compile really came from the persistent cache.
    assert row["MFU (peak)"] == row["peak mem"] == "n/a"
    _check_finite(row, skip=("model", "precision", "remat", "blocks", "MFU (peak)", "peak mem",
                             "XLA mem/device"))  # fmt: skip
    assert row["XLA mem/device"].endswith(" MiB")

    record = json.loads(out.read_text())["tables"]["Train step"][0]
    assert record["warm_cache_hits"] > 0
    # 3 x the exact forward FLOPs of the smoke DiT (depth 2, width 64, 16 tokens of 16
    # values) for a batch of 8.
    assert record["model_flops"] == 3 * 8 * dit_forward_flops(2, 64, 16, 16)
    assert record["xla_flops"] > record["model_flops"]  # elementwise + optimizer work too
    assert np.isfinite(record["loss"])

    (pipe,) = _table(text, "Input pipeline vs step")
    _check_finite(pipe, skip=("model",))
    scan = _table(text, "DiT blocks unrolled vs scanned")
    assert [r["blocks"] for r in scan] == ["unrolled", "scanned"]
    assert scan[0]["compile vs unrolled"] == scan[0]["step vs unrolled"] == "1.000"
    for r in scan:
        _check_finite(r, skip=("model", "blocks"))


def test_train_step_smoke_unet_with_augment_labels(capsys):
    from benchmarks import train_step

    text = train_step.main(["--smoke", "--model", "unet", "--precision", "default"])
    (row,) = _table(text, "Train step")
    assert (row["model"], row["precision"]) == ("unet", "default")
    _check_finite(row, skip=("model", "precision", "remat", "blocks", "MFU (peak)", "peak mem",
                             "XLA mem/device"))  # fmt: skip
    (pipe,) = _table(text, "Input pipeline vs step")  # npy data through EDM's augmentation
    _check_finite(pipe, skip=("model",))
    assert "### DiT blocks unrolled vs scanned" not in text  # a UNet has no scan option


def test_sampling_smoke(capsys):
    from benchmarks import sampling

    text = sampling.main(["--smoke"])
    assert text in capsys.readouterr().out
    rows = {r["sampler"]: r for r in _table(text, "Samplers")}
    assert {name: rows[name]["NFE"] for name in rows} == {
        "forward (1 evaluation)": "1", "Euler, 1 step": "1", "Heun, 18 steps": "35",
    }  # fmt: skip
    for r in rows.values():
        _check_finite(r, skip=("sampler",))
    (derived,) = _table(text, "Sampler overhead and one-step speed-up")
    _check_finite(derived)

    guided = {r["guidance"]: r for r in _table(text, "Guidance, Heun 18 steps, scale 2.0")}
    nfe = {name: int(r["NFE"]) for name, r in guided.items()}
    # The interval guides the steps whose first noise level lies in (0.28, 1.61]: one
    # extra evaluation per guided evaluation (two per Heun step, one on the last step).
    sigmas = np.asarray(karras_sigmas(18), np.float32)[:-1]
    inside = (sigmas > np.float32(0.28)) & (sigmas <= np.float32(1.61))
    extra = int(sum((2 if i < 17 else 1) for i in np.flatnonzero(inside)))
    assert nfe == {
        "none (conditional)": 35,
        "cfg:2.0": 70,
        "ag:2.0,threshold=0.99": nfe["ag:2.0,threshold=0.99"],
        "interval:2.0,sigma_lo=0.28,sigma_hi=1.61": 35 + extra,
    }
    assert 35 < nfe["ag:2.0,threshold=0.99"] <= 70 and extra > 0
    assert guided["cfg:2.0"]["NFE vs CFG"] == guided["cfg:2.0"]["time vs CFG"] == "1.000"
    for r in guided.values():
        _check_finite(r, skip=("guidance",))


def test_bad_arguments_are_named():
    from benchmarks import sampling, train_step

    with pytest.raises(InvalidArgumentError, match="--model 'dit-Z/9'"):
        train_step.main(["--smoke", "--model", "dit-Z/9"])
    with pytest.raises(InvalidArgumentError, match="--batches='1,x'"):
        sampling.main(["--smoke", "--batches", "1,x"])


@pytest.mark.slow  # 35 s: compiles two DiT layouts
def test_compile_time_smoke_compiles_both_layouts_from_shapes(capsys):
    from benchmarks import compile_time

    text = compile_time.main(["--smoke", "--model", "dit-S/2"])
    assert text in capsys.readouterr().out
    rows = _table(text, "Train-step compile time")
    assert [r["blocks"] for r in rows] == ["unrolled", "scanned"]
    for row in rows:
        assert _number(row["cold compile s"]) > 0
        assert row["warm compile s"] != "miss"  # served by the persistent cache
        assert row["cuDNN attn"] == "0"  # CPU: attention takes the XLA path
