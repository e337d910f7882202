"""Flow matching with the rectified-flow (linear) interpolant."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff.diffusion.conversions import flow_t_to_sigma, shift_flow_t, sigma_to_flow_t
from jaxdiff.diffusion.formulation import Formulation, Precond


@dataclasses.dataclass(frozen=True)
class FlowMatching(Formulation):
    """Rectified flow: ``x_t = (1 - t) x0 + t n``, the network predicts ``v = n - x0``.

    In EDM space ``sigma = t / (1 - t)`` and ``x = x_t / (1 - t)``, so
    ``c_in = 1 / (1 + sigma)``, ``c_skip = 1 / (1 + sigma)``, ``c_out = -sigma / (1 + sigma)``
    and ``D = x_t - t v``. Training times are logit-normal,
    ``t = sigmoid(m + s z)``, then optionally shifted by ``shift`` (SD3).

    ``time_reversed=True`` is the convention of SiT and of Lipman et al.'s flow matching:
    the network's time is ``s = 1 - t`` (data at ``s = 1``, noise at ``s = 0``) and it
    predicts the velocity toward the data, ``d x_s / ds = x0 - n``. Only the noise label
    and the sign of ``c_out`` change (``D = x_s + (1 - s) F``, SiT's ODE estimate of the
    data); the path, the EDM-space sigma and the training distribution are the same (the
    default logit-normal is symmetric in ``t`` and ``1 - t``).

    Attributes:
        logit_mean: ``m`` of the logit-normal time distribution.
        logit_std: ``s`` of the logit-normal time distribution.
        shift: time shift (1.0 = none); see :func:`~jaxdiff.diffusion.conversions.shift_flow_t`.
        t_eps: training times are clipped to ``[t_eps, 1 - t_eps]`` to keep sigma finite.
        noise_label_scale: network time label is ``noise_label_scale * t`` (or
            ``noise_label_scale * (1 - t)`` with ``time_reversed``; SiT uses 1.0).
        time_reversed: the SiT convention described above.
    """

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    t_eps: float = 1e-5
    noise_label_scale: float = 1000.0
    time_reversed: bool = False

    def __post_init__(self):
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")

    def precondition(self, sigma: jax.Array) -> Precond:
        """See :class:`Formulation`."""
        inv = 1.0 / (1.0 + sigma)
        if self.time_reversed:
            # SiT: label s = 1 - t = 1 / (1 + sigma), output x0 - n, so c_out flips sign.
            return Precond(
                c_skip=inv, c_out=sigma * inv, c_in=inv, c_noise=self.noise_label_scale * inv
            )
        c_noise = self.noise_label_scale * sigma_to_flow_t(sigma)
        return Precond(c_skip=inv, c_out=-sigma * inv, c_in=inv, c_noise=c_noise)

    def sample_sigma(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Draws shifted logit-normal times and returns their sigmas."""
        z = jax.random.normal(key, shape, jnp.float32)
        t = shift_flow_t(jax.nn.sigmoid(self.logit_mean + self.logit_std * z), self.shift)
        return flow_t_to_sigma(jnp.clip(t, self.t_eps, 1.0 - self.t_eps))

    def sigma_from_noise_label(self, c_noise: ArrayLike) -> jax.Array:
        """See :class:`Formulation`."""
        t = jnp.asarray(c_noise) / self.noise_label_scale
        return flow_t_to_sigma(1.0 - t if self.time_reversed else t)

    def target(self, x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
        """The velocity ``n - x0`` (``x0 - n`` with ``time_reversed``)."""
        del sigma
        return x0 - noise if self.time_reversed else noise - x0
