"""Where a model trained on the synthetic data goes wrong: accuracy per kind of expression, and the
ceiling its anchors allow.

    python -m tools.diagnose_synthetic --eval-weights logs/synthetic/best.pth [--config FILE] [KEY=VALUE ...]

For one split (``--split``, default val) and each kind of expression (the colour, size and position
words it uses; ``category`` for the noun alone): how many there are, the model's Acc@0.5, and the
share whose referent is among the selected anchors at all -- the best any choice among them can
score, each cell giving its most confident box as the model does. A model near the ceiling needs a
better detector; one far below it, a better ranking. A student (MODEL.ARCH: student) regresses its
box and ranks no anchors: it has no ceiling ('-'). Only for data of ``datasets.synthetic``. The
config is the checkpoint's unless ``--config`` is given, as in test.py. Several checkpoints are
compared side by side (``--eval-weights`` repeated), each with its own config; the ceiling column is
the first one's.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import torch
from torchvision.ops import box_iou

from datasets import RefDataset, build_loader, letterbox_to_original
from datasets.synthetic import expression_kind
from models.box_prediction import cell_box
from models.detector_cache import DetectorCache
from utils.checkpoint import evaluation_config, model_for_evaluation
from utils.cli import run_main
from utils.config import ConfigError
from utils.distributed import local_device
from utils.engine import prepare_batch
from utils.evaluation import gt_xyxy, hits, model_boxes


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: the one stored in the checkpoint)")
    parser.add_argument("--eval-weights", required=True, action="append",
                        help="checkpoint to diagnose; repeat it to compare several")
    parser.add_argument("--names", default=None, help="comma-separated column names, one per checkpoint "
                        "(default: the checkpoints' folder names)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when present)")
    parser.add_argument("--out-json", default="", help='also write {kind: {"n", "acc", "ceiling"}} here (of one '
                        'checkpoint; of several: {name: {kind: ...}})')
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


@torch.no_grad()
def diagnose(model, dataset: RefDataset, cfg, device: torch.device) -> dict[str, dict[str, float]]:
    """``{kind: {"n", "acc", "ceiling"}}`` (percentages; ceiling None for a model without anchors),
    with ``"all"`` over every expression."""
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
                   "ceiling": float(100.0 * reach / n) if ranks_anchors else None}
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


def main(args: argparse.Namespace) -> int:
    names = (args.names.split(",") if args.names
             else [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.eval_weights])
    if len(names) != len(args.eval_weights):
        raise ConfigError(f"--names gives {len(names)} names for {len(args.eval_weights)} checkpoints")
    device = local_device(args.device)
    results = []
    for path in args.eval_weights:
        cfg = evaluation_config(path, args.config, args.overrides)
        dataset = RefDataset(cfg, args.split)
        results.append(diagnose(model_for_evaluation(path, cfg, dataset.vocab, device), dataset, cfg, device))
    if args.out_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
        with open(args.out_json, "w") as f:
            json.dump(results[0] if len(results) == 1 else dict(zip(names, results)), f, indent=2)
    width = max(12, *(len(name) + 2 for name in names))  # a column per model, as wide as its name
    print(f"{'expressions':<26}{'n':>6}{'ceiling':>9}" + "".join(f"{name:>{width}}" for name in names)
          + f"   (Acc@0.5, {args.split})")
    for kind, row in results[0].items():
        ceiling = "-" if row["ceiling"] is None else f"{row['ceiling']:.2f}"
        print(f"{kind:<26}{row['n']:>6}{ceiling:>9}"
              + "".join(f"{result[kind]['acc']:>{width}.2f}" for result in results))
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
