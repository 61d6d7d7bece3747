"""The whole method on a 2-core CPU, from nothing: synthetic data, detector, REC model, results.

    python quickstart.py

1. generates the synthetic referring dataset (``datasets/synthetic.py``) with its probe splits
   ``position`` and ``size`` (for ``tools.diagnose_synthetic --split position,size``) unless it exists;
2. pre-trains the YOLOv3 detector on its training images (``pretrain.py``) unless the weights exist;
3. trains the weakly supervised REC model (``train.py``), resuming an unfinished run;
4. evaluates every split with two text-blind baselines and draws a few predictions (``test.py``).

Each stage reuses what an earlier run produced, unless what it was made from is newer (regenerated
data, a retrained detector). The last line printed is ``results: PATH``, a JSON
file ``{split: {"acc", "n"}, ..., "baselines": {...}}``. ``--mini`` runs a miniature (a few images
and steps) to check the pipeline, as CI does.

    python quickstart.py --student

then runs RefCLIP's weakly supervised training scheme on the quickstart's model: exports its
pseudo-labels (``test.py --export-pseudo-labels``), trains the supervised student
(``config/synthetic/student.yaml``) on them and, for the upper bound, on the ground truth, evaluates
both, and prints one table (the teacher, both students, the text-blind baselines, per split) and the
accuracy by kind of expression (``tools/diagnose_synthetic``). Its last line is ``results: PATH``,
``{"weak": {split: {"acc", "n"}}, "student_pseudo": ..., "student_gt": ..., "baselines": ...,
"by_kind": {model: {kind: {"n", "acc", "ceiling"}}}, "student_rounds": [...]}``.

    python quickstart.py --student --rounds 2 --export-overrides PSEUDO_LABEL_ASSIGNMENT=joint \
        --student-overrides PSEUDO_LABEL_KEEP=0.8 EPOCHS=8 LOG_PATH=./logs/synthetic_student_joint

``--rounds N`` self-trains: each student after the first trains on the labels its predecessor
exports; ``student_rounds`` holds each round's labels, their agreement with the true boxes and the
student's accuracy. ``--export-overrides`` apply to the teacher's export, ``--student-overrides``
to every student (the one on the ground truth keeps every entry unweighted).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from datasets.synthetic import PROBE_IMAGES
from utils.checkpoint import CheckpointMismatchError, completed_epochs, config_from_checkpoint, load_checkpoint
from utils.cli import run_main, run_python
from utils.config import ConfigError, load_config
from utils.paths import make_folder
from utils.pseudo_label_export import label_agreement

# The demo's data: 2100 training images; the evaluation splits hold 60 images (about 470 expressions)
# each, as evaluation runs the detector once per image and each expression costs little more. The
# probe splits hold 80 images each, at least 200 expressions of position (size) words only.
DATA = {"images": 2280, "eval_images": 60, "probe_images": PROBE_IMAGES}
# A pipeline check, not a result: a few images, a few steps.
MINI = {
    "images": 24, "image_size": 96, "probe_images": 3,
    "overrides": ["INPUT_SHAPE=[96, 96]", "SELECT_NUM=4", "EPOCHS=1", "WARMUP=0", "BATCH_SIZE=4", "NUM_WORKER=0",
                  "DET_EPOCHS=1", "DET_BATCH_SIZE=4", "PRINT_FREQ=5"],
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/synthetic/quickstart.yaml")
    parser.add_argument("--workdir", default="", help="where data, weights and logs go (default: as the config says)")
    parser.add_argument("--mini", action="store_true", help="a miniature run that checks the pipeline")
    parser.add_argument("--visualize", type=int, default=8, help="predictions to draw")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when present)")
    parser.add_argument("--student", action="store_true",
                        help="after the quickstart: pseudo-labels, the supervised student on them and on the "
                             "ground truth, one table")
    parser.add_argument("--student-config", default="config/synthetic/student.yaml")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --student: students trained in turn, each after the first on the labels of the "
                             "one before (self-training)")
    parser.add_argument("--export-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="with --student: config overrides of the teacher's pseudo-label export "
                             "(PSEUDO_LABEL_ASSIGNMENT, PSEUDO_LABEL_EXPRESSIONS)")
    parser.add_argument("--student-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="with --student: config overrides of every student (PSEUDO_LABEL_KEEP, "
                             "PSEUDO_LABEL_WEIGHTING, EPOCHS, LOG_PATH, ...)")
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


def trained_with(path: str, cfg) -> bool:
    """Whether the training checkpoint ``path`` was trained with ``cfg`` (keys it predates taking
    their defaults; a config this code cannot read is another)."""
    try:
        trained = config_from_checkpoint(load_checkpoint(path, "training checkpoint"), path)
    except (ConfigError, CheckpointMismatchError):
        return False
    return trained.to_dict() == cfg.to_dict()


def train_stage(name: str, config: str, cfg, inputs: list[str], arguments: list[str]) -> str:
    """Train ``config`` into ``cfg.LOG_PATH`` unless a finished run of ``cfg`` newer than ``inputs``
    is there, resuming a current unfinished one; returns its ``best.pth``."""
    last, best = os.path.join(cfg.LOG_PATH, "last.pth"), os.path.join(cfg.LOG_PATH, "best.pth")
    current = os.path.isfile(last) and not older(last, *inputs) and trained_with(last, cfg)
    finished = current and completed_epochs(last) >= cfg.EPOCHS
    if finished and os.path.isfile(best):
        print(f"== {name}: reusing {best}")
    else:
        # An unfinished current run is continued; one made from older data or weights, or with
        # another config, is replaced.
        if current:
            resume = ["--resume", last]
        else:
            resume = ["--overwrite"] if os.path.exists(last) or os.path.exists(best) else []
        stage(name, ["train.py", "--config", config, *resume, *arguments])
    return best


def main(args: argparse.Namespace) -> int:
    overrides = list(MINI["overrides"]) if args.mini else []
    work = os.path.abspath(args.workdir) if args.workdir else ""
    if work:
        make_folder(work, "--workdir")
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
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {args.rounds}")
    if not args.student and (args.rounds > 1 or args.export_overrides or args.student_overrides):
        raise ConfigError("--rounds, --export-overrides and --student-overrides belong to --student")
    if args.student:
        student_paths = [f"TRAIN_ANN_PATH={work}/data/anns/synthetic_pseudo.json",
                         f"LOG_PATH={work}/logs_student"] if work else []
        return student(args, cfg, overrides, overrides + student_paths, device)
    data_root = os.path.dirname(os.path.dirname(cfg.ann_path))

    generate = ["-m", "datasets.synthetic", "--out", data_root]
    if args.mini:
        generate += ["--num-images", str(MINI["images"]), "--image-size", str(MINI["image_size"]),
                     "--probe-images", str(MINI["probe_images"])]
    else:
        generate += ["--num-images", str(DATA["images"]), "--eval-images", str(DATA["eval_images"]),
                     "--probe-images", str(DATA["probe_images"])]
    stage("data", generate)

    manifest = os.path.join(data_root, "manifest.json")
    if os.path.isfile(cfg.PRETRAIN_WEIGHT) and not older(cfg.PRETRAIN_WEIGHT, manifest):
        print(f"== detector: reusing {cfg.PRETRAIN_WEIGHT}")
    else:
        # Made from older data, or never finished: made again, replacing what is there.
        stale = [cfg.DET_OUTPUT, os.path.join(cfg.DET_LOG_PATH, "last.pth")]
        overwrite = ["--overwrite"] if any(os.path.exists(path) for path in stale) else []
        stage("detector", ["pretrain.py", "--config", args.config, *overwrite, *device, *overrides])

    best = train_stage("train", args.config, cfg, [manifest, cfg.PRETRAIN_WEIGHT], [*device, *overrides])

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


MODELS = {"weak": "teacher", "student_pseudo": "student, pseudo-labels", "student_gt": "student, ground truth"}


def round_name(number: int) -> str:
    """The results key of the student of round ``number`` (round 1: the one on the teacher's labels)."""
    return "student_pseudo" if number == 1 else f"student_round{number}"


def student(args: argparse.Namespace, weak_cfg, weak_overrides: list[str], overrides: list[str],
            device: list[str]) -> int:
    """RefCLIP's scheme on the quickstart's model: its pseudo-labels, the student trained on them
    (and, for ``--rounds`` above 1, each later student on its predecessor's labels) and on the
    ground truth, one table."""
    weak = os.path.join(weak_cfg.LOG_PATH, "best.pth")
    if not os.path.isfile(weak):
        sys.exit(f"quickstart --student: no trained model at {weak}; run python quickstart.py first")
    overrides = [*overrides, *args.student_overrides]
    cfg = load_config(args.student_config, overrides)
    pseudo, folder = cfg.train_ann_path, cfg.LOG_PATH
    rounds = [round_name(number) for number in range(1, args.rounds + 1)]
    columns = {"weak": MODELS["weak"], **{name: MODELS.get(name, f"student, round {number}")
                                          for number, name in enumerate(rounds, start=1)},
               "student_gt": MODELS["student_gt"]}
    scores_of = {name: os.path.join(folder, name, "results.json") for name in columns}
    kinds_of = {name: os.path.join(folder, name, "by_kind.json") for name in columns}
    labels_of = {name: pseudo if number == 1 else os.path.join(folder, f"labels_round{number}.json")
                 for number, name in enumerate(rounds, start=1)}
    # What the teacher's labels were made with: other export overrides make them again.
    made_with = os.path.splitext(pseudo)[0] + ".made_with.json"
    recipe = {"teacher": os.path.abspath(weak), "export_overrides": args.export_overrides}
    outputs = (pseudo, scores_of["weak"], kinds_of["weak"], made_with)
    if all(os.path.isfile(p) and not older(p, weak) for p in outputs) and read_json(made_with) == recipe:
        print(f"== pseudo-labels: reusing {pseudo}")
    else:
        stage("pseudo-labels", ["test.py", "--config", args.config, "--eval-weights", weak, "--baselines",
                                "--out-json", scores_of["weak"], "--export-pseudo-labels", pseudo, *device,
                                *weak_overrides, *args.export_overrides])
        stage("diagnose weak", ["-m", "tools.diagnose_synthetic", "--config", args.config, "--eval-weights", weak,
                                "--out-json", kinds_of["weak"], *device, *weak_overrides])
        with open(made_with, "w") as f:
            json.dump(recipe, f)
    # The student on the ground truth: every entry, unweighted (the file holds no margins).
    runs = [(name, labels_of[name], overrides, labels_of.get(following))
            for name, following in zip(rounds, [*rounds[1:], None])]
    runs.append(("student_gt", cfg.ann_path, [*overrides, "PSEUDO_LABEL_KEEP=1.0", "PSEUDO_LABEL_WEIGHTING=none"],
                 None))
    for name, train_file, student_overrides, next_labels in runs:
        run_overrides = [*student_overrides, f"TRAIN_ANN_PATH={train_file}", f"LOG_PATH={os.path.join(folder, name)}"]
        run_cfg = load_config(args.student_config, run_overrides)
        best = train_stage(f"train {name}", args.student_config, run_cfg, [train_file, run_cfg.PRETRAIN_WEIGHT],
                           [*device, *run_overrides])
        # A student followed by another round labels the training set for it in the same pass, unless
        # its labels are already there.
        relabel = next_labels and (not os.path.isfile(next_labels) or older(next_labels, best))
        export = ["--export-pseudo-labels", next_labels] if relabel else []
        stage(f"evaluate {name}", ["test.py", "--config", args.student_config, "--eval-weights", best,
                                   "--out-json", scores_of[name], *export, *device, *run_overrides])
        stage(f"diagnose {name}", ["-m", "tools.diagnose_synthetic", "--config", args.student_config,
                                   "--eval-weights", best, "--out-json", kinds_of[name], *device, *run_overrides])

    results = {name: read_json(scores_of[name]) for name in MODELS}
    results["baselines"] = results["weak"].pop("baselines")
    results["by_kind"] = {name: read_json(kinds_of[name]) for name in MODELS}
    results["student_rounds"] = [
        {"round": number, "labels": labels_of[name],
         "labels_agree": label_agreement(labels_of[name], cfg.ann_path, cfg.TRAIN_SPLIT, cfg.DATASET),
         "scores": read_json(scores_of[name]), "by_kind": read_json(kinds_of[name])}
        for number, name in enumerate(rounds, start=1)]
    print(student_tables(results, columns))
    path = os.path.join(folder, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"results: {path}")
    return 0


def read_json(path: str):
    """The content of the JSON file ``path``; None where there is none."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def student_tables(results: dict, columns: dict[str, str]) -> str:
    """Acc@0.5 per split of the teacher, every student (``columns``: results key -> column name)
    and the baselines; the labels each round trained on; then val by kind."""
    rounds = {round_name(row["round"]): row for row in results["student_rounds"]}
    scores = {name: rounds[name]["scores"] if name in rounds else results[name] for name in columns}
    kinds = {name: rounds[name]["by_kind"] if name in rounds else results["by_kind"][name] for name in columns}
    names = {**columns, **{kind: kind.replace("_", " ") for kind in results["baselines"]}}
    header = [*columns, *results["baselines"]]
    lines = ["Acc@0.5 (%) per split:", f"  {'split':<8}" + "".join(f"{names[c]:>24}" for c in header) + f"{'n':>6}"]
    for split, row in results["weak"].items():
        accs = [scores[c][split]["acc"] for c in columns] + [b[split]["acc"] for b in results["baselines"].values()]
        lines.append(f"  {split:<8}" + "".join(f"{acc:>24.2f}" for acc in accs) + f"{row['n']:>6}")
    lines.append("training labels within IoU 0.5 of the true boxes (%):")
    lines += [f"  {columns[name]:<28}{row['labels_agree']:6.2f}  {row['labels']}" for name, row in rounds.items()]
    lines += ["val Acc@0.5 (%) by kind of expression (the teacher's anchor ceiling in brackets):",
              f"  {'expressions':<20}{'n':>6}" + "".join(f"{columns[name]:>24}" for name in columns)]
    for kind, row in kinds["weak"].items():
        cells = [f"{row['acc']:.2f} ({row['ceiling']:.2f})"]
        cells += [f"{kinds[name][kind]['acc']:.2f}" for name in list(columns)[1:]]
        lines.append(f"  {kind:<20}{row['n']:>6}" + "".join(f"{cell:>24}" for cell in cells))
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main, get_args_parser())
