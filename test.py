"""Evaluate a checkpoint on every split, draw predictions, export pseudo-labels.

    python test.py --eval-weights logs/refcoco/best.pth
    python test.py --eval-weights CKPT --splits val,testA --out-json acc.json
    python test.py --eval-weights CKPT --visualize 20 --vis-dir vis/
    python test.py --eval-weights CKPT --export-pseudo-labels pseudo.json
    python test.py --config config/refcoco.yaml --eval-weights REFERENCE_CKPT
    torchrun --nproc_per_node=4 test.py --eval-weights CKPT

Accepts this project's checkpoints, whose config is used unless ``--config`` is given
(KEY=VALUE overrides apply either way; a change to a key that alters what the model
computes, such as INPUT_SHAPE, is an error unless ``--allow-config-change``), and the
reference's (``{epoch, state_dict, ...}``, with ``--config``).
Acc@0.5: the share of expressions whose predicted box overlaps the annotated
one with IoU > 0.5. Evaluation splits: ``--splits``, else EVAL_SPLITS, else
every split of the annotation file except TRAIN_SPLIT.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import cv2
import torch

from datasets import RefDataset, build_loader, load_annotations
from utils import distributed as dist_utils
from utils.checkpoint import evaluation_config, model_for_evaluation
from utils.cli import run_main
from utils.config import Config, ConfigError
from utils.evaluation import BASELINES, evaluate_predictors, model_boxes, text_blind_predictor
from utils.logger import setup_logger
from utils.paths import make_folder, prepare_output_file
from utils.pseudo_label_export import check_export_config, export_pseudo_labels, pseudo_label_datasets
from utils.visualize import evaluate_samples, evaluation_sheet, sample_across_images

log = logging.getLogger("rec")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="YAML config (default: the one stored in the checkpoint; needed for the reference's)")
    parser.add_argument("--eval-weights", required=True, help="checkpoint to evaluate")
    parser.add_argument("--splits", default="", help="comma-separated splits (default: see above)")
    parser.add_argument("--out-json", default="", help='write {split: {"acc": %%, "n": count}} here')
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    parser.add_argument("--visualize", type=int, default=0, metavar="N",
                        help="draw N predictions of the first split, sampled across its images (seeded by "
                        "SEED), one PNG each and one contact sheet")
    parser.add_argument("--vis-dir", default="", help="folder for --visualize (default LOG_PATH/vis)")
    parser.add_argument("--export-pseudo-labels", default="", metavar="FILE",
                        help="write the annotation file with predicted boxes for TRAIN_SPLIT")
    parser.add_argument("--baselines", action="store_true",
                        help="also score two text-blind baselines (random_anchor, most_confident_anchor)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="evaluate even where the config changes what the trained model computes")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def eval_splits(cfg: Config, requested: str) -> list[str]:
    if requested:
        return [s.strip() for s in requested.split(",") if s.strip()]
    if cfg.EVAL_SPLITS:
        return list(cfg.EVAL_SPLITS)
    return [s for s in load_annotations(cfg.ann_path, cfg.DATASET) if s not in cfg.TRAIN_SPLIT.split("+")]


def visualize(model, dataset: RefDataset, cfg: Config, device: torch.device, count: int, folder: str) -> list[str]:
    """Draws ``count`` entries of ``dataset``, sampled across its images (seeded by SEED), into
    ``folder``: one PNG each, then all of them in ``contact_sheet.png``; returns the paths."""
    indices = sample_across_images([entry["iid"] for entry in dataset.entries], count, cfg.SEED)
    samples = evaluate_samples(model, dataset, indices, device, (cfg.MEAN, cfg.STD), cfg.AMP, cfg.BATCH_SIZE)
    if not samples:
        return []
    os.makedirs(folder, exist_ok=True)
    paths = []
    for sample in samples:
        iid = dataset.entries[sample.index]["iid"]
        path = os.path.join(folder, f"{dataset.split}_{sample.index:05d}_iid{iid}.png")
        cv2.imwrite(path, sample.draw())
        paths.append(path)
    paths.append(os.path.join(folder, "contact_sheet.png"))
    cv2.imwrite(paths[-1], evaluation_sheet(samples))
    return paths


def format_table(results: dict[str, dict]) -> str:
    """One row per split; with baselines, one column per baseline."""
    baselines = results.get("baselines", {})
    splits = [s for s in results if s != "baselines"]
    lines = [f"{'split':<12}{'Acc@0.5':>9}{'n':>8}" + "".join(f"{kind:>24}" for kind in baselines)]
    for split in splits:
        row = f"{split:<12}{results[split]['acc']:>9.2f}{results[split]['n']:>8d}"
        lines.append(row + "".join(f"{baselines[kind][split]['acc']:>24.2f}" for kind in baselines))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    cfg = evaluation_config(args.eval_weights, args.config, args.overrides)
    device = dist_utils.local_device(args.device)
    for path, option in ((args.out_json, "--out-json"), (args.export_pseudo_labels, "--export-pseudo-labels")):
        if path:
            prepare_output_file(path, option)
    if args.vis_dir:
        make_folder(args.vis_dir, "--vis-dir")
    distributed = dist_utils.init_distributed(device, cfg.DIST_BACKEND)
    is_main = dist_utils.is_main()
    setup_logger(None, "test", is_main)
    try:
        splits = eval_splits(cfg, args.splits)
        datasets = {split: RefDataset(cfg, split) for split in splits}
        vocab = next(iter(datasets.values())).vocab if datasets else RefDataset(cfg, cfg.TRAIN_SPLIT).vocab
        model = model_for_evaluation(args.eval_weights, cfg, vocab, device, args.allow_config_change)
        if args.baselines and not hasattr(model, "candidate_boxes"):
            raise ConfigError(f"--baselines choose among the detector's anchors, and MODEL.ARCH '{cfg.ARCH}' "
                              "ranks none: score them with the weak model's checkpoint")
        if args.export_pseudo_labels:
            check_export_config(model, cfg)
        train_sets = pseudo_label_datasets(cfg) if args.export_pseudo_labels else []
        if cfg.CHANNELS_LAST:
            model.to(memory_format=torch.channels_last)

        results, baselines = {}, {kind: {} for kind in (BASELINES if args.baselines else ())}
        for split, dataset in datasets.items():
            loader = build_loader(cfg, dataset, train=False, distributed=distributed)
            # The model and the baselines score each batch in one pass: one detector run per image.
            predictors = {"model": model_boxes, **{kind: text_blind_predictor(kind, cfg.SEED) for kind in baselines}}
            scores = evaluate_predictors(model, loader, device, predictors, (cfg.MEAN, cfg.STD), cfg.AMP,
                                         cfg.CHANNELS_LAST)
            results[split] = scores["model"]
            for kind in baselines:
                baselines[kind][split] = scores[kind]
        if baselines:
            results["baselines"] = baselines
        if is_main:
            print(format_table(results))
            if args.out_json:
                with open(args.out_json, "w") as f:
                    json.dump(results, f, indent=2)
            if args.visualize and datasets:
                folder = args.vis_dir or os.path.join(cfg.LOG_PATH, "vis")
                paths = visualize(model, next(iter(datasets.values())), cfg, device, args.visualize, folder)
                print(f"visualizations: {max(len(paths) - 1, 0)} drawings and their contact sheet in {folder}")
            if args.export_pseudo_labels:
                # Only here, on the main process, over the whole training split: the entries of an
                # image meet in one process, as the joint assignment needs.
                summary = export_pseudo_labels(model, cfg, device, args.export_pseudo_labels, train_sets)
                deciders = [name for name, on in (("the joint assignment", cfg.PSEUDO_LABEL_ASSIGNMENT == "joint"),
                                                  ("the position words", cfg.POSITION_WORDS == "lexicon")) if on]
                moved = (f"; {' and '.join(deciders)} gave {summary.moved} of them another box than their own "
                         "first choice" if deciders else "")
                print(f"pseudo-labels: {summary.count} training entries written to {args.export_pseudo_labels}; "
                      f"{summary.agree:.2f} % of them within IoU 0.5 of the file's own boxes{moved}")
    finally:
        dist_utils.cleanup()
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
