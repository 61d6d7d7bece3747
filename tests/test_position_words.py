"""POSITION_WORDS: the lexicon's rule (models/position_words.py) in the weak model's and the
student's answers and in the pseudo-label export."""
import numpy as np
import pytest
import torch
from torchvision.ops import box_convert

from datasets import RefDataset, build_loader
from models import build_model
from models.position_words import PositionWords, direction, reorder
from tiny_data import tiny_config
from utils.config import ConfigError
from utils.engine import prepare_batch
from utils.pseudo_label_export import assign_image, pseudo_labels

CPU = torch.device("cpu")
VOCAB = ["<pad>", "<unk>", "<cls>", "the", "circle", "on", "left", "right", "leftmost", "upper", "lowest"]
IDS = {word: i for i, word in enumerate(VOCAB)}
WIDTH = 200.0
# One image's candidates: the left circle, a second box of it (IoU 0.76), the right circle, and a
# square further left than both that the expression does not fit.
LEFT, LEFT2, RIGHT, SQUARE = [30.0, 50.0, 70.0, 90.0], [35.0, 50.0, 75.0, 90.0], [130.0, 40.0, 170.0, 80.0], \
    [0.0, 0.0, 20.0, 20.0]
BOXES = torch.tensor([[LEFT, LEFT2, RIGHT, SQUARE]])
# The model's scores: the two circles alike (the right a little ahead), the left circle's second box
# a little behind its first, the square far behind.
SCORES = torch.tensor([[2.0, 1.9, 2.2, -3.0]])


def _refs(*texts):
    return torch.tensor([[IDS[w] for w in text.split()] + [0] * (5 - len(text.split())) for text in texts])


def _mirror(boxes):
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([WIDTH - x2, y1, WIDTH - x1, y2], dim=-1)


def test_reorder_hands_the_plausible_scores_out_along_the_direction():
    scores = torch.tensor([-0.1, -0.3, -5.0, -torch.inf], dtype=torch.float64)
    centres = torch.tensor([[80.0, 10.0], [20.0, 10.0], [0.0, 10.0], [50.0, 10.0]], dtype=torch.float64)
    left = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    # Objects 0 and 1 are within a nat of the best: the left one (1) takes the best score. Object 2 is
    # further left but implausible, and keeps its score; so does the non-candidate.
    assert reorder(scores, centres, left, 1.0).tolist() == [-0.3, -0.1, -5.0, -torch.inf]
    assert reorder(scores, centres, -left, 1.0).tolist() == scores.tolist()
    assert torch.equal(reorder(scores, centres, torch.zeros(2), 10.0), scores)
    assert torch.equal(reorder(scores, centres, left, 0.1), scores), "one plausible object: nothing to order"
    # A wide tolerance takes the square in: it is furthest left, and gets the best score.
    assert reorder(scores, centres, left, 10.0).argmax().item() == 2


def test_direction_sums_the_lexicons_words_and_opposite_words_cancel():
    assert direction("the leftmost circle".split()) == (-1.0, 0.0)
    assert direction("upper left one".split()) == (-1.0, -1.0)
    assert direction(["left", "right"]) == (0.0, 0.0)
    assert direction(["circle"]) == (0.0, 0.0)


def test_choose_takes_the_plausible_object_furthest_along_the_words_direction():
    words = PositionWords(VOCAB, tolerance=1.0)
    texts = ["the circle", "the circle on the left", "leftmost circle", "right circle"]
    chosen = words.choose(SCORES.expand(4, -1), BOXES.expand(4, -1, -1), _refs(*texts))
    # Without a position word the best-scored candidate; "left" the left circle's best box (not its
    # second box, not the square); "right" the right circle.
    assert chosen.tolist() == [2, 0, 0, 2]
    # Mirrored images with the words swapped give the mirrored answers.
    mirrored = words.choose(SCORES.expand(4, -1), _mirror(BOXES).expand(4, -1, -1),
                            _refs("the circle", "the circle on the right", "right circle", "leftmost circle"))
    assert mirrored.tolist() == chosen.tolist()
    # Vertical words order by y: the right circle is the upper one.
    assert words.choose(SCORES.expand(2, -1), BOXES.expand(2, -1, -1), _refs("upper circle", "lowest circle")
                        ).tolist() == [2, 0]


def test_joint_assignment_gives_the_left_referent_the_left_box():
    scores = SCORES.log_softmax(dim=1).double().numpy().repeat(2, axis=0)
    boxes = BOXES.double().numpy().repeat(2, axis=0)
    # Without position words both referents prefer the right circle; the assignment can only guess
    # which of them moves.
    towards = np.array([[-1.0, 0.0], [1.0, 0.0]])
    assert assign_image(scores, boxes, towards, np.ones(2)).tolist() == [0, 2]
    assert assign_image(scores, boxes, -towards, np.ones(2)).tolist() == [2, 0]
    # An entry without a direction keeps its own scores; a tolerance too narrow leaves them as well.
    assert assign_image(scores[:1], boxes[:1], np.zeros((1, 2)), np.ones(1)).tolist() == [2]
    assert assign_image(scores[:1], boxes[:1], towards[:1], np.full(1, 0.1)).tolist() == [2]


def test_the_model_answers_by_the_rule_and_reads_the_same_checkpoints(tiny):
    plain_cfg, cfg = tiny_config(tiny), tiny_config(tiny, "POSITION_WORDS=lexicon", "POSITION_TOLERANCE=2.0")
    dataset = RefDataset(cfg, "val")
    torch.manual_seed(0)
    plain = build_model(plain_cfg, None, len(dataset.vocab), dataset.vocab).eval()
    lexicon = build_model(cfg, None, len(dataset.vocab), dataset.vocab).eval()
    lexicon.load_state_dict(plain.state_dict())  # the lexicon adds nothing to a checkpoint
    assert lexicon.state_dict().keys() == plain.state_dict().keys()
    batch = prepare_batch(plain, next(iter(build_loader(cfg, dataset, train=False))), CPU,
                          mean_std=(cfg.MEAN, cfg.STD))
    with torch.no_grad():
        # The tiny data's expressions hold no position word: the answers are the plain model's.
        assert torch.equal(lexicon(batch["image"], batch["refs"]), plain(batch["image"], batch["refs"]))
        # Read its colour words as "left": every answer is the leftmost candidate within 2 nats.
        lexicon.position_words.directions[[dataset.token_to_ix[w] for w in ("red", "green", "blue")]] = \
            torch.tensor([-1.0, 0.0])
        answers = lexicon(batch["image"], batch["refs"])[:, 0]
        similarities, candidates = plain.rank(batch["image"], batch["refs"])
    log_probs = similarities.log_softmax(dim=1)
    moved = 0
    for answer, scores, boxes in zip(answers, log_probs, candidates):
        plausible = boxes[scores >= scores.max() - 2.0]
        centre_x = (answer[0] + answer[2]) / 2
        assert centre_x <= ((plausible[:, 0] + plausible[:, 2]) / 2).min() + 1e-4
        moved += not torch.equal(answer, boxes[scores.argmax()])
    assert moved, "the untrained model's plausible candidates should not all have the best on the left"


def test_the_export_orders_each_entrys_plausible_boxes_by_its_words(tiny):
    cfg = tiny_config(tiny, "POSITION_TOLERANCE=2.0")
    dataset = RefDataset(cfg, "train")
    torch.manual_seed(0)
    model = build_model(cfg, None, len(dataset.vocab), dataset.vocab).eval()
    plain = pseudo_labels(model, dataset, cfg, CPU)
    lexicon = cfg.replace(POSITION_WORDS="lexicon")
    # Without position words in any expression the labels are the same, independent or joint.
    assert np.array_equal(pseudo_labels(model, dataset, lexicon, CPU).boxes, plain.boxes)
    joint = cfg.replace(PSEUDO_LABEL_ASSIGNMENT="joint")
    assert np.array_equal(pseudo_labels(model, dataset, joint.replace(POSITION_WORDS="lexicon"), CPU).boxes,
                          pseudo_labels(model, dataset, joint, CPU).boxes)
    # Every expression saying "left": no label lies right of the plain one (the plain label is
    # among the plausible boxes, and the rule takes the leftmost of them).
    for entry in dataset.entries:
        entry["refs"] = [f"left {text}" for text in entry["refs"]]
    left = pseudo_labels(model, dataset, lexicon, CPU)
    centre = lambda boxes: (boxes[:, 0] + boxes[:, 2]) / 2  # noqa: E731
    assert (centre(left.boxes) <= centre(plain.boxes) + 1e-6).all() and (left.moved.any())


def test_the_lexicon_is_refused_where_apls_head_answers(tiny):
    with pytest.raises(ConfigError, match="with APL_ALIGN_PREDICT APL's alignment head answers.*"
                                          "set APL_ALIGN_PREDICT=false or POSITION_WORDS=none"):
        tiny_config(tiny, "POSITION_WORDS=lexicon", "APL_ALIGNMENT=true", "APL_ALIGN_PREDICT=true")


def _box_head_output(model, batch):
    """The student's answers and its box head's raw output for ``batch``."""
    seen = []
    hook = model.box_head.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.no_grad():
            answers = model(batch["image"], batch["refs"])[:, 0]
    finally:
        hook.remove()
    return answers, seen[0]


def test_the_student_answers_by_the_rule_among_its_cells(tiny):
    plain_cfg = tiny_config(tiny, "ARCH=student")
    cfg = tiny_config(tiny, "ARCH=student", "POSITION_WORDS=lexicon", "POSITION_TOLERANCE=2.0")
    dataset = RefDataset(cfg, "val")
    torch.manual_seed(0)
    plain = build_model(plain_cfg, None, len(dataset.vocab), dataset.vocab).eval()
    lexicon = build_model(cfg, None, len(dataset.vocab), dataset.vocab).eval()
    lexicon.load_state_dict(plain.state_dict())
    batch = prepare_batch(plain, next(iter(build_loader(cfg, dataset, train=False))), CPU,
                          mean_std=(cfg.MEAN, cfg.STD))
    plain_answers, raw = _box_head_output(plain, batch)
    assert torch.equal(_box_head_output(lexicon, batch)[0], plain_answers)
    lexicon.position_words.directions[[dataset.token_to_ix[w] for w in ("red", "green", "blue")]] = \
        torch.tensor([-1.0, 0.0])
    answers, _ = _box_head_output(lexicon, batch)
    boxes = box_convert(plain.box_head.boxes(raw.float()), "cxcywh", "xyxy")
    log_probs = raw[..., 4].flatten(1).float().log_softmax(dim=1)
    for answer, scores, cells in zip(answers, log_probs, boxes):
        plausible = cells[scores >= scores.max() - 2.0]
        assert (answer[0] + answer[2]) / 2 <= ((plausible[:, 0] + plausible[:, 2]) / 2).min() + 1e-4
    assert not torch.equal(answers, plain_answers)
