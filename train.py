"""Train the weakly supervised REC model, or the supervised student (MODEL.ARCH).

    python train.py --config config/refcoco.yaml [KEY=VALUE ...] [--resume logs/refcoco/last.pth] [--overwrite]
    torchrun --nproc_per_node=8 train.py --config config/refcoco.yaml

Each epoch trains on TRAIN_SPLIT, validates the EMA weights on VAL_SPLIT and
writes ``last.pth`` and ``best.pth`` (atomically) in LOG_PATH, beside the
resolved config, a log file and TensorBoard events. A fresh run into a LOG_PATH
that holds another run's checkpoints stops (continue it with --resume, or pass
--overwrite), and so does a run into a LOG_PATH another live run owns (``run.lock``,
see utils/run_lock.py). A resumed run whose config changes what the model computes
stops, naming each changed key, unless --allow-config-change. Ctrl-C or SIGTERM
saves ``last.pth`` where the run stopped.
The loop itself is ``utils.engine.fit``, shared with pretrain.py.
"""
from __future__ import annotations

import argparse
import logging
import os

import torch
from torch.nn.parallel import DistributedDataParallel

from datasets import DataError, RefDataset, build_loader, check_training_file, load_word_vectors, training_entries
from models import DetectorCache, build_model
from utils import distributed as dist_utils
from utils.checkpoint import (FORMAT, CheckpointMismatchError, check_model_config, config_from_checkpoint,
                              load_checkpoint, load_pretrained_backbone, prepare_run_folder)
from utils.cli import run_main
from utils.config import Config, load_config
from utils.engine import MetricLogger, NonFiniteLossError, Run, TrainState, fit, prepare_batch, rec_losses
from utils.evaluation import evaluate
from utils.logger import setup_logger
from utils.optim import Recipe
from utils.visualize import evaluate_samples, evaluation_sheet, sample_across_images

log = logging.getLogger("rec")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (config/<dataset>.yaml)")
    parser.add_argument("--resume", default="", help="checkpoint to continue from (usually LOG_PATH/last.pth)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a LOG_PATH that holds another run's checkpoints, replacing them")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even where the config changes what the checkpoint's model computes")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    device = dist_utils.local_device(args.device)
    ckpt = resume_checkpoint(args.resume, cfg, args.allow_config_change) if args.resume else None
    with prepare_run_folder(cfg.LOG_PATH, "LOG_PATH", [os.path.join(cfg.LOG_PATH, name) for name in
                                                       ("last.pth", "best.pth")], args.resume, args.overwrite):
        return train(args, cfg, device, ckpt)


def resume_checkpoint(path: str, cfg: Config, allow_config_change: bool) -> dict:
    """The training checkpoint ``path``, checked before anything is spent: written by train.py, and
    trained with a config that computes what ``cfg`` does (see ``check_model_config``)."""
    ckpt = load_checkpoint(path, "checkpoint to resume")
    if ckpt.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path} is not a training checkpoint of this project (a reference "
                                      "checkpoint can be evaluated with test.py, not resumed)")
    check_model_config(cfg, config_from_checkpoint(ckpt, path), path, allow_config_change)
    return ckpt


def train(args: argparse.Namespace, cfg: Config, device: torch.device, ckpt: dict | None) -> int:
    distributed = dist_utils.init_distributed(device, cfg.DIST_BACKEND)
    is_main = dist_utils.is_main()
    setup_logger(cfg.LOG_PATH, "train", is_main)
    torch.manual_seed(cfg.SEED + dist_utils.rank())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if is_main:
        cfg.dump(os.path.join(cfg.LOG_PATH, "config.yaml"))
    log.info("device %s, %d process(es); config %s", device, dist_utils.world_size(), args.config)

    if cfg.train_ann_path != cfg.ann_path:
        check_training_file(cfg.train_ann_path, cfg.ann_path, cfg.TRAIN_SPLIT, cfg.DATASET, cfg.image_path)
    train_set = RefDataset(cfg, cfg.TRAIN_SPLIT, cfg.train_ann_path)
    val_set = RefDataset(cfg, cfg.VAL_SPLIT)
    if train_set.vocab != val_set.vocab:
        raise DataError(f"{cfg.train_ann_path} (TRAIN_ANN_PATH) and {cfg.ann_path} (ANN_PATH) give different "
                        "vocabularies: train on a file whose expressions are ANN_PATH's")
    train_items = training_entries(train_set, cfg.PSEUDO_LABEL_KEEP, cfg.PSEUDO_LABEL_WEIGHTING)
    if train_items is not train_set:
        log.info("training on %d of the %d entries of %s, those of largest margin (PSEUDO_LABEL_KEEP %g), %s",
                 len(train_items), len(train_set), cfg.train_ann_path, cfg.PSEUDO_LABEL_KEEP,
                 "weighted by margin rank" if cfg.PSEUDO_LABEL_WEIGHTING == "margin" else "unweighted")
    train_loader = build_loader(cfg, train_items, train=True, distributed=distributed)
    val_loader = build_loader(cfg, val_set, train=False, distributed=distributed)
    vocab = train_set.vocab
    vectors = load_word_vectors(cfg, vocab, cfg.ann_path) if cfg.USE_GLOVE else None

    model = build_model(cfg, vectors, len(vocab), vocab)
    load_pretrained_backbone(model.visual_encoder, cfg.PRETRAIN_WEIGHT)
    model.to(device)
    if cfg.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    state = TrainState.create(model, Recipe.rec(cfg), len(train_loader), cfg.AMP, device)
    if ckpt is not None:
        if ckpt["vocab"] != list(vocab):
            raise CheckpointMismatchError(f"{args.resume} was trained with another vocabulary (another annotation "
                                          "file?)")
        state.restore(ckpt, args.resume)
        log.info("resumed from %s: epoch %d, batch %d, step %d", args.resume, state.epoch, state.batch_in_epoch,
                 state.step)

    train_model = model
    if distributed:
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.COMPILE:
        train_model = torch.compile(train_model)
    detector_cache = DetectorCache(cfg.CACHE_DETECTOR_MAX_MB) if cfg.CACHE_DETECTOR else None
    logger = MetricLogger(cfg.PRINT_FREQ, os.path.join(cfg.LOG_PATH, "tensorboard"), log.info)
    vis_indices = sample_across_images([entry["iid"] for entry in val_set.entries], cfg.VIS_SAMPLES, cfg.SEED)

    def losses(batch: dict) -> dict[str, torch.Tensor]:
        batch = prepare_batch(train_model, batch, device, cfg.CHANNELS_LAST, detector_cache, cfg.AMP,
                              mean_std=(cfg.MEAN, cfg.STD))
        return rec_losses(train_model, batch, cfg.AMP, device)

    def validate(eval_model: torch.nn.Module) -> float:
        result = evaluate(eval_model, val_loader, device, (cfg.MEAN, cfg.STD), cfg.AMP, cfg.CHANNELS_LAST,
                          detector_cache=detector_cache)
        log.info("epoch %d: %s Acc@0.5 %.2f (n=%d)", state.epoch, cfg.VAL_SPLIT, result["acc"], result["n"])
        # At the global step, so that accuracy and losses share one axis.
        logger.scalar(f"val/{cfg.VAL_SPLIT}_acc", result["acc"], state.step)
        if vis_indices and dist_utils.is_main():
            sheet = evaluation_sheet(evaluate_samples(eval_model, val_set, vis_indices, device, (cfg.MEAN, cfg.STD),
                                                      cfg.AMP))
            logger.image(f"val/{cfg.VAL_SPLIT}_predictions", sheet[..., ::-1].copy(), state.step)
        return result["acc"]

    run = Run(cfg.LOG_PATH, cfg.EPOCHS, cfg.SEED, cfg.GRAD_NORM_CLIP, log.info,
              extra={"format": FORMAT, "config": cfg.to_dict(), "vocab": list(vocab)},
              validate=validate, validate_every=cfg.EVAL_EVERY)
    try:
        code = fit(state, train_loader, losses, logger, run)
    except NonFiniteLossError as err:
        log.error("%s", err)
        return 1
    finally:
        logger.close()
        dist_utils.cleanup()
    if code == 0:
        log.info("done: best %s Acc@0.5 %.2f; checkpoints in %s", cfg.VAL_SPLIT, state.best_acc, cfg.LOG_PATH)
    return code


if __name__ == "__main__":
    run_main(main, get_args_parser())
