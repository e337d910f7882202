"""Bad input to either CLI: exit code 2, one ``error:`` line naming the value, no
traceback, and nothing in the workdir changed. One row per case."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import TINY_MODEL_FLAGS

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_MODEL_FLAGS
IMAGEFOLDER = "train/configs/imagefolder.py"
STATS = "jaxdiff.metrics.reference_stats"
CONVERT = "jaxdiff.pretrained.convert"
ENCODE = "jaxdiff.pretrained.encode"
PHEMA = "jaxdiff.experiment.phema"

# (id, cli, arguments, text the error line must contain). RUN is the trained workdir,
# NEW a path that does not exist yet, TMP a scratch directory, FILE an existing file.
CASES = [
    ("num-zero", "sample", ["--num=0"], "--num"),
    ("num-negative", "sample", ["--num=-5"], "-5"),
    ("batch-zero", "sample", ["--batch_size=0"], "--batch_size"),
    ("seed-negative", "sample", ["--seed=-1"], "--seed"),
    ("steps-zero", "sample", ["--steps=0"], "--steps"),
    ("steps-negative", "sample", ["--steps=-3"], "-3"),
    ("steps-not-int", "sample", ["--steps=abc"], "abc"),
    ("scale-zero", "sample", ["--scale=0"], "--scale"),
    ("switch-negative", "sample", ["--switch_step=-1"], "--switch_step"),
    ("eval-unknown", "sample", ["--eval=inception_score"], "inception_score"),
    ("fid-without-stats", "sample", ["--eval=fid"], "--fid_stats"),
    ("fid-stats-missing", "sample", ["--eval=fid", "--fid_stats=/nonexistent.npz"], "nonexistent"),
    ("dinov2-without-stats", "sample", ["--eval=fd_dinov2"], "--dinov2_stats"),
    ("sfid-without-ref-batch", "sample", ["--eval=fid,sfid", "--fid_stats=FILE"], "--ref_batch"),
    ("is-without-fc", "sample", ["--eval=is"], "--inception_fc"),
    ("eval-repeated", "sample", ["--eval=fid,fid"], "each once"),
    (
        "dinov2-weights-missing",
        "sample",
        ["--eval=fd_dinov2", "--dinov2_stats=FILE", "--dinov2_weights=/nonexistent.st"],
        "nonexistent.st",
    ),
    ("out-is-dir", "sample", ["--out=TMP"], "--out"),
    ("out-not-png", "sample", ["--out=TMP/grid.jpg"], "grid.jpg"),
    ("out-under-a-file", "sample", ["--out=FILE/sub/grid.png"], "cannot write"),
    ("cfg-not-number", "sample", ["--guidance=cfg:abc"], "abc"),
    ("cfg-nan", "sample", ["--guidance=cfg:nan"], "nan"),
    ("apg-negative-r", "sample", ["--guidance=apg:r=-1"], "-1"),
    ("interval-empty", "sample", ["--guidance=interval:2,sigma_lo=5,sigma_hi=1"], "sigma_lo"),
    ("guidance-unknown", "sample", ["--guidance=nosuch:2"], "nosuch"),
    ("autoguidance-no-guide", "sample", ["--guidance=autoguidance:2.0"], "guide="),
    ("guide-missing", "sample", ["--guidance=autoguidance:2,guide=/nonexistent"], "nonexistent"),
    ("classifier-missing", "sample", ["--guidance=classifier:1,classifier=/no.npz"], "/no.npz"),
    ("stray-guide-key", "sample", ["--guidance=cfg:2,guide=RUN"], "guide="),
    ("bad-guidance-key", "sample", ["--guidance=cfg:2,bogus=1"], "bogus"),
    ("rescale-phi", "sample", ["--guidance=rescale:2,phi=1.5"], "phi"),
    ("ag-threshold-nan", "sample", ["--guidance=ag:2,threshold=nan"], "threshold"),
    ("solver-unknown", "sample", ["--solver=rk45"], "rk45"),
    ("solver-bad-arg", "sample", ["--solver=ddim:eta=-1"], "eta"),
    ("cfgpp-with-heun", "sample", ["--solver=heun", "--guidance=cfgpp:0.6", "--num=2"], "euler"),
    ("workdir-without-run", "sample", ["--workdir=NEW"], "no checkpoint"),
    ("labels-out-of-range", "sample", ["--labels=11", "--num=2"], "11"),
    ("labels-not-ints", "sample", ["--labels=a,b", "--num=2"], "a,b"),
    ("ema-not-kept", "sample", ["--ema=0.5"], "0.5"),
    ("unknown-flag", "sample", ["--unknown_flag=1"], "unknown_flag"),
    ("positional-arg", "sample", ["extra"], "extra"),
    ("student-without-run", "sample", ["--student=NEW", "--num=2"], "no checkpoint"),
    ("unknown-config-key", "train", ["--config.train.num_stepz=3"], "num_stepz"),
    ("label-dropout", "train", ["--config.train.label_dropout=2.0"], "label_dropout"),
    ("grid-size-negative", "train", ["--config.sample.grid_size=-1"], "grid_size"),
    ("config-without-get-config", "train", ["--config=TMP/noget.py"], "get_config"),
    ("config-missing", "train", ["--config=/nonexistent_cfg.py"], "nonexistent_cfg.py"),
    ("workdir-is-a-file", "train", ["--workdir=FILE"], "FILE"),
    ("batch-not-divisible", "train", ["--config.train.batch_size=12"], "batch_size=12"),
    ("config-guidance", "train", ["--config.sample.guidance=cfg:abc"], "abc"),
    ("config-guidance-unknown", "train", ["--config.sample.guidance=cfgg:2"], "cfgg"),
    ("learning-rate", "train", ["--config.optim.learning_rate=-1"], "learning_rate"),
    ("num-steps-zero", "train", ["--config.train.num_steps=0"], "num_steps"),
    ("mesh-fsdp", "train", ["--config.mesh.fsdp=3"], "fsdp=3"),
    ("dataset-unknown", "train", ["--config.data.name=digitz"], "digitz"),
    ("ema-rate", "train", ["--config.train.ema_rates=(1.5,)"], "ema_rates"),
    (
        "eval-name",
        "train",
        ["--config.eval.name=inception_score", "--config.eval.every=1"],
        "eval.name",
    ),
    (
        "eval-sfid-without-ref-batch",
        "train",
        ["--config.eval.name=fd_digits,sfid", "--config.eval.every=1"],
        "config.eval.ref_batch",
    ),
    ("config-solver", "train", ["--config.sample.solver=rk45"], "rk45"),
    ("config-steps", "train", ["--config.sample.steps=0"], "steps"),
    ("resume-below-step", "train", ["--workdir=RUN", *TINY, "--config.train.num_steps=1"], "below"),
    ("workdir-unknown-scheme", "train", ["--workdir=memory://bucket/run"], "memory://"),
    (
        "distill-features-not-sown",  # the tiny teacher has one level: no "enc1"
        "train",
        ["--config=train/configs/distill_digits.py", "--config.teacher=RUN"],
        "--config.distill.feature_names",
    ),
    ("sample-unknown-scheme", "sample", ["--workdir=ftp://host/run"], "ftp://"),
    ("imagefolder-without-path", "train", [f"--config={IMAGEFOLDER}"], "--config.data.path"),
    (
        "imagefolder-corrupt-image",
        "train",
        # A bad image is met when training reads it, after the run has started: the run
        # goes to a scratch workdir outside the snapshot.
        ["--workdir=SCRATCH", f"--config={IMAGEFOLDER}", "--config.data.path=TMP/images"]
        + ["--config.data.workers=0", *TINY],
        "TMP/images/a/bad.png",
    ),
    ("vae-missing", "sample", ["--vae=/nonexistent.safetensors"], "nonexistent"),
    ("vae-for-pixel-model", "sample", ["--vae=FILE"], "not latents"),
    ("phema-not-made", "sample", ["--ema=phema:0.1"], "jaxdiff.experiment.phema"),
    ("phema-every-without-stds", "train", ["--config.train.phema_every=5"], "ema_stds"),
    ("lr-schedule-unknown", "train", ["--config.optim.schedule=linear"], "linear"),
    ("convert-src-missing", CONVERT, ["--src=/no.pt", "--dst=NEW/x.safetensors"], "/no.pt"),
    ("convert-dst-suffix", CONVERT, ["--src=FILE", "--dst=NEW/x.bin"], ".safetensors"),
    ("convert-hash", CONVERT, ["--src=FILE", "--dst=NEW/x.safetensors", "--sha256=00ff"], "00ff"),
    ("convert-unknown-type", CONVERT, ["--src=FILE", "--dst=NEW/x.safetensors"], "unknown"),
    ("convert-evil-pickle", CONVERT, ["--src=TMP/evil.pkl", "--dst=NEW/x.safetensors"], "system"),
    ("convert-arch", CONVERT, ["--src=FILE", "--dst=NEW/x.safetensors", "--arch=unet"], "unet"),
    ("encode-vae-missing", ENCODE, ["--src=TMP/images", "--dst=NEW/z", "--vae=/v.st"], "/v.st"),
    ("phema-no-snapshots", PHEMA, ["--workdir=RUN", "--std=0.1"], "phema_every"),
    ("phema-std-range", PHEMA, ["--workdir=RUN", "--std=0.5"], "0.5"),
    ("stats-without-out", STATS, ["--dataset=digits", "--evaluator=fd_digits"], "--out"),
    (
        "stats-evaluator-mismatch",
        STATS,
        ["--dataset=moons", "--evaluator=fd_digits", "--out=SCRATCH/moons.npz"],
        "fd_digits describes 8x8",
    ),
    (
        "stats-dinov2-weights-on-fid",
        STATS,
        ["--dataset=digits", "--evaluator=fid", "--dinov2_weights=FILE", "--out=NEW/s.npz"],
        "--dinov2_weights is for --evaluator=fd_dinov2",
    ),
    (
        "stats-dinov2-no-weights",
        STATS,
        ["--dataset=digits", "--evaluator=fd_dinov2", "--out=SCRATCH/d.npz"],
        "convert_dinov2",
    ),
]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="session")
def places(tmp_path_factory, trained_run):
    run = trained_run
    tmp = tmp_path_factory.mktemp("scratch")
    (tmp / "noget.py").write_text("X = 1\n")
    (tmp / "a_file").write_text("not a directory\n")
    (tmp / "images" / "a").mkdir(parents=True)
    (tmp / "images" / "a" / "bad.png").write_bytes(b"\x89PNG, then garbage")
    # A pickle that would run a shell command if unpickled naively (it never is).
    (tmp / "evil.pkl").write_bytes(pickle.dumps(_Evil()))
    scratch = tmp_path_factory.mktemp("scratch_run") / "run"
    return {"RUN": run, "TMP": tmp, "FILE": tmp / "a_file", "NEW": tmp / "new", "SCRATCH": scratch}


def _snapshot(*roots: Path) -> dict:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for root in roots
        for p in ([root] if root.is_file() else sorted(root.rglob("*")))
        if p.exists()
    }


# The table's 80-odd subprocesses are half of one worker's run: two groups (setup.cfg:
# --dist=loadgroup) let both workers take a half, each beside the other tests.
TABLE = [
    pytest.param(c, id=c[0], marks=pytest.mark.xdist_group(f"cli_table_{i % 2}"))
    for i, c in enumerate(CASES)
]


@pytest.mark.parametrize("case", TABLE)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, places):
    _, cli, args, expected = case

    def fill(text: str) -> str:
        for name, path in places.items():
            text = text.replace(name, str(path))
        return text

    args = [fill(a) for a in args]
    expected = fill(expected)
    if cli == "sample" and not any(a.startswith("--workdir") for a in args):
        args.insert(0, f"--workdir={places['RUN']}")
    if cli == "train" and not any(a.startswith("--workdir") for a in args):
        args.insert(0, f"--workdir={places['NEW']}")
    before = _snapshot(places["RUN"], places["TMP"])
    res = subprocess.run(
        [sys.executable, "-m", cli, *args],
        cwd=ROOT,
        env={**os.environ, "JAXDIFF_DEBUG": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(errors) == 1 and expected in errors[0], res.stderr[-3000:]
    assert _snapshot(places["RUN"], places["TMP"]) == before  # nothing written or moved


def test_debug_shows_the_traceback(places):
    res = subprocess.run(
        [sys.executable, "-m", "sample", f"--workdir={places['NEW']}", "--debug"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0 and "Traceback" in res.stderr and "no checkpoint" in res.stderr


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
