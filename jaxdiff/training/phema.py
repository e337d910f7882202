"""Power-function EMA and post-hoc EMA reconstruction (EDM2, Karras et al. 2024).

A power-function EMA of the parameter trajectory ``p_1 .. p_T`` (``p_t`` = the params after
optimizer update ``t``) averages with the continuous profile ``f(s) = (gamma+1) s^gamma /
T^(gamma+1)`` on ``[0, T]``. Its width is given by the relative standard deviation
``sigma_rel = std(f) / T`` (:func:`exp_to_std`, EDM2 eq. 123); EDM2 stores profiles by
``sigma_rel``, and so does jaxdiff: an EMA dict key ``"std0.050"`` is the profile with
``sigma_rel = 0.05``.

**Time is counted in optimizer steps.** EDM2 counts images: after an update it sets
``t_next = cur_nimg`` and uses ``beta = (1 - batch_size / t_next)^(gamma+1)`` (eq. 127);
with a constant batch size ``batch_size / cur_nimg = 1 / t``, ``t`` being the number of
updates done *including* this one. So the update made at ``TrainState.step == k`` uses
``t = k + 1``: the first update (``k = 0``) has ``beta = 0`` and copies the params, and the
EMA after ``T`` updates weights ``p_t`` by exactly ``(t/T)^(gamma+1) - ((t-1)/T)^(gamma+1)``,
the integral of ``f`` over ``[t-1, t]``. The tracked EMA is therefore *exactly* the
continuous power EMA of the piecewise-constant trajectory, which is why the continuous inner
products of :func:`profile_inner` (EDM2 eq. 151) solve the discrete reconstruction. A
snapshot's time (EDM2's ``ofs``, in images there) is its step; the solution is invariant to
the time unit, so steps and images give the same coefficients.

Post-hoc reconstruction (EDM2 Algorithm 3): snapshots of a few profiles saved during
training are combined with least-squares coefficients (:func:`solve_coefficients`) into a
profile of any other ``sigma_rel`` (:func:`reconstruct`). Snapshot files are written by
:func:`make_snapshot_fn` and combined by ``python -m jaxdiff.experiment.phema``.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.parallel import to_host
from jaxdiff.pretrained.weights_io import StateDict, read_weights, write_weights
from jaxdiff.utils import storage

log = logging.getLogger(__name__)

STD_MAX = 0.289
"""Largest supported ``sigma_rel`` (exclusive), EDM2's bound; ``sqrt(1/12)`` is gamma = 0."""
SNAPSHOT_FORMAT = "jaxdiff.phema.snapshot/1"
RECONSTRUCTION_FORMAT = "jaxdiff.phema.reconstruction/1"
_SNAPSHOT_RE = re.compile(r"snapshot-(\d+)\.safetensors")


def check_std(std: float, what: str = "sigma_rel") -> float:
    """Returns ``std`` as a float if it is a supported ``sigma_rel``.

    Raises:
        InvalidArgumentError: outside ``(0, 0.289)`` (EDM2's range) or with more than three
            decimals (profiles are named ``std%.3f``, so a finer value could not be found
            again from its name).
    """
    value = float(std)
    if not 0.0 < value < STD_MAX:
        raise InvalidArgumentError(
            f"{what}={std!r} is outside the supported range (0, {STD_MAX}): a power-function "
            f"EMA's relative std lies there (EDM2 uses 0.05 and 0.10); pass e.g. 0.1"
        )
    if abs(round(value, 3) - value) > 1e-12:
        raise InvalidArgumentError(
            f"{what}={std!r} has more than three decimals: profiles are named 'std%.3f', "
            f"pass {round(value, 3)} or another value with at most three decimals"
        )
    return round(value, 3)


def std_key(std: float) -> str:
    """The EMA dict key of a power-function profile, e.g. ``0.05 -> "std0.050"``."""
    return f"std{float(std):.3f}"


def key_std(key: str) -> float | None:
    """``"std0.050" -> 0.05``; ``None`` for a constant-rate key such as ``"0.999"``."""
    return float(key[3:]) if key.startswith("std") else None


def exp_to_std(gamma: Any) -> np.ndarray:
    """``sigma_rel`` of the power profile with exponent ``gamma`` (EDM2 eq. 123), float64.

    ``sigma_rel^2 = (gamma+1) / ((gamma+2)^2 (gamma+3))``.
    """
    g = np.float64(gamma)
    return np.sqrt((g + 1) / (g + 2) ** 2 / (g + 3))


def std_to_exp(std: Any) -> np.ndarray:
    """The exponent ``gamma`` of the profile with relative std ``std`` (EDM2 eq. 126), float64.

    Squaring eq. 123 gives the cubic ``gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2)
    = 0``; as EDM2 does, the largest real root is taken (all three are real for ``std`` in
    the supported range).
    """
    std = np.asarray(std, np.float64)
    inv = std.reshape(-1) ** -2
    roots = [np.roots([1.0, 7.0, 16.0 - v, 12.0 - v]).real.max() for v in inv]
    return np.float64(roots).reshape(std.shape)


def power_weight(step: Any, gamma: float) -> jax.Array:
    """``1 - beta`` of the update made at ``TrainState.step == step`` (float32, jit-safe).

    Computed as ``-expm1((gamma+1) log1p(-1/t))`` with ``t = step + 1``, which keeps its
    relative precision for large ``t`` (a float32 ``1 - 1/t`` keeps only a few bits of
    ``1/t`` at ``t ~ 1e6`` and is exactly 1 beyond ``t ~ 3e7``).
    It is 1 at ``step = 0``: the first update copies the params.
    """
    t = jnp.asarray(step, jnp.float32) + 1.0
    return -jnp.expm1((float(gamma) + 1.0) * jnp.log1p(-1.0 / t))


def power_beta(step: Any, gamma: float) -> jax.Array:
    """EDM2's ``beta = (1 - 1/t)^(gamma+1)``, ``t = step + 1`` (see the module docstring)."""
    t = jnp.asarray(step, jnp.float32) + 1.0
    return jnp.exp((float(gamma) + 1.0) * jnp.log1p(-1.0 / t))


def power_update(ema: Any, params: Any, weight: jax.Array) -> Any:
    """``ema + weight (params - ema)`` per leaf, in torch.lerp's two-sided form.

    For ``weight >= 0.5`` it computes ``params - (1 - weight)(params - ema)``, which equals
    ``params`` exactly at ``weight = 1`` (EDM2 updates with ``lerp_``).
    """

    def lerp(e, p):
        d = p - e
        return jnp.where(weight < 0.5, e + weight * d, p - (1.0 - weight) * d)

    return jax.tree.map(lerp, ema, params)


def profile_inner(a_steps: Any, a_stds: Any, b_steps: Any, b_stds: Any) -> np.ndarray:
    """Inner products ``<f_a, f_b>`` of power profiles ending at ``a_steps``/``b_steps``.

    ``int_0^m f_a f_b ds`` with ``m = min(T_a, T_b)`` is ``(ga+1)(gb+1) (T_a/T_b)^gb /
    ((ga+gb+1) T_b)`` when ``T_a < T_b``, and symmetrically otherwise (EDM2 eq. 151).
    Arguments broadcast; float64.
    """
    ta, tb = np.float64(a_steps), np.float64(b_steps)
    ga, gb = std_to_exp(a_stds), std_to_exp(b_stds)
    exponent = np.where(ta < tb, gb, -ga)
    return (ga + 1) * (gb + 1) * (ta / tb) ** exponent / ((ga + gb + 1) * np.maximum(ta, tb))


def solve_coefficients(
    in_steps: Sequence[float], in_stds: Sequence[float], out_steps: Any, out_stds: Any
) -> np.ndarray:
    """Least-squares coefficients ``[num_in, num_out]`` of post-hoc EMA (EDM2 Algorithm 3).

    Solves ``A x = b`` with ``A_ij = <f_i, f_j>`` over the stored profiles and ``b_i =
    <f_i, g>`` for each target ``g``, then rescales each column to sum to 1 (as EDM2 does,
    so the result is an average even where the solve is inexact). float64.

    Args:
        in_steps: step of each stored snapshot profile (one entry per profile).
        in_stds: its ``sigma_rel``.
        out_steps: step(s) to reconstruct at (broadcast against ``out_stds``).
        out_stds: target ``sigma_rel`` value(s).
    """
    in_steps, in_stds = np.broadcast_arrays(np.float64(in_steps), np.float64(in_stds))
    out_steps, out_stds = np.broadcast_arrays(np.float64(out_steps), np.float64(out_stds))
    col = lambda x: x.reshape(-1, 1)  # noqa: E731
    row = lambda x: x.reshape(1, -1)  # noqa: E731
    gram = profile_inner(col(in_steps), col(in_stds), row(in_steps), row(in_stds))
    rhs = profile_inner(col(in_steps), col(in_stds), row(out_steps), row(out_stds))
    x = np.linalg.solve(gram, rhs)
    return x / np.sum(x, axis=0)


def fit_error(
    in_steps: Sequence[float], in_stds: Sequence[float], out_step: float, out_std: float, x: Any
) -> float:
    """Relative L2 error ``||g - sum_i x_i f_i|| / ||g||`` of a reconstructed profile."""
    s, d = np.float64(in_steps), np.float64(in_stds)
    x = np.float64(x)
    gg = profile_inner(out_step, out_std, out_step, out_std)
    fg = profile_inner(s, d, out_step, out_std)
    ff = profile_inner(s[:, None], d[:, None], s[None, :], d[None, :])
    err2 = gg - 2 * x @ fg + x @ ff @ x
    return float(np.sqrt(max(err2, 0.0) / gg))


def reconstruct(snapshot_trees: Iterable[Any], coefficients: Any) -> Any:
    """``sum_i c_i tree_i``, accumulated in float64 and returned as float32 numpy.

    ``snapshot_trees`` is consumed once, one tree at a time (a generator streams files).

    Args:
        snapshot_trees: pytrees of the stored profiles, in the order of the coefficients.
        coefficients: ``[num_in]`` (returns one tree) or ``[num_in, num_out]`` (a list).
    """
    coefs = np.float64(coefficients)
    single = coefs.ndim == 1
    coefs = coefs.reshape(coefs.shape[0], -1)
    acc: list[Any] = [None] * coefs.shape[1]
    count = 0
    for i, tree in enumerate(snapshot_trees):
        if i >= coefs.shape[0]:
            raise InvalidArgumentError(f"more snapshots than the {coefs.shape[0]} coefficients")
        host = jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
        for j in range(coefs.shape[1]):
            term = jax.tree.map(lambda a, c=coefs[i, j]: c * a, host)
            acc[j] = term if acc[j] is None else jax.tree.map(np.add, acc[j], term)
        count += 1
    if count != coefs.shape[0]:
        raise InvalidArgumentError(f"{count} snapshots for {coefs.shape[0]} coefficients")
    out = [jax.tree.map(lambda a: a.astype(np.float32), t) for t in acc]
    return out[0] if single else out


# ---- files -------------------------------------------------------------------------------


def _name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def flat_shapes(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a/b/c": leaf}`` of a nested-dict pytree, in leaf order (leaves untouched)."""
    return {prefix + _name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def flat_params(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"a/b/c": host array}`` of a nested-dict pytree (the safetensors names)."""
    return {k: np.asarray(v) for k, v in flat_shapes(tree, prefix).items()}


def params_like(tensors: Mapping[str, np.ndarray], like: Any, source: str) -> Any:
    """The tree shaped like ``like`` from flat ``tensors`` (every key used, shapes checked).

    Raises:
        WeightsError: naming ``source`` and the missing, extra or misshapen key.
    """
    sd = StateDict(tensors, source=source)
    leaves = [sd.take(name, tuple(leaf.shape)) for name, leaf in flat_shapes(like).items()]
    sd.finish()
    return jax.tree_util.tree_unflatten(jax.tree.structure(like), leaves)


def snapshot_path(directory: str, step: int) -> str:
    """``directory/snapshot-00001000.safetensors``."""
    return storage.join(directory, f"snapshot-{int(step):08d}.safetensors")


def reconstruction_path(directory: str, std: float) -> str:
    """``directory/reconstructed-std0.100.safetensors``."""
    return storage.join(directory, f"reconstructed-{std_key(std)}.safetensors")


def write_snapshot(directory: str, step: int, profiles: Mapping[float, Any]) -> str:
    """Writes ``{sigma_rel: params}`` as one safetensors file (atomic; local or gs://).

    Tensor names are ``"std0.050/a/b/c"``; metadata ``step`` and ``stds`` (JSON list).
    """
    tensors: dict[str, np.ndarray] = {}
    for std, tree in profiles.items():
        tensors.update(flat_params(tree, prefix=std_key(std) + "/"))
    path = snapshot_path(directory, step)
    meta = {"format": SNAPSHOT_FORMAT, "step": str(int(step)), "stds": json.dumps(list(profiles))}
    write_weights(path, tensors, meta)
    return path


def list_snapshots(directory: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every snapshot file in ``directory``, by step ([] if none)."""
    if not storage.isdir(directory):
        return []
    found = [(_SNAPSHOT_RE.fullmatch(n), n) for n in storage.listdir(directory)]
    return sorted((int(m.group(1)), storage.join(directory, n)) for m, n in found if m)


def read_metadata(path: str) -> dict[str, str]:
    """The safetensors metadata of ``path``, reading only its header (not the tensors).

    Raises:
        InvalidArgumentError: if the file is not a readable safetensors file.
    """
    try:
        with storage.open_file(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        return {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
    except (OSError, ValueError, struct.error) as e:
        raise InvalidArgumentError(
            f"{path}: unreadable post-hoc EMA snapshot header ({type(e).__name__}: {e}); "
            "move the file out of the phema folder"
        ) from None


def make_snapshot_fn(directory: str, stds: Sequence[float]) -> Callable[[int, Any], None]:
    """``fn(step, state)`` writing ``state.ema``'s power profiles to :func:`snapshot_path`.

    Every process must call it: the profiles are gathered with
    :func:`jaxdiff.parallel.to_host` (``process_allgather`` when params are sharded over
    several hosts, a plain device-to-host copy on one), and only process 0 writes.
    """
    stds = [check_std(s, "train.ema_stds") for s in stds]

    def snapshot(step: int, state: Any) -> None:
        profiles = {s: jax.tree.map(to_host, state.ema[std_key(s)]) for s in stds}
        if jax.process_index() == 0:
            path = write_snapshot(directory, step, profiles)
            log.info("wrote post-hoc EMA snapshot %s", path)

    return snapshot


def read_reconstruction(path: str, like: Any) -> tuple[Any, dict[str, str]]:
    """Reads a reconstruction written by ``python -m jaxdiff.experiment.phema``.

    Returns:
        ``(params, metadata)``: float32 numpy params shaped like ``like``.

    Raises:
        WeightsError: for a missing file, a bad checksum, or params of another model.
    """
    tensors, meta = read_weights(path)
    if meta.get("format") != RECONSTRUCTION_FORMAT:
        raise InvalidArgumentError(f"{path} is not a post-hoc EMA reconstruction")
    return params_like(tensors, like, path), meta


__all__ = [
    "STD_MAX",
    "check_std",
    "exp_to_std",
    "fit_error",
    "key_std",
    "list_snapshots",
    "make_snapshot_fn",
    "power_beta",
    "power_update",
    "power_weight",
    "profile_inner",
    "read_metadata",
    "read_reconstruction",
    "reconstruct",
    "reconstruction_path",
    "solve_coefficients",
    "snapshot_path",
    "std_key",
    "std_to_exp",
    "write_snapshot",
]
