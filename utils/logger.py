"""Run logging: one log file per run beside the checkpoints, plus the console, main process only."""
from __future__ import annotations

import logging
import os
import sys
import time


def setup_logger(log_dir: str | None, name: str, is_main: bool = True) -> logging.Logger:
    """A logger writing to the console and ``<log_dir>/<name>_<timestamp>.log`` on the main process;
    other processes log warnings and errors only."""
    logger = logging.getLogger("rec")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if is_main and log_dir:
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, f"{name}_{time.strftime('%Y%m%d_%H%M%S')}.log")
        handler = logging.FileHandler(path)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger
