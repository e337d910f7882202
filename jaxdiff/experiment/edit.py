"""Edits real images with a class-conditional run: inversion and Direct Inversion.

``python -m sample --workdir=RUN --edit=PATH --edit_to=LABELS`` calls :func:`edit_images`
on the images :func:`read_edit_input` reads (an ``.npz`` with ``samples`` and ``labels``
as ``python -m sample`` writes them, or an image folder with class subfolders). Each image
is inverted with its own label (conditional model, ``w = 1``) on the run's sampler grid
(:func:`jaxdiff.samplers.inversion.inversion_sigmas` from ``config.sample``'s
``sigma_min`` up to ``sigma_max``), then edited by
:func:`jaxdiff.samplers.inversion.direct_inversion_edit` with the sampler's guidance on
both branches, from level ``round(strength * N)`` of the grid (``--edit_strength``) and
with the source's attention injected into the target for the first ``--edit_inject``
fraction of the editing steps. The same call regenerates the full-depth latent with the
source label (``w = 1``), so the plain inversion's reconstruction error comes with every
edit. Batches are split over the run's mesh.
"""

from __future__ import annotations

import numpy as np

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.runs import TrainedModel
from jaxdiff.experiment.sampling import SamplerSpec
from jaxdiff.samplers.inversion import EDIT_MODES, check_inversion_solver, inversion_sigmas


def read_edit_input(path: str, sample_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, *sample_shape] float32 in [-1, 1], labels [N] int32)`` to edit.

    Raises:
        InvalidArgumentError: for a missing or malformed input, or images without labels
            (the source branch needs each image's class).
    """
    from jaxdiff.experiment.diffusion_classify import read_classify_input

    try:
        images, labels = read_classify_input(path, sample_shape)
    except InvalidArgumentError as err:
        raise InvalidArgumentError(str(err).replace("--classify=", "--edit=")) from None
    if labels is None:
        raise InvalidArgumentError(
            f"--edit={path} has no labels: editing inverts each image with its own class; "
            "add labels=[N] to the .npz, or put the images in class subfolders (0/, 1/, ...)"
        )
    if len(labels) != len(images):
        raise InvalidArgumentError(
            f"--edit={path}: {len(images)} images but {len(labels)} labels; give one label "
            "per image"
        )
    return images, labels


def parse_edit_to(spec: str, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Target labels: ``"+1"`` (shift mod classes), ``"3"`` (all), or one per image.

    Raises:
        InvalidArgumentError: for a malformed spec, a wrong count or a label out of range.
    """
    text = str(spec).strip()
    try:
        if text[:1] in "+-" and "," not in text:
            return ((labels + int(text)) % num_classes).astype(np.int32)
        values = np.asarray([int(v) for v in text.split(",") if v.strip()], np.int32)
    except ValueError:
        values = np.zeros(0, np.int32)
    if len(values) not in (1, len(labels)):
        raise InvalidArgumentError(
            f"--edit_to={spec!r}: write one class ('3'), one per image ({len(labels)} "
            "comma-separated), or a shift ('+1' = label + 1 mod classes)"
        )
    if values.min() < 0 or values.max() >= num_classes:
        raise InvalidArgumentError(
            f"--edit_to={spec!r}: classes are 0..{num_classes - 1}; the null class "
            f"{num_classes} is not a target"
        )
    return np.resize(values, len(labels)).astype(np.int32)


def edit_grid(images: np.ndarray, edited: np.ndarray, cols: int = 10) -> tuple[np.ndarray, int]:
    """``(tiles, nrow)``: rows of ``cols`` sources, each followed by its edited row."""
    cols = max(1, min(cols, len(images)))
    pad = -len(images) % cols
    blank = np.ones((pad, *images.shape[1:]), images.dtype)  # white tiles fill the last row
    rows = []
    for part in (np.concatenate([images, blank]), np.concatenate([edited, blank])):
        rows.append(part.reshape(-1, cols, *images.shape[1:]))
    tiles = np.stack(rows, axis=1).reshape(-1, *images.shape[1:])
    return tiles, cols


def edit_images(
    run: TrainedModel,
    images: np.ndarray,
    labels: np.ndarray,
    targets: np.ndarray,
    spec: SamplerSpec,
    *,
    mode: str = "source",
    strength: float = 1.0,
    inject: float = 0.0,
    batch_size: int = 64,
) -> dict[str, np.ndarray | int]:
    """Inverts ``images`` and edits them from ``labels`` to ``targets`` on the run's mesh.

    Args:
        run: a class-conditional run (:func:`jaxdiff.experiment.load_run`).
        images: ``[N, *sample_shape]`` in ``[-1, 1]``.
        labels: ``[N]`` the images' classes (the source branch's condition).
        targets: ``[N]`` the classes to edit to.
        spec: the sampler (:func:`jaxdiff.experiment.resolve_sampler`): its deterministic
            solver, its number of steps and its guidance (used on both editing branches).
        mode: ``"source"`` (the paper) or ``"both"`` (see
            :func:`~jaxdiff.samplers.inversion.direct_inversion_edit`).
        strength: edit depth in (0, 1]: invert ``round(strength * steps)`` levels.
        inject: fraction in [0, 1] of the editing steps whose target branch takes the
            source's attention probabilities (needs a UNet run).
        batch_size: images per compiled call (over all devices).

    Returns:
        ``{"edited", "source", "reconstructed", "latent"}`` ``[N, ...]`` float32 (the
        target branch, the corrected source branch, the plain regeneration with the source
        label) and ``"nfe"`` per image.

    Raises:
        InvalidArgumentError: for an unconditional run, a stochastic solver, a student's
            own recipe, an unknown mode, a strength or inject out of range, injection into
            a model without the ``"inject"`` variant, or mismatched inputs.
    """
    import jax

    from jaxdiff.generate import class_conditions, model_denoiser
    from jaxdiff.models import UNet
    from jaxdiff.parallel import batch_sharding, replicated
    from jaxdiff.samplers.inversion import direct_inversion_edit, edit_depth, regenerate

    if run.num_classes == 0:
        raise InvalidArgumentError("--edit needs a class-conditional run: this one is not")
    if mode not in EDIT_MODES:
        raise InvalidArgumentError(f"--edit_mode={mode!r}: choose one of {', '.join(EDIT_MODES)}")
    if spec.trained_levels is not None:
        raise InvalidArgumentError(
            "--edit inverts the probability-flow ODE; a few-step student's own recipe has "
            "none: pass --solver=heun (or euler, dpmpp_2m)"
        )
    check_inversion_solver(spec.solver)
    edit_depth(spec.steps, strength)
    if not 0.0 <= inject <= 1.0:
        raise InvalidArgumentError(f"--edit_inject={inject}: pass a fraction in [0, 1]")
    if inject > 0 and not isinstance(run.model, UNet):
        raise InvalidArgumentError(
            f"--edit_inject={inject} needs a UNet run (its attention layers take the "
            f"'inject' variant); this run's model is {type(run.model).__name__}: pass 0"
        )
    if not len(images) == len(labels) == len(targets) or len(images) == 0:
        raise InvalidArgumentError(
            f"--edit: {len(images)} images, {len(labels)} labels and {len(targets)} targets; "
            "give one label and one target per image"
        )
    sc = run.config.sample
    grid = inversion_sigmas(spec.steps, sc.sigma_min, sc.sigma_max, sc.rho)

    def fn(params, x, src, tgt):
        den = model_denoiser(run.model, run.formulation, params, **spec.model_kwargs)
        cond, null = class_conditions(src, run.num_classes)
        target, _ = class_conditions(tgt, run.num_classes)
        edited, aux = direct_inversion_edit(
            den, x, grid, solver=spec.solver, cond_src=cond, cond_tgt=target, uncond=null,
            guidance=spec.guidance, mode=mode, strength=strength, inject=inject,
        )  # fmt: skip
        recon, raux = regenerate(den, aux["latent"], grid, solver=spec.solver, cond=cond)
        out = {"edited": edited, "source": aux["source"], "reconstructed": recon}
        return out | {"latent": aux["latent"], "nfe": aux["nfe"] + raux["nfe"]}

    mesh = run.mesh
    data = batch_sharding(mesh)
    jitted = jax.jit(
        fn,
        in_shardings=(run.param_shardings, data, data, data),
        out_shardings=replicated(mesh),
    )
    devices = mesh.devices.size
    batch = max(devices, -(-min(batch_size, len(images)) // devices) * devices)
    parts = []
    for start in range(0, len(images), batch):
        chunk = [a[start : start + batch] for a in (images, labels, targets)]
        pad = batch - len(chunk[0])
        if pad:  # one compiled shape: repeat the last image, drop its answer
            chunk = [np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for a in chunk]
        x, src, tgt = chunk
        out = jax.device_get(
            jitted(run.params, x.astype(np.float32), src.astype(np.int32), tgt.astype(np.int32))
        )
        parts.append({k: v[: batch - pad] for k, v in out.items() if k != "nfe"})
    result = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    result["nfe"] = int(out["nfe"])
    return result


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root mean squared pixel difference over all images (in the [-1, 1] scale)."""
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def run_edit(
    run: TrainedModel,
    path: str,
    edit_to: str,
    out: str,
    *,
    solver: str | None = None,
    steps: int | None = None,
    guidance: str | None = None,
    mode: str = "source",
    strength: float = 1.0,
    inject: float = 0.0,
    batch_size: int = 64,
    scale: int | None = None,
) -> dict[str, float | int | str]:
    """The ``--edit`` command: edits the images at ``path`` and writes ``out`` (a PNG).

    Writes the grid (rows of sources, each followed by the row of their edits) to ``out``
    and ``samples`` (edited), ``labels`` (targets), ``sources``, ``source_labels`` and
    ``reconstructed`` to the ``.npz`` beside it; prints and returns one JSON-ready line
    with the plain inversion's reconstruction RMSE and the source branch's RMSE.
    """
    import json

    from jaxdiff.experiment.sampling import resolve_sampler
    from jaxdiff.utils import storage
    from jaxdiff.utils.images import save_image_grid

    spec = resolve_sampler(
        run.config.sample, num_classes=run.num_classes, solver=solver, steps=steps,
        guidance=guidance,
    )  # fmt: skip
    images, labels = read_edit_input(path, run.sample_shape)
    targets = parse_edit_to(edit_to, labels, max(run.num_classes, 1))
    print(
        f"editing with: {spec.describe()}, direct inversion mode {mode}, strength "
        f"{strength:g}, attention injection {inject:g}"
    )
    result = edit_images(
        run, images, labels, targets, spec, mode=mode, strength=strength, inject=inject,
        batch_size=batch_size,
    )  # fmt: skip
    tiles, cols = edit_grid(images[:200], result["edited"][:200])
    save_image_grid(out, tiles, nrow=cols, scale=scale or run.config.sample.grid_scale)
    storage.save_npz(
        out[: -len(".png")] + ".npz", samples=result["edited"], labels=targets, sources=images,
        source_labels=labels, reconstructed=result["reconstructed"],
    )  # fmt: skip
    line = {"edit": path, "num": len(images), "mode": mode, "strength": strength}
    line |= {"inject": inject, "nfe": result["nfe"]}
    line["reconstruction_rmse"] = rmse(result["reconstructed"], images)
    line["source_branch_rmse"] = rmse(result["source"], images)
    line["edit_rmse"] = rmse(result["edited"], images)
    print(json.dumps(line))
    print(f"wrote {len(images)} edited images ({result['nfe']} network evaluations each) to {out}")
    return line


__all__ = ["edit_grid", "edit_images", "parse_edit_to", "read_edit_input", "rmse", "run_edit"]
