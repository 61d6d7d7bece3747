"""A rehearsal at RefCOCO's size: every stage of a run on data with RefCOCO's sizes (or a fraction of
them), timed, with its peak memory.

    python -m tools.scale_check --fraction 0.01 [--workers 2] [--steps 10] [--out-json scale.json]
                                [--config config/synthetic/quickstart.yaml] [KEY=VALUE ...]

The data (``datasets/refcoco_sized.py``: RefCOCO's images, objects and expressions per split times
``--fraction``, 640 x 480 JPEGs, a 10k-word Zipf vocabulary) is generated into ``--data`` (default:
a temporary folder, deleted after). The model is the reduced synthetic one (``--config``) with
random weights; nothing is learnt, only costs are measured. Stages, each with its wall time, its
CPU time (this process and its loader workers: on a shared machine the wall time measures the
other processes too) and the peak proportional resident memory (PSS, sampled every 50 ms) of this
process and its loader workers, whose pages shared with it count once:

- ``datasets``: building the train and val datasets and the vocabulary;
- ``word_vectors``: the embedding matrix of the full 10k-word vocabulary from GloVe 6B 50-d
  (``glove6b50``), built, then read back from its cache; the same from spaCy's vectors where spaCy
  is installed: from the vectors package ``--spacy-package`` if it is installed, otherwise from a
  made-up pipeline saved to the data folder beforehand (untimed) whose vectors table has
  en_core_web_lg's shape (500,000 x 300 random float32 vectors, keyed by made-up words that include
  the vocabulary's, so lookups hit); skipped without spaCy. The made-up words are not in GloVe:
  every lookup there misses, which costs what a hit does;
- ``loader``: ``--loader-batches`` training batches with ``NUM_WORKER`` workers;
- ``train_steps``: ``--steps`` training steps (forward, backward, optimizer, EMA);
- ``evaluate_val``: Acc@0.5 over val, the detector once per image;
- ``export_train``: the pseudo-label export of train (every expression of each entry).

A table is printed; ``--out-json`` writes the figures.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from datasets import RefDataset, build_loader, load_word_vectors
from datasets.refcoco_sized import generate, split_sizes, vocabulary_words
from datasets.tokens import SPECIAL_TOKENS
from models import build_model
from utils.config import load_config
from utils.engine import optimize, prepare_batch, rec_losses
from utils.evaluation import evaluate
from utils.ema import ModelEMA
from utils.optim import Recipe, build_optimizer, build_scheduler
from utils.pseudo_label_export import export_pseudo_labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TICKS = os.sysconf("SC_CLK_TCK")
# en_core_web_lg's vectors table holds 514,157 keys of 300 floats.
MADE_UP_SPACY_ROWS = 500_000
SPACY_WIDTH = 300


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.01, help="of RefCOCO's sizes (1: full size)")
    parser.add_argument("--data", default="", help="folder for the generated data (default: a temporary one)")
    parser.add_argument("--config", default=os.path.join(ROOT, "config", "synthetic", "quickstart.yaml"))
    parser.add_argument("--workers", type=int, default=2, help="loader workers (NUM_WORKER)")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed")
    parser.add_argument("--loader-batches", type=int, default=10, help="training batches the loader stage reads")
    parser.add_argument("--spacy-package", default="en_core_web_lg",
                        help="spaCy vectors package (300-d) for the word-vector rows (where it is not "
                             "installed: made-up vectors of en_core_web_lg's shape)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", default="")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def _descendants(pid: int) -> list[int]:
    try:
        children = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(child) for child in f.read().split()]
        return children + [d for child in children for d in _descendants(child)]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _pss(pid: int) -> int:
    """Proportional resident bytes: pages shared with the loader workers (forked) counted once overall."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return 0


def _cpu_ticks(pid: int, reaped: bool) -> int:
    """User + system ticks of ``pid`` (its threads), and with ``reaped`` of its children that have ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15 if reaped else 13])
    except (FileNotFoundError, ProcessLookupError):
        return 0


def memory_bytes() -> int:
    """Proportional resident memory of this process and its descendants (the loader workers)."""
    return sum(_pss(pid) for pid in [os.getpid(), *_descendants(os.getpid())])


def cpu_seconds() -> float:
    """CPU time of this process and its descendants, the ended ones included: unlike wall time, what
    the work costs whatever else shares the machine."""
    ticks = _cpu_ticks(os.getpid(), True) + sum(_cpu_ticks(pid, False) for pid in _descendants(os.getpid()))
    return ticks / _TICKS


class Stages:
    """Each stage's wall time, CPU time and peak memory (proportional resident set: this process
    and its loader workers)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    @contextmanager
    def stage(self, name: str, **details) -> Iterator[dict]:
        peak, stop = [memory_bytes()], threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], memory_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start, cpu = time.perf_counter(), cpu_seconds()
        row = {"stage": name, **details}
        try:
            yield row
        finally:
            row["seconds"] = round(time.perf_counter() - start, 3)
            row["cpu_seconds"] = round(cpu_seconds() - cpu, 3)
            stop.set()
            sampler.join()
            row["peak_mib"] = round(max(peak[0], memory_bytes()) / 2**20, 1)
            self.rows.append(row)
            print(json.dumps(row), flush=True)


class DetectorCount:
    """Counts the images ``model.detect`` runs on."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.images = 0
        detect = model.detect

        def counted(images: torch.Tensor):
            self.images += len(images)
            return detect(images)
        model.detect = counted


def made_up_spacy_pipeline(folder: str, seed: int) -> None:
    """Saves to ``folder`` a blank English spaCy pipeline whose vectors table has en_core_web_lg's
    shape, random vectors keyed by made-up words, the benchmark's vocabulary first."""
    import spacy

    nlp = spacy.blank("en")
    keys = [nlp.vocab.strings.add(word) for word in vocabulary_words(MADE_UP_SPACY_ROWS)]
    data = np.random.default_rng(seed).standard_normal((MADE_UP_SPACY_ROWS, SPACY_WIDTH), dtype=np.float32)
    nlp.vocab.vectors = spacy.vocab.Vectors(data=data, keys=keys)
    nlp.to_disk(folder)


def word_vector_rows(stages: Stages, cfg, ann_path: str, spacy_package: str, scratch: str, seed: int) -> None:
    vocab = [*SPECIAL_TOKENS, *vocabulary_words()]
    # (row name, WORD_VECTORS, the source's width, details): the width is the source's, whatever
    # the config's model uses, since only building the matrix is timed.
    sources = [("glove6b50", "glove6b50", 50, {})]
    if not importlib.util.find_spec("spacy"):
        stages.rows.append({"stage": "word_vectors spacy", "skipped": "spaCy not installed"})
    elif importlib.util.find_spec(spacy_package):
        sources.append(("spacy", f"spacy:{spacy_package}", SPACY_WIDTH, {"vectors": spacy_package}))
    else:
        folder = os.path.join(scratch, "spacy_pipeline")
        # In a process of its own, so that neither spaCy's import nor the 600 MB table it built is
        # already paid for, or still held, when the spaCy rows are timed.
        maker = multiprocessing.get_context("spawn").Process(target=made_up_spacy_pipeline, args=(folder, seed))
        maker.start()
        maker.join()
        if maker.exitcode != 0:
            raise RuntimeError(f"making the spaCy pipeline in {folder} failed (exit code {maker.exitcode})")
        details = {"vectors": f"made up, {MADE_UP_SPACY_ROWS} x {SPACY_WIDTH} ({spacy_package} not installed)"}
        sources.append(("spacy", f"spacy:{folder}", SPACY_WIDTH, details))
    for name, source, width, details in sources:
        cfg_source = cfg.replace(USE_GLOVE=True, WORD_VECTORS=source, WORD_EMBED_SIZE=width)
        for attempt in ("build", "from cache"):
            with stages.stage(f"word_vectors {name} ({attempt})", words=len(vocab), **details):
                load_word_vectors(cfg_source, vocab, ann_path)


def rehearse(args: argparse.Namespace, root: str) -> list[dict]:
    stages = Stages()
    sizes = split_sizes(args.fraction)
    with stages.stage("generate", images=sum(n for n, _, _ in sizes.values())):
        paths = generate(root, args.fraction, args.seed)
    cfg = load_config(args.config, [
        f"ANN_PATH={{synthetic: {paths['annotations']}}}", f"IMAGE_PATH={{synthetic: {paths['images']}}}",
        "DATASET=synthetic", "PRETRAIN_WEIGHT=none", "USE_GLOVE=false", "CACHE_DETECTOR=false",
        f"NUM_WORKER={args.workers}", f"LOG_PATH={os.path.join(root, 'logs')}", *args.overrides])
    with stages.stage("datasets") as row:
        train_set, val_set = RefDataset(cfg, cfg.TRAIN_SPLIT), RefDataset(cfg, cfg.VAL_SPLIT)
        row.update(train_entries=len(train_set), val_entries=len(val_set), vocabulary=len(train_set.vocab))
    word_vector_rows(stages, cfg, paths["annotations"], args.spacy_package, root, args.seed)

    torch.manual_seed(cfg.SEED)
    device = torch.device("cpu")
    mean_std = (cfg.MEAN, cfg.STD)
    loader = build_loader(cfg, train_set, train=True)
    with stages.stage("loader", batches=args.loader_batches, workers=cfg.NUM_WORKER) as row:
        samples = 0
        for n, batch in enumerate(loader):
            samples += len(batch["image"])
            if n + 1 == args.loader_batches:
                break
        row["samples"] = samples

    model = build_model(cfg, None, len(train_set.vocab), train_set.vocab)
    detector = DetectorCount(model)
    recipe = Recipe.rec(cfg)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, len(loader), recipe)
    ema = ModelEMA(model, cfg.EMA_DECAY) if cfg.USE_EMA else None
    with stages.stage("train_steps", steps=args.steps, batch=cfg.BATCH_SIZE) as row:
        model.train()
        steps = 0
        while steps < args.steps:
            for batch in loader:
                batch = prepare_batch(model, batch, device, mean_std=mean_std)
                optimize(rec_losses(model, batch, cfg.AMP, device)["loss"], optimizer, scheduler, None,
                         cfg.GRAD_NORM_CLIP, ema, model)
                steps += 1
                if steps == args.steps:
                    break
        row["samples"] = steps * cfg.BATCH_SIZE
    del loader

    detector.images = 0
    with stages.stage("evaluate_val", entries=len(val_set),
                      images=len({e["iid"] for e in val_set.entries})) as row:
        row["acc"] = round(evaluate(model, build_loader(cfg, val_set, train=False), device, mean_std,
                                    cfg.AMP)["acc"], 2)
        row["detector_images"] = detector.images

    detector.images = 0
    with stages.stage("export_train", entries=len(train_set),
                      images=len({e["iid"] for e in train_set.entries})) as row:
        summary = export_pseudo_labels(model, cfg, device, os.path.join(root, "pseudo.json"), [train_set])
        row.update(written=summary.count, detector_images=detector.images)
    return stages.rows


def format_table(rows: list[dict], fraction: float) -> str:
    lines = [f"fraction {fraction}", f"{'stage':<36}{'seconds':>9}{'CPU s':>9}{'peak MiB':>10}  details"]
    for row in rows:
        details = {k: v for k, v in row.items() if k not in ("stage", "seconds", "cpu_seconds", "peak_mib")}
        figures = [f"{row[k]:.2f}" if k in row else "-" for k in ("seconds", "cpu_seconds")]
        peak = f"{row['peak_mib']:.0f}" if "peak_mib" in row else "-"
        lines.append(f"{row['stage']:<36}{figures[0]:>9}{figures[1]:>9}{peak:>10}  "
                     + ", ".join(f"{k} {v}" for k, v in details.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    root = args.data or tempfile.mkdtemp(prefix="rec-scale-")
    try:
        rows = rehearse(args, root)
    finally:
        if not args.data:
            shutil.rmtree(root, ignore_errors=True)
    print(format_table(rows, args.fraction))
    if args.out_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
        with open(args.out_json, "w") as f:
            json.dump({"fraction": args.fraction, "torch": torch.__version__, "cpus": os.cpu_count(),
                       "threads": torch.get_num_threads(), "stages": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
