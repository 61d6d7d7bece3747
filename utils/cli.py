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

USER_ERRORS = (ConfigError, DataError, CheckpointMismatchError, FileNotFoundError)


def run_main(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser) -> None:
    args = parser.parse_args()
    try:
        code = main(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
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
