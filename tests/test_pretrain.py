"""pretrain.py: held-out images, the weight-file format, resuming, the loss and the AP."""
import json
import os

import pytest
import torch

import pretrain
from datasets import load_annotations, normalize_images
from datasets.detection import build_detection_datasets, collate_detections, excluded_image_ids
from datasets.synthetic import generate
from models import build_model
from models.detection_loss import detection_loss
from reference_weights import FIXTURES
from utils.checkpoint import load_pretrained_backbone
from utils.config import load_config
from utils.metrics import average_precision


def _normalised(batch: dict, cfg) -> dict:
    """A collated batch with its uint8 images normalised as pretrain.py does on the device."""
    return dict(batch, image=normalize_images(batch["image"], cfg.MEAN, cfg.STD))


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny convolutions gain nothing from a second thread, and two threads spinning against the
    # other processes of a busy 2-core machine make these steps many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("synthetic")), num_images=12, image_size=96, seed=0)


def _overrides(data, log_path, epochs=1):
    return ["INPUT_SHAPE=[64, 64]", "SELECT_NUM=2", "VIS_WIDTH=0.125", "CLASS_NUM=12", "NUM_WORKER=0", "PRINT_FREQ=1",
            f"DET_ANN_PATH={data['detection_train']}", f"DET_VAL_ANN_PATH={data['detection_val']}",
            f"DET_IMAGE_PATH={data['images']}", "DET_VAL_IMAGE_PATH=''",
            f"DET_EXCLUDE_ANNS=[{data['annotations']}]", f"DET_EPOCHS={epochs}", "DET_BATCH_SIZE=4",
            "DET_WARMUP=0.5", f"DET_LOG_PATH={log_path}", f"DET_OUTPUT={log_path}/yolov3.pth"]


def _run(overrides, resume=""):
    args = pretrain.get_args_parser().parse_args(["--config", "config/synthetic/quickstart.yaml", "--device", "cpu"]
                                                 + (["--resume", resume] if resume else []) + overrides)
    assert pretrain.main(args) == 0


def test_rec_val_and_test_images_are_left_out(data):
    cfg = load_config("config/synthetic/quickstart.yaml", _overrides(data, "unused"))
    train_set, val_set = build_detection_datasets(cfg)
    rec = load_annotations(data["annotations"], "synthetic")
    assert train_set.image_ids == sorted({e["iid"] for e in rec["train"]})
    assert val_set.image_ids == sorted({e["iid"] for e in rec["val"]})
    held_out = {e["iid"] for split in ("val", "testA", "testB") for e in rec[split]}
    assert excluded_image_ids([data["annotations"]]) == held_out
    assert train_set.num_excluded == len(held_out)


def test_weight_file_has_the_reference_keys_and_loads_as_pretrain_weight(data, tmp_path, capsys):
    _run(_overrides(data, tmp_path))
    assert "mAP@0.5: " in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["mAP@0.5"] <= 1.0 and metrics["step"] == 2  # 9 images, batches of 4

    with open(os.path.join(FIXTURES, "yolov3_checkpoint_keys.tsv")) as f:
        expected = [line.split("\t")[0] for line in f if line.strip() and not line.startswith("#")]
    weights = torch.load(tmp_path / "yolov3.pth", weights_only=True)
    assert sorted(weights) == sorted(expected)

    cfg = load_config("config/synthetic/quickstart.yaml", _overrides(data, tmp_path) + ["USE_GLOVE=false"])
    model = build_model(cfg, None, token_size=8)
    load_pretrained_backbone(model.visual_encoder, str(tmp_path / "yolov3.pth"))
    head = model.visual_encoder.layers[19]
    assert torch.equal(head.shape_pred.weight, weights["module_list.19.guide_wh.weight"])


def test_resume_continues_from_the_saved_step(data, tmp_path, monkeypatch):
    _run(_overrides(data, tmp_path / "straight", epochs=2))
    loss, calls = pretrain.detection_loss, []

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(*args, **kwargs)

    monkeypatch.setattr(pretrain, "detection_loss", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        _run(_overrides(data, tmp_path / "resumed", epochs=2))
    saved = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 2)

    calls.clear()
    _run(_overrides(data, tmp_path / "resumed", epochs=2), resume=str(tmp_path / "resumed" / "last.pth"))
    assert len(calls) == 2  # the second epoch only
    straight = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    assert (resumed["epoch"], resumed["step"]) == (2, 4)
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, msg=key)


def test_loss_decreases_on_a_fixed_batch(data):
    torch.manual_seed(0)
    cfg = load_config("config/synthetic/quickstart.yaml", _overrides(data, "unused") + ["DET_FLIP=false"])
    train_set, _ = build_detection_datasets(cfg)
    batch = _normalised(collate_detections([train_set[i] for i in range(4)]), cfg)
    model = pretrain.build_detector(cfg)
    optimizer = torch.optim.Adam(model.parameters(), 2e-3)
    losses = []
    for _ in range(8):
        _, raw = model(batch["image"], decode=False)
        parts = detection_loss(model, raw, batch["targets"])
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        losses.append(parts["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def test_class_term_follows_its_weight_and_starts_at_the_prior(data):
    cfg = load_config("config/synthetic/quickstart.yaml", _overrides(data, "unused") + ["DET_FLIP=false"])
    train_set, _ = build_detection_datasets(cfg)
    batch = _normalised(collate_detections([train_set[i] for i in range(2)]), cfg)
    model = pretrain.build_detector(cfg)
    _, outputs = model(batch["image"])
    scores = torch.cat([o[..., 4:].flatten(0, -2) for o in outputs])
    torch.testing.assert_close(scores[:, 0].mean(), torch.tensor(0.01), atol=2e-3, rtol=0)
    torch.testing.assert_close(scores[:, 1:].mean(), torch.tensor(1 / cfg.CLASS_NUM), atol=1e-2, rtol=0)
    _, raw = model(batch["image"], decode=False)
    plain = detection_loss(model, raw, batch["targets"])
    weighted = detection_loss(model, raw, batch["targets"], cls_weight=4.0)
    assert weighted["cls"] == plain["cls"] > 0
    torch.testing.assert_close(weighted["loss"], plain["loss"] + 3.0 * plain["cls"])


def test_boxes_are_assigned_to_the_best_prior_and_the_anchor_free_slot(data):
    priors = "[[4, 4], [6, 6], [8, 8], [10, 10], [12, 12], [14, 14], [20, 19], [30, 28], [42, 40]]"
    cfg = load_config("config/synthetic/quickstart.yaml", _overrides(data, "unused") + [f"ANCHORS={priors}"])
    model = pretrain.build_detector(cfg)
    _, raw = model(torch.zeros(1, 3, 64, 64), decode=False)
    # A 30 x 28 box (one of the stride-32 priors) centred in cell (1, 1) of the 2 x 2 stride-32 grid.
    targets = torch.tensor([[0.0, 1.0, 33.0, 34.0, 63.0, 62.0]])
    raw = [(s.detach().requires_grad_(), o.detach().requires_grad_()) for s, o in raw]
    detection_loss(model, raw, targets)["cls"].backward()
    grad = raw[0][1].grad[..., 5:].abs().sum(-1)  # [1, 2, 2, 4]
    assert set(map(tuple, grad.nonzero().tolist())) == {(0, 1, 1, 1), (0, 1, 1, 3)}
    assert all(o.grad is None or not o.grad[..., 5:].any() for _, o in raw[1:])


def test_average_precision():
    box = torch.tensor([0.0, 0.0, 10.0, 10.0])
    truth = {1: box[None], 2: torch.zeros(0, 4)}
    assert average_precision([(1, 0.9, box)], truth) == pytest.approx(1.0)
    # A false positive ranked first halves the precision at full recall.
    assert average_precision([(2, 0.9, box), (1, 0.8, box)], truth) == pytest.approx(0.5)
    # A duplicate of a matched box is a false positive that comes after full recall: no loss.
    assert average_precision([(1, 0.9, box), (1, 0.8, box)], truth) == pytest.approx(1.0)
    assert average_precision([(1, 0.9, box + 8)], truth) == 0.0



def test_batched_loss_sums_the_losses_of_its_images(data):
    """The ignore test runs on the whole batch (boxes padded per image): each term's sum over the
    batch is the sum of the terms of its images computed alone, an image without boxes included."""
    cfg = load_config("config/synthetic/quickstart.yaml", _overrides(data, "unused") + ["DET_FLIP=false"])
    train_set, _ = build_detection_datasets(cfg)
    batch = _normalised(collate_detections([train_set[i] for i in range(4)]), cfg)
    targets = batch["targets"][batch["targets"][:, 0] != 2]  # image 2 without boxes
    model = pretrain.build_detector(cfg)
    with torch.no_grad():
        _, raw = model(batch["image"], decode=False)
    for ignore_iou in (0.0, 0.3, 0.5):
        whole = detection_loss(model, raw, targets, ignore_iou)
        positives = 2 * len(targets)
        sums = dict.fromkeys(("shape", "box", "obj", "cls"), 0.0)
        for k in range(4):
            mine = targets[targets[:, 0] == k].clone()
            mine[:, 0] = 0
            alone = detection_loss(model, [(s[k:k + 1], o[k:k + 1]) for s, o in raw], mine, ignore_iou)
            for key in sums:
                sums[key] += alone[key] * max(2 * len(mine), 1)  # the loss divides by the positives
        for key in sums:
            torch.testing.assert_close(whole[key] * positives, sums[key], rtol=1e-5, atol=1e-4)
