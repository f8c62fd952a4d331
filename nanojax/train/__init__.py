"""Training: the config and its check (config.py), the loss and the jitted steps (step.py), and
the loop with checkpoints and exact resume (loop.py). `from nanojax.train import ...` gives all
of them, as it did when this was one module.
"""

from nanojax.train.config import ConfigError, default_config, model_config_from, validate_config
from nanojax.train.loop import (
    CONFIG_FILE,
    NonFiniteLossError,
    WorkdirMismatchError,
    evaluate_full,
    train,
)
from nanojax.train.step import (
    Run,
    build,
    loss_fn,
    make_eval_step,
    make_eval_sum_step,
    make_train_step,
    token_losses,
)

__all__ = [
    "CONFIG_FILE", "ConfigError", "NonFiniteLossError", "Run", "WorkdirMismatchError", "build",
    "default_config", "evaluate_full", "loss_fn", "make_eval_step", "make_eval_sum_step",
    "make_train_step", "model_config_from", "token_losses", "train", "validate_config",
]
