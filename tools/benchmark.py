"""Throughput of the training step, the evaluation forward and the data loader, measured
against the frozen detector's forward, the floor under every step.

    python -m tools.benchmark [--device cpu|cuda] [--batch N] [--size 416] [--amp none|bf16|fp16]
                              [--channels-last] [--compile] [--runs 7] [--workers N]
                              [--compare config/refclip/refcoco.yaml,config/apl/refcoco.yaml] [--loader-only]
                              [KEY=VALUE ...]

The model is the refcoco one (``--config``, KEY=VALUE overrides as in train.py) with random
weights, fed random images and random token ids; ``--compare`` times other configs' models the
same way (RefCLIP, APL) and reports their ratios next to it. The loader part reads COCO-sized
stand-in data generated in a temporary folder. One JSON object is printed; ``--loader-only`` times
the loader alone.

What is timed, each after warm-up, as the median over ``--runs`` rounds:

- ``backbone``: the full detector forward, all three heads, under no_grad: what the reference
  runs every step. Timed in train mode (its BatchNorms use batch statistics, as in the
  reference's training) to compare with the training step, and in eval mode to compare with the
  evaluation forward.
- ``backbone_trunk``: the detector up to its stride-32 head only, the part the model runs (the
  other two heads' boxes are read by nothing).
- ``train_step``: ``utils.engine.train_step``: forward, backward, gradient clipping, the
  optimizer train.py builds, the per-step scheduler and the EMA update.
- ``eval_forward``: the model's evaluation forward (boxes from the first expression).
- ``loader``: the data loader alone on 640 x 480 JPEGs (``datasets/refcoco_sized.py``) at
  ``--size``: one worker's rate (``samples_per_s_one_worker``, ``RefDataset.__getitem__`` in a
  loop), batches from ``build_loader`` with ``--workers`` processes (on CUDA, copied to the device as
  training does), and the bytes a sample ships (uint8 images: normalised on the device).

The timings of one round are taken back to back, so the ratios (``train_step_over_backbone``,
``eval_over_backbone`` and the ``_trunk`` ones) are medians of per-round ratios: on a shared
machine, load that slows one round slows both sides of its ratio. The backbone is timed with the
same settings as the step (AMP, channels-last, torch.compile). ``best_of_runs`` gives the
ratios of the fastest runs too, the better estimate on a machine shared with bursty load.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import tempfile
import time
from typing import Callable, Iterator

import torch

from datasets.tokens import SPECIAL_TOKENS, tokenize
from models import build_model
from models.apl import APL_COLOURS
from utils.config import Config, load_config
from utils.ema import ModelEMA
from utils.engine import autocast, train_step
from utils.optim import Recipe, build_optimizer, build_scheduler

VOCAB_SIZE = 2000
# The loader part reads 85 COCO-sized images (212 training entries) of RefCOCO-sized stand-in data.
LOADER_FRACTION = 0.005
LOADER_SAMPLES_ONE_WORKER = 200
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: CUDA when present)")
    parser.add_argument("--batch", type=int, default=4, help="samples per step")
    parser.add_argument("--size", type=int, default=416, help="input side (a multiple of 32)")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="mixed precision")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--runs", type=int, default=7, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (3 more with --compile)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: NUM_WORKER)")
    parser.add_argument("--loader-batches", type=int, default=30,
                        help="batches timed in the loader part (0 skips it)")
    parser.add_argument("--loader-only", action="store_true", help="time the data loader alone")
    parser.add_argument("--config", default=os.path.join(ROOT, "config", "refcoco.yaml"))
    parser.add_argument("--compare", default="",
                        help="comma-separated configs timed the same way after --config, each reported by "
                             "its ratios under 'compare' (e.g. config/refclip/refcoco.yaml,config/apl/refcoco.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def model_config(args: argparse.Namespace, path: str | None = None) -> Config:
    return load_config(path or args.config, [
        "PRETRAIN_WEIGHT=none", "USE_GLOVE=false", f"INPUT_SHAPE=[{args.size}, {args.size}]",
        f"BATCH_SIZE={args.batch}", f"AMP={args.amp}", f"CHANNELS_LAST={str(args.channels_last).lower()}",
        f"COMPILE={str(args.compile).lower()}", *args.overrides])


def benchmark_vocab(cfg: Config) -> list[str]:
    """VOCAB_SIZE tokens holding APL's colour words and the detector's class names (so that APL's
    prompts look up real ids), then filler words."""
    words = list(dict.fromkeys([*SPECIAL_TOKENS, *APL_COLOURS,
                                *(token for name in cfg.DETECTOR_CLASS_NAMES for token in tokenize(name))]))
    return words + [f"word{i}" for i in range(VOCAB_SIZE - len(words))]


def random_batch(cfg: Config, batch: int, device: torch.device, generator: torch.Generator) -> dict:
    """Normalised-looking images and token ids ``[B, NUM_REFS, MAX_TOKEN]`` with 0-padded tails."""
    size = cfg.INPUT_SHAPE[0]
    images = torch.randn(batch, 3, size, size, generator=generator)
    refs = torch.randint(3, VOCAB_SIZE, (batch, cfg.NUM_REFS, cfg.MAX_TOKEN), generator=generator)
    lengths = torch.randint(1, cfg.MAX_TOKEN + 1, (batch, cfg.NUM_REFS, 1), generator=generator)
    refs[torch.arange(cfg.MAX_TOKEN).expand_as(refs) >= lengths] = 0
    if cfg.CHANNELS_LAST:
        images = images.contiguous(memory_format=torch.channels_last)
    return {"image": images.to(device), "refs": refs.to(device)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_rounds(phases: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                runs: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds of each phase in each round (phases interleaved), and each phase's peak memory."""
    for _ in range(warmup):
        for fn in phases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in phases}
    peaks: dict[str, float] = {}
    for _ in range(runs):
        for name, fn in phases.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(_seconds(fn, device))
            peaks[name] = max(peaks.get(name, 0.0), _peak_memory_mib(device))
    return times, peaks


def _ratio(numerator: list[float], denominator: list[float]) -> float:
    return round(statistics.median(n / d for n, d in zip(numerator, denominator)), 3)


def _best_ratio(numerator: list[float], denominator: list[float]) -> float:
    return round(min(numerator) / min(denominator), 3)


def benchmark_model(cfg: Config, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg, None, VOCAB_SIZE, benchmark_vocab(cfg)).to(device)
    if cfg.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    ema = ModelEMA(model, cfg.EMA_DECAY)
    recipe = Recipe.rec(cfg)  # the optimizer and schedule train.py trains with
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, 1000, recipe)
    scaler = torch.amp.GradScaler(device.type) if cfg.AMP == "fp16" else None
    run_model = torch.compile(model) if cfg.COMPILE else model
    run_backbone = torch.compile(model.visual_encoder) if cfg.COMPILE else model.visual_encoder
    batch = random_batch(cfg, args.batch, device, torch.Generator().manual_seed(cfg.SEED))
    images, refs = batch["image"], batch["refs"]
    warmup = args.warmup + (3 if cfg.COMPILE else 0)

    def backbone(heads: tuple[int, ...]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad(), autocast(device, cfg.AMP):
                return run_backbone(images, heads=heads)
        return run

    def step() -> object:
        return train_step(run_model, batch, optimizer, scheduler, ema, scaler, cfg.GRAD_NORM_CLIP,
                          cfg.AMP, device)

    def evaluate() -> object:
        with torch.no_grad(), autocast(device, cfg.AMP):
            return run_model(images, refs)

    model.train()
    train_times, train_peaks = time_rounds(
        {"backbone": backbone((0, 1, 2)), "backbone_trunk": backbone((0,)), "train_step": step},
        device, warmup, args.runs)
    model.eval()
    eval_times, eval_peaks = time_rounds(
        {"backbone": backbone((0, 1, 2)), "backbone_trunk": backbone((0,)), "eval_forward": evaluate},
        device, warmup, args.runs)

    def rate(seconds: list[float]) -> float:
        return round(args.batch / statistics.median(seconds), 3)

    return {
        "samples_per_s": {
            "backbone_train_mode": rate(train_times["backbone"]),
            "backbone_trunk_train_mode": rate(train_times["backbone_trunk"]),
            "train_step": rate(train_times["train_step"]),
            "backbone_eval_mode": rate(eval_times["backbone"]),
            "backbone_trunk_eval_mode": rate(eval_times["backbone_trunk"]),
            "eval_forward": rate(eval_times["eval_forward"]),
        },
        "train_step_over_backbone": _ratio(train_times["train_step"], train_times["backbone"]),
        "eval_over_backbone": _ratio(eval_times["eval_forward"], eval_times["backbone"]),
        "train_step_over_backbone_trunk": _ratio(train_times["train_step"], train_times["backbone_trunk"]),
        "eval_over_backbone_trunk": _ratio(eval_times["eval_forward"], eval_times["backbone_trunk"]),
        # Fastest run over fastest run: where other processes share the machine in bursts, the
        # runs that no burst slowed are the nearest to what the code itself costs.
        "best_of_runs": {
            "train_step_over_backbone": _best_ratio(train_times["train_step"], train_times["backbone"]),
            "eval_over_backbone": _best_ratio(eval_times["eval_forward"], eval_times["backbone"]),
            "seconds": {f"{phase}_{mode}": round(min(times[phase]), 4)
                        for mode, times in (("train_mode", train_times), ("eval_mode", eval_times))
                        for phase in times},
        },
        "peak_memory_mib": (
            {"kind": "cuda_max_allocated", "train_step": round(train_peaks["train_step"], 1),
             "eval_forward": round(eval_peaks["eval_forward"], 1),
             "backbone": round(max(train_peaks["backbone"], eval_peaks["backbone"]), 1)}
            if device.type == "cuda" else
            {"kind": "process_max_rss", "all": round(max(train_peaks.values()), 1)}),
    }


def _synthetic_config(args: argparse.Namespace, paths: dict) -> Config:
    path = os.path.join(ROOT, "config", "synthetic", "quickstart.yaml")
    overrides = [f"ANN_PATH={{synthetic: {paths['annotations']}}}", f"IMAGE_PATH={{synthetic: {paths['images']}}}",
                 f"INPUT_SHAPE=[{args.size}, {args.size}]", "USE_GLOVE=false"]
    if not os.path.isfile(path):
        path, overrides = args.config, ["DATASET=synthetic", *overrides]
    if args.workers is not None:
        overrides.append(f"NUM_WORKER={args.workers}")
    return load_config(path, overrides)


def benchmark_loader(args: argparse.Namespace, device: torch.device) -> dict:
    """The loader alone, on COCO-sized JPEGs (``datasets/refcoco_sized.py``): one worker's rate
    (``__getitem__`` in a loop), then batches out of ``build_loader`` with ``--workers`` processes."""
    if args.loader_batches < 1:
        return {"skipped": "--loader-batches 0"}
    from datasets import RefDataset, build_loader
    from datasets.refcoco_sized import IMAGE_SIZE, generate
    with tempfile.TemporaryDirectory(prefix="rec-bench-") as root:
        paths = generate(root, LOADER_FRACTION, seed=0)
        cfg = _synthetic_config(args, paths)
        dataset = RefDataset(cfg, cfg.TRAIN_SPLIT)
        if len(dataset) < args.batch:
            return {"skipped": f"the training split has {len(dataset)} samples, fewer than one batch of {args.batch}"}
        sample = dataset[0]
        for i in range(8):  # warm-up: the page cache
            dataset[i % len(dataset)]
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(LOADER_SAMPLES_ONE_WORKER):
            dataset[i % len(dataset)]
        per_worker = LOADER_SAMPLES_ONE_WORKER / (time.perf_counter() - start)
        # Per CPU second: what a worker with a core of its own delivers, whatever else runs meanwhile.
        per_worker_cpu = LOADER_SAMPLES_ONE_WORKER / (time.process_time() - cpu)
        loader = build_loader(cfg, dataset, train=True, batch_size=args.batch)
        batches = _endless(loader)
        start = time.perf_counter()
        _deliver(next(batches), device)  # worker start-up and the first batch
        first = time.perf_counter() - start
        start = time.perf_counter()
        for batch in itertools.islice(batches, args.loader_batches):
            _deliver(batch, device)
        _sync(device)
        seconds = time.perf_counter() - start
        result = {"samples_per_s": round(args.loader_batches * args.batch / seconds, 3),
                  "samples_per_s_one_worker": round(per_worker, 1),
                  "samples_per_cpu_s_one_worker": round(per_worker_cpu, 1),
                  "bytes_per_sample": sum(v.numel() * v.element_size() for v in sample.values() if torch.is_tensor(v)),
                  "image_bytes_per_sample": sample["image"].numel() * sample["image"].element_size(),
                  "first_batch_s": round(first, 3), "batches": args.loader_batches,
                  "workers": cfg.NUM_WORKER, "pin_memory": loader.pin_memory,
                  "prefetch_factor": loader.prefetch_factor, "source_image_size": list(IMAGE_SIZE),
                  "source_jpeg_kib": round(statistics.mean(
                      os.path.getsize(os.path.join(paths["images"], name)) for name in os.listdir(paths["images"]))
                      / 1024, 1)}
        # Stop the (persistent) workers before their image folder is deleted.
        batches.close()
        del batches, loader
        return result


def _endless(loader: torch.utils.data.DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


def _deliver(batch: dict, device: torch.device) -> None:
    """What training does with a batch before the step: tensors onto the device."""
    for value in batch.values():
        if torch.is_tensor(value):
            value.to(device, non_blocking=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = model_config(args)
    result = {
        "device": device_name(device),
        "settings": {"batch": args.batch, "size": args.size, "amp": args.amp,
                     "channels_last": args.channels_last, "compile": args.compile, "runs": args.runs,
                     "warmup": args.warmup, "config": os.path.relpath(args.config, ROOT),
                     "overrides": args.overrides, "optimizer": cfg.OPT, "optimizer_params": cfg.OPT_PARAMS,
                     "torch": torch.__version__},
    }
    if args.loader_only:
        result["loader"] = benchmark_loader(args, device)
        print(json.dumps(result, indent=2))
        return result
    result.update(benchmark_model(cfg, args, device))
    result["compare"] = {}
    for path in filter(None, args.compare.split(",")):
        timed = benchmark_model(model_config(args, path), args, device)
        result["compare"][os.path.relpath(os.path.abspath(path), ROOT)] = {
            key: timed[key] for key in ("train_step_over_backbone", "eval_over_backbone", "samples_per_s",
                                        "best_of_runs")}
    result["loader"] = benchmark_loader(args, device)
    if "samples_per_s" in result["loader"]:
        result["loader"]["over_train_step"] = round(
            result["loader"]["samples_per_s"] / result["samples_per_s"]["train_step"], 3)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
