"""Entry points report user errors (a bad config, a missing file, a checkpoint that does not fit)
as one clear line instead of a traceback."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Callable

from datasets import DataError
from .checkpoint import CheckpointMismatchError
from .config import ConfigError

# The OS errors among them are a path of the wrong kind or one that may not be written; their
# message names the path.
USER_ERRORS = (ConfigError, DataError, CheckpointMismatchError, FileNotFoundError, IsADirectoryError,
               NotADirectoryError, PermissionError)


def user_message(err: BaseException) -> str:
    """The message of a user error. One raised in a DataLoader worker reaches the main process with
    the worker's traceback in its message ("Caught DataError in DataLoader worker process 0.
    Original Traceback ..."): only the original message is kept, the line that names the file."""
    message = str(err)
    if "\nOriginal Traceback" not in message:
        return message
    lines = message.rstrip().splitlines()
    kind = type(err)
    prefixes = (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: ")
    for start in range(len(lines) - 1, 0, -1):
        if lines[start].startswith(prefixes):
            first = lines[start].split(": ", 1)[1]
            return "\n".join([first] + lines[start + 1:])
    return lines[-1]


def run_main(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser) -> None:
    args = parser.parse_args()
    try:
        code = main(args)
    except USER_ERRORS as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(args: list[str]) -> int:
    """``python ARGS`` (a script or ``-m module``) from the repository root, the root on the import
    path, output passed through; returns the exit status. The quickstart and the tools run the entry
    points this way."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env).returncode
