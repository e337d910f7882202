"""Many samples from a ``generate`` callable: one compiled call per global batch over the mesh."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxdiff.parallel.mesh import batch_sharding, put_global, replicated, to_host
from jaxdiff.utils.rng import per_sample_keys


@dataclasses.dataclass
class BatchedOutput:
    """What a :func:`make_sharded_generate` run returns (host arrays, ``num`` rows each).

    Attributes:
        samples: ``[num, ...]`` samples, or None when not kept.
        extras: per-sample outputs of ``extra_fn`` (e.g. evaluation features), by name;
            empty when an ``on_extras`` callback took them batch by batch.
        nfe: network evaluations per sample (the ``aux["nfe"]`` of ``generate``).
    """

    samples: np.ndarray | None
    extras: dict[str, np.ndarray]
    nfe: int


def make_sharded_generate(
    generate: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, dict]],
    *,
    mesh: Mesh,
    num: int,
    labels: Any,
    batch_size: int,
    param_shardings: Any = None,
    extra_fn: Callable[[Any, jax.Array], dict[str, jax.Array]] | None = None,
    extra_params: Any = None,
) -> Callable[..., BatchedOutput]:
    """Compiles ``generate`` once over global batches split across the mesh's batch axes.

    The one loop that draws many samples: sample ``j`` is seeded by
    ``fold_in(key(seed), j)`` (:func:`jaxdiff.utils.rng.per_sample_keys`), so the result
    depends neither on ``batch_size`` nor on the device count. Each global batch
    (``batch_size`` rounded up to a multiple of the ``data x fsdp`` shards) is one jitted
    call with explicit shardings: params as ``param_shardings`` (default replicated),
    labels, keys and outputs split over ``('data', 'fsdp')``. The last batch is padded
    with extra seeds whose outputs are dropped, so every call has one shape.

    Args:
        generate: ``generate(params, labels, keys) -> (samples, aux)``, pure; ``aux``
            holds ``"nfe"``.
        mesh: a mesh with ``('data', 'fsdp', ...)`` axes.
        num: number of samples.
        labels: ``[num]`` int labels handed to ``generate`` (zeros for unconditional).
        batch_size: global samples per call.
        param_shardings: shardings of ``params`` on ``mesh`` (a pytree or one sharding).
        extra_fn: optional ``extra_fn(extra_params, samples) -> {name: [B, ...]}`` run in
            the same jitted call (e.g. evaluation features next to the sampler).
        extra_params: ``extra_fn``'s params (replicated).

    Returns:
        ``run(params, seed, keep_samples=True, on_extras=None, progress=None)``
        ``-> BatchedOutput``. ``keep_samples`` is a bool or a number: keep the first
        that many samples on the host (e.g. for a grid while a metric sees all).
        ``on_extras(extras)``, if given, receives each batch's ``extra_fn`` outputs on
        the host (padding dropped, in sample order) instead of ``run`` keeping them
        all: a metric can reduce 50 000 feature rows as they come.
        ``progress(done)``, if given, is called with the samples finished so far after
        each batch.
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    labels = np.asarray(labels, np.int32)
    if labels.shape != (num,):
        raise ValueError(f"labels must have shape ({num},), got {labels.shape}")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = -(-min(batch_size, num) // shards) * shards
    num_batches = -(-num // batch)
    padded = np.resize(labels, num_batches * batch).astype(np.int32)
    b_sh, rep = batch_sharding(mesh), replicated(mesh)
    p_sh = rep if param_shardings is None else param_shardings

    def step(params, extra_params, seed, batch_labels, start):
        key = jax.random.key(seed)
        keys = jax.lax.with_sharding_constraint(per_sample_keys(key, batch, start), b_sh)
        x, aux = generate(params, batch_labels, keys)
        extras = {} if extra_fn is None else extra_fn(extra_params, x)
        return x, extras, aux["nfe"]

    jitted = jax.jit(
        step, in_shardings=(p_sh, rep, rep, b_sh, rep), out_shardings=(b_sh, b_sh, rep)
    )
    extra_params = put_global(extra_params, rep)
    label_batches = [
        put_global(padded[i * batch : (i + 1) * batch], b_sh) for i in range(num_batches)
    ]

    def run(
        params: Any,
        seed: int,
        keep_samples: bool | int = True,
        on_extras: Callable[[dict[str, np.ndarray]], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> BatchedOutput:
        params = put_global(params, p_sh)
        seed = put_global(np.uint32(seed), rep)
        keep = num if keep_samples is True else int(keep_samples)
        xs, extras, nfe = [], [], 0
        for i in range(num_batches):
            start = put_global(np.int32(i * batch), rep)
            x, e, n = jitted(params, extra_params, seed, label_batches[i], start)
            valid = min(batch, num - i * batch)  # the last batch's padding is dropped
            if i * batch < keep:
                xs.append(to_host(x)[: min(valid, keep - i * batch)])
            host = {k: to_host(v)[:valid] for k, v in e.items()}
            if on_extras is None:
                extras.append(host)
            elif host:
                on_extras(host)
            nfe = int(n)
            if progress is not None:
                progress(i * batch + valid)
        merged = {k: np.concatenate([e[k] for e in extras]) for k in extras[0]} if extras else {}
        samples = np.concatenate(xs) if xs else None
        return BatchedOutput(samples, merged, nfe)

    return run
