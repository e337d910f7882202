r"""Post-hoc EMA reconstruction of a run: ``python -m jaxdiff.experiment.phema``.

Examples::

    # the EMA with relative std 0.1 at the newest snapshot of a run
    python -m jaxdiff.experiment.phema --workdir=runs/edm2 --std=0.1

    # several lengths at once, at an earlier snapshot, on a bucket
    python -m jaxdiff.experiment.phema --workdir=gs://b/run --std=0.05 --std=0.15 --step=40000

    # sample with it
    python -m sample --workdir=runs/edm2 --ema=phema:0.1

A run trained with ``train.ema_stds`` (e.g. ``(0.05,0.1)``) and ``train.phema_every=N``
stores snapshots of its power-function EMA profiles in ``WORKDIR/phema/``. This command
solves EDM2's least-squares coefficients (:func:`jaxdiff.training.phema.solve_coefficients`)
for each ``--std`` at ``--step`` (default: the newest snapshot), combines the snapshots up
to that step, streaming one file at a time with float64 sums, and writes
``WORKDIR/phema/reconstructed-std0.100.safetensors``, which
``load_run(WORKDIR, ema="phema:0.1")`` and ``python -m sample --ema=phema:0.1`` load. It
needs no accelerator and runs on one process. A bad flag or missing snapshot is one line on
stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence

import numpy as np
from absl import app, flags

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.pretrained.weights_io import read_weights, write_weights
from jaxdiff.training import phema
from jaxdiff.utils import cli, storage

POOR_FIT = 0.05
"""A profile fit error above this gets a warning: the snapshots cannot express the target."""


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """What one reconstruction used and wrote.

    Attributes:
        path: the written file.
        std: its relative std; ``gamma`` its power exponent.
        step: the snapshot step it reconstructs.
        inputs: ``(step, std)`` of every stored profile combined.
        coefficients: their coefficients (summing to 1).
        fit_error: relative L2 error of the reconstructed averaging profile.
    """

    path: str
    std: float
    gamma: float
    step: int
    inputs: tuple[tuple[int, float], ...]
    coefficients: np.ndarray
    fit_error: float

    def describe(self) -> str:
        """A two-line summary for the terminal."""
        steps = sorted({s for s, _ in self.inputs})
        stds = ",".join(f"{d:.3f}" for d in sorted({d for _, d in self.inputs}))
        c = self.coefficients
        return (
            f"wrote {self.path}: sigma_rel {self.std:.3f} (gamma {self.gamma:.3f}) at step "
            f"{self.step} from {len(self.inputs)} profiles (stds {stds}) of {len(steps)} "
            f"snapshots (steps {steps[0]}..{steps[-1]})\n"
            f"  coefficients: sum |c| {np.abs(c).sum():.3f}, max |c| {np.abs(c).max():.3f}, "
            f"largest on step/std {self.inputs[int(np.argmax(np.abs(c)))]}; profile fit "
            f"error {100 * self.fit_error:.2f}%"
        )


def _no_snapshots(directory: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"no post-hoc EMA snapshots in {directory}: train with power-function EMA profiles "
        "and snapshots, e.g. --config.train.ema_stds=(0.05,0.1) --config.train.phema_every="
        "1000 (steps between snapshots), then run this command on the workdir"
    )


def _inputs(directory: str, step: int | None) -> tuple[int, list[tuple[int, float, str]]]:
    snapshots = phema.list_snapshots(directory)
    if not snapshots:
        raise _no_snapshots(directory)
    steps = [s for s, _ in snapshots]
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise InvalidArgumentError(
            f"--step={step}: no snapshot of that step in {directory}; pass one of {steps}"
        )
    inputs = []
    for s, path in snapshots:
        if 0 < s <= step:
            stds = json.loads(phema.read_metadata(path).get("stds", "[]"))
            inputs.extend((s, float(d), path) for d in stds)
    if not inputs:
        raise _no_snapshots(directory)
    return step, inputs


def _profiles(inputs: Sequence[tuple[int, float, str]]) -> Iterator[dict[str, np.ndarray]]:
    """Each input profile as a flat ``{"a/b/c": array}``, reading each file once."""
    current, tensors, names, first = None, {}, None, None
    for _, std, path in inputs:
        if path != current:
            tensors, current = read_weights(path)[0], path
        prefix = phema.std_key(std) + "/"
        flat = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if names is None:
            names, first = sorted(flat), f"{path} ({prefix[:-1]})"
        elif sorted(flat) != names:
            raise InvalidArgumentError(
                f"{path} ({prefix[:-1]}) holds other params than {first}: the model changed "
                "during training; move the older snapshots out of the phema folder, or pass "
                "--step=N of a snapshot before the change"
            )
        yield flat


def reconstruct_run(
    workdir: str, stds: Sequence[float], step: int | None = None
) -> list[Reconstruction]:
    """Writes ``WORKDIR/phema/reconstructed-stdX.safetensors`` for each of ``stds``.

    Args:
        workdir: the run's workdir (local or gs://).
        stds: relative stds to reconstruct, each in ``(0, 0.289)`` with three decimals.
        step: the snapshot step to reconstruct at; None = the newest.

    Returns:
        One :class:`Reconstruction` per distinct std, in increasing order.

    Raises:
        InvalidArgumentError: with no snapshots (says which config keys make them), a
            ``step`` without a snapshot, or a std out of range.
    """
    out_stds = sorted({phema.check_std(s, "--std") for s in stds})
    if not out_stds:
        raise InvalidArgumentError("pass at least one --std, e.g. --std=0.1")
    directory = storage.join(workdir, "phema")
    step, inputs = _inputs(directory, step)
    in_steps = [s for s, _, _ in inputs]
    in_stds = [d for _, d, _ in inputs]
    try:
        coefs = phema.solve_coefficients(in_steps, in_stds, step, out_stds)
    except np.linalg.LinAlgError:
        coefs = np.full((len(inputs), len(out_stds)), np.nan)
    if not np.all(np.isfinite(coefs)):
        raise InvalidArgumentError(
            f"the post-hoc EMA solve in {directory} is singular (duplicate snapshots?); "
            "move duplicated snapshot files out of the folder"
        )
    trees = phema.reconstruct(_profiles(inputs), coefs)
    done = []
    for j, std in enumerate(out_stds):
        x = coefs[:, j]
        rec = Reconstruction(
            path=phema.reconstruction_path(directory, std),
            std=std,
            gamma=float(phema.std_to_exp(std)),
            step=step,
            inputs=tuple((s, d) for s, d, _ in inputs),
            coefficients=x,
            fit_error=phema.fit_error(in_steps, in_stds, step, std, x),
        )
        meta = {
            "format": phema.RECONSTRUCTION_FORMAT,
            "step": str(step),
            "std": f"{std:.3f}",
            "gamma": repr(rec.gamma),
            "inputs": json.dumps([list(i) for i in rec.inputs]),
            "coefficients": json.dumps([float(c) for c in x]),
            "fit_error": repr(rec.fit_error),
        }
        write_weights(rec.path, trees[j], meta)
        done.append(rec)
    return done


def define_flags() -> None:
    """Defines the command's flags.

    Only when run as a command: the module is a library too, and its ``--workdir`` would
    clash with other commands' flags in one process.
    """
    flags.DEFINE_string("workdir", None, "The run's workdir (local or gs://).")
    flags.DEFINE_multi_float("std", None, "Relative std(s) to reconstruct, in (0, 0.289).")
    flags.DEFINE_integer("step", None, "Snapshot step to reconstruct at (default: newest).")
    flags.mark_flags_as_required(["workdir", "std"])


def main(argv: list[str]) -> None:
    """Reconstructs every ``--std`` and prints what each used."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    step = flags.FLAGS.step
    if step is not None and step < 1:
        raise InvalidArgumentError(f"--step={step} must be >= 1 (a snapshot's step)")
    for rec in reconstruct_run(flags.FLAGS.workdir, flags.FLAGS.std, step):
        print(rec.describe())
        if rec.fit_error > POOR_FIT:
            print(
                f"  warning: sigma_rel {rec.std:.3f} is poorly expressed by the stored profiles"
                " (fit error above 5%); store snapshots more often or profiles closer to it"
            )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
