"""The supervised student: SimOTA assignment, learning, checkpoints, the pseudo-label pipeline, bad files."""
import json
import math
import os

import pytest
import torch
from torchvision.ops import box_iou

from datasets import DataError, RefDataset, build_loader, check_training_file
from models import build_model
from models.box_head import BoxHead
from test_pipeline import overrides, run, weights
from tiny_data import make_tiny_dataset
from utils.checkpoint import load_matching
from utils.config import ConfigError, load_config
from utils.engine import to_device, train_step
from utils.evaluation import evaluate, gt_xyxy
from utils.optim import Recipe, build_optimizer, build_scheduler

STRIDE = 8


def _raw_for(boxes, grid=16):
    """Raw head outputs ``[1, grid, grid, 5]`` whose cell (i, j) decodes to ``boxes[(i, j)]``
    (cx, cy, w, h in pixels) with objectness logit ``boxes[(i, j)][4]``; other cells predict a
    2-pixel box in their own top-left corner, far from everything."""
    raw = torch.zeros(1, grid, grid, 5)
    raw[..., 2:4] = math.log(2 / STRIDE)
    raw[..., 4] = -4.0
    for (i, j), (cx, cy, w, h, obj) in boxes.items():
        raw[0, i, j] = torch.tensor([cx / STRIDE - j, cy / STRIDE - i, math.log(w / STRIDE), math.log(h / STRIDE), obj])
    return raw


def _positives(head, raw, target):
    size = raw.shape[1] * STRIDE
    cells = head.cell_offsets(raw)
    positive = head.assign(head.boxes(raw), raw[..., 4].flatten(1), torch.tensor([target]) * 1.0,
                           (cells + 0.5) * STRIDE)[0]
    return {tuple(int(v) for v in cells[n].flip(0)) for n in positive.nonzero()[:, 0]}, size


def test_simota_picks_the_best_cells_near_the_target():
    head = BoxHead(4, 4, stride=STRIDE)
    target = (60.0, 60.0, 24.0, 24.0)  # cells (6..8, 6..8) have their centres inside it
    exact, close, off = (60, 60, 24, 24), (62, 60, 24, 24), (70, 60, 24, 24)  # IoU 1, 0.85, 0.41
    # One good prediction: the dynamic k (sum of the ten best IoUs, 1.4) is 1, and the far cell that
    # predicts the target exactly is no candidate at all.
    picked, _ = _positives(head, _raw_for({(7, 7): (*exact, 0.0), (7, 8): (*off, 0.0), (0, 0): (*exact, 5.0)}), target)
    assert picked == {(7, 7)}
    # Three good ones: k = int(1 + 0.85 + 0.85) = 2, the two cheapest: the exact one, then the close
    # one the model is more confident about.
    picked, _ = _positives(head, _raw_for({(7, 7): (*exact, 0.0), (6, 7): (*close, 2.0), (8, 7): (*close, -2.0)}),
                           target)
    assert picked == {(7, 7), (6, 7)}
    # A cell near the centre but outside the box costs more than any cell inside it.
    picked, _ = _positives(head, _raw_for({(7, 7): (*close, 0.0), (7, 9): (*exact, 0.0)}), target)
    assert picked == {(7, 7)}


def test_box_head_decodes_the_most_confident_cell_and_loss_vanishes_on_exact_boxes():
    head = BoxHead(4, 4, stride=STRIDE, iou_loss="giou")
    raw = _raw_for({(7, 7): (60, 60, 24, 24, 6.0), (2, 3): (30, 20, 10, 12, 3.0)})
    decoded = head.decode(raw)
    torch.testing.assert_close(decoded[0, 0, :4], torch.tensor([48.0, 48.0, 72.0, 72.0]))
    assert decoded.shape == (1, 1, 5) and decoded[0, 0, 4] > 0.99
    parts = head.loss(raw, torch.tensor([[60.0, 60.0, 24.0, 24.0]]) / (16 * STRIDE))
    assert parts["iou"] < 1e-5 and parts["l1"] < 1e-5
    # Targeting the less confident box: that cell becomes the positive, and the confident one a
    # negative the objectness is wrong about.
    other = head.loss(raw, torch.tensor([[30.0, 20.0, 10.0, 12.0]]) / (16 * STRIDE))
    assert other["iou"] < 1e-5 and other["obj"] > parts["obj"] + 2.5




def _text_blind_ceiling(dataset):
    """The most a prediction that ignores the expression can score: on an image whose referents'
    boxes are pairwise disjoint, one box overlaps at most one of them with IoU > 0.5 (1 - IoU is a
    metric), so at most one of its expressions is right; other images count in full."""
    by_image = {}
    for entry in dataset.entries:
        by_image.setdefault(entry["iid"], []).append(entry["bbox"])
    right = 0
    for boxes in by_image.values():
        xyxy = gt_xyxy(torch.tensor(boxes))
        overlap = box_iou(xyxy, xyxy).fill_diagonal_(0)
        right += 1 if overlap.max() == 0 else len(boxes)
    return 100.0 * right / len(dataset)


def test_student_learns_to_box_the_named_square(tmp_path, tiny_overrides):
    ann, images = make_tiny_dataset(str(tmp_path))
    cfg = load_config("config/refcoco.yaml", [
        *tiny_overrides, "ARCH=student", "DATASET=synthetic", f"ANN_PATH={{synthetic: {ann}}}",
        f"IMAGE_PATH={{synthetic: {images}}}", "NUM_REFS=1", "BOX_HEAD_CHANNELS=32", "BATCH_SIZE=8", "NUM_WORKER=0",
        "EPOCHS=150", "LR=0.003", "WARMUP=0", "USE_EMA=false", "DROPOUT_R=0.0"])
    torch.manual_seed(0)
    dataset = RefDataset(cfg, "train")
    model = build_model(cfg, None, len(dataset.vocab))
    loader = build_loader(cfg, dataset, train=True)
    recipe = Recipe.rec(cfg)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, len(loader), recipe)
    losses = []
    for epoch in range(cfg.EPOCHS):
        loader.sampler.set_epoch(epoch)
        model.train()
        for batch in loader:
            parts = train_step(model, to_device(batch, torch.device("cpu"), (cfg.MEAN, cfg.STD)), optimizer,
                               scheduler, None, None, cfg.GRAD_NORM_CLIP, "none", torch.device("cpu"))
            losses.append(float(parts["loss"]))
    assert sum(losses[-10:]) < 0.4 * sum(losses[:10])
    accuracy = evaluate(model, build_loader(cfg, dataset, train=False), torch.device("cpu"), (cfg.MEAN, cfg.STD))
    ceiling = _text_blind_ceiling(dataset)
    assert ceiling <= 60, "the tiny data should hold two disjoint squares per training image"
    assert accuracy["n"] == len(dataset) and accuracy["acc"] >= ceiling + 20


def test_checkpoint_round_trip_keeps_the_outputs(tmp_path, tiny_overrides):
    cfg = load_config("config/refcoco.yaml", [*tiny_overrides, "ARCH=student", "BOX_HEAD_CHANNELS=16"])
    model = build_model(cfg, None, 30).eval()
    path = tmp_path / "student.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = build_model(cfg, None, 30).eval()
    load_matching(loaded, torch.load(path, weights_only=True)["state_dict"], str(path))
    images, refs = torch.randn(2, 3, 128, 128), torch.randint(3, 30, (2, 1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, refs), model(images, refs))
    weak = build_model(load_config("config/refcoco.yaml", tiny_overrides), None, 30)
    with pytest.raises(Exception, match="box_head"):
        load_matching(weak, model.state_dict(), str(path))


def test_arch_and_box_loss_are_checked():
    with pytest.raises(ConfigError, match="ARCH must be 'weak' or 'student'"):
        load_config("config/refcoco.yaml", ["ARCH=simrec"])
    with pytest.raises(ConfigError, match="BOX_IOU_LOSS must be 'iou' or 'giou'"):
        load_config("config/refcoco.yaml", ["BOX_IOU_LOSS=ciou"])
    with pytest.raises(ConfigError, match="BOX_ACTIVATION must be 'leaky' or 'silu'"):
        load_config("config/refcoco.yaml", ["BOX_ACTIVATION=relu"])


def test_simrec_head_settings_are_one_override_away(tiny_overrides):
    """SimREC's head: SiLU, an assignment cost of 3 x IoU only, no L1 (docs: the student)."""
    cfg = load_config("config/student/refcoco.yaml", tiny_overrides + [
        "BOX_ACTIVATION=silu", "BOX_OBJ_COST=0", "BOX_L1_WEIGHT=0"])
    head = build_model(cfg, None, 10).box_head
    assert all(isinstance(block.act, torch.nn.SiLU) for block in (head.stem, *head.convs))
    assert head.obj_cost == head.l1_weight == 0 and head.iou_cost == 3
    default = build_model(load_config("config/student/refcoco.yaml", tiny_overrides), None, 10).box_head
    assert isinstance(default.stem.act, torch.nn.LeakyReLU)


@pytest.mark.parametrize("student, accv", [*((f"student/{d}", d) for d in ("refcoco", "refcoco+", "refcocog", "referit")),
                                            ("synthetic/student", "synthetic/quickstart")])
def test_student_configs_train_on_the_pseudo_labels(student, accv):
    cfg = load_config(f"config/{student}.yaml")
    base = load_config(f"config/{accv}.yaml")
    assert cfg.ARCH == "student" and cfg.ann_path == base.ann_path
    assert cfg.train_ann_path.endswith(f"{os.path.basename(base.ann_path)[:-5]}_pseudo.json")


def test_pseudo_labels_to_student_to_test_py(tiny):  # noqa: F811
    root, ann, images = tiny
    weak = overrides(root, tiny, "EPOCHS=1", logs="weak_teacher")
    run("train.py", "--config", "config/refcoco.yaml", *weak)
    pseudo = root / "pseudo_for_student.json"
    run("test.py", "--config", "config/refcoco.yaml", "--eval-weights", str(root / "weak_teacher" / "last.pth"),
        "--export-pseudo-labels", str(pseudo), *weak)
    data, labels = json.loads(open(ann).read()), json.loads(pseudo.read_text())
    assert [e["bbox"] for e in labels["train"]] != [e["bbox"] for e in data["train"]]
    assert all("pseudo_margin" in e for e in labels["train"]) and "pseudo_margin" not in labels["val"][0]

    student = overrides(root, tiny, "ARCH=student", "NUM_REFS=1", "BOX_HEAD_CHANNELS=16", f"TRAIN_ANN_PATH={pseudo}",
                        logs="student")
    out = run("train.py", "--config", "config/refcoco.yaml", *student)
    assert "val Acc@0.5" in out.stdout + out.stderr
    last = weights(root / "student" / "last.pth")
    assert last["config"]["MODEL"]["ARCH"] == "student" and last["vocab"] == weights(
        root / "weak_teacher" / "last.pth")["vocab"]

    result_json = root / "student_acc.json"
    run("test.py", "--config", "config/refcoco.yaml", "--eval-weights", str(root / "student" / "best.pth"),
        "--out-json", str(result_json), *student)
    results = json.loads(result_json.read_text())
    assert {s: r["n"] for s, r in results.items()} == {s: len(data[s]) for s in ("val", "testA", "testB")}

    out = run("test.py", "--config", "config/refcoco.yaml", "--eval-weights", str(root / "student" / "best.pth"),
              "--baselines", *student, check=False)
    assert out.returncode == 2 and "weak model's checkpoint" in out.stderr and "Traceback" not in out.stderr
    # Self-training: the student labels the training set (each entry from all of its expressions,
    # with a margin), and a second student trains on the more decided half, weighted by margin.
    out = run("test.py", "--eval-weights", str(root / "student" / "best.pth"), "--export-pseudo-labels",
              str(root / "joint.json"), "PSEUDO_LABEL_ASSIGNMENT=joint", check=False)
    assert out.returncode == 2 and "set PSEUDO_LABEL_ASSIGNMENT=independent" in out.stderr
    assert "Traceback" not in out.stderr and not (root / "joint.json").exists()
    from_student = root / "from_student.json"
    out = run("test.py", "--eval-weights", str(root / "student" / "best.pth"), "--export-pseudo-labels",
              str(from_student))
    assert f"pseudo-labels: {len(data['train'])} training entries written" in out.stdout
    relabelled = json.loads(from_student.read_text())
    assert relabelled["val"] == data["val"] and all(-3 <= e["pseudo_margin"] <= 3 for e in relabelled["train"])
    second = overrides(root, tiny, "ARCH=student", "NUM_REFS=1", "BOX_HEAD_CHANNELS=16", "EPOCHS=1",
                       f"TRAIN_ANN_PATH={from_student}", "PSEUDO_LABEL_KEEP=0.5", "PSEUDO_LABEL_WEIGHTING=margin",
                       logs="student_round2")
    out = run("train.py", "--config", "config/refcoco.yaml", *second)
    assert f"training on {len(data['train']) // 2} of the {len(data['train'])} entries" in out.stdout + out.stderr
    assert weights(root / "student_round2" / "last.pth")["epoch"] == 1
    # Boxes without margins (here the original file's) cannot be kept by margin: one line, before
    # anything trains.
    out = run("train.py", "--config", "config/refcoco.yaml", *overrides(
        root, tiny, "ARCH=student", "NUM_REFS=1", "BOX_HEAD_CHANNELS=16", "PSEUDO_LABEL_KEEP=0.5", logs="no_margins"),
        check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {ann} holds no pseudo_margin for entry train[0]")
    assert not (root / "no_margins" / "last.pth").exists()

    prediction = root / "student_prediction.jsonl"
    run("predict.py", "--weights", str(root / "student" / "last.pth"), "--image", os.path.join(images, "3.jpg"),
        "--expr", "the red square", "--out-json", str(prediction))
    line = json.loads(prediction.read_text())
    assert len(line["box"]) == 4 and 0 <= line["match_score"] <= 1 and line["objectness"] is None


def test_resumed_student_run_ends_where_an_uninterrupted_one_does(tiny):  # noqa: F811
    root = tiny[0]
    student = ["ARCH=student", "NUM_REFS=1", "BOX_HEAD_CHANNELS=16", "EPOCHS=2"]
    run("train.py", "--config", "config/refcoco.yaml", *overrides(root, tiny, *student, logs="student_straight"))
    stopped = overrides(root, tiny, *student, logs="student_resumed")
    run("train.py", "--config", "config/refcoco.yaml", *stopped, "EPOCHS=1")
    run("train.py", "--config", "config/refcoco.yaml", "--resume", str(root / "student_resumed" / "last.pth"),
        *stopped)
    straight, resumed = weights(root / "student_straight" / "last.pth"), weights(root / "student_resumed" / "last.pth")
    assert resumed["epoch"] == 2 and resumed["step"] == straight["step"]
    for key in ("state_dict", "model"):
        for name, value in straight[key].items():
            assert torch.equal(value, resumed[key][name]), f"{key}.{name} differs"


def _bad_copy(tmp_path, ann, change):
    data = json.loads(open(ann).read())
    change(data)
    path = tmp_path / "bad_pseudo.json"
    path.write_text(json.dumps(data))
    return str(path)


def _set_box(split, index, box):
    def change(data):
        data[split][index]["bbox"] = box
    return change


@pytest.mark.parametrize("change,message", [
    (lambda data: data.pop("val"), r"bad_pseudo.json lacks split 'val' of .*anns.json"),
    (lambda data: data.pop("train"), r"bad_pseudo.json lacks split 'train'"),
    (_set_box("train", 2, [10.0, 5.0, 200.0, 20.0]), r"bad_pseudo.json: the box \[10.0, 5.0, 200.0, 20.0\] of "
                                                     r"entry train\[2\] \(iid 2\) reaches outside its 112x96 image"),
    (_set_box("train", 1, [-8.0, 5.0, 20.0, 20.0]), r"entry train\[1\] \(iid 1\) reaches outside"),
    (_set_box("train", 3, [float("nan"), 5.0, 20.0, 20.0]), r"bad_pseudo.json: malformed entry train\[3\] \(iid 2\): "
                                                            r"bbox must be \[x, y, w, h\] of 4 finite numbers"),
    (lambda data: data["train"].pop(), r"bad_pseudo.json: split 'train' holds 15 entries, .*anns.json's 16"),
    (lambda data: data["train"][4].update(iid=7), r"bad_pseudo.json: entry train\[4\] \(iid 7\) names image 7, "
                                                  r".*anns.json image 3 there"),
    (lambda data: data["train"][0].update(refs=["the blue square"]), r"the expressions of entry train\[0\] \(iid 1\)"),
], ids=["missing-val", "missing-train", "past-right-edge", "negative-x", "nan", "length", "iid", "expressions"])
def test_bad_pseudo_label_files_are_named_with_the_entry(tmp_path, change, message):
    ann, images = make_tiny_dataset(str(tmp_path))
    bad = _bad_copy(tmp_path, ann, change)
    with pytest.raises(DataError, match=message):
        check_training_file(bad, ann, "train", "synthetic", images)


def test_good_pseudo_labels_pass_and_a_bad_file_stops_train_py_in_one_line(tiny):  # noqa: F811
    root, ann, images = tiny
    check_training_file(ann, ann, "train", "synthetic", images)
    bad = _bad_copy(root, ann, _set_box("train", 0, [0.0, 0.0, 500.0, 10.0]))
    out = run("train.py", "--config", "config/refcoco.yaml",
              *overrides(root, tiny, "ARCH=student", f"TRAIN_ANN_PATH={bad}", logs="student_bad"), check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: the box [0.0, 0.0, 500.0, 10.0] of entry "
                                                          "train[0] (iid 1)")
    assert not os.path.exists(root / "student_bad" / "last.pth")
