"""Classifies images with a trained class-conditional run: the zero-shot diffusion classifier.

``python -m sample --workdir=RUN --classify=PATH`` calls :func:`classify_images` on the
images :func:`read_classify_input` reads: an ``.npz`` holding ``samples`` (and optionally
``labels``) as ``python -m sample`` writes them, or an image folder (class subfolders give
labels: integer names are the class ids, other names their sorted positions). The run's
denoiser scores every class on shared noise draws
(:mod:`jaxdiff.metrics.diffusion_classifier`); batches of images are split over the mesh.
"""

from __future__ import annotations

import numpy as np

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.runs import TrainedModel
from jaxdiff.metrics.diffusion_classifier import (
    DiffusionClassifier,
    classify,
    evaluation_levels,
)
from jaxdiff.utils import storage


def parse_schedule(spec: str, trials: int = 1) -> DiffusionClassifier:
    """``"N1:K1,N2:K2,..."`` (levels by the end of each stage : classes kept) as a schedule.

    Example: ``"10:3,30:1"`` scores all classes at 10 levels, keeps the best 3, adds 20
    more levels for them and keeps 1; ``"30:1"`` is the plain classifier at 30 levels.

    Raises:
        InvalidArgumentError: for a malformed spec or an invalid schedule (named).
    """
    try:
        pairs = [tuple(int(v) for v in item.split(":")) for item in spec.split(",") if item]
        n_samples, to_keep = zip(*pairs, strict=True) if pairs else ((), ())
        return DiffusionClassifier(tuple(n_samples), tuple(to_keep), trials=trials)
    except ValueError as err:
        raise InvalidArgumentError(
            f"classify schedule {spec!r}: {err}; write N:K stages such as '10:3,30:1' (the "
            "last keeps 1 class)"
        ) from None


def read_classify_input(path: str, sample_shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """``(images [N, *sample_shape] float32 in [-1, 1], labels [N] int32 or None)``.

    Raises:
        InvalidArgumentError: for a missing path, an ``.npz`` without ``samples``, or images
            whose shape does not match the run's samples.
    """
    if str(path).lower().endswith(".npz"):
        if not storage.isfile(path):
            raise InvalidArgumentError(f"--classify={path} does not exist")
        data = storage.load_npz(path)
        if "samples" not in data:
            raise InvalidArgumentError(
                f"--classify={path} has no 'samples' array (it has {sorted(data)}); write "
                "images as samples=[N, H, W, C] float32 in [-1, 1], labels optional"
            )
        images, labels = np.asarray(data["samples"], np.float32), data.get("labels")
    else:
        images, labels = _read_folder(path, sample_shape)
    if images.shape[1:] != tuple(sample_shape):
        raise InvalidArgumentError(
            f"--classify={path}: images of shape {images.shape[1:]}, but the run's samples "
            f"are {tuple(sample_shape)}"
        )
    return images, None if labels is None else np.asarray(labels, np.int32).reshape(-1)


def _read_folder(path: str, sample_shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    from jaxdiff.data.imagefolder import list_image_folder, load_image, uint8_to_unit

    files, labels, classes = list_image_folder(path)
    size, channels = sample_shape[0], sample_shape[-1]
    images = np.stack([load_image(storage.join(path, f), size) for f in files])
    if channels == 1:  # grey models: the mean of RGB
        images = images.mean(axis=-1, keepdims=True)
    images = uint8_to_unit(images)
    if labels is not None and all(c.isdigit() for c in classes):
        labels = np.asarray([int(classes[i]) for i in labels], np.int32)
    return images.astype(np.float32), labels


MAX_EVALS_PER_CALL = 16384
"""Network evaluations one compiled call may batch (images x classes x levels x trials):
100 levels of 10 classes at 256 images would be 256,000, beyond a 24 GiB host."""


def classify_images(
    run: TrainedModel,
    images: np.ndarray,
    schedule: DiffusionClassifier,
    *,
    seed: int = 0,
    batch_size: int = 64,
    max_evals: int = MAX_EVALS_PER_CALL,
) -> dict[str, np.ndarray]:
    """Classifies ``images`` with the run's denoiser on its mesh.

    Image ``j``'s draws come from ``fold_in(key(seed), j)``, so the answer does not depend
    on ``batch_size`` or the device count. A call takes at most ``batch_size`` images, and
    fewer when ``classes x levels x trials`` evaluations per image would exceed
    ``max_evals`` in one batch (at least one image per device).

    Returns:
        ``{"pred": [N] int32, "errors": [N, classes] float32}``.

    Raises:
        InvalidArgumentError: for an unconditional run.
    """
    import jax

    from jaxdiff.generate import model_denoiser
    from jaxdiff.parallel import batch_sharding, replicated
    from jaxdiff.utils.rng import per_sample_keys

    if run.num_classes == 0:
        raise InvalidArgumentError(
            "--classify needs a class-conditional run: this one is unconditional"
        )
    levels = evaluation_levels(run.formulation, schedule.num_levels)
    mesh = run.mesh
    data = batch_sharding(mesh)
    devices = mesh.devices.size
    per_image = run.num_classes * schedule.num_levels * schedule.trials
    batch_size = min(batch_size, max(1, max_evals // per_image))
    batch = max(devices, -(-batch_size // devices) * devices)

    def fn(params, x, keys):
        den = model_denoiser(run.model, run.formulation, params)
        return classify(den, x, keys, num_classes=run.num_classes, levels=levels, cfg=schedule)

    jitted = jax.jit(
        fn,
        in_shardings=(run.param_shardings, data, data),
        out_shardings=replicated(mesh),
    )
    all_keys = per_sample_keys(jax.random.key(seed), len(images))
    preds, errors = [], []
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        keys = all_keys[start : start + batch]
        pad = batch - len(x)
        if pad:  # one compiled shape: repeat the last image, drop its answer
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
            keys = jax.numpy.concatenate([keys, jax.numpy.repeat(keys[-1:], pad, axis=0)])
        out = jax.device_get(jitted(run.params, x, keys))
        preds.append(out["pred"][: batch - pad])
        errors.append(out["errors"][: batch - pad])
    return {"pred": np.concatenate(preds), "errors": np.concatenate(errors)}


__all__ = ["MAX_EVALS_PER_CALL", "classify_images", "parse_schedule", "read_classify_input"]
