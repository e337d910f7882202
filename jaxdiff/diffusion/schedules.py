"""Sigma schedules for sampling: decreasing noise levels, ending at 0 by default.

Every function returns a float32 array of ``num_steps + 1`` noise levels (``num_steps``
when ``append_zero=False``). The values are computed in float64 numpy because the
number of steps is static; pass the result to :func:`jaxdiff.samplers.sample`, where it is
a traced array, so changing the values never recompiles.
"""

from __future__ import annotations

import numpy as np

from jaxdiff.diffusion.vp_schedules import VPSchedule


def _check_steps(num_steps: int) -> None:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )


def _finish(sigmas: np.ndarray, append_zero: bool) -> np.ndarray:
    if append_zero:
        sigmas = np.append(sigmas, 0.0)
    return sigmas.astype(np.float32)


def karras_sigmas(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    append_zero: bool = True,
) -> np.ndarray:
    """EDM's schedule: ``(smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``.

    Args:
        num_steps: number of solver steps N (the schedule has N + 1 entries with the 0).
        sigma_min: last non-zero noise level.
        sigma_max: first noise level.
        rho: warping; larger spends more steps at low noise (EDM uses 7).
        append_zero: append a final 0 so the last step lands on clean data.

    Returns:
        float32 array of shape ``[N + 1]`` (or ``[N]``).
    """
    _check_steps(num_steps)
    _check_range(sigma_min, sigma_max)
    ramp = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.zeros(1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, append_zero)


def log_linear_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, append_zero: bool = True
) -> np.ndarray:
    """Noise levels evenly spaced in ``log sigma`` (uniform log-SNR steps).

    Args:
        num_steps: number of solver steps.
        sigma_min: last non-zero noise level.
        sigma_max: first noise level.
        append_zero: append a final 0.

    Returns:
        float32 array of shape ``[N + 1]`` (or ``[N]``).
    """
    _check_steps(num_steps)
    _check_range(sigma_min, sigma_max)
    return _finish(np.geomspace(sigma_max, sigma_min, num_steps), append_zero)


def vp_sigmas(
    num_steps: int,
    schedule: VPSchedule,
    t_min: float = 1e-3,
    t_max: float = 1.0,
    append_zero: bool = True,
) -> np.ndarray:
    """VP's uniform-time discretisation: ``t`` evenly from ``t_max`` to ``t_min``.

    Args:
        num_steps: number of solver steps.
        schedule: the VP schedule mapping time to sigma.
        t_min: last time (score_sde samples down to 1e-3).
        t_max: first time; keep it below 1 for the cosine schedule (sigma(1) is infinite).
        append_zero: append a final 0.

    Returns:
        float32 array of shape ``[N + 1]`` (or ``[N]``).
    """
    _check_steps(num_steps)
    if not 0.0 < t_min < t_max <= 1.0:
        raise ValueError(f"need 0 < t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    t = np.linspace(t_max, t_min, num_steps)
    sigmas = np.sqrt(np.expm1(-np.asarray(schedule.log_alpha2(t), np.float64)))
    if not np.all(np.isfinite(sigmas)):
        raise ValueError(f"sigma(t_max={t_max}) is infinite for {schedule}: lower t_max")
    return _finish(sigmas, append_zero)


def flow_sigmas(
    num_steps: int, shift: float = 1.0, t_max: float = 0.999, append_zero: bool = True
) -> np.ndarray:
    """Rectified-flow times evenly from ``t_max`` to 0, shifted, as sigmas ``t / (1 - t)``.

    Args:
        num_steps: number of solver steps.
        shift: time shift ``shift t / (1 + (shift - 1) t)`` (1.0 = none; SD3 uses 3.0).
        t_max: first time; must be below 1 since ``sigma(1)`` is infinite (0.999 gives
            sigma = 999, where the data's share of ``x`` is negligible).
        append_zero: end on ``t = 0`` (sigma 0); otherwise stop one step before it.

    Returns:
        float32 array of shape ``[N + 1]`` (or ``[N]``).
    """
    _check_steps(num_steps)
    if not 0.0 < t_max < 1.0:
        raise ValueError(f"t_max must lie in (0, 1), got {t_max}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    t = np.linspace(t_max, 0.0, num_steps + 1)
    t = shift * t / (1.0 + (shift - 1.0) * t)
    sigmas = t / (1.0 - t)
    return (sigmas if append_zero else sigmas[:-1]).astype(np.float32)
