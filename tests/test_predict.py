"""Batch prediction (utils/predictor.py, predict.py) and the drawings (utils/visualize.py) on a tiny
trained model."""
import json
import os

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import clip_boxes_to_image

import predict
from datasets import DataError, EntryExpressions, FirstExpression, RefDataset
from test_pipeline import overrides, run
from utils.config import ConfigError
from utils.engine import to_device
from utils.evaluation import entry_boxes, model_boxes as evaluation_predict
from utils.predictor import Predictor, vocabulary_warnings
from utils.visualize import (CORRECT, GROUND_TRUTH, WRONG, contact_sheet, draw_box, draw_evaluation,
                             sample_across_images, text_colour)

FIELDS = {"image", "expression", "box", "match_score", "objectness", "unknown_words", "warnings", "candidates"}
K = 3  # SELECT_NUM of the tiny model


@pytest.fixture(scope="module")
def trained(tiny):  # noqa: F811
    root = tiny[0]
    run("train.py", "--config", "config/refcoco.yaml", *overrides(root, tiny, "EPOCHS=1", logs="predict"))
    return root / "predict" / "last.pth"


@pytest.fixture(scope="module")
def predictor(trained):
    return Predictor.from_checkpoint(str(trained), "cpu")


def test_scores_are_probabilities_over_the_candidates_best_first(predictor, tiny):  # noqa: F811
    image = os.path.join(tiny[2], "1.jpg")
    expressions = ["the red square", "blue one", "green"]
    full = predictor.predict(image, expressions, topk=K)
    for prediction in full:
        scores = [c.match_score for c in prediction.candidates]
        assert len(scores) == K and all(0 <= s <= 1 for s in scores)
        assert sum(scores) == pytest.approx(1, abs=1e-5)
        assert scores == sorted(scores, reverse=True)
        best = prediction.candidates[0]
        assert (best.box, best.match_score, best.objectness) == (prediction.box, prediction.match_score,
                                                                 prediction.objectness)
        assert 0 <= prediction.objectness <= 1
    top2 = predictor.predict(image, expressions, topk=2)
    assert [p.candidates for p in top2] == [p.candidates[:2] for p in full]
    assert all(p.candidates == [] for p in predictor.predict(image, expressions))


def test_boxes_match_evaluation_and_do_not_depend_on_the_batch(predictor, trained):
    cfg = predictor.cfg
    dataset = RefDataset(cfg, "val")
    batch = torch.utils.data.default_collate([FirstExpression(dataset)[i] for i in range(len(dataset))])
    batch = to_device(batch, torch.device("cpu"), (cfg.MEAN, cfg.STD))
    expected = evaluation_predict(predictor.model, batch, "none", torch.device("cpu"))
    expected = torch.cat([clip_boxes_to_image(box[None], (h, w))  # torchvision's, per image
                          for box, (h, w) in zip(expected, batch["info"][:, :2].tolist())])
    images = [dataset.image_file(entry) for entry in dataset.entries]
    expressions = [entry["refs"][0] for entry in dataset.entries]
    for batch_size in (1, 3):
        boxes = torch.tensor([p.box for p in predictor.predict(images, expressions, batch_size=batch_size)])
        torch.testing.assert_close(boxes, expected.float(), atol=1e-3, rtol=0)


def test_pseudo_labels_from_all_expressions_of_an_entry(predictor):
    dataset = RefDataset(predictor.cfg, "train")
    for i, entry in enumerate(dataset.entries):  # one, two or three expressions per entry
        entry["refs"] = entry["refs"][:1 + i % 3]
    items = EntryExpressions(dataset)
    batch = to_device(torch.utils.data.default_collate([items[i] for i in range(len(dataset))]), torch.device("cpu"),
                      (predictor.cfg.MEAN, predictor.cfg.STD))
    counts = [1 + i % 3 for i in range(len(dataset))]
    assert batch["count"].tolist() == counts and batch["refs"].shape[1] == items.width == 3
    for row, count in enumerate(counts):  # the rows past an entry's own repeat its first
        assert (batch["refs"][row, count:] == batch["refs"][row, :1]).all()
        assert len(batch["refs"][row, :count].unique(dim=0)) == count
    cpu, model = torch.device("cpu"), predictor.model
    boxes = entry_boxes(model, batch, "none", cpu)

    # One expression decides as evaluation does.
    alone = entry_boxes(model, dict(batch, count=torch.ones_like(batch["count"])), "none", cpu)
    torch.testing.assert_close(alone, evaluation_predict(model, dict(batch, refs=batch["refs"][:, :1]), "none", cpu))
    # The entry's own expressions vote in any order; the padding rows after them have no say.
    shuffled = batch["refs"].clone()
    for row, count in enumerate(counts):
        shuffled[row, :count] = batch["refs"][row, :count].flip(0)
        shuffled[row, count:] = torch.randint(3, len(predictor.vocab), shuffled[row, count:].shape)
    torch.testing.assert_close(entry_boxes(model, dict(batch, refs=shuffled), "none", cpu), boxes)


def test_boxes_are_clipped_to_the_image(predictor):
    strip = np.full((8, 96, 3), 127, np.uint8)  # letterboxed, mostly padding: candidates reach past it
    strip[:, 40:48] = (0, 0, 255)
    predictions = predictor.predict(strip, ["the red square", "blue"], topk=K)
    boxes = np.array([c.box for p in predictions for c in p.candidates])
    assert predictions[0].image == "<array 0>"
    assert (boxes >= 0).all() and (boxes[:, 0::2] <= 96).all() and (boxes[:, 1::2] <= 8).all()
    assert (boxes[:, 1] == 0).any() or (boxes[:, 3] == 8).any(), "no box reached past the strip"


def test_unknown_words_are_named_and_none_known_is_said():
    vocab = {"PAD": 0, "UNK": 1, "CLS": 2, "the": 3, "red": 4, "square": 5}
    assert vocabulary_warnings("the red square", vocab, 4) == ([], [])
    unknown, warnings = vocabulary_warnings("the purple square, purple!", vocab, 0)
    assert unknown == ["purple"] and len(warnings) == 1 and warnings[0].endswith("read as unknown: purple")
    unknown, warnings = vocabulary_warnings("Zebra", vocab, 4)
    assert unknown == ["zebra"] and warnings == ["'Zebra' has no word in the model's vocabulary: no word of it "
                                                 "guides the box"]
    assert "has no words" in vocabulary_warnings("?!", vocab, 4)[1][0]
    assert vocabulary_warnings("the red red red square", vocab, 4)[1] == [
        "'the red red red square': only the first 4 words are read (MAX_TOKEN); ignored: square"]


def test_a_model_without_candidates_reports_its_confidence(predictor, tiny):  # noqa: F811
    class BoxesOnly(torch.nn.Module):
        """The REC model's eval boxes without its ranking, as a supervised model gives them."""
        supervised = True

        def __init__(self, rec):
            super().__init__()
            self.rec = rec

        def forward(self, images, refs, detections=None):
            return self.rec(images, refs)

    image = os.path.join(tiny[2], "2.jpg")
    ranked = predictor.predict(image, ["red", "green square"])
    boxes_only = Predictor(BoxesOnly(predictor.model), predictor.cfg, predictor.vocab, predictor.device)
    for plain, full in zip(boxes_only.predict(image, ["red", "green square"], topk=K), ranked):
        assert plain.box == pytest.approx(full.box) and plain.match_score == pytest.approx(full.objectness)
        assert plain.objectness is None and len(plain.candidates) == 1


def test_folder_input_writes_json_lines_warnings_and_drawings(trained, tiny, tmp_path, predictor):  # noqa: F811
    exprs = tmp_path / "exprs.tsv"
    exprs.write_text("# file name<TAB>expression\n1.jpg\tthe red square\n\n3.jpg\tpurple square\n3.jpg\tzebra\n")
    out_json = tmp_path / "out" / "boxes.jsonl"
    out = run("predict.py", "--weights", str(trained), "--image-dir", tiny[2], "--exprs-file", str(exprs),
              "--topk", "2", "--batch-size", "2", "--out-json", str(out_json), "--out-dir", str(tmp_path / "drawn"))
    lines = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert [(os.path.basename(p["image"]), p["expression"]) for p in lines] == [
        ("1.jpg", "the red square"), ("3.jpg", "purple square"), ("3.jpg", "zebra")]
    h, w = cv2.imread(os.path.join(tiny[2], "1.jpg")).shape[:2]
    for line in lines:
        assert set(line) == FIELDS and len(line["candidates"]) == 2
        assert set(line["candidates"][0]) == {"box", "match_score", "objectness"}
        x1, y1, x2, y2 = line["box"]
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
    assert [p["unknown_words"] for p in lines] == [[], ["purple"], ["zebra"]]
    api = predictor.predict([p["image"] for p in lines], [p["expression"] for p in lines], topk=2)
    np.testing.assert_allclose([p["box"] for p in lines], [p.box for p in api], atol=1e-4)

    warnings = out.stderr.strip().splitlines()
    assert len(warnings) == 2
    assert warnings[0].startswith(f"warning: {exprs} line 4: ") and warnings[0].endswith("unknown: purple")
    assert "'zebra' has no word in the model's vocabulary" in warnings[1]
    assert len([line for line in out.stdout.splitlines() if " box " in line]) == 3
    assert sorted(os.listdir(tmp_path / "drawn")) == ["00001_1.png", "00002_3.png", "00003_3.png"]


def test_input_files_errors_name_the_line_or_entry(tmp_path, tiny):  # noqa: F811
    image = os.path.join(tiny[2], "1.jpg")
    listed = tmp_path / "pairs.json"
    listed.write_text(json.dumps([{"image": image, "expression": "red"}, {"image": image}]))
    with pytest.raises(DataError, match=r"pairs.json entry 1: expected \{\"image\": path"):
        predict.read_input_file(str(listed))
    lines = tmp_path / "pairs.jsonl"
    lines.write_text(json.dumps({"image": "../1.jpg", "expression": "red"}) + "\n{'image': 'x'}\n")
    with pytest.raises(DataError, match="pairs.jsonl line 2 is not valid JSON"):
        predict.read_input_file(str(lines))
    lines.write_text("\n" + json.dumps({"image": "images/1.jpg", "expression": "red"}) + "\n")
    assert predict.read_input_file(str(lines)) == [(str(tmp_path / "images" / "1.jpg"), "red", f"{lines} line 2")]
    exprs = tmp_path / "exprs.tsv"
    exprs.write_text("1.jpg\tred\n1.jpg red square\n")
    with pytest.raises(DataError, match=r"exprs.tsv line 2: expected 'file name<TAB>expression'"):
        predict.read_exprs_file(str(exprs), tiny[2])
    args = predict.get_args_parser().parse_args(["--weights", "w.pth", "--image", str(tmp_path / "absent.jpg"),
                                                 "--expr", "red"])
    with pytest.raises(FileNotFoundError, match=r"image not found: .*absent.jpg \(--expr 1\)"):
        predict.read_inputs(args)
    args = predict.get_args_parser().parse_args(["--weights", "w.pth", "--image", image])
    with pytest.raises(ConfigError, match="--image needs at least one --expr"):
        predict.read_inputs(args)


def test_a_file_that_is_not_an_image_is_a_one_line_error(trained, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    out = run("predict.py", "--weights", str(trained), "--image", str(notes), "--expr", "red", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"error: image {notes} is not an image OpenCV can decode (JPEG, "
                                               "PNG, BMP, TIFF, WebP...): replace the file, or remove what refers "
                                               "to it"]


def test_contact_sheet_grid_and_tiles_of_one_shape():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((60, 200), (300, 90), (96, 112))] * 2
    box = np.array([10.0, 5.0, 50.0, 40.0])
    drawings = [draw_evaluation(im, "the red square on the left", box, box + 3, 0.7, tile=160)
                for im in images[:5]]
    assert len({d.shape for d in drawings}) == 1
    h, w = drawings[0].shape[:2]
    sheet = contact_sheet(drawings)
    assert sheet.shape == (2 * h, 3 * w, 3)
    np.testing.assert_array_equal(sheet[h + 1:2 * h - 1, 1:w - 1], drawings[3][1:-1, 1:-1])
    assert (sheet[h:, 2 * w:] == 255).all(), "the sixth cell stays empty"
    assert contact_sheet(drawings, columns=2).shape == (3 * h, 2 * w, 3)
    with pytest.raises(ValueError, match="share one shape"):
        contact_sheet([drawings[0], images[0]])


def test_sampling_spreads_over_images_with_a_fixed_seed():
    image_ids = [7, 7, 7, 7, 8, 9, 9]
    picked = sample_across_images(image_ids, 3, seed=1)
    assert sorted(image_ids[i] for i in picked) == [7, 8, 9]
    assert picked == sample_across_images(image_ids, 3, seed=1)
    assert sorted(sample_across_images(image_ids, 10, seed=1)) == list(range(7))


def test_labels_sit_on_a_band_of_the_box_colour_in_a_contrasting_colour():
    for colour in (GROUND_TRUTH, CORRECT, WRONG, (0, 255, 255)):
        canvas = np.full((120, 200, 3), 127, np.uint8)
        draw_box(canvas, (40, 60, 150, 110), colour, "prediction")
        above = canvas[30:60, 40:150].reshape(-1, 3)
        ink = text_colour(colour)
        assert (above == colour).all(-1).sum() > 500 and (above == ink).all(-1).sum() > 20
        brightness = np.array([0.114, 0.587, 0.299])
        assert abs(brightness @ colour - brightness @ ink) > 90


def test_published_checkpoint_keeps_what_prediction_reads_and_is_named_by_its_sha256(trained, predictor, tmp_path):
    from tools.publish_checkpoint import PUBLISHED_KEYS, publish, sha256_of
    from utils.checkpoint import CheckpointMismatchError
    path = publish(str(trained), str(tmp_path / "tiny.pth"))
    name = os.path.basename(path)
    assert name == f"tiny-{sha256_of(path)[:8]}.pth" and os.listdir(tmp_path) == [name]
    source, published = torch.load(trained, weights_only=True), torch.load(path, weights_only=True)
    assert tuple(published) == PUBLISHED_KEYS and "optimizer" in source and source["ema"] is not None
    for key, value in source["state_dict"].items():  # the EMA's weights, as evaluated
        assert torch.equal(published["state_dict"][key], value)
    assert os.path.getsize(path) < os.path.getsize(trained) / 2
    dataset = RefDataset(predictor.cfg, "val")
    image = dataset.image_file(dataset.entries[0])
    again = Predictor.from_checkpoint(path, "cpu")
    assert [p.to_dict() for p in again.predict(image, ["the red square", "blue one"], topk=K)] == \
        [p.to_dict() for p in predictor.predict(image, ["the red square", "blue one"], topk=K)]
    torch.save(source["state_dict"], tmp_path / "raw.pth")
    with pytest.raises(CheckpointMismatchError, match="is not a checkpoint of train.py"):
        publish(str(tmp_path / "raw.pth"), str(tmp_path / "raw_published.pth"))
