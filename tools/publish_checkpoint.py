"""Turns a training checkpoint of train.py into a file to share, as mmdetection's publish_model does.

    python -m tools.publish_checkpoint logs/refcoco/best.pth refcoco_accv.pth
    # -> refcoco_accv-1a2b3c4d.pth

It keeps what evaluation and prediction read (the evaluation weights, which are the EMA's when the run
kept an EMA, the config and the vocabulary, plus the epoch and best validation accuracy for the
record) and drops the training state: the raw weights beside the EMA's, the EMA's own state, the
optimizer, schedule, gradient scaler and random generators. The file is written under the given name
with the first 8 hex digits of its sha256 before the extension, so that a download can be checked
against its name. test.py and predict.py read it as they read the checkpoint; --resume cannot
continue from it. Every key of both kinds of file: docs/training.md, "Checkpoint files".
"""
from __future__ import annotations

import argparse
import hashlib
import os

from utils.checkpoint import FORMAT, CheckpointMismatchError, load_checkpoint, save_atomic
from utils.cli import run_main

PUBLISHED_KEYS = ("format", "config", "vocab", "state_dict", "epoch", "best_acc")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish(source: str, out: str) -> str:
    """Write the published form of checkpoint ``source`` as ``out`` with ``-<sha256[:8]>`` before its
    extension; returns that path."""
    ckpt = load_checkpoint(source, "checkpoint to publish")
    if ckpt.get("format") != FORMAT or "vocab" not in ckpt:
        raise CheckpointMismatchError(f"{source} is not a checkpoint of train.py (no format {FORMAT!r} and "
                                      "vocabulary); publish a LOG_PATH/best.pth or last.pth")
    save_atomic({key: ckpt[key] for key in PUBLISHED_KEYS}, out)
    stem, extension = os.path.splitext(out)
    final = f"{stem}-{sha256_of(out)[:8]}{extension or '.pth'}"
    os.replace(out, final)
    return final


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Strip a training checkpoint to the weights, config and "
                                     "vocabulary, named by its sha256")
    parser.add_argument("checkpoint", help="a checkpoint of train.py (LOG_PATH/best.pth or last.pth)")
    parser.add_argument("out", help="the file to write; its sha256 prefix is added before the extension")
    return parser


def main(args: argparse.Namespace) -> int:
    path = publish(args.checkpoint, args.out)
    print(f"published {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
