"""Pretrain the frozen detector (YOLOv3 with guided-anchor heads) on COCO-format detection data.

    python pretrain.py --config config/synthetic/quickstart.yaml [KEY=VALUE ...] [--resume DET_LOG_PATH/last.pth] [--overwrite]
    torchrun --nproc_per_node=8 pretrain.py --config config/refcoco.yaml

The reference ships its detector only as a weight file (``yolov3_coco.pth``, made from COCO
without the images of RefCOCO/+/g's val and test splits); this script makes one. It trains on
DET_ANN_PATH minus the REC val/test images (``datasets/detection.py``) with the loss of
``models/detection_loss.py``, on the loop train.py runs (``utils.engine.fit``: the same sampler,
optimizer builder, schedule, EMA, atomic checkpoints, Ctrl-C / SIGTERM save and ``--resume``),
with the DETECTOR keys of the config. It then measures mAP@0.5 on DET_VAL_ANN_PATH
(``utils/metrics.py``), prints ``mAP@0.5: XX.X`` and writes DET_OUTPUT with exactly the keys of the
reference's weight file, ready to be used as PRETRAIN_WEIGHT. Checkpoints (``last.pth``), the
metrics JSON, the log and TensorBoard events go to DET_LOG_PATH, which one run at a time owns
(``run.lock``, see utils/run_lock.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from datasets import build_loader, normalize_images
from datasets.detection import build_detection_datasets, collate_detections
from models.detection_loss import detection_loss
from models.detector import YOLOv3
from models.reference_keys import detector_weight_file_state_dict
from utils import distributed as dist_utils
from utils.checkpoint import CheckpointMismatchError, load_checkpoint, prepare_run_folder, save_atomic
from utils.cli import run_main
from utils.config import Config, load_config
from utils.engine import MetricLogger, NonFiniteLossError, Run, TrainState, autocast, fit
from utils.logger import setup_logger
from utils.metrics import evaluate_map
from utils.optim import Recipe
from utils.paths import prepare_output_file

log = logging.getLogger("rec")

FORMAT = "detector-pretrain-v1"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (e.g. config/synthetic/quickstart.yaml)")
    parser.add_argument("--resume", default="", help="checkpoint to continue from (usually DET_LOG_PATH/last.pth)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh where another run's checkpoint or DET_OUTPUT is, replacing them")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def build_detector(cfg: Config) -> YOLOv3:
    """A fresh detector of the config's shape: objectness biases at logit(DET_OBJECTNESS_PRIOR), class
    biases at logit(1 / CLASS_NUM), and the offsets of the deformable convolutions near zero (guided
    anchoring's initialisation), so that they start as plain 3x3 convolutions instead of sampling
    at random places, cells away on the coarse grids."""
    model = YOLOv3(cfg.CLASS_NUM, cfg.ANCHORS, cfg.ANCH_MASK, cfg.VIS_WIDTH, cfg.SPP_KERNELS, cfg.VIS_MIN_CHANNELS)
    prior = cfg.DET_OBJECTNESS_PRIOR
    with torch.no_grad():
        for head in model.heads:
            torch.nn.init.normal_(head.adaption.offset.weight, std=0.01)
            torch.nn.init.zeros_(head.adaption.offset.bias)
            bias = head.pred.bias.view(-1, head.num_outputs)
            bias[:, 4] = math.log(prior / (1 - prior))
            bias[:, 5:] = -math.log(max(cfg.CLASS_NUM - 1, 1))
    return model


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    device = dist_utils.local_device(args.device)
    prepare_output_file(cfg.DET_OUTPUT, "DET_OUTPUT")
    with prepare_run_folder(cfg.DET_LOG_PATH, "DET_LOG_PATH", [os.path.join(cfg.DET_LOG_PATH, "last.pth"),
                                                               cfg.DET_OUTPUT], args.resume, args.overwrite):
        return pretrain(args, cfg, device)


def pretrain(args: argparse.Namespace, cfg: Config, device: torch.device) -> int:
    distributed = dist_utils.init_distributed(device, cfg.DIST_BACKEND)
    is_main = dist_utils.is_main()
    setup_logger(cfg.DET_LOG_PATH, "pretrain", is_main)
    torch.manual_seed(cfg.SEED + dist_utils.rank())
    if is_main:
        cfg.dump(os.path.join(cfg.DET_LOG_PATH, "config.yaml"))

    train_set, val_set = build_detection_datasets(cfg)
    log.info("detector pretraining on %d images of %s (%d left out), mAP on %d images of %s",
             len(train_set), cfg.DET_ANN_PATH, train_set.num_excluded, len(val_set), cfg.DET_VAL_ANN_PATH)
    loader = build_loader(cfg, train_set, train=True, batch_size=cfg.DET_BATCH_SIZE, distributed=distributed,
                          collate_fn=collate_detections)

    model = build_detector(cfg).to(device)
    state = TrainState.create(model, Recipe.detector(cfg), len(loader), cfg.AMP, device)
    if args.resume:
        ckpt = load_checkpoint(args.resume, "checkpoint to resume")
        if ckpt.get("format") != FORMAT:
            raise CheckpointMismatchError(f"{args.resume} is not a detector pretraining checkpoint of this project")
        state.restore(ckpt, args.resume)
        log.info("resumed from %s: epoch %d, batch %d, step %d", args.resume, state.epoch, state.batch_in_epoch,
                 state.step)
    train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if distributed else model
    logger = MetricLogger(cfg.PRINT_FREQ, os.path.join(cfg.DET_LOG_PATH, "tensorboard"), log.info, tag="pretrain")

    def losses(batch: dict) -> dict[str, torch.Tensor]:
        images = normalize_images(batch["image"].to(device, non_blocking=True), cfg.MEAN, cfg.STD)
        with autocast(device, cfg.AMP):
            _, raw = train_model(images, decode=False)
        return detection_loss(model, raw, batch["targets"], cfg.DET_IGNORE_IOU, cfg.DET_CLS_WEIGHT)

    start = time.perf_counter()
    try:
        code = fit(state, loader, losses, logger, Run(cfg.DET_LOG_PATH, cfg.DET_EPOCHS, cfg.SEED,
                                                      cfg.DET_GRAD_NORM_CLIP, log.info,
                                                      extra={"format": FORMAT, "config": cfg.to_dict()}))
        if code:
            return code
        train_seconds = time.perf_counter() - start
        result = evaluate_map(state.eval_model, val_set, cfg, device, distributed)
        logger.scalar("pretrain/val_mAP@0.5", 100 * result["mAP@0.5"], state.step)  # percent, as printed
        if is_main:
            save_atomic(detector_weight_file_state_dict(state.eval_model), cfg.DET_OUTPUT)
            result.update(step=state.step, train_images=len(train_set), train_seconds=train_seconds,
                          weights=cfg.DET_OUTPUT)
            with open(os.path.join(cfg.DET_LOG_PATH, "metrics.json"), "w") as f:
                json.dump(result, f, indent=1)
            log.info("wrote %s (step %d, %.0f s of training)", cfg.DET_OUTPUT, state.step, train_seconds)
            print(f"mAP@0.5: {100 * result['mAP@0.5']:.1f}")
        dist_utils.barrier()
    except NonFiniteLossError as err:
        log.error("%s", err)
        return 1
    finally:
        logger.close()
        dist_utils.cleanup()
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
