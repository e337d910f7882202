"""Training: train state with EMA, optimizer, pure train step, checkpoints, the loop."""

from jaxdiff.training.checkpoint import Checkpointer, load_config
from jaxdiff.training.loop import train_and_evaluate
from jaxdiff.training.optim import make_optimizer
from jaxdiff.training.state import TrainState, create_train_state, ema_key, update_ema
from jaxdiff.training.step import drop_labels, jit_train_step, make_loss_fn, make_train_step

__all__ = [
    "Checkpointer",
    "TrainState",
    "create_train_state",
    "drop_labels",
    "ema_key",
    "jit_train_step",
    "load_config",
    "make_loss_fn",
    "make_optimizer",
    "make_train_step",
    "train_and_evaluate",
    "update_ema",
]
