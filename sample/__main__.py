"""Samples a trained run: ``python -m sample --workdir=W [--solver=... --steps=N --guidance=...]``.

``--workdir`` may also name a converted published network (``dit-xl2-256.safetensors``,
written by ``python -m jaxdiff.pretrained.convert``); it then samples with that paper's
sampler unless flags say otherwise, and ``--vae=FILE`` decodes latent samples to images.

Uses the run's stored sampler (``config.sample``: solver, steps, sigmas, guidance) unless a
flag overrides it, and prints the sampler it used. Writes a PNG grid and an .npz of the
samples (float32 in [-1, 1], with labels); with ``--eval=NAME`` it also prints metrics of
the samples (e.g. ``fd_digits``, ``toy``, or ADM's table ``fid,sfid,is,prec_recall``
with ``--ref_batch``), one JSON line and one markdown row. Each sample is seeded by its index, so
the same seed gives the same images at any batch size or device count.
``--classify=PATH`` classifies images instead (an ``.npz`` with ``samples`` and optionally
``labels``, or an image folder) with the run as a zero-shot diffusion classifier, writes
the predictions beside ``--out`` (``*_classify.npz``) and prints the accuracy when labels
are given. ``--edit=PATH --edit_to=+1`` edits images instead: inversion, then Direct
Inversion to the target classes (``jaxdiff.experiment.edit``). A distilled
few-step student samples as it was trained (its stored ``renoise`` recipe at its trained
levels; ``--steps=k`` takes k of them, at most K). ``--student=S --switch_step=k``
samples the hybrid of diversity distillation: this run's first k steps, the last landing
on one of the student's trained levels, then the distilled student S. Flags are checked
before the run is restored; a bad one is one line on stderr and exit code 2 (``--debug``
shows the traceback).
"""

import json
import os

from absl import app, flags

from jaxdiff.utils import cli, storage

_WORKDIR = flags.DEFINE_string(
    "workdir", "runs/digits", "Workdir of a training run, or a converted .safetensors network."
)
_SOLVER = flags.DEFINE_string(
    "solver", None, "euler, heun, edm_stochastic:s_churn=40, ddim:eta=1, ... (default: the run's)"
)
_STEPS = flags.DEFINE_integer(
    "steps",
    None,
    "Solver steps (default: the run's config). A K-step distilled student samples as "
    "trained with 1..K steps at that many of its trained levels (docs/distillation.md).",
)
_GUIDANCE = flags.DEFINE_string(
    "guidance", None, "NAME:key=value,... or none (default: the run's; see docs/guidance.md)."
)
_NUM = flags.DEFINE_integer("num", 64, "Number of samples.")
_LABELS = flags.DEFINE_string("labels", None, "Class labels: '3' or '0,1,7'; default cycles.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Samples per batch (over all devices).")
_EMA = flags.DEFINE_string(
    "ema",
    "default",
    "EMA to use: a rate ('0.999'), a power profile ('std0.100'), a post-hoc reconstruction "
    "('phema:0.1', see docs/phema.md), or 'none' for raw params.",
)
_OUT = flags.DEFINE_string("out", None, "PNG path (default: WORKDIR/samples/grid.png).")
_SCALE = flags.DEFINE_integer("scale", None, "Grid upscaling (default: the run's config).")
_EVAL = flags.DEFINE_string(
    "eval",
    None,
    "Evaluate the samples, comma-separated: fd_digits, fid, sfid, is, prec_recall, kid, "
    "fd_dinov2, toy (see docs/evaluation.md).",
)
_SAVE_NUM = flags.DEFINE_integer(
    "save_num",
    None,
    "Samples kept in host memory and written to the .npz (default: all of them; with "
    "--eval at most 1000, since the metrics stream every sample's features anyway).",
)
_FID_STATS = flags.DEFINE_string("fid_stats", None, "Reference .npz (mu, sigma) for --eval=fid.")
_REF_BATCH = flags.DEFINE_string(
    "ref_batch",
    None,
    "Reference batch in ADM's .npz layout (published, or from python -m "
    "jaxdiff.metrics.reference_stats --evaluator=adm): sfid, prec_recall, kid (and fid).",
)
_WEIGHTS = flags.DEFINE_string(
    "inception_weights", None, "FID Inception weights (default $JAXDIFF_INCEPTION_WEIGHTS)."
)
_FC = flags.DEFINE_string(
    "inception_fc",
    None,
    "Inception logits layer for --eval=is (convert_inception --fc-out; default "
    "$JAXDIFF_INCEPTION_FC).",
)
_DINOV2_STATS = flags.DEFINE_string(
    "dinov2_stats", None, "Reference .npz (mu, sigma) of DINOv2 features for --eval=fd_dinov2."
)
_DINOV2 = flags.DEFINE_string(
    "dinov2_weights", None, "Converted DINOv2 .safetensors (default $JAXDIFF_DINOV2_WEIGHTS)."
)
_STUDENT = flags.DEFINE_string(
    "student",
    None,
    "Distilled student workdir: hybrid sampling, base first, then the student's own recipe "
    "from its highest trained level at or below the base's sigmas[switch_step].",
)
_SWITCH = flags.DEFINE_integer(
    "switch_step", 1, "Base-model steps before the student runs (0: the student alone)."
)
_VAE = flags.DEFINE_string(
    "vae",
    None,
    "Converted VAE (.safetensors) that decodes a latent model's samples to images "
    "(default: the run's config.vae.path).",
)

_PRECISION = flags.DEFINE_enum(
    "precision",
    None,
    ["default", "fp32", "bf16"],
    "Numerics preset (default: the run's config.precision): bf16 computes in bfloat16 "
    "with float32 params and sampler state; fp32 makes float32 matmuls exact on GPU/TPU.",
)
_CLASSIFY = flags.DEFINE_string(
    "classify",
    None,
    "Classify these images with the run (diffusion classifier) instead of sampling: an .npz "
    "with samples (and labels) or an image folder.",
)
_CLASSIFY_SCHEDULE = flags.DEFINE_string(
    "classify_schedule",
    "10:3,30:1",
    "Stages N:K of --classify: levels by the end of the stage : classes kept (last keeps 1).",
)
_CLASSIFY_TRIALS = flags.DEFINE_integer(
    "classify_trials", 1, "Noise draws per level of --classify (shared by all classes)."
)
_EDIT = flags.DEFINE_string(
    "edit",
    None,
    "Edit these images instead of sampling (inversion + Direct Inversion): an .npz with "
    "samples and labels, or an image folder with class subfolders.",
)
_EDIT_TO = flags.DEFINE_string(
    "edit_to", "+1", "Target classes of --edit: '3', one per image '0,1,7', or a shift '+1'."
)
_EDIT_MODE = flags.DEFINE_enum(
    "edit_mode", "source", ["source", "both"], "Direct Inversion correction: paper or both."
)
_EDIT_STRENGTH = flags.DEFINE_float(
    "edit_strength", 1.0, "Edit depth in (0, 1]: invert round(strength * steps) levels."
)
_EDIT_INJECT = flags.DEFINE_float(
    "edit_inject", 0.0, "Fraction of editing steps whose target takes the source's attention."
)
_CACHE = flags.DEFINE_string(
    "compile_cache_dir",
    None,
    "Persistent XLA compilation cache folder (local or gs://): a repeated command loads "
    "its compiled sampler instead of compiling it again. Only use a folder you alone write.",
)


def default_out(workdir: str) -> str:
    """WORKDIR/samples/grid.png, or samples/<name>.png for a converted weight file."""
    if workdir.lower().endswith(".safetensors"):
        name = os.path.basename(workdir)[: -len(".safetensors")]
        return os.path.join("samples", f"{name}.png")
    return storage.join(workdir, "samples", "grid.png")


EVAL_SAVE_NUM = 1000
"""Samples written to the .npz by default with ``--eval`` (the metrics see all of them)."""

EVAL_NAMES = ("fd_digits", "fid", "sfid", "is", "prec_recall", "kid", "fd_dinov2", "toy")
"""Evaluators ``--eval`` takes (comma-separated for several)."""


def eval_names() -> list[str]:
    """The evaluators of ``--eval``, in order (empty without the flag).

    Raises:
        app.UsageError: For an unknown or repeated name.
    """
    if _EVAL.value is None:
        return []
    names = [n.strip() for n in _EVAL.value.split(",") if n.strip()]
    bad = [n for n in names if n not in EVAL_NAMES]
    if bad or not names or len(set(names)) != len(names):
        raise app.UsageError(
            f"--eval must be one or more of {', '.join(EVAL_NAMES)} (comma-separated, each "
            f"once), got {_EVAL.value!r}"
        )
    return names


def metrics_table(metrics: dict[str, float], nfe: int, num: int) -> str:
    """One markdown row of every metric, as a paper's results table lays it out."""
    names = list(metrics)
    head = "| NFE | samples | " + " | ".join(names) + " |"
    rule = "|" + "---|" * (len(names) + 2)
    row = f"| {nfe} | {num} | " + " | ".join(f"{metrics[n]:.4g}" for n in names) + " |"
    return "\n".join((head, rule, row))


def _check_flags(out: str) -> None:
    """Everything that can be checked before JAX starts and the run is restored."""
    checks = (("num", _NUM, 1), ("batch_size", _BATCH, 1), ("seed", _SEED, 0))
    if _SAVE_NUM.value is not None:
        checks += (("save_num", _SAVE_NUM, 1),)
    for name, flag, low in checks:
        if flag.value < low:
            raise app.UsageError(f"--{name} must be >= {low}, got {flag.value}")
    for name, flag in (("steps", _STEPS), ("scale", _SCALE)):
        if flag.value is not None and flag.value < 1:
            raise app.UsageError(
                f"--{name} must be >= 1, got {flag.value} (leave it out for the run's own)"
            )
    if _SWITCH.value < 0:
        raise app.UsageError(f"--switch_step must be >= 0, got {_SWITCH.value}")
    if _CLASSIFY.value:
        if not (storage.isfile(_CLASSIFY.value) or storage.isdir(_CLASSIFY.value)):
            raise app.UsageError(f"--classify={_CLASSIFY.value} does not exist")
        if _CLASSIFY_TRIALS.value < 1:
            raise app.UsageError(f"--classify_trials must be >= 1, got {_CLASSIFY_TRIALS.value}")
        from jaxdiff.experiment.diffusion_classify import parse_schedule

        parse_schedule(_CLASSIFY_SCHEDULE.value, _CLASSIFY_TRIALS.value)
    if _EDIT.value and not (storage.isfile(_EDIT.value) or storage.isdir(_EDIT.value)):
        raise app.UsageError(f"--edit={_EDIT.value} does not exist")
    names = eval_names()
    from jaxdiff.experiment.evaluate import eval_request_problem

    files = (
        ("fid_stats", _FID_STATS),
        ("ref_batch", _REF_BATCH),
        ("inception_weights", _WEIGHTS),
        ("inception_fc", _FC),
        ("dinov2_stats", _DINOV2_STATS),
        ("dinov2_weights", _DINOV2),
    )
    if names:
        problem = eval_request_problem(names, **{k: flag.value for k, flag in files})
        if problem:
            raise app.UsageError(f"--eval={_EVAL.value}: {problem}")
    for name, flag in (*files, ("vae", _VAE)):
        if flag.value and not storage.isfile(flag.value):
            raise app.UsageError(f"--{name}={flag.value} does not exist")
    if not out.lower().endswith(".png") or storage.isdir(out):
        raise app.UsageError(f"--out must be a .png file path, got {out!r}")
    if storage.is_remote(out):
        return  # a bucket: its permissions are only known when the upload runs
    parent = os.path.dirname(os.path.abspath(out))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise app.UsageError(f"--out={out}: cannot write into {existing}")


def main(argv):
    """Runs the command; ``argv`` holds no positional arguments."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out = _OUT.value or default_out(_WORKDIR.value)
    _check_flags(out)
    from jaxdiff import experiment as ex
    from jaxdiff.parallel import make_mesh
    from jaxdiff.utils.compile_cache import enable_compile_cache
    from jaxdiff.utils.logs import quiet_library_logs

    quiet_library_logs()
    if _SOLVER.value is not None:
        ex.build_solver(_SOLVER.value)
    if _GUIDANCE.value is not None:
        ex.check_guidance_spec(_GUIDANCE.value)
    enable_compile_cache(_CACHE.value)
    mesh = make_mesh()
    ema = None if _EMA.value == "none" else _EMA.value
    run = ex.load_run(_WORKDIR.value, ema=ema, mesh=mesh, precision=_PRECISION.value)
    with ex.build_precision(run.config).scope():
        if _CLASSIFY.value:
            _classify(run, out)
        elif _EDIT.value:
            from jaxdiff.experiment.edit import run_edit

            run_edit(
                run, _EDIT.value, _EDIT_TO.value, out, solver=_SOLVER.value, steps=_STEPS.value,
                guidance=_GUIDANCE.value, mode=_EDIT_MODE.value, batch_size=_BATCH.value,
                scale=_SCALE.value, strength=_EDIT_STRENGTH.value, inject=_EDIT_INJECT.value,
            )  # fmt: skip
        else:
            _sample(run, mesh, out)


def _classify(run, out: str) -> None:
    """Classifies the --classify images with ``run`` and writes the predictions."""
    import numpy as np

    from jaxdiff.experiment import diffusion_classify as dc

    schedule = dc.parse_schedule(_CLASSIFY_SCHEDULE.value, _CLASSIFY_TRIALS.value)
    images, labels = dc.read_classify_input(_CLASSIFY.value, run.sample_shape)
    result = dc.classify_images(run, images, schedule, seed=_SEED.value, batch_size=_BATCH.value)
    path = out[: -len(".png")] + "_classify.npz"
    extra = {} if labels is None else {"labels": labels}
    storage.save_npz(path, pred=result["pred"], errors=result["errors"], **extra)
    line = {"classify": _CLASSIFY.value, "num": len(images), "schedule": _CLASSIFY_SCHEDULE.value}
    line["trials"] = _CLASSIFY_TRIALS.value
    if labels is not None:
        line["accuracy"] = float(np.mean(result["pred"] == labels))
    print(json.dumps(line))
    print(f"wrote predictions of {len(images)} images to {path}")


def _sample(run, mesh, out: str) -> None:
    """Samples (and evaluates) ``run`` as the flags say and writes the grid to ``out``."""
    from jaxdiff import experiment as ex
    from jaxdiff.utils.images import save_image_grid
    from jaxdiff.utils.plots import render_points

    spec = ex.resolve_sampler(
        run.config.sample,
        num_classes=run.num_classes,
        solver=_SOLVER.value,
        steps=_STEPS.value,
        guidance=_GUIDANCE.value,
    )
    print(f"sampler: {spec.describe()}")
    vae = ex.run_vae(run, _VAE.value or run.config.get("vae", {}).get("path"))
    if vae is None and ex.latent_scaling(run) is not None:
        print("latent samples: pass --vae=FILE to decode them; the grid shows raw channels")
    labels = ex.parse_labels(_LABELS.value, _NUM.value, run.num_classes)
    common = dict(num=_NUM.value, labels=labels, seed=_SEED.value, batch_size=_BATCH.value)
    metrics, extra = None, {}
    names = eval_names()
    options = ex.evaluator_options(
        fid_stats=_FID_STATS.value,
        ref_batch=_REF_BATCH.value,
        inception_weights=_WEIGHTS.value,
        inception_fc=_FC.value,
        dinov2_stats=_DINOV2_STATS.value,
        dinov2_weights=_DINOV2.value,
    )
    cond = labels if run.num_classes else None
    keep = _SAVE_NUM.value or (min(_NUM.value, EVAL_SAVE_NUM) if names else _NUM.value)
    if names and not _STUDENT.value:  # every feature network fused into the sharded sampler
        result = ex.sample_and_evaluate(
            run, names, _NUM.value, _SEED.value, spec=spec, labels=cond,
            batch_size=_BATCH.value, evaluator_options=options, return_samples=keep,
            vae=vae, progress=True,
        )  # fmt: skip
        samples, nfe, metrics = result.samples, result.nfe, result.metrics
    else:  # sample, then evaluate the samples on the host
        if _STUDENT.value:
            student = ex.load_run(_STUDENT.value, mesh=mesh)
            samples, nfe = ex.hybrid_generate_samples(
                run, student, spec, switch_step=_SWITCH.value, **common
            )
        else:
            samples, nfe = ex.generate_samples(run, spec, **common)
        if vae is not None:
            extra["latents"], samples = samples, vae.decode(samples)
        if names:
            dataset = run.config.data.name if "data" in run.config else None
            evaluator = ex.build_evaluator(names, dataset=dataset, options=options)
            metrics = evaluator(samples, cond)
    if metrics is not None:
        print(json.dumps({"eval": ",".join(names), "num": _NUM.value, "nfe": nfe, **metrics}))
        print(metrics_table(metrics, nfe, _NUM.value))
    samples = samples[:keep]
    grid = render_points(samples)[None] if samples.ndim == 2 else samples[:400]
    save_image_grid(out, grid, scale=_SCALE.value or run.config.sample.grid_scale)
    extra = {k: v[:keep] for k, v in extra.items()}
    storage.save_npz(out[: -len(".png")] + ".npz", samples=samples, labels=labels[:keep], **extra)
    print(f"wrote {len(samples)} samples ({nfe} network evaluations each) to {out}")


if __name__ == "__main__":
    cli.run(main)
