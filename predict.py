"""Box the object each expression refers to, for many images and expressions in one run.

    python predict.py --weights logs/refcoco/best.pth --image photo.jpg --expr "the man in red" --expr "left dog"
    python predict.py --weights CKPT --image-dir photos/ --exprs-file exprs.tsv --out-json boxes.jsonl
    python predict.py --weights CKPT --input pairs.jsonl --topk 3 --out-dir drawn/

Inputs, one of:
  --image FILE --expr TEXT [--expr TEXT ...]   one image, one or more expressions
  --image-dir DIR --exprs-file FILE            FILE holds lines 'file name<TAB>expression', names relative
                                               to DIR (a name may repeat; empty lines and lines starting
                                               with '#' are skipped)
  --input FILE                                 a JSON list, or JSON lines, of {"image": path,
                                               "expression": text}; relative paths start at FILE's folder

The model is loaded once (vocabulary from the checkpoint written by train.py, and the config unless
--config is given; KEY=VALUE overrides apply either way, and a change to what the model computes,
such as INPUT_SHAPE, is an error unless --allow-config-change) and runs
--batch-size pairs at a time. Each prediction is a line on stdout and, with --out-json, a JSON line:
"image", "expression", "box" [x1, y1, x2, y2] in the image's pixels, clipped to the image,
"match_score" the probability of the chosen candidate among the model's K candidate anchors for
this expression, "objectness" the detector's confidence in that box (whatever the expression),
"unknown_words", "warnings", and with --topk N "candidates": the N best [{"box", "match_score",
"objectness"}], best first. Words outside the vocabulary are named in a warning on stderr; an
expression none of whose words is known gets a warning that says so.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NamedTuple

import cv2

from datasets import DataError, read_image
from utils.cli import run_main
from utils.config import ConfigError
from utils.paths import make_folder, prepare_output_file
from utils.predictor import Prediction, Predictor
from utils.text_io import read_text
from utils.visualize import draw_prediction


class Pair(NamedTuple):
    image: str
    expression: str
    where: str  # how messages point at the input


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="checkpoint written by train.py")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", help="one image file, with --expr")
    inputs.add_argument("--image-dir", help="a folder of images, with --exprs-file")
    inputs.add_argument("--input", help='JSON list or JSON lines of {"image": path, "expression": text}')
    parser.add_argument("--expr", action="append", default=[], help="an expression for --image (repeatable)")
    parser.add_argument("--exprs-file", help="lines 'file name<TAB>expression' for --image-dir")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass")
    parser.add_argument("--topk", type=int, default=0, metavar="N", help="also report the N best candidates")
    parser.add_argument("--out-json", default="", help="write one JSON line per prediction here")
    parser.add_argument("--out-dir", default="", help="draw each prediction into this folder")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    parser.add_argument("--config", default=None, help="YAML config (default: the one stored in the checkpoint)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="predict even where the config changes what the trained model computes")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def read_exprs_file(path: str, image_dir: str) -> list[Pair]:
    """The pairs of a 'file name<TAB>expression' file; a malformed line is an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expressions file not found: {path}")
    pairs = []
    for number, line in enumerate(read_text(path, "expressions file", DataError).split("\n"), 1):
        line = line.rstrip("\r\n")
        if not line.strip() or line.startswith("#"):
            continue
        name, tab, expression = line.partition("\t")
        if not tab or not name.strip() or not expression.strip():
            raise DataError(f"{path} line {number}: expected 'file name<TAB>expression', got {line[:80]!r}")
        pairs.append(Pair(os.path.join(image_dir, name.strip()), expression.strip(), f"{path} line {number}"))
    return pairs


def read_input_file(path: str) -> list[Pair]:
    """The pairs of a JSON list or a JSON-lines file of ``{"image", "expression"}`` objects; a
    malformed line or entry is an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    text = read_text(path, "input file", DataError)
    expected = 'expected {"image": path, "expression": text}'
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
        entries = [(f"{path} entry {i}", item) for i, item in enumerate(items)]
    else:
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path} line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number} is not valid JSON ({err.msg}); {expected}") from err
    pairs = []
    for where, item in entries:
        if not (isinstance(item, dict) and isinstance(item.get("image"), str)
                and isinstance(item.get("expression"), str)):
            raise DataError(f"{where}: {expected}, got {json.dumps(item)[:80]}")
        pairs.append(Pair(os.path.join(os.path.dirname(path), item["image"]), item["expression"], where))
    return pairs


def read_inputs(args: argparse.Namespace) -> list[Pair]:
    if args.expr and not args.image:
        raise ConfigError("--expr goes with --image (a folder takes --exprs-file, a list --input)")
    if args.exprs_file and not args.image_dir:
        raise ConfigError("--exprs-file goes with --image-dir")
    if args.image:
        if not args.expr:
            raise ConfigError("--image needs at least one --expr")
        pairs = [Pair(args.image, expr, f"--expr {i + 1}") for i, expr in enumerate(args.expr)]
    elif args.image_dir:
        if not args.exprs_file:
            raise ConfigError("--image-dir needs --exprs-file (lines 'file name<TAB>expression')")
        if not os.path.isdir(args.image_dir):
            raise FileNotFoundError(f"image folder not found: {args.image_dir}")
        pairs = read_exprs_file(args.exprs_file, args.image_dir)
    else:
        pairs = read_input_file(args.input)
    if not pairs:
        raise DataError(f"{args.exprs_file or args.input} holds no (image, expression) pair")
    for pair in pairs:
        if not os.path.isfile(pair.image):
            raise FileNotFoundError(f"image not found: {pair.image} ({pair.where})")
    return pairs


def readable(prediction: Prediction) -> str:
    x1, y1, x2, y2 = prediction.box
    objectness = f"{prediction.objectness:.3f}" if prediction.objectness is not None else "-"
    return (f"{prediction.image}  {json.dumps(prediction.expression)}  box {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}  "
            f"match {prediction.match_score:.3f}  objectness {objectness}")


def draw(prediction: Prediction, path: str) -> None:
    shown = prediction.candidates or [prediction]
    objectness = f", objectness {prediction.objectness:.2f}" if prediction.objectness is not None else ""
    drawing = draw_prediction(read_image(prediction.image), prediction.expression, [c.box for c in shown],
                              [c.match_score for c in shown], [f"match {prediction.match_score:.2f}{objectness}"])
    cv2.imwrite(path, drawing)


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.topk < 0:
        raise ConfigError(f"--batch-size must be at least 1 and --topk at least 0, got {args.batch_size} "
                          f"and {args.topk}")
    pairs = read_inputs(args)
    if args.out_json:
        prepare_output_file(args.out_json, "--out-json")
    if args.out_dir:
        make_folder(args.out_dir, "--out-dir")
    predictor = Predictor.from_checkpoint(args.weights, args.device, args.config, args.overrides,
                                          args.allow_config_change)
    out_json = open(args.out_json, "w", encoding="utf-8") if args.out_json else None
    try:
        for start in range(0, len(pairs), args.batch_size):
            chunk = pairs[start:start + args.batch_size]
            predictions = predictor.predict([p.image for p in chunk], [p.expression for p in chunk], args.topk,
                                            args.batch_size)
            for number, (pair, prediction) in enumerate(zip(chunk, predictions), start + 1):
                for warning in prediction.warnings:
                    print(f"warning: {pair.where}: {warning}", file=sys.stderr)
                print(readable(prediction))
                if out_json is not None:
                    out_json.write(json.dumps(prediction.to_dict()) + "\n")
                if args.out_dir:
                    stem = os.path.splitext(os.path.basename(pair.image))[0]
                    draw(prediction, os.path.join(args.out_dir, f"{number:05d}_{stem}.png"))
            if out_json is not None:
                out_json.flush()
    finally:
        if out_json is not None:
            out_json.close()
    if args.out_json:
        print(f"predictions: {len(pairs)} JSON lines in {args.out_json}")
    if args.out_dir:
        print(f"drawings: {len(pairs)} in {args.out_dir}")
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
