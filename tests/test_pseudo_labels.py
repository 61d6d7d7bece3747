"""Making pseudo-labels and training on them: the joint assignment per image, the margins, the
regressor's agreement rule, PSEUDO_LABEL_KEEP and PSEUDO_LABEL_WEIGHTING, the bad inputs."""
import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate
from torchvision.ops import box_iou

from datasets import DataError, EntryExpressions, FirstExpression, RefDataset, check_training_file, clip_to_image
from datasets import letterbox_to_original, training_entries
from datasets.loader import EpochSampler
from datasets.pseudo_labels import MARGIN_FIELD, WeightedEntries, kept_entries, margin_weights
from models import build_model
from models.box_head import BoxHead
from tiny_data import make_tiny_dataset
from utils.config import ConfigError, load_config
from utils.engine import prepare_batch
from utils.evaluation import model_boxes
from utils.pseudo_label_export import (agreement_labels, assign_image, assign_jointly, check_export_config,
                                       pseudo_labels, vote_margins)

CPU = torch.device("cpu")
# Three candidate boxes of one image: A, A2 (IoU 0.82 with A, the same object) and B elsewhere.
A, A2, B = [10.0, 10.0, 50.0, 50.0], [12.0, 10.0, 52.0, 50.0], [60.0, 60.0, 90.0, 90.0]


def _candidates(n):
    return np.array([[A, A2, B]] * n)


def test_joint_assignment_gives_two_referents_two_boxes_where_their_best_collide():
    # Both entries prefer the object of A: entry 1 through A2, another candidate of the same box.
    scores = np.log(np.array([[0.80, 0.15, 0.05],
                              [0.30, 0.45, 0.25]]))
    assert set(scores.argmax(axis=1)) == {0, 1}, "the independent choices: two candidates, one box"
    chosen = assign_image(scores, _candidates(2))
    # Entry 1 loses less by moving (log 0.45 - log 0.25) than entry 0 would (log 0.80 - log 0.05).
    assert chosen.tolist() == [0, 2]
    # Where entry 0 cares less, it is the one that moves.
    scores = np.log(np.array([[0.40, 0.25, 0.35], [0.10, 0.85, 0.05]]))
    assert assign_image(scores, _candidates(2)).tolist() == [2, 1]


def test_joint_assignment_keeps_agreeing_choices_and_leaves_extra_entries_their_own_best():
    scores = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    assert assign_image(scores, _candidates(2)).tolist() == [0, 2]
    # Three referents, two distinct boxes: the two boxes go where they add most; the third entry
    # takes its own best.
    scores = np.log(np.array([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.2, 0.7, 0.1]]))
    # Entry 2 takes the object of A (through A2) and entry 1 B; entry 0 is left over and keeps A.
    assert assign_image(scores, _candidates(3)).tolist() == [0, 2, 1]
    # Entries of an image need not be next to each other; other images are solved apart.
    iids = [7, 8, 7]
    scores = np.log(np.array([[0.8, 0.1, 0.1], [0.8, 0.1, 0.1], [0.6, 0.1, 0.3]]))
    assert assign_jointly(iids, scores, _candidates(3)).tolist() == [0, 0, 2]


def test_vote_margins_compare_the_label_with_the_best_other_box():
    votes = torch.tensor([[5.0, 4.0, 1.0], [5.0, 4.0, 1.0], [2.0, 1.0, 0.5]])
    boxes = torch.tensor([[A, A2, B], [A, A2, B], [A, A2, A]])
    # A2 is the label's own box, so the rival is B; a label moved to B has a negative margin; with
    # every candidate on the label's box nothing competes.
    margins = vote_margins(votes, boxes, torch.tensor([0, 2, 0]))
    assert margins.tolist() == [4.0, -4.0, math.inf]


def test_a_regressor_labels_an_entry_with_the_answer_its_expressions_agree_on():
    far = [100.0, 100.0, 120.0, 120.0]
    boxes = torch.tensor([[A, A2, far], [A, far, far], [far, A, A], [far, A2, A]])
    scores = torch.tensor([[0.6, 0.9, 0.95], [0.5, 0.8, 0.7], [0.3, 0.9, 0.4], [0.2, 0.3, 0.6]])
    counts = torch.tensor([3, 2, 1, 3])
    chosen, margins = agreement_labels(boxes, scores, counts)
    # Entry 0: A and A2 agree, the confident outlier does not; A2 is the more confident of the two.
    # Entry 1: two expressions disagree, the more confident wins; entry 2: one expression.
    # Entry 3: the two agreeing answers are both A-like; the IoU sums tie, the confidence decides.
    assert chosen.tolist() == [1, 1, 0, 2]
    torch.testing.assert_close(margins, torch.tensor([0.6 + 0.9 - 0.95, 0.8 - 0.5, 0.3, 0.3 + 0.6 - 0.2]))


def test_keep_takes_the_largest_margins_and_weights_follow_their_ranks():
    margins = np.array([0.5, math.inf, -1.0, 2.0, 0.5, 3.0])
    assert kept_entries(margins, 0.5).tolist() == [1, 3, 5]
    assert kept_entries(margins, 1.0).tolist() == list(range(6))
    assert kept_entries(margins, 0.01).tolist() == [1]  # rounded up: never nothing
    weights = margin_weights(margins)
    assert weights.mean() == pytest.approx(1.0)
    assert weights[2] == pytest.approx(1 / 6) and weights[1] == pytest.approx(11 / 6)
    assert weights[0] == weights[4] and weights[5] > weights[3] > weights[0]


@pytest.fixture
def tiny_files(tmp_path, tiny_overrides):
    ann, images = make_tiny_dataset(str(tmp_path))
    cfg = load_config("config/refcoco.yaml", [
        *tiny_overrides, "DATASET=synthetic", f"ANN_PATH={{synthetic: {ann}}}", f"IMAGE_PATH={{synthetic: {images}}}",
        "BATCH_SIZE=5", "NUM_WORKER=0"])
    return cfg, ann, images


def _with_margins(ann, path, margins):
    data = json.loads(open(ann).read())
    for entry, margin in zip(data["train"], margins):
        entry[MARGIN_FIELD] = margin
    path.write_text(json.dumps(data))
    return str(path)


def test_the_student_trains_on_the_kept_entries_with_their_weights(tmp_path, tiny_files):
    cfg, ann, images = tiny_files
    margins = [float(i) for i in range(16)]
    margins[3] = None  # nothing competed with this label: the most decided of all
    labels = _with_margins(ann, tmp_path / "margins.json", margins)
    check_training_file(labels, ann, "train", "synthetic", images)
    dataset = RefDataset(cfg, "train", labels)
    assert training_entries(dataset, 1.0, "none") is dataset
    kept = training_entries(dataset, 0.25, "none")
    assert isinstance(kept, WeightedEntries) and kept.indices == [3, 13, 14, 15] and kept.weights is None
    assert "weight" not in kept[0]
    weighted = training_entries(dataset, 0.25, "margin")
    assert [float(weighted[i]["weight"]) for i in range(4)] == pytest.approx([1.75, 0.25, 0.75, 1.25])
    # The training sampler's keys reach the right entries, each with its weight.
    sampler = EpochSampler(len(weighted), 2, seed=0)
    for key in sampler:
        item = weighted[key]
        assert torch.equal(item["gt_box"], dataset[(weighted.indices[key[0]], key[1])]["gt_box"])
    batch = default_collate([weighted[key] for key in sampler])
    assert batch["weight"].shape == (4,) and float(batch["weight"].sum()) == pytest.approx(4.0)


def test_box_loss_weights_scale_each_sample():
    torch.manual_seed(0)
    head = BoxHead(8, 8, stride=8)
    raw = head(torch.randn(3, 8, 8, 8))
    targets = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2], [0.5, 0.5, 0.5, 0.5]])
    plain = head.loss(raw, targets)
    doubled = head.loss(raw, targets, torch.full((3,), 2.0))
    split = [head.loss(raw, targets, torch.eye(3)[i]) for i in range(3)]
    for part in ("loss", "iou", "obj", "l1"):
        torch.testing.assert_close(doubled[part], 2 * plain[part])
        torch.testing.assert_close(sum(s[part] for s in split), plain[part])


def _old_export_boxes(model, dataset, cfg, every):
    """The export's boxes as this code computed them before joint assignment and margins existed."""
    items = EntryExpressions(dataset) if every else FirstExpression(dataset)
    boxes = []
    for batch in DataLoader(items, batch_size=cfg.BATCH_SIZE):
        batch = prepare_batch(model, batch, CPU, mean_std=(cfg.MEAN, cfg.STD))
        if every:
            refs = batch["refs"]
            own = torch.arange(refs.shape[1])[None] < batch["count"][:, None]
            detections = model.detect(batch["image"])
            total = torch.zeros(())
            for e in range(refs.shape[1]):
                similarities, candidates = model.rank(batch["image"], refs[:, e:e + 1], detections)
                total = total + similarities.float() * own[:, e:e + 1]
            best = total.argmax(dim=1)
            pred = letterbox_to_original(candidates[torch.arange(len(best)), best, :4].float(), batch["info"])
        else:
            pred = model_boxes(model, batch, "none", CPU)
        boxes.append(clip_to_image(pred, batch["info"]).numpy().astype(np.float64))
    return np.concatenate(boxes)


@pytest.mark.parametrize("expressions", ["all", "first"])
def test_independent_assignment_gives_exactly_the_earlier_boxes_and_joint_separates_referents(tiny_files,
                                                                                                 expressions):
    cfg, _, _ = tiny_files
    cfg = cfg.replace(PSEUDO_LABEL_EXPRESSIONS=expressions)
    dataset = RefDataset(cfg, "train")
    torch.manual_seed(0)
    model = build_model(cfg, None, len(dataset.vocab)).eval()
    labels = pseudo_labels(model, dataset, cfg, CPU)
    assert np.array_equal(labels.boxes, _old_export_boxes(model, dataset, cfg, expressions == "all"))
    assert labels.margins.shape == (len(dataset),) and (labels.margins >= 0).all() and not labels.moved.any()

    joint = pseudo_labels(model, dataset, cfg.replace(PSEUDO_LABEL_ASSIGNMENT="joint"), CPU)
    assert joint.moved.any(), "the untrained model should send some referents of an image to one box"
    iids = np.array([entry["iid"] for entry in dataset.entries])
    for iid in np.unique(iids):  # two referents per training image of the tiny data
        first, second = torch.from_numpy(joint.boxes[iids == iid])
        assert box_iou(first[None], second[None]).item() <= 0.5
    # Only entries the joint assignment moved carry another box, and a negative margin.
    same = (joint.boxes == labels.boxes).all(axis=1)
    assert np.array_equal(~same, joint.moved) and (joint.margins[joint.moved] <= 0).all()


def test_bad_inputs_are_one_clear_line(tmp_path, tiny_files, tiny_overrides):
    cfg, ann, images = tiny_files
    dataset = RefDataset(cfg, "train")
    for keep, weighting in ((0.5, "none"), (1.0, "margin")):
        with pytest.raises(DataError, match=r"anns.json holds no pseudo_margin for entry train\[0\] \(iid 1\).*"
                                            r"export them again with test.py --export-pseudo-labels, or set "
                                            r"PSEUDO_LABEL_KEEP=1.0 PSEUDO_LABEL_WEIGHTING=none"):
            training_entries(dataset, keep, weighting)
    bad = _with_margins(ann, tmp_path / "bad.json", [1.0] * 5 + ["high"] + [1.0] * 10)
    with pytest.raises(DataError, match=r"the pseudo_margin of entry train\[5\] \(iid 3\) is 'high'"):
        check_training_file(bad, ann, "train", "synthetic", images)
    with pytest.raises(ConfigError, match="PSEUDO_LABEL_KEEP must be above 0"):
        load_config("config/refcoco.yaml", ["PSEUDO_LABEL_KEEP=0"])
    with pytest.raises(ConfigError, match="PSEUDO_LABEL_KEEP must be between 0 and 1"):
        load_config("config/refcoco.yaml", ["PSEUDO_LABEL_KEEP=1.5"])
    with pytest.raises(ConfigError, match="PSEUDO_LABEL_WEIGHTING: margin weights the student's box loss"):
        load_config("config/refcoco.yaml", ["PSEUDO_LABEL_WEIGHTING=margin"])
    with pytest.raises(ConfigError, match="PSEUDO_LABEL_ASSIGNMENT must be 'independent' or 'joint'"):
        load_config("config/refcoco.yaml", ["PSEUDO_LABEL_ASSIGNMENT=greedy"])
    student_cfg = load_config("config/refcoco.yaml", [*tiny_overrides, "ARCH=student", "BOX_HEAD_CHANNELS=8",
                                                      "PSEUDO_LABEL_ASSIGNMENT=joint"])
    with pytest.raises(ConfigError, match="set PSEUDO_LABEL_ASSIGNMENT=independent"):
        check_export_config(build_model(student_cfg, None, 10), student_cfg)
