"""2-D toy distributions with explicit seeds and, where cheap, exact densities.

All samplers take ``rng``: an ``int`` seed or a ``np.random.Generator`` (the same seed
always gives the same points) and return ``(points, labels)``: float32 ``[n, 2]`` and int32
``[n]``.

* Gaussian mixture: by default 8 isotropic Gaussians on a circle. Its parameters are a
  :class:`GaussianMixture` (``means``, ``stds``, ``weights``) so exact denoisers and exact
  log-likelihoods can be written against it. Label = component index.
* Two moons: label = moon (0 = upper, 1 = lower), centred at the origin.
* Checkerboard: uniform on the "black" cells of a square board. Label = column parity
  of the cell (so the two classes are the interleaved halves of the board).
"""

from __future__ import annotations

import dataclasses

import numpy as np

RngLike = int | np.random.Generator


def _as_rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, bool) or not isinstance(rng, int | np.integer | np.random.Generator):
        raise TypeError(f"rng must be an int seed or np.random.Generator, got {rng!r}")
    return np.random.default_rng(rng)


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"number of samples must be >= 0, got n={n}")


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Mixture of isotropic Gaussians ``sum_k w_k N(mu_k, s_k^2 I)``.

    Attributes:
        means: float64 ``[K, d]`` component means.
        stds: float64 ``[K]`` per-component standard deviations.
        weights: float64 ``[K]`` mixture weights (sum to 1).
    """

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:
        means = np.atleast_2d(np.asarray(self.means, dtype=np.float64))
        k = len(means)
        stds = np.broadcast_to(np.asarray(self.stds, dtype=np.float64), (k,)).copy()
        weights = np.broadcast_to(np.asarray(self.weights, dtype=np.float64), (k,)).copy()
        if np.any(stds <= 0):
            raise ValueError(f"stds must be positive, got {stds}")
        if np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
            raise ValueError(f"weights must be non-negative and sum to 1, got {weights}")
        for arr in (means, stds, weights):
            arr.flags.writeable = False
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds)
        object.__setattr__(self, "weights", weights)

    @property
    def num_components(self) -> int:
        """Number of mixture components ``K``."""
        return len(self.means)

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the points."""
        return self.means.shape[1]

    def sample(self, n: int, rng: RngLike) -> tuple[np.ndarray, np.ndarray]:
        """Draws ``n`` points; see :func:`sample_gaussian_mixture`."""
        return sample_gaussian_mixture(n, rng, self)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """Exact log-density at ``x``; see :func:`gaussian_mixture_log_prob`."""
        return gaussian_mixture_log_prob(x, self.means, self.stds, self.weights)


def ring_gaussian_mixture(
    num_components: int = 8, radius: float = 2.0, std: float = 0.2
) -> GaussianMixture:
    """Equal-weight Gaussians with means evenly spaced on a circle.

    Component ``k`` sits at angle ``2 pi k / num_components`` (component 0 on the +x axis).

    Args:
        num_components: Number of Gaussians ``K``.
        radius: Circle radius.
        std: Standard deviation of every component.

    Returns:
        The mixture parameters.

    Raises:
        ValueError: If ``num_components < 1`` or ``std <= 0``.
    """
    if num_components < 1:
        raise ValueError(f"num_components must be >= 1, got {num_components}")
    angles = 2.0 * np.pi * np.arange(num_components) / num_components
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture(
        means=means,
        stds=np.full(num_components, std),
        weights=np.full(num_components, 1.0 / num_components),
    )


def sample_gaussian_mixture(
    n: int, rng: RngLike, mixture: GaussianMixture | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Samples a Gaussian mixture.

    Args:
        n: Number of points.
        rng: Seed or generator.
        mixture: Mixture parameters; defaults to :func:`ring_gaussian_mixture` ``()``.

    Returns:
        ``(points, labels)``: float32 ``[n, d]`` and int32 ``[n]`` component indices.

    Example:
        >>> x, y = sample_gaussian_mixture(5, rng=0)
        >>> x.shape, x.dtype, y.dtype
        ((5, 2), dtype('float32'), dtype('int32'))
    """
    _check_n(n)
    mixture = ring_gaussian_mixture() if mixture is None else mixture
    gen = _as_rng(rng)
    labels = gen.choice(mixture.num_components, size=n, p=mixture.weights)
    noise = gen.standard_normal((n, mixture.dim))
    points = mixture.means[labels] + mixture.stds[labels, None] * noise
    return points.astype(np.float32), labels.astype(np.int32)


def gaussian_mixture_log_prob(
    x: np.ndarray,
    means: np.ndarray,
    std: float | np.ndarray,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Exact log-density of an isotropic Gaussian mixture, in float64.

    ``log p(x) = logsumexp_k [log w_k - d/2 log(2 pi s_k^2) - |x - mu_k|^2 / (2 s_k^2)]``.

    Args:
        x: Points ``[..., d]``.
        means: Component means ``[K, d]``.
        std: Scalar or per-component ``[K]`` standard deviations.
        weights: Mixture weights ``[K]``; uniform if ``None``.

    Returns:
        float64 log-densities of shape ``x.shape[:-1]``.

    Raises:
        ValueError: If the last axis of ``x`` does not match the means' dimension.
    """
    x = np.asarray(x, dtype=np.float64)
    means = np.atleast_2d(np.asarray(means, dtype=np.float64))
    k, d = means.shape
    if x.shape[-1] != d:
        raise ValueError(f"x has last dimension {x.shape[-1]} but means are [{k}, {d}]")
    var = np.broadcast_to(np.asarray(std, dtype=np.float64) ** 2, (k,))
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
    sq_dist = np.sum((x[..., None, :] - means) ** 2, axis=-1)  # [..., K]
    with np.errstate(divide="ignore"):  # zero weights give log 0 = -inf, which is right
        log_terms = np.log(w) - 0.5 * d * np.log(2.0 * np.pi * var) - 0.5 * sq_dist / var
    peak = np.max(log_terms, axis=-1, keepdims=True)
    return np.squeeze(peak, -1) + np.log(np.sum(np.exp(log_terms - peak), axis=-1))


def sample_two_moons(n: int, rng: RngLike, *, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Samples the two-moons distribution, centred at the origin.

    The upper moon is the unit half-circle ``(cos t, sin t)``, ``t ~ U[0, pi]``; the lower
    is ``(1 - cos t, 0.5 - sin t)``; both are shifted by ``(-0.5, -0.25)`` and get
    isotropic Gaussian noise of std ``noise``. Each point picks a moon with probability 1/2.

    Args:
        n: Number of points.
        rng: Seed or generator.
        noise: Standard deviation of the added Gaussian noise.

    Returns:
        ``(points, labels)``: float32 ``[n, 2]`` and int32 ``[n]`` (0 upper, 1 lower moon).
    """
    _check_n(n)
    gen = _as_rng(rng)
    labels = gen.integers(0, 2, size=n)
    t = gen.uniform(0.0, np.pi, size=n)
    upper = np.stack([np.cos(t), np.sin(t)], axis=1)
    lower = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], axis=1)
    points = np.where(labels[:, None] == 0, upper, lower) - np.array([0.5, 0.25])
    points = points + noise * gen.standard_normal((n, 2))
    return points.astype(np.float32), labels.astype(np.int32)


def _black_cells(num_cells: int) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(num_cells), np.arange(num_cells), indexing="ij")
    black = (rows + cols) % 2 == 0
    return np.stack([rows[black], cols[black]], axis=1)  # [M, 2] (row, col)


def sample_checkerboard(
    n: int, rng: RngLike, *, num_cells: int = 4, cell_size: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Samples uniformly from the black cells of a centred ``num_cells^2`` checkerboard.

    The board covers ``[-L, L]^2`` with ``L = num_cells * cell_size / 2``; cell
    ``(row, col)`` is black when ``row + col`` is even (cell (0, 0) is bottom-left).

    Args:
        n: Number of points.
        rng: Seed or generator.
        num_cells: Cells per side.
        cell_size: Side length of one cell.

    Returns:
        ``(points, labels)``: float32 ``[n, 2]`` (x, y) and int32 ``[n]`` column parity
        ``col % 2`` of the cell each point fell in.

    Raises:
        ValueError: If ``num_cells < 1``.
    """
    _check_n(n)
    if num_cells < 1:
        raise ValueError(f"num_cells must be >= 1, got {num_cells}")
    gen = _as_rng(rng)
    cells = _black_cells(num_cells)[gen.integers(0, (num_cells**2 + 1) // 2, size=n)]
    offset = gen.uniform(0.0, 1.0, size=(n, 2))
    half = num_cells * cell_size / 2.0
    x = (cells[:, 1] + offset[:, 0]) * cell_size - half
    y = (cells[:, 0] + offset[:, 1]) * cell_size - half
    points = np.stack([x, y], axis=1)
    return points.astype(np.float32), (cells[:, 1] % 2).astype(np.int32)


def checkerboard_log_prob(
    x: np.ndarray, *, num_cells: int = 4, cell_size: float = 1.0
) -> np.ndarray:
    """Exact log-density of :func:`sample_checkerboard`, in float64.

    Args:
        x: Points ``[..., 2]``.
        num_cells: Cells per side (as used for sampling).
        cell_size: Side length of one cell (as used for sampling).

    Returns:
        ``-log(black area)`` inside black cells, ``-inf`` elsewhere; shape ``x.shape[:-1]``.
    """
    x = np.asarray(x, dtype=np.float64)
    half = num_cells * cell_size / 2.0
    col = np.floor((x[..., 0] + half) / cell_size)
    row = np.floor((x[..., 1] + half) / cell_size)
    inside = (col >= 0) & (col < num_cells) & (row >= 0) & (row < num_cells)
    black = inside & ((row + col) % 2 == 0)
    area = ((num_cells**2 + 1) // 2) * cell_size**2
    return np.where(black, -np.log(area), -np.inf)
