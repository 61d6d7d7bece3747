"""Output paths checked before any work is done: a folder that runs through a file, or a file
path that names a folder, is a one-line error naming the option or config key to change."""
from __future__ import annotations

import os

from .config import ConfigError


def _file_on_the_way(path: str) -> str | None:
    """The first existing ancestor of ``path`` (itself included) that is not a folder, if any."""
    current = os.path.abspath(path)
    while True:
        if os.path.exists(current):
            return None if os.path.isdir(current) else current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def make_folder(path: str, name: str) -> None:
    """``os.makedirs(path)``; ``name`` (an option or config key) is named where ``path`` runs
    through a file."""
    blocker = _file_on_the_way(path)
    if blocker is not None:
        where = "is a file" if blocker == os.path.abspath(path) else f"runs through the file {blocker}"
        raise ConfigError(f"{name} {path} {where}, not a folder; set {name} to a folder path")
    os.makedirs(path, exist_ok=True)


def prepare_output_file(path: str, name: str) -> None:
    """Make the folder of output file ``path`` (option ``name``); a ``path`` that is a folder, or
    whose folder runs through a file, is an error naming ``name``."""
    if os.path.isdir(path):
        raise ConfigError(f"{name} {path} is a folder; give a file path, such as "
                          f"{os.path.join(path, 'out.json')}")
    folder = os.path.dirname(os.path.abspath(path))
    blocker = _file_on_the_way(folder)
    if blocker is not None:
        raise ConfigError(f"{name} {path} runs through the file {blocker}; give a path whose folders are folders")
    os.makedirs(folder, exist_ok=True)
