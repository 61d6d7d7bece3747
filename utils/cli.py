"""Entry points report user errors (a bad config, a missing file, a checkpoint that does not fit)
as one clear line instead of a traceback."""
from __future__ import annotations

import argparse
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
