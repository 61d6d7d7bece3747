"""The whole method on a 2-core CPU, from nothing: synthetic data, detector, REC model, results.

    python quickstart.py

1. generates the synthetic referring dataset (``datasets/synthetic.py``) unless it exists;
2. pre-trains the YOLOv3 detector on its training images (``pretrain.py``) unless the weights exist;
3. trains the weakly supervised REC model (``train.py``), resuming an unfinished run;
4. evaluates every split with two text-blind baselines and draws a few predictions (``test.py``).

Each stage reuses what an earlier run produced, unless what it was made from is newer (regenerated
data, a retrained detector). The last line printed is ``results: PATH``, a JSON
file ``{split: {"acc", "n"}, ..., "baselines": {...}}``. ``--mini`` runs a miniature (a few images
and steps) to check the pipeline, as CI does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from utils.checkpoint import completed_epochs
from utils.cli import run_python
from utils.config import load_config

# The demo's data: 2100 training images; the evaluation splits hold 60 images (about 470 expressions)
# each, as evaluation runs the detector once per image and each expression costs little more.
DATA = {"images": 2280, "eval_images": 60}
# A pipeline check, not a result: a few images, a few steps.
MINI = {
    "images": 24, "image_size": 96,
    "overrides": ["INPUT_SHAPE=[96, 96]", "SELECT_NUM=4", "EPOCHS=1", "WARMUP=0", "BATCH_SIZE=4", "NUM_WORKER=0",
                  "DET_EPOCHS=1", "DET_BATCH_SIZE=4", "PRINT_FREQ=5"],
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/synthetic.yaml")
    parser.add_argument("--workdir", default="", help="where data, weights and logs go (default: as the config says)")
    parser.add_argument("--mini", action="store_true", help="a miniature run that checks the pipeline")
    parser.add_argument("--visualize", type=int, default=8, help="predictions to draw")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when present)")
    return parser


def stage(name: str, command: list[str]) -> None:
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.time()
    code = run_python(command)
    if code != 0:
        sys.exit(f"quickstart: stage '{name}' failed (exit {code}); fix the error above and "
                 "run the same command again: finished stages are reused")
    print(f"== {name}: done in {time.time() - start:.0f} s", flush=True)


def older(path: str, *sources: str) -> bool:
    """Whether ``path`` predates any of ``sources``: made from data or weights that were replaced since
    (regenerated data, a retrained detector), so it must be made again, not reused."""
    return any(os.path.getmtime(path) < os.path.getmtime(source) for source in sources)


def main(args: argparse.Namespace) -> int:
    overrides = list(MINI["overrides"]) if args.mini else []
    if args.workdir:
        work = os.path.abspath(args.workdir)
        overrides += [f"ANN_PATH={{synthetic: {work}/data/anns/synthetic.json}}",
                      f"IMAGE_PATH={{synthetic: {work}/data/images}}",
                      f"PRETRAIN_WEIGHT={work}/yolov3_synthetic.pth",
                      f"DET_ANN_PATH={work}/data/detection/instances_train.json",
                      f"DET_VAL_ANN_PATH={work}/data/detection/instances_val.json",
                      f"DET_IMAGE_PATH={work}/data/images",
                      f"DET_EXCLUDE_ANNS=[{work}/data/anns/synthetic.json]",
                      f"DET_OUTPUT={work}/yolov3_synthetic.pth",
                      f"DET_LOG_PATH={work}/logs/detector",
                      f"LOG_PATH={work}/logs"]
    cfg = load_config(args.config, overrides)
    device = ["--device", args.device] if args.device else []
    data_root = os.path.dirname(os.path.dirname(cfg.ann_path))

    generate = ["-m", "datasets.synthetic", "--out", data_root]
    if args.mini:
        generate += ["--num-images", str(MINI["images"]), "--image-size", str(MINI["image_size"])]
    else:
        generate += ["--num-images", str(DATA["images"]), "--eval-images", str(DATA["eval_images"])]
    stage("data", generate)

    manifest = os.path.join(data_root, "manifest.json")
    if os.path.isfile(cfg.PRETRAIN_WEIGHT) and not older(cfg.PRETRAIN_WEIGHT, manifest):
        print(f"== detector: reusing {cfg.PRETRAIN_WEIGHT}")
    else:
        # Made from older data, or never finished: made again, replacing what is there.
        stale = [cfg.DET_OUTPUT, os.path.join(cfg.DET_LOG_PATH, "last.pth")]
        overwrite = ["--overwrite"] if any(os.path.exists(path) for path in stale) else []
        stage("detector", ["pretrain.py", "--config", args.config, *overwrite, *device, *overrides])

    last, best = os.path.join(cfg.LOG_PATH, "last.pth"), os.path.join(cfg.LOG_PATH, "best.pth")
    current = os.path.isfile(last) and not older(last, manifest, cfg.PRETRAIN_WEIGHT)
    finished = current and completed_epochs(last) >= cfg.EPOCHS
    if finished and os.path.isfile(best):
        print(f"== train: reusing {best}")
    else:
        # An unfinished current run is continued; one made from older data or weights is replaced.
        if current:
            resume = ["--resume", last]
        else:
            resume = ["--overwrite"] if os.path.exists(last) or os.path.exists(best) else []
        stage("train", ["train.py", "--config", args.config, *resume, *device, *overrides])

    results = os.path.join(cfg.LOG_PATH, "results.json")
    stage("evaluate", ["test.py", "--config", args.config, "--eval-weights", best, "--baselines",
                       "--out-json", results, "--visualize", str(args.visualize),
                       "--vis-dir", os.path.join(cfg.LOG_PATH, "vis"), *device, *overrides])
    with open(results) as f:
        scores = json.load(f)
    best_baseline = {split: max(b[split]["acc"] for b in scores["baselines"].values())
                     for split in scores if split != "baselines"}
    print("Acc@0.5 (%) of the model and of the better text-blind baseline:")
    for split, best_acc in best_baseline.items():
        print(f"  {split:<8} model {scores[split]['acc']:6.2f}   baseline {best_acc:6.2f}   n={scores[split]['n']}")
    print(f"results: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
