"""Where a run writes: log/, log_tensorboard/ and saved/ under ``fmrl_output_dir``.

RecBole hard-codes ``./log`` and ``./log_tensorboard``; this module is the one place that sends
them under the configured output folder instead. Run names cannot collide: RecBole names a run by
its start second, so two runs started in the same second into one ``fmrl_output_dir`` overwrote each
other's checkpoints; ``run_id`` adds the process id and a random suffix.
"""
import contextlib
import logging
import os
import secrets

import colorlog
from recbole.utils import get_local_time
from recbole.utils.logger import RemoveColorFilter, log_colors_config


def run_id(config) -> str:
    """``<start time>-<pid>-<random>``: one per Config (the log, TensorBoard and checkpoint names share it)."""
    if "_fmrl_run_id" not in config.__dict__:
        config.__dict__["_fmrl_run_id"] = f"{get_local_time()}-{os.getpid()}-{secrets.token_hex(3)}"
    return config.__dict__["_fmrl_run_id"]


def checkpoint_file(config) -> str:
    """The best checkpoint's path, ``<checkpoint_dir>/<model>-<run_id>.pth`` (its last one: ``.last.pth``)."""
    return os.path.join(config["checkpoint_dir"], f"{config['model']}-{run_id(config)}.pth")


def init_logger(config) -> str:
    """RecBole-style console + file logging, the file under <fmrl_output_dir>/log/<model>/."""
    log_dir = os.path.join(config["fmrl_output_dir"], "log", config["model"])
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"{config['model']}-{config['dataset']}-{run_id(config)}.log")
    level = {"debug": logging.DEBUG, "error": logging.ERROR, "warning": logging.WARNING}.get(
        str(config["state"]).lower(), logging.INFO)
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter("%(asctime)-15s %(levelname)s  %(message)s", "%a %d %b %Y %H:%M:%S"))
    file_handler.addFilter(RemoveColorFilter())
    stream = logging.StreamHandler()
    stream.setFormatter(colorlog.ColoredFormatter("%(log_color)s%(asctime)-15s %(levelname)s  %(message)s",
                                                  "%d %b %H:%M", log_colors=log_colors_config))
    root = logging.getLogger()
    for handler in list(root.handlers):  # a second run in one process must not log twice
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    file_handler.setLevel(level)
    stream.setLevel(level)
    root.addHandler(file_handler)
    root.addHandler(stream)
    return path


@contextlib.contextmanager
def tensorboard_under(output_dir):
    """Make RecBole's Trainer create its SummaryWriter under <output_dir>/log_tensorboard."""
    import recbole.trainer.trainer as recbole_trainer
    from torch.utils.tensorboard import SummaryWriter

    def get_tensorboard(logger):
        name = next((os.path.basename(h.baseFilename).rsplit(".", 1)[0] for h in logger.handlers
                     if hasattr(h, "baseFilename")), f"model-{get_local_time()}")
        return SummaryWriter(os.path.join(output_dir, "log_tensorboard", name))

    original = recbole_trainer.get_tensorboard
    recbole_trainer.get_tensorboard = get_tensorboard
    try:
        yield
    finally:
        recbole_trainer.get_tensorboard = original
