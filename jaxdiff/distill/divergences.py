"""f-divergences and their f-distill weightings ``h(r) = f''(r) r^2`` (Xu et al. 2025).

For ``D_f(p || q) = E_q[f(p / q)]`` with the density ratio ``r = p_t / q_t`` (teacher over
student), the generator gradient is ``E[h(r) (s_q - s_p)^T dx_t/dtheta]``. Reverse-KL has
``h = 1``: it is DMD / VSD. Constant factors cancel under the per-batch normalisation of
:func:`jaxdiff.distill.ratio.f_weights`, but the tables keep them exact so ``h = f'' r^2``
holds (tested against quadrature).

=============  =======================================  ============  ==============
key            f(r)                                     h(r)          mode-seeking
=============  =======================================  ============  ==============
``rkl``        ``-log r``                               1             yes
``srkl``       ``(r+1) log((r+1) / (2r))``              1/(r+1)       yes
``js``         ``r log r - (r+1) log((r+1)/2)``         r/(r+1)       medium
``sh``         ``1 - sqrt(r)``                          sqrt(r)/4     medium
``fkl``        ``r log r``                              r             no
``jeffreys``   ``(r-1) log r``                          r+1           no
``alpha:A``    ``(r^A - 1 - A(r-1)) / (A(A-1))``        r^A           A=0 rkl, 1 fkl
=============  =======================================  ============  ==============
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Weighting = Callable[[jax.Array], jax.Array]

H: dict[str, Weighting] = {
    "rkl": jnp.ones_like,
    "srkl": lambda r: 1.0 / (r + 1.0),
    "js": lambda r: r / (r + 1.0),
    "sh": lambda r: 0.25 * jnp.sqrt(r),
    "fkl": lambda r: r,
    "jeffreys": lambda r: r + 1.0,
}
"""``h(r) = f''(r) r^2`` by divergence key."""

F: dict[str, Weighting] = {
    "rkl": lambda r: -jnp.log(r),
    "srkl": lambda r: (r + 1.0) * jnp.log(0.5 + 0.5 / r),
    "js": lambda r: r * jnp.log(r) - (r + 1.0) * jnp.log((r + 1.0) / 2.0),
    "sh": lambda r: 1.0 - jnp.sqrt(r),
    "fkl": lambda r: r * jnp.log(r),
    "jeffreys": lambda r: (r - 1.0) * jnp.log(r),
}
"""The generator ``f`` of each divergence (``D_f = E_q f(p/q)``), for tests and plots."""

DIVERGENCES: tuple[str, ...] = tuple(H)
"""The named divergences; ``"alpha:A"`` (any float A) is accepted too."""


def _alpha(kind: str) -> float:
    try:
        return float(kind.split(":", 1)[1])
    except (IndexError, ValueError) as err:
        raise ValueError(
            f"alpha divergence must be written 'alpha:A', e.g. 'alpha:0.5', got {kind!r}"
        ) from err


def weighting(kind: str) -> Weighting:
    """Returns ``h`` for a divergence key (see the module table).

    Raises:
        ValueError: for an unknown key (the message lists the known ones).
    """
    if kind in H:
        return H[kind]
    if kind.startswith("alpha"):
        a = _alpha(kind)
        return lambda r: jnp.power(r, a)
    raise ValueError(f"unknown divergence {kind!r}: choose one of {list(DIVERGENCES)} or 'alpha:A'")


def generator_f(kind: str) -> Weighting:
    """Returns ``f`` for a divergence key (``alpha:A`` with A not 0 or 1).

    Raises:
        ValueError: for an unknown key or a degenerate alpha.
    """
    if kind in F:
        return F[kind]
    if kind.startswith("alpha"):
        a = _alpha(kind)
        if a in (0.0, 1.0):
            raise ValueError(f"alpha={a} is a limit: use 'rkl' (0) or 'fkl' (1) for f")
        return lambda r: (jnp.power(r, a) - 1.0 - a * (r - 1.0)) / (a * (a - 1.0))
    raise ValueError(f"unknown divergence {kind!r}: choose one of {list(DIVERGENCES)} or 'alpha:A'")


__all__ = ["DIVERGENCES", "F", "H", "generator_f", "weighting"]
