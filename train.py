"""Train the weakly supervised REC model.

    python train.py --config config/refcoco.yaml [KEY=VALUE ...] [--resume logs/refcoco/last.pth]
    torchrun --nproc_per_node=8 train.py --config config/refcoco.yaml

Each epoch trains on TRAIN_SPLIT, validates the EMA weights on VAL_SPLIT and
writes ``last.pth`` and ``best.pth`` (atomically) in LOG_PATH, beside the
resolved config, a log file and TensorBoard events.
"""
from __future__ import annotations

import argparse
import logging
import os

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from datasets import RefDataset, build_loader, load_word_vectors
from models import CheckpointMismatchError, DetectorCache, build_model, load_pretrained_backbone
from utils import distributed as dist_utils
from utils.checkpoint import FORMAT, load_checkpoint, restore_training_state, rng_state, save_atomic
from utils.config import Config, ConfigError, load_config
from utils.ema import ModelEMA
from utils.engine import NonFiniteLossError, StopRequest, evaluate, train_one_epoch
from utils.cli import run_main
from utils.logger import setup_logger
from utils.scheduler import build_scheduler
from utils.visualize import evaluate_samples, evaluation_sheet, sample_across_images

log = logging.getLogger("rec")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (config/<dataset>.yaml)")
    parser.add_argument("--resume", default="", help="checkpoint to continue from (usually LOG_PATH/last.pth)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # The multi-tensor implementation: the same updates as the per-parameter loop, far fewer kernels.
    options = {"foreach": True, **cfg.OPT_PARAMS}
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    optimizers = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
    if cfg.OPT not in optimizers:
        raise ConfigError(f"OPT must be one of {sorted(optimizers)}, got {cfg.OPT!r}")
    return optimizers[cfg.OPT](params, lr=cfg.LR, weight_decay=cfg.WEIGHT_DECAY, **options)


def checkpoint_dict(model, ema, optimizer, scheduler, scaler, cfg, vocab, epoch, step, batch_in_epoch,
                    best_acc) -> dict:
    """What ``--resume`` needs to continue exactly, and what test.py / predict.py need to run:
    ``state_dict`` holds the weights to evaluate (the EMA's when USE_EMA, as the reference saves)."""
    weights = model.state_dict()
    return {
        "format": FORMAT,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "step": step,
        "state_dict": ema.module.state_dict() if ema is not None else weights,
        "model": weights,
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "lr": optimizer.param_groups[0]["lr"],
        "best_acc": best_acc,
        "rng": rng_state(),
        "config": cfg.to_dict(),
        "vocab": list(vocab),
    }


def save(obj: dict, path: str) -> None:
    try:
        save_atomic(obj, path)
    except OSError as err:
        raise OSError(f"could not write checkpoint {path} ({err}); any earlier file there is intact") from err
    log.info("saved %s (epoch %d, step %d)", path, obj["epoch"], obj["step"])


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    device = dist_utils.local_device(args.device)
    distributed = dist_utils.init_distributed(device, cfg.DIST_BACKEND)
    is_main = dist_utils.is_main()
    setup_logger(cfg.LOG_PATH, "train", is_main)
    torch.manual_seed(cfg.SEED + dist_utils.rank())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if is_main:
        os.makedirs(cfg.LOG_PATH, exist_ok=True)
        cfg.dump(os.path.join(cfg.LOG_PATH, "config.yaml"))
    log.info("device %s, %d process(es); config %s", device, dist_utils.world_size(), args.config)

    train_set = RefDataset(cfg, cfg.TRAIN_SPLIT)
    val_set = RefDataset(cfg, cfg.VAL_SPLIT)
    train_loader = build_loader(cfg, train_set, train=True, distributed=distributed)
    val_loader = build_loader(cfg, val_set, train=False, distributed=distributed)
    vocab = train_set.vocab
    vectors = load_word_vectors(cfg, vocab, cfg.ann_path) if cfg.USE_GLOVE else None

    model = build_model(cfg, vectors, len(vocab), vocab)
    load_pretrained_backbone(model.visual_encoder, cfg.PRETRAIN_WEIGHT)
    model.to(device)
    if cfg.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    ema = ModelEMA(model, cfg.EMA_DECAY) if cfg.USE_EMA else None
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, len(train_loader), cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.AMP == "fp16" else None
    detector_cache = DetectorCache() if cfg.CACHE_DETECTOR else None

    start_epoch, start_batch, step, best_acc = 0, 0, 0, -1.0
    if args.resume:
        ckpt = load_checkpoint(args.resume, "checkpoint to resume")
        if ckpt.get("format") != FORMAT:
            raise CheckpointMismatchError(f"{args.resume} is not a training checkpoint of this project (a reference "
                               "checkpoint can be evaluated with test.py, not resumed)")
        if ckpt["vocab"] != list(vocab):
            raise CheckpointMismatchError(f"{args.resume} was trained with another vocabulary (another annotation file?)")
        restore_training_state(ckpt, args.resume, model, ema, optimizer, scheduler, scaler)
        start_epoch, start_batch, step, best_acc = (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"],
                                                    ckpt["best_acc"])
        log.info("resumed from %s: epoch %d, batch %d, step %d", args.resume, start_epoch, start_batch, step)

    train_model = model
    if distributed:
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.COMPILE:
        train_model = torch.compile(train_model)

    writer = SummaryWriter(os.path.join(cfg.LOG_PATH, "tensorboard")) if is_main else None
    vis_indices = sample_across_images([entry["iid"] for entry in val_set.entries], cfg.VIS_SAMPLES, cfg.SEED)
    stop = StopRequest()
    stop.install()
    last_path = os.path.join(cfg.LOG_PATH, "last.pth")

    def on_log(at_step: int, values: dict) -> None:
        log.info("step %d: %s", at_step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        if writer is not None:
            for key, value in values.items():
                writer.add_scalar(f"train/{key}", value, at_step)

    try:
        for epoch in range(start_epoch, cfg.EPOCHS):
            train_loader.sampler.set_epoch(epoch, start_batch)
            if start_batch == 0:
                # Each epoch's dropout draws depend on (seed, epoch, rank) only, so resuming at an
                # epoch boundary needs no saved generator state.
                torch.manual_seed(cfg.SEED + 1000 * epoch + dist_utils.rank())
            epoch_start_step = step - start_batch
            progress = tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}/{cfg.EPOCHS}",
                            disable=not is_main, dynamic_ncols=True, leave=False)
            step = train_one_epoch(train_model, train_loader, optimizer, scheduler, ema, scaler, cfg,
                                   device, step, on_log, progress, stop, detector_cache)
            progress.close()
            start_batch = 0
            if stop.requested:
                if is_main:
                    save(checkpoint_dict(model, ema, optimizer, scheduler, scaler, cfg, vocab, epoch, step,
                                         step - epoch_start_step, best_acc), last_path)
                log.info("stopped on request; continue with --resume %s", last_path)
                return 130
            if (epoch + 1) % cfg.EVAL_EVERY == 0 or epoch + 1 == cfg.EPOCHS:
                eval_model = ema.module if ema is not None else model
                result = evaluate(eval_model, val_loader, device, cfg.AMP, cfg.CHANNELS_LAST,
                                  detector_cache=detector_cache)
                log.info("epoch %d: %s Acc@0.5 %.2f (n=%d)", epoch + 1, cfg.VAL_SPLIT, result["acc"], result["n"])
                if writer is not None:
                    # At the global step, so that accuracy and losses share one axis.
                    writer.add_scalar(f"val/{cfg.VAL_SPLIT}_acc", result["acc"], step)
                    if vis_indices:
                        sheet = evaluation_sheet(evaluate_samples(eval_model, val_set, vis_indices, device, cfg.AMP))
                        writer.add_image(f"val/{cfg.VAL_SPLIT}_predictions", sheet[..., ::-1].copy(), step,
                                         dataformats="HWC")
                improved = result["acc"] > best_acc
                best_acc = max(best_acc, result["acc"])
            else:
                improved = False
            if is_main:
                state = checkpoint_dict(model, ema, optimizer, scheduler, scaler, cfg, vocab, epoch + 1, step,
                                        0, best_acc)
                save(state, last_path)
                if improved:
                    save(state, os.path.join(cfg.LOG_PATH, "best.pth"))
            dist_utils.barrier()
    except NonFiniteLossError as err:
        log.error("%s", err)
        return 1
    finally:
        if writer is not None:
            writer.close()
        dist_utils.cleanup()
    log.info("done: best %s Acc@0.5 %.2f; checkpoints in %s", cfg.VAL_SPLIT, best_acc, cfg.LOG_PATH)
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
