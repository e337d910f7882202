"""Training pieces without config: state + EMA, optimizer, pure step, checkpoints, loop driver.

The config-driven runs that put them together (``train_and_evaluate``) live in
:mod:`jaxdiff.experiment`.
"""

from jaxdiff.training.checkpoint import Checkpointer, load_config
from jaxdiff.training.loop import Hook, StopSignal, mean_metrics, run_loop
from jaxdiff.training.optim import make_optimizer
from jaxdiff.training.smooth import SmoothTerm, step_variation
from jaxdiff.training.state import (
    TrainState,
    abstract_state,
    create_train_state,
    ema_key,
    make_state_fns,
    train_state_shardings,
    update_ema,
)
from jaxdiff.training.step import (
    LossInputs,
    LossTerm,
    drop_labels,
    jit_train_step,
    make_loss_fn,
    make_train_step,
)

__all__ = [
    "LossInputs",
    "LossTerm",
    "Checkpointer",
    "Hook",
    "StopSignal",
    "SmoothTerm",
    "TrainState",
    "abstract_state",
    "create_train_state",
    "drop_labels",
    "ema_key",
    "jit_train_step",
    "load_config",
    "make_loss_fn",
    "make_optimizer",
    "make_state_fns",
    "make_train_step",
    "mean_metrics",
    "run_loop",
    "step_variation",
    "train_state_shardings",
    "update_ema",
]
