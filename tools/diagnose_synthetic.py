"""Where a model trained on the synthetic data goes wrong: accuracy per kind of expression, and the
ceiling its anchors allow.

    python -m tools.diagnose_synthetic --eval-weights logs/synthetic/best.pth [--config FILE] [KEY=VALUE ...]

For a split (``--split``, default val) and each kind of expression (the colour, size and position
words it uses; ``category`` for the noun alone): how many there are (n), the model's Acc@0.5 with
its 95 % confidence interval (the Wilson score interval for a binomial proportion, ``utils/intervals.py``:
an accuracy over 15 expressions moves 6.7 points with each of them), and the share whose referent is
among the selected anchors at all -- the best any choice among them can score, each cell giving its
most confident box as the model does. A model near the ceiling needs a better detector; one far
below it, a better ranking. A student (MODEL.ARCH: student) regresses its box and ranks no anchors:
it has no ceiling ('-'). Only for data of ``datasets.synthetic``. The config is the checkpoint's
unless ``--config`` is given, as in test.py. Several checkpoints are compared side by side
(``--eval-weights`` repeated), each with its own config; the ceiling column is the first one's.

``--split`` takes val, testA, testB and the probe splits ``position`` and ``size`` (expressions
of that kind only, a few hundred each: ``anns/probe.json`` beside the config's annotation file, made by
``python -m datasets.synthetic --probe-images N``, by the quickstart with its data); several splits,
comma-separated (``--split val,position,size``), print one table each.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import torch
from torchvision.ops import box_iou

from datasets import DataError, RefDataset, build_loader, letterbox_to_original
from datasets.synthetic import PROBE_SPLITS, checked_probe_annotations, expression_kind
from models.box_prediction import cell_box
from models.detector_cache import DetectorCache
from utils.checkpoint import evaluation_config, model_for_evaluation
from utils.cli import run_main
from utils.config import ConfigError
from utils.distributed import local_device
from utils.engine import prepare_batch
from utils.evaluation import gt_xyxy, hits, model_boxes
from utils.intervals import wilson_interval


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: the one stored in the checkpoint)")
    parser.add_argument("--eval-weights", required=True, action="append",
                        help="checkpoint to diagnose; repeat it to compare several")
    parser.add_argument("--names", default=None, help="comma-separated column names, one per checkpoint "
                        "(default: the checkpoints' folder names)")
    parser.add_argument("--split", default="val", help="split to diagnose, or several comma-separated: val, "
                        "testA, testB, or the probe splits position and size (default: val)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when present)")
    parser.add_argument("--out-json", default="", help='also write {kind: {"n", "acc", "ceiling", "ci95": [low, '
                        'high]}} here, percentages (of one checkpoint; of several: {name: {kind: ...}}; of several '
                        'splits: {split: ...} around either)')
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


@torch.no_grad()
def diagnose(model, dataset: RefDataset, cfg, device: torch.device) -> dict[str, dict]:
    """``{kind: {"n", "acc", "ceiling", "ci95"}}`` (percentages; ceiling None for a model without anchors;
    ci95 ``[low, high]``, the Wilson score interval of acc), with ``"all"`` over every expression."""
    counts = defaultdict(lambda: torch.zeros(3))  # samples, correct, reachable
    ranks_anchors = hasattr(model, "candidate_boxes")
    index = 0
    cache = DetectorCache(0)  # the loader is in file order: one detector run per image
    for batch in build_loader(cfg, dataset, train=False):
        batch = prepare_batch(model, batch, device, cache=cache, amp=cfg.AMP, mean_std=(cfg.MEAN, cfg.STD))
        gt = gt_xyxy(batch["gt_box"])
        correct = hits(model_boxes(model, batch, cfg.AMP, device), batch["gt_box"])
        b = gt.shape[0]
        reachable = _reachable(model, batch, gt) if ranks_anchors else torch.zeros(b, dtype=torch.bool)
        for i in range(b):
            kind = expression_kind(dataset.entries[index + i]["refs"][0])
            for key in (kind, "all"):
                counts[key] += torch.tensor([1.0, float(correct[i]), float(reachable[i])])
        index += b
    return {kind: {"n": int(n), "acc": float(100.0 * hit / n),
                   "ceiling": float(100.0 * reach / n) if ranks_anchors else None,
                   "ci95": [100.0 * end for end in wilson_interval(int(hit), int(n))]}
            for kind, (n, hit, reach) in sorted(counts.items(), key=lambda item: (item[0] == "all", item[0]))}


def _reachable(model, batch: dict, gt: torch.Tensor) -> torch.Tensor:
    """``[B]``: whether any selected cell's most confident box overlaps the referent with IoU > 0.5."""
    candidates = model.candidate_boxes(batch["image"], batch["detections"]).float()  # [B, K, 4, 5+C]
    b, k = candidates.shape[:2]
    boxes = torch.stack([cell_box(candidates, torch.full((b,), cell, device=gt.device))[:, 0, :4]
                         for cell in range(k)], dim=1)  # [B, K, 4] letterboxed
    boxes = letterbox_to_original(boxes.flatten(0, 1), batch["info"].repeat_interleave(k, dim=0))
    overlap = box_iou(boxes, gt).view(b, k, b)[torch.arange(b), :, torch.arange(b)]  # [B, K]
    return (overlap > 0.5).any(dim=1)


def split_dataset(cfg, split: str) -> RefDataset:
    """The entries of ``split``: ANN_PATH's, or for the probe splits those of the probe file beside it,
    encoded with ANN_PATH's vocabulary, the one the model was trained with."""
    parts = split.split("+")
    probes = [part for part in parts if part in PROBE_SPLITS]
    if not probes:
        return RefDataset(cfg, split)
    if len(probes) != len(parts):
        raise DataError(f"split '{split}' joins probe splits ({', '.join(PROBE_SPLITS)}) to others, which are in "
                        f"another annotation file: give them comma-separated instead (--split {','.join(parts)})")
    return RefDataset(cfg, split, checked_probe_annotations(cfg.ann_path), vocab_from=cfg.ann_path)


def table(split: str, names: list[str], results: list[dict]) -> str:
    """One split's rows: n, the first model's ceiling, then each model's Acc@0.5 and its interval."""
    width = max(12, *(len(name) + 2 for name in names))  # a column per model, as wide as its name
    lines = [f"{'expressions':<26}{'n':>6}{'ceiling':>9}" + "".join(f"{name:>{width}}{'95 % CI':>16}" for name in names)
             + f"   (Acc@0.5, {split}; 95 % CI: Wilson score interval)"]
    for kind, row in results[0].items():
        ceiling = "-" if row["ceiling"] is None else f"{row['ceiling']:.2f}"
        line = f"{kind:<26}{row['n']:>6}{ceiling:>9}"
        for result in results:
            low, high = result[kind]["ci95"]
            line += f"{result[kind]['acc']:>{width}.2f}{f'[{low:.1f}, {high:.1f}]':>16}"
        lines.append(line)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    names = (args.names.split(",") if args.names
             else [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.eval_weights])
    if len(names) != len(args.eval_weights):
        raise ConfigError(f"--names gives {len(names)} names for {len(args.eval_weights)} checkpoints")
    splits = list(dict.fromkeys(args.split.split(",")))
    if not all(splits):
        raise ConfigError(f"--split '{args.split}' names an empty split: give split names separated by single commas")
    device = local_device(args.device)
    results: dict[str, list[dict]] = {split: [] for split in splits}
    for path in args.eval_weights:
        cfg = evaluation_config(path, args.config, args.overrides)
        data = {split: split_dataset(cfg, split) for split in splits}
        # Every split's entries are encoded with ANN_PATH's vocabulary: one model serves them all.
        model = model_for_evaluation(path, cfg, data[splits[0]].vocab, device)
        for split, dataset in data.items():
            results[split].append(diagnose(model, dataset, cfg, device))
    if args.out_json:
        by_split = {split: rows[0] if len(rows) == 1 else dict(zip(names, rows)) for split, rows in results.items()}
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
        with open(args.out_json, "w") as f:
            json.dump(by_split[splits[0]] if len(splits) == 1 else by_split, f, indent=2)
    print("\n\n".join(table(split, names, rows) for split, rows in results.items()))
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
