"""FLOP counting for MFU: analytic counts from a traced program, closed forms, chip peaks.

Convention (the usual one for model FLOPs utilisation): a multiply-add is 2 FLOPs and
only matrix products count, i.e. every ``dot_general`` (dense layers, attention's
``QK^T`` and ``AV``, einsums) and ``conv_general_dilated``. Elementwise work (norms,
activations, softmax) is left out; for transformers and U-Nets it is a few percent.

* :func:`count_flops` traces a function with :func:`jax.make_jaxpr` (so
  :class:`jax.ShapeDtypeStruct` inputs work, and a full-size model costs no compute and no
  compile) and sums the matrix products, looking inside ``jit``, ``remat``, custom
  derivative rules, ``shard_map`` and ``scan`` (times its length) and ``cond`` (its most
  expensive branch). A ``while`` loop whose body does matrix products raises: its trip
  count is unknown when tracing (``fori_loop`` with constant bounds traces as a ``scan``
  and is fine).
* :func:`dit_forward_flops` is the exact count of :class:`jaxdiff.models.dit.DiT`'s
  forward pass; :func:`training_flops` is the model FLOPs of a training step (3x forward:
  the backward pass computes two products per forward product). Counting a training step
  directly with :func:`count_flops` includes rematerialised forward passes, which model
  FLOPs exclude, so for MFU count the forward and use :func:`training_flops`.
* :func:`device_peak_flops` gives a chip's dense bf16 peak; MFU is
  ``training_flops * images_per_second / (peak * num_chips)``.
* :func:`xla_flops` reads XLA's own count from a compiled program. Use it as a cross-check
  on CPU only: XLA also counts elementwise ops, and on GPU it omits the cuBLAS/cuDNN custom
  calls that do the matrix products.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.extend as jex

from jaxdiff.errors import InvalidArgumentError

# Each sub-jaxpr of these runs once per device of the named mesh axes (shard_map) or of
# the mapped axis (pmap), on a per-device slice, so its count is multiplied accordingly.
_SHARD_MAP = "shard_map"
_PMAP = "xla_pmap"

_GPU_PEAKS: tuple[tuple[str, float], ...] = (
    # Most specific first: the PCIe H100 is a lower-clocked part.
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
)
_TPU_PEAKS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12),
    ("v6e", 918e12),
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("v5", 459e12),  # v5p reports its kind as "TPU v5"
    ("v4", 275e12),
    ("v3", 123e12),
)


def device_peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one chip, from its ``jax.Device.device_kind``.

    Names match by case-insensitive substring, so ``"NVIDIA H100 80GB HBM3"`` is an H100
    and ``"TPU v5 lite"`` a v5e.

    Args:
      device_kind: e.g. ``jax.devices()[0].device_kind``.

    Returns:
      FLOP/s (H100/H200 989e12, A100 312e12, TPU v6e 918e12, v5p 459e12, v5e 197e12,
      v4 275e12, v3 123e12), or None for a CPU or an unknown chip.
    """
    kind = device_kind.lower()
    table = _TPU_PEAKS if "tpu" in kind else _GPU_PEAKS
    for pattern, peak in table:
        if pattern in kind:
            return peak
    return None


def training_flops(forward: int) -> int:
    """Model FLOPs of one training step: 3x the forward pass (forward + 2x backward).

    Args:
      forward: Forward FLOPs (per image, or per batch).

    Returns:
      ``3 * forward``; rematerialisation is not counted.
    """
    return 3 * forward


def dit_forward_flops(
    depth: int,
    hidden_size: int,
    tokens: int,
    patch_dim: int,
    mlp_ratio: float = 4.0,
    learn_sigma: bool = False,
    frequency_features: int = 256,
) -> int:
    """Exact forward FLOPs per image of :class:`jaxdiff.models.dit.DiT`.

    With ``d = hidden_size``, ``T = tokens`` and ``m = int(d * mlp_ratio)``, each block
    costs ``12 d^2`` (adaLN, ``6 d`` from ``d``) + ``8 T d^2`` (q/k/v and output
    projections) + ``4 T^2 d`` (``QK^T`` and ``AV``) + ``4 T d m`` (the MLP), i.e.
    ``24 T d^2 + 4 T^2 d`` plus the adaLN term for ``mlp_ratio=4``. Outside the blocks:
    the patch embedding ``2 T P d``, the noise-embedding MLP ``2 F d + 2 d^2``, the final
    adaLN ``4 d^2`` and the final linear map ``2 T d P'`` (``P' = 2 P`` with
    ``learn_sigma``). The class embedding is a table look-up (no FLOPs).

    Args:
      depth: Number of blocks.
      hidden_size: Token width ``d``.
      tokens: Tokens per image, ``(H / patch) * (W / patch)``.
      patch_dim: Values per patch ``P = patch^2 * channels``.
      mlp_ratio: MLP hidden width / ``d``.
      learn_sigma: The final layer emits twice the channels.
      frequency_features: Sinusoidal features ``F`` fed to the noise-embedding MLP.

    Returns:
      FLOPs per image (2 per multiply-add).

    Raises:
      ValueError: If a size is not positive.
    """
    sizes = dict(depth=depth, hidden_size=hidden_size, tokens=tokens, patch_dim=patch_dim)
    sizes.update(frequency_features=frequency_features)
    bad = {name: value for name, value in sizes.items() if value < 1}
    if bad or mlp_ratio <= 0:
        raise ValueError(f"DiT sizes must be positive, got {bad or dict(mlp_ratio=mlp_ratio)}")
    d, t = hidden_size, tokens
    m = int(d * mlp_ratio)
    block = 12 * d * d + 8 * t * d * d + 4 * t * t * d + 4 * t * d * m
    out_dim = patch_dim * (2 if learn_sigma else 1)
    outside = 2 * t * patch_dim * d + 2 * frequency_features * d + 2 * d * d + 4 * d * d
    return depth * block + outside + 2 * t * d * out_dim


def xla_flops(compiled: Any) -> float | None:
    """XLA's FLOP estimate of a compiled program, or None when it has none.

    Args:
      compiled: A ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``), or
        anything whose ``cost_analysis()`` returns a dict or a list of dicts.

    Returns:
      The ``"flops"`` entry (summed over a list of per-program dicts), or None if the
      backend gives no cost analysis or no (non-negative) ``"flops"``.
    """
    try:
        analysis = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None
    if isinstance(analysis, Mapping):
        analysis = [analysis]
    if not analysis:
        return None
    values = [a["flops"] for a in analysis if isinstance(a, Mapping) and "flops" in a]
    if not values or any(v is None or v < 0 for v in values):
        return None
    return float(sum(values))


def count_flops(
    fn: Callable[..., Any], *args: Any, by_primitive: bool = False, **kwargs: Any
) -> int | dict[str, int]:
    """Matrix-product FLOPs of ``fn(*args, **kwargs)``, counted from its jaxpr.

    Leaves of ``args``/``kwargs`` with a ``shape`` and ``dtype`` (arrays,
    :class:`jax.ShapeDtypeStruct`, e.g. from ``jax.eval_shape(model.init, ...)``) are
    traced; every other leaf (Python numbers, strings, None) is passed as a constant, so
    flags such as ``train=False`` keep working. Nothing is compiled or run.

    Counts ``2 * MACs`` of each ``dot_general`` and ``conv_general_dilated`` (a
    convolution's MACs are output elements times ``C_in / groups * kernel area``, so
    strides, padding and dilation enter through the output shape, and padded zeros are
    counted as real inputs, as in the usual formula). A forward pass under ``jax.remat``
    is counted once; a gradient of it includes the recomputation.

    Args:
      fn: The function, e.g. ``model.apply`` or a training step.
      *args: Its positional arguments (arrays or shape structs in pytrees).
      by_primitive: Return ``{primitive name: FLOPs}`` instead of the total.
      **kwargs: Its keyword arguments.

    Returns:
      Total FLOPs (int), or the per-primitive breakdown.

    Raises:
      InvalidArgumentError: If a ``while`` loop (unknown trip count) contains matrix
        products.
    """
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    traced = [hasattr(leaf, "shape") and hasattr(leaf, "dtype") for leaf in leaves]

    def call(*dynamic: Any) -> Any:
        it = iter(dynamic)
        pairs = zip(leaves, traced, strict=True)
        full = [next(it) if is_traced else leaf for leaf, is_traced in pairs]
        call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, full)
        return fn(*call_args, **call_kwargs)

    # Leaves go in as they are (not as bare shapes) so that shardings, which shard_map
    # checks against its in_specs, survive.
    closed = jax.make_jaxpr(call)(*[leaf for leaf, t in zip(leaves, traced, strict=True) if t])
    counts = _count(closed.jaxpr)
    if by_primitive:
        return dict(counts)
    return sum(counts.values())


def _count(jaxpr: jex.core.Jaxpr) -> Counter[str]:
    """FLOPs by primitive name of one (open) jaxpr, sub-jaxprs included."""
    total: Counter[str] = Counter()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total[name] += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total[name] += _conv_flops(eqn)
        elif name == "scan":
            total.update(_scale(_count(_open(eqn.params["jaxpr"])), eqn.params["length"]))
        elif name == "cond":
            branches = [_count(_open(b)) for b in eqn.params["branches"]]
            total.update(max(branches, key=lambda c: sum(c.values())))
        elif name == "while":
            _check_while(eqn)
        else:
            inner: Counter[str] = Counter()
            for sub in _subjaxprs(eqn.params):
                inner.update(_count(sub))
            total.update(_scale(inner, _replicas(eqn)))
    return total


def _dot_flops(eqn: jex.core.JaxprEqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    return 2 * math.prod(out_shape) * math.prod(lhs_shape[i] for i in lhs_contract)


def _conv_flops(eqn: jex.core.JaxprEqn) -> int:
    # rhs_spec = (out features, in features, spatial...): the kernel's in-feature axis is
    # already C_in / feature_group_count (and C_in itself under batch grouping).
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec
    rhs_shape = eqn.invars[1].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    return 2 * math.prod(out_shape) * math.prod(rhs_shape[i] for i in rhs_spec[1:])


def _check_while(eqn: jex.core.JaxprEqn) -> None:
    body = _count(_open(eqn.params["body_jaxpr"])) + _count(_open(eqn.params["cond_jaxpr"]))
    if sum(body.values()):
        raise InvalidArgumentError(
            f"count_flops cannot count a while loop with matrix products ({dict(body)} per "
            "iteration): its trip count is unknown when tracing. Use lax.scan or a "
            "lax.fori_loop with constant bounds (which traces as a scan), or count one "
            "iteration and multiply"
        )


def _replicas(eqn: jex.core.JaxprEqn) -> int:
    name, params = eqn.primitive.name, eqn.params
    if name == _SHARD_MAP:
        mesh = params["mesh"]
        axes = params.get("newly_manual_axes", params.get("manual_axes", mesh.axis_names))
        return math.prod(dict(mesh.shape)[axis] for axis in axes)
    if name == _PMAP:
        return int(params["axis_size"])
    return 1


def _scale(counts: Counter[str], factor: int) -> Counter[str]:
    return Counter({name: value * factor for name, value in counts.items()})


def _open(jaxpr: Any) -> jex.core.Jaxpr:
    return jaxpr.jaxpr if isinstance(jaxpr, jex.core.ClosedJaxpr) else jaxpr


def _subjaxprs(params: Mapping[str, Any]) -> Iterator[jex.core.Jaxpr]:
    # jit/closed_call/remat/custom_jvp/custom_vjp/shard_map each hold the one body they
    # run; callables (custom rules, thunks) are not jaxprs and are skipped.
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, (jex.core.Jaxpr, jex.core.ClosedJaxpr)):
                yield _open(item)
