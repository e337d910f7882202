"""The digits classifier behind FD-digits: training, the shipped weights, loading.

A small :class:`jaxdiff.models.Classifier` trained with a fixed seed on the digits
``"train"`` split (1,500 images) and scored on the held-out ``"test"`` split (297). The
trained clean classifier ships with jaxdiff as ``jaxdiff/metrics/assets/digits_classifier.npz``
(flattened params plus the architecture as JSON, ~150 KB) and is loaded by default,
checked against :data:`CLASSIFIER_SHA256`. Re-create it with::

    python -m train --config=train/configs/digits_classifier.py --workdir=runs/clf \
        --config.out=jaxdiff/metrics/assets/digits_classifier.npz

(training takes well under a minute on a CPU; the digest is bit-reproducible on the same
JAX version and CPU, otherwise update :data:`CLASSIFIER_SHA256` to the printed value).
The trainer lives in :mod:`jaxdiff.experiment.classifier`: this module only loads.

``--config.noise_aware=True`` trains the same network with a noise-level input on EDM-noised digits
(``x0 + sigma n``, ``ln sigma ~ N(-1.2, 1.2^2)``), fed as ``c_in(sigma) x`` with noise label
``ln(sigma) / 4`` (see :func:`noisy_classifier_inputs`): the ``p(y | x_sigma)`` of
classifier guidance. Its accuracy is reported on clean test digits.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.metrics.weights import arrays_from_bytes, check_sha256, save_arrays
from jaxdiff.models.classifier import Classifier
from jaxdiff.utils import storage
from jaxdiff.utils.trees import flatten_tree, unflatten_tree

CLASSIFIER_PATH = Path(__file__).resolve().parent / "assets" / "digits_classifier.npz"
"""The shipped clean digits classifier (inside the package, so always a local file)."""

CLASSIFIER_SHA256 = "05c3edaa730672d18eabf7bfc89cdd7c17c7ce702ca33b2b2a5fd8d6e8527bfe"
"""SHA-256 of the shipped :data:`CLASSIFIER_PATH`."""

ARCHITECTURE: dict[str, Any] = {"num_classes": 10, "channels": [16, 32], "feature_dim": 128}
"""Fields of the default :class:`Classifier` (plus ``noise_conditioned``, ``dropout``)."""

SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2  # EDM's training noise distribution (noise-aware classifier)

_CONFIG_KEY, _META_KEY = "__config__", "__meta__"
_DEFAULT = object()


def classifier_model(noise_aware: bool = False, dropout: float = 0.1) -> Classifier:
    """The default digits classifier architecture."""
    arch = dict(ARCHITECTURE, channels=tuple(ARCHITECTURE["channels"]))
    return Classifier(**arch, noise_conditioned=noise_aware, dropout=dropout)


def noisy_classifier_inputs(
    x: jax.Array, sigma: jax.Array, sigma_data: float = SIGMA_DATA
) -> tuple[jax.Array, jax.Array]:
    """Network inputs of a noise-aware classifier for ``x = x0 + sigma n`` (EDM scaling).

    Args:
      x: ``[B, H, W, C]`` noisy images.
      sigma: ``[B]`` (or scalar) noise levels, > 0.
      sigma_data: Data standard deviation.

    Returns:
      ``(x / sqrt(sigma^2 + sigma_data^2), log(sigma) / 4)``.
    """
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    c_in = 1.0 / jnp.sqrt(sigma**2 + sigma_data**2)
    return x * c_in[:, None, None, None], jnp.log(sigma) / 4.0


@dataclasses.dataclass(frozen=True, eq=False)
class DigitsClassifier:
    """A classifier module with its params; methods are pure and jittable.

    Attributes:
      model: The module.
      params: Its (unboxed) params.
      meta: Training metadata stored with the weights (seed, steps, accuracy...).
      sha256: SHA-256 of the file it was loaded from (None if built in memory); it names
        the feature space in statistics files (:attr:`feature_name`).
    """

    model: Classifier
    params: Any
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    sha256: str | None = None

    @property
    def feature_name(self) -> str:
        """Name of this classifier's feature space, as stored in statistics files.

        Features of two different classifier files are not comparable, so the name
        carries the file's digest (``"digits_classifier:05c3edaa7306"``) when known.
        """
        return "digits_classifier" + (f":{self.sha256[:12]}" if self.sha256 else "")

    def logits(self, x: jax.Array, noise_label: jax.Array | None = None) -> jax.Array:
        """``[B, num_classes]`` logits of images in [-1, 1]."""
        return self.model.apply({"params": self.params}, x, noise_label)

    def features(self, x: jax.Array, noise_label: jax.Array | None = None) -> jax.Array:
        """``[B, F]`` penultimate features of images in [-1, 1]."""
        return self.model.apply({"params": self.params}, x, noise_label, method=Classifier.features)

    def feature_map(
        self, x: jax.Array, stage: int = 1, noise_label: jax.Array | None = None
    ) -> jax.Array:
        """``[B, H / 2^stage, W / 2^stage, C]`` patch features of a conv stage.

        See :meth:`jaxdiff.models.Classifier.feature_map`; the default (stage 1) is the
        ``[B, 4, 4, 32]`` map of the shipped classifier, REPA's target on digits.
        """
        return self.model.apply(
            {"params": self.params}, x, stage, noise_label, method=Classifier.feature_map
        )


def accuracy(
    clf: DigitsClassifier,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    sigma: float = 0.002,
    batch_size: int = 512,
) -> float:
    """Fraction of clean ``images`` (in [-1, 1]) whose arg-max logit equals ``labels``.

    Args:
      clf: The classifier.
      images: ``[N, 8, 8, 1]`` images.
      labels: ``[N]`` int labels.
      sigma: Noise level a noise-aware classifier is told (EDM's ``sigma_min``); no noise
        is added. Ignored by a clean classifier.
      batch_size: Images per forward pass.

    Returns:
      The accuracy in [0, 1].
    """

    @jax.jit
    def predict(params, x):
        noise_label = None
        if clf.model.noise_conditioned:
            x, noise_label = noisy_classifier_inputs(x, jnp.full((x.shape[0],), sigma))
        return jnp.argmax(clf.model.apply({"params": params}, x, noise_label), axis=-1)

    preds = [
        np.asarray(predict(clf.params, jnp.asarray(images[i : i + batch_size])))
        for i in range(0, len(images), batch_size)
    ]
    return float(np.mean(np.concatenate(preds) == np.asarray(labels)))


def save_classifier(path: str | os.PathLike, clf: DigitsClassifier) -> str:
    """Writes params, architecture and metadata to a deterministic ``.npz``; returns SHA-256."""
    config = {
        "num_classes": clf.model.num_classes,
        "channels": list(clf.model.channels),
        "feature_dim": clf.model.feature_dim,
        "noise_conditioned": clf.model.noise_conditioned,
        "dropout": clf.model.dropout,
    }
    arrays: dict[str, Any] = {
        k: np.asarray(v, np.float32) for k, v in flatten_tree({"params": clf.params}).items()
    }
    arrays[_CONFIG_KEY] = np.asarray(json.dumps(config, sort_keys=True))
    arrays[_META_KEY] = np.asarray(json.dumps(clf.meta, sort_keys=True))
    return save_arrays(path, arrays)


def load_classifier(
    path: str | os.PathLike | None = None, *, expected_sha256: Any = _DEFAULT
) -> DigitsClassifier:
    """Loads a digits classifier file (default: the shipped one, checksum-verified).

    Args:
      path: A file written by :func:`save_classifier` (local or a bucket URL); None =
        :data:`CLASSIFIER_PATH`.
      expected_sha256: Required digest; default :data:`CLASSIFIER_SHA256` for the shipped
        file and no check for other paths; None skips the check.

    Returns:
      The classifier. Loads of the same bytes return the same object, so jitted feature
      functions and cached reference features are reused.

    Raises:
      FileNotFoundError: If the file is missing (says how to re-create it).
      ChecksumMismatchError: On a digest mismatch, or an unreadable file.
    """
    target = storage.to_str(CLASSIFIER_PATH if path is None else path)
    if expected_sha256 is _DEFAULT:
        shipped = not storage.is_remote(target) and os.path.realpath(target) == os.path.realpath(
            CLASSIFIER_PATH
        )
        expected_sha256 = CLASSIFIER_SHA256 if shipped else None
    if not storage.isfile(target):
        raise FileNotFoundError(
            f"digits classifier {target!r} not found: create it with `python -m "
            "train --config=train/configs/digits_classifier.py --workdir=runs/classifier "
            f"--config.out={target}`"
        )
    # The file is small (~150 KB): read it on every call and cache by content digest, which
    # stays right when a file is rewritten in place and works the same for buckets.
    data = storage.read_bytes(target)
    digest = hashlib.sha256(data).hexdigest()
    check_sha256(digest, expected_sha256, path=target, what="digits classifier")
    clf = _LOADED.get(digest)
    if clf is None:
        clf = _parse(arrays_from_bytes(data, path=target, what="digits classifier"), digest, target)
        _LOADED[digest] = clf
        while len(_LOADED) > _MAX_LOADED:
            _LOADED.popitem(last=False)
    return clf


_MAX_LOADED = 8
_LOADED: collections.OrderedDict[str, DigitsClassifier] = collections.OrderedDict()


def _parse(arrays: dict[str, np.ndarray], digest: str, path: str) -> DigitsClassifier:
    if _CONFIG_KEY not in arrays:
        raise ValueError(
            f"{path!r} is not a digits classifier file (it has no {_CONFIG_KEY!r} entry): "
            "pass a file written by save_classifier / the digits_classifier config"
        )
    config = json.loads(arrays.pop(_CONFIG_KEY).item())
    meta = json.loads(arrays.pop(_META_KEY, np.asarray("{}")).item())
    config["channels"] = tuple(config["channels"])
    params = unflatten_tree(arrays)["params"]
    return DigitsClassifier(Classifier(**config), params, meta, digest)
