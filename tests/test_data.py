"""The data pipeline against the reference's output (tests/fixtures/data) and on bad data."""
import json
import os

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist

from datasets import (DataError, EpochSampler, RefDataset, ShardSampler, box_to_yolo, build_loader, clip_to_image,
                      letterbox_geometry, letterbox_image, letterbox_to_original, normalize_images,
                      original_to_letterbox, select_expressions, tokenize)
from reference_weights import FIXTURES as ALL_FIXTURES
from utils.config import load_config
from utils.engine import to_device

FIXTURES = os.path.join(ALL_FIXTURES, "data")
with open(os.path.join(FIXTURES, "expected.json")) as _f:
    EXPECTED = json.load(_f)
with open(os.path.join(FIXTURES, "anns.json")) as _f:
    FIXTURE_ANNS = json.load(_f)
CASES = [(split, i) for split, entries in FIXTURE_ANNS.items() for i in range(len(entries))]


def fixture_config(*overrides):
    cfg = load_config(None, ["INPUT_SHAPE=[416, 416]", "MAX_TOKEN=15", *overrides])
    cfg = cfg.replace(ANN_PATH={"refcoco": os.path.join(FIXTURES, "anns.json")})
    cfg = cfg.replace(IMAGE_PATH={"refcoco": os.path.join(FIXTURES, "images")})
    return cfg


def synthetic_config(tmp_path, splits, image_sizes, *overrides):
    """A 'synthetic' dataset (images named <iid>.jpg) in tmp_path; image_sizes: {iid: (h, w)}."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for iid, (h, w) in image_sizes.items():
        cv2.imwrite(str(image_dir / f"{iid}.jpg"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    ann = tmp_path / "anns.json"
    ann.write_text(json.dumps(splits))
    cfg = load_config(None, ["DATASET=synthetic", "INPUT_SHAPE=[64, 64]", "SELECT_NUM=4", "MAX_TOKEN=6", "NUM_WORKER=0",
                             *overrides])
    cfg = cfg.replace(ANN_PATH={"synthetic": str(ann)})
    cfg = cfg.replace(IMAGE_PATH={"synthetic": str(image_dir)})
    return cfg


def entry(iid, refs, bbox=(1.0, 2.0, 10.0, 12.0)):
    return {"iid": iid, "bbox": list(bbox), "cat_id": 0, "refs": refs, "mask_id": iid}


# --- parity with the reference pipeline -------------------------------------------------------

@pytest.fixture(scope="module")
def fixture_datasets():
    cfg = fixture_config()
    return {split: RefDataset(cfg, split) for split in FIXTURE_ANNS}


def test_vocabulary_matches_reference(fixture_datasets):
    for dataset in fixture_datasets.values():
        assert dataset.vocab == EXPECTED["vocab"]
        assert dataset.max_token_seen == EXPECTED["max_token_seen"]


@pytest.mark.parametrize("split,index", CASES)
def test_tokens_and_expression_rule_match_reference(fixture_datasets, split, index):
    dataset = fixture_datasets[split]
    refs = dataset.entries[index]["refs"]
    tokens = [dataset.encode(text) for text in refs]
    assert all(t.dtype == np.int64 and t.shape == (15,) for t in tokens)
    assert [t.tolist() for t in tokens] == EXPECTED[f"{split}/{index}/tokens"]
    by_primary = [dataset.sample_refs(index, p).tolist() for p in range(len(refs))]
    assert by_primary == EXPECTED[f"{split}/{index}/three_refs_by_primary"]


@pytest.mark.parametrize("split,index", CASES)
def test_items_match_reference(fixture_datasets, split, index):
    key = f"{split}/{index}"
    item = fixture_datasets[split][index]
    assert item["refs"].dtype == torch.int64 and item["refs"].shape == (3, 15)
    assert item["refs"].tolist() in EXPECTED[f"{key}/three_refs_by_primary"]
    assert item["box"].dtype == torch.float32 and item["box"].shape == (1, 4)
    torch.testing.assert_close(item["box"], torch.tensor(EXPECTED[f"{key}/yolo_box"]), rtol=0, atol=1e-7)
    assert item["gt_box"].dtype == torch.float32
    assert item["gt_box"].tolist() == EXPECTED[f"{key}/gt_box"]
    assert item["info"].tolist() == EXPECTED[f"{key}/info"]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 416, 416)
    image = normalize_images(item["image"], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert image.dtype == torch.float32 and image.is_contiguous()
    # JPEG decoders may differ by one level in a few pixels, hence the tolerance.
    assert image.mean().item() == pytest.approx(EXPECTED[f"{key}/image_tensor_mean"], abs=2e-3)
    assert image.std().item() == pytest.approx(EXPECTED[f"{key}/image_tensor_std"], abs=2e-3)


@pytest.mark.parametrize("split,index", CASES)
def test_letterboxed_pixels_match_reference(fixture_datasets, split, index):
    square, info = fixture_datasets[split].letterboxed(index)
    reference = cv2.cvtColor(cv2.imread(os.path.join(FIXTURES, f"letterboxed_{split}_{index}.png")),
                             cv2.COLOR_BGR2RGB)
    assert square.dtype == np.uint8 and square.shape == reference.shape
    assert np.abs(square.astype(int) - reference.astype(int)).max() <= 1
    assert list(info) == EXPECTED[f"{split}/{index}/info"]


def test_batch_normalised_on_the_device_equals_the_per_sample_normalisation(fixture_datasets):
    """The loader ships uint8 images and the engine normalises the batch: bit for bit what the
    datasets returned before, each sample normalised alone (that arithmetic is spelled out here)."""
    dataset = fixture_datasets["train"]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    items = [dataset[i] for i in range(len(dataset))]
    batch = {"image": torch.stack([item["image"] for item in items]), "info": torch.stack([i["info"] for i in items])}
    normalised = to_device(batch, torch.device("cpu"), (mean, std))["image"]
    per_sample = []
    for i in range(len(dataset)):
        square, _ = dataset.letterboxed(i)
        image = torch.from_numpy(square).permute(2, 0, 1).contiguous().float().div(255)
        per_sample.append((image - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    assert batch["image"].dtype == torch.uint8
    assert torch.equal(normalised, torch.stack(per_sample))
    with pytest.raises(TypeError, match="uint8 letterboxed images"):
        to_device({"image": normalised}, torch.device("cpu"), (mean, std))


# --- tokens and the expressions of a sample ----------------------------------------------------

def test_tokenize_rules():
    assert tokenize("Man in the RED shirt!") == ["man", "in", "the", "red", "shirt"]
    assert tokenize("left-most zebra/top") == ["left", "most", "zebra", "top"]
    assert tokenize("dog's (tail) #1: \"a\"; b* c? d.") == ["dogs", "tail", "1", "a", "b", "c", "d"]
    assert tokenize("...!?") == [] and tokenize("") == []
    assert tokenize("café & co") == ["café", "&", "co"]


def test_empty_long_and_unknown_expressions(fixture_datasets):
    dataset = fixture_datasets["train"]
    assert dataset.encode("").tolist() == [0] * 15  # no words: all PAD, as the reference
    assert dataset.encode("?!.,").tolist() == [0] * 15
    long = dataset.encode("dog " * 40)
    assert long.shape == (15,) and (long == dataset.vocab.index("dog")).all()
    assert dataset.encode("dog zzzunseen").tolist()[:3] == [dataset.vocab.index("dog"), 1, 0]


def test_wordless_expressions_are_reported_by_entry(tmp_path, caplog):
    splits = {"train": [entry(1, ["a red dog"]), entry(2, ["blue cat", "  ", "?!"])]}
    cfg = synthetic_config(tmp_path, splits, {1: (20, 30), 2: (20, 30)})
    with caplog.at_level("WARNING"):
        RefDataset(cfg, "train")
    assert "2 expression(s) have no words (first: expression 1 of entry train[1] (iid 2))" in caplog.text
    caplog.clear()
    clean = {"train": [entry(1, ["a red dog"]), entry(2, ["blue cat"])]}
    with caplog.at_level("WARNING"):
        RefDataset(synthetic_config(tmp_path, clean, {1: (20, 30), 2: (20, 30)}), "train")
    assert "no words" not in caplog.text


@pytest.mark.parametrize("count,num_refs", [(1, 3), (2, 3), (3, 3), (5, 3), (4, 1), (2, 5)])
def test_expression_selection_rule(count, num_refs):
    for primary in range(count):
        chosen = select_expressions(count, primary, num_refs)
        others = [i for i in range(count) if i != primary]
        expected = ([primary] + others + [primary] * num_refs)[:num_refs]
        assert chosen == expected
    with pytest.raises(IndexError):
        select_expressions(count, count, num_refs)


def test_primary_expression_is_drawn_at_random(tmp_path):
    cfg = synthetic_config(tmp_path, {"train": [entry(1, ["a", "b", "c"])]}, {1: (20, 30)})
    dataset = RefDataset(cfg, "train")
    torch.manual_seed(0)
    firsts = {dataset[0]["refs"][0, 0].item() for _ in range(40)}
    assert firsts == {dataset.vocab.index(w) for w in "abc"}


def test_refclip_config_carries_one_expression(tmp_path):
    cfg = synthetic_config(tmp_path, {"train": [entry(1, ["a b", "c"])]}, {1: (20, 30)}, "NUM_REFS=1")
    item = RefDataset(cfg, "train")[0]
    assert item["refs"].shape == (1, 6)


def test_max_token_minus_one_uses_longest_expression(tmp_path):
    cfg = synthetic_config(tmp_path, {"train": [entry(1, ["a b c d e f g h"])], "val": [entry(1, ["x"])]},
                           {1: (20, 30)}, "MAX_TOKEN=-1")
    dataset = RefDataset(cfg, "val")
    assert dataset.max_token == 8 and dataset[0]["refs"].shape == (3, 8)


# --- splits ----------------------------------------------------------------------------------

def test_joined_splits_and_vocabulary_over_every_split():
    train_val = RefDataset(fixture_config(), "train+val")
    assert len(train_val) == 5
    assert [e["iid"] for e in train_val.entries] == [9, 25, 72, 9, 72]
    assert train_val.vocab == EXPECTED["vocab"]


def test_unknown_split_lists_the_file_splits():
    with pytest.raises(DataError, match=r"split 'test'.*\['train', 'val', 'testA', 'testB'\]"):
        RefDataset(fixture_config(), "test")
    with pytest.raises(DataError, match="split 'nope'"):
        RefDataset(fixture_config(), "train+nope")


# --- bad data ----------------------------------------------------------------------------------

def test_missing_annotation_file_names_path_and_key(tmp_path):
    cfg = fixture_config()
    cfg = cfg.replace(ANN_PATH={"refcoco": str(tmp_path / "absent.json")})
    with pytest.raises(DataError, match=r"absent\.json.*ANN_PATH\['refcoco'\]"):
        RefDataset(cfg, "train")


def test_missing_image_folder_names_path_and_key(tmp_path):
    cfg = fixture_config()
    cfg = cfg.replace(IMAGE_PATH={"refcoco": str(tmp_path / "no_images")})
    with pytest.raises(DataError, match=r"no_images.*IMAGE_PATH\['refcoco'\]"):
        RefDataset(cfg, "train")


def test_missing_image_is_an_error_or_skipped(tmp_path, caplog):
    splits = {"train": [entry(1, ["a"]), entry(2, ["b"]), entry(3, ["c"])]}
    cfg = synthetic_config(tmp_path, splits, {1: (20, 30), 3: (20, 30)})
    with pytest.raises(DataError, match=r"2\.jpg.*train\[1\] \(iid 2\).*1 of 3.*SKIP_BAD_IMAGES"):
        RefDataset(cfg, "train")
    cfg = cfg.replace(SKIP_BAD_IMAGES=True)
    with caplog.at_level("WARNING"):
        dataset = RefDataset(cfg, "train")
    assert len(dataset) == 2 and [e["iid"] for e in dataset.entries] == [1, 3]
    assert len(dataset.skipped) == 1 and dataset.skipped[0][1].endswith("2.jpg")
    assert "skipped 1 of 3" in caplog.text
    assert dataset.vocab[3:] == ["a", "b", "c"]  # skipping does not change token ids


def test_undecodable_image_names_file_and_entry(tmp_path):
    cfg = synthetic_config(tmp_path, {"train": [entry(1, ["a"]), entry(7, ["b"])]}, {1: (20, 30)},
                           "SKIP_BAD_IMAGES=true")
    (tmp_path / "images" / "7.jpg").write_bytes(b"not a jpeg")
    dataset = RefDataset(cfg, "train")
    assert len(dataset) == 2  # existence is checked at construction, decoding at load time
    dataset[0]
    with pytest.raises(DataError, match=r"7\.jpg.*train\[1\] \(iid 7\)"):
        dataset[1]


@pytest.mark.parametrize("bad,message", [
    ({"bbox": [0, 0, 1, 1], "refs": ["a"]}, "missing iid"),
    ({"iid": "5", "bbox": [0, 0, 1, 1], "refs": ["a"]}, "iid must be"),
    ({"iid": 5, "bbox": [0, 0, 1], "refs": ["a"]}, "bbox must be"),
    ({"iid": 5, "bbox": [0, 0, 1, float("nan")], "refs": ["a"]}, "bbox must be"),
    ({"iid": 5, "bbox": [0, 0, -1, 1], "refs": ["a"]}, "must not be negative"),
    ({"iid": 5, "bbox": [0, 0, 1, 1], "refs": []}, "refs must be"),
    ({"iid": 5, "bbox": [0, 0, 1, 1], "refs": "a"}, "refs must be"),
    ("just a string", "expected an object"),
])
def test_malformed_entry_names_the_entry(tmp_path, bad, message):
    cfg = synthetic_config(tmp_path, {"train": [entry(1, ["a"])], "val": [entry(1, ["b"]), bad]}, {1: (20, 30)})
    with pytest.raises(DataError, match=rf"malformed entry val\[1\].*{message}"):
        RefDataset(cfg, "train")


def test_file_that_is_not_a_split_dict(tmp_path):
    cfg = synthetic_config(tmp_path, {"train": [entry(1, ["a"])]}, {1: (20, 30)})
    (tmp_path / "anns.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="split: \\[entry"):
        RefDataset(cfg, "train")
    (tmp_path / "anns.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        RefDataset(cfg, "train")


def test_box_past_the_image_is_clipped_like_the_reference(tmp_path):
    splits = {"train": [entry(1, ["a"], bbox=(-10.0, 5.0, 100.0, 60.0))]}
    cfg = synthetic_config(tmp_path, splits, {1: (40, 80)})
    item = RefDataset(cfg, "train")[0]
    assert item["gt_box"].tolist() == [[-10.0, 5.0, 100.0, 60.0]]  # the original box is kept
    # 80 x 40 into 64 x 64: nw 64, nh 32, dy 16. The width, 100/80 of the image's, is clipped to 0.99.
    assert item["info"].tolist() == [40, 80, 32, 64, 0, 16, 1]
    assert item["box"][0].tolist() == pytest.approx([0.5, (70 / 80 * 32 + 16) / 64, 0.99, 60 / 40 * 32 / 64])


# --- letterbox and box mappings ----------------------------------------------------------------

@pytest.mark.parametrize("h,w", [(480, 640), (500, 300), (200, 200), (7, 1000), (1000, 7), (333, 334)])
def test_letterbox_geometry(h, w):
    size = 416
    nh, nw, dx, dy = letterbox_geometry(h, w, size)
    assert max(nh, nw) == size
    assert (nw == int(size * w / h)) if w < h else (nh == int(size * h / w))
    assert dx == (size - nw) // 2 and dy == (size - nh) // 2
    image = np.full((h, w, 3), 200, np.uint8)
    square, info = letterbox_image(image, size)
    assert info == (h, w, nh, nw, dx, dy)
    assert (square[dy:dy + nh, dx:dx + nw] == 200).all()
    padding = np.ones((size, size), bool)
    padding[dy:dy + nh, dx:dx + nw] = False
    assert (square[padding] == 127).all()


def test_box_round_trip_is_exact():
    generator = torch.Generator().manual_seed(0)
    rows = []
    for h, w in [(480, 640), (500, 300), (200, 200), (37, 1001), (999, 41)]:
        nh, nw, dx, dy = letterbox_geometry(h, w, 416)
        rows.append([h, w, nh, nw, dx, dy, 12345])
    info = torch.tensor(rows).repeat(20, 1)
    sizes = info[:, [1, 0]].double()
    corner = torch.rand(len(info), 2, generator=generator, dtype=torch.float64) * sizes
    extent = torch.rand(len(info), 2, generator=generator, dtype=torch.float64) * sizes * 0.5
    boxes = torch.cat([corner, corner + extent], dim=1)
    letterboxed = original_to_letterbox(boxes, info)
    assert (letterboxed[:, :2] >= info[:, [4, 5]]).all()
    back = letterbox_to_original(letterboxed, info)
    assert back.dtype == torch.float64
    assert (back - boxes).abs().max().item() < 1e-4
    float_back = letterbox_to_original(original_to_letterbox(boxes.float(), info), info)
    assert float_back.dtype == torch.float32 and (float_back.double() - boxes).abs().max().item() < 1e-2


def test_boxes_are_clipped_to_their_own_image():
    info = torch.tensor([[20, 30, 0, 0, 0, 0, 1], [50, 10, 0, 0, 0, 0, 2]])  # (h, w, ...)
    boxes = torch.tensor([[-5.0, 2.0, 40.0, 25.0], [3.0, -1.0, 8.0, 60.0]])
    clipped = clip_to_image(boxes, info)
    assert clipped.tolist() == [[0.0, 2.0, 30.0, 20.0], [3.0, 0.0, 8.0, 50.0]]
    inside = torch.tensor([[1.0, 1.0, 5.0, 5.0], [2.0, 3.0, 9.0, 40.0]])
    assert torch.equal(clip_to_image(inside, info), inside)


def test_forward_mapping_agrees_with_yolo_box():
    info = (480, 640, 312, 416, 0, 52, 9)
    xywh = np.array([[100.0, 50.0, 200.0, 100.0]])
    yolo = box_to_yolo(xywh, info, 416)[0] * 416
    x1, y1, x2, y2 = original_to_letterbox(torch.tensor([[100.0, 50.0, 300.0, 150.0]], dtype=torch.float64),
                                           torch.tensor([info]))[0].tolist()
    assert yolo == pytest.approx([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])


def test_mapping_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="info must be"):
        letterbox_to_original(torch.zeros(2, 4), torch.zeros(7))
    with pytest.raises(ValueError, match="boxes must be"):
        letterbox_to_original(torch.zeros(3, 4), torch.zeros(2, 7))


# --- loader --------------------------------------------------------------------------------------

def loader_config(tmp_path, *overrides, count=8):
    splits = {"train": [entry(i, [f"w{i} a", f"w{i} b", f"w{i} c", f"w{i} d"]) for i in range(1, count + 1)],
              "val": [entry(i, [f"w{i}"]) for i in range(1, count)]}
    return synthetic_config(tmp_path, splits, {i: (20 + i, 30) for i in range(1, count + 1)}, *overrides)


def first_tokens(loader):
    return [batch["refs"][:, :, 0].tolist() for batch in loader]


def test_train_loader_batches_shuffles_and_drops_last(tmp_path):
    cfg = loader_config(tmp_path, "BATCH_SIZE=3")
    dataset = RefDataset(cfg, "train")
    loader = build_loader(cfg, dataset, train=True)
    batches = list(loader)
    assert len(batches) == 2  # 8 samples, batches of 3, the incomplete one dropped
    batch = batches[0]
    assert batch["refs"].shape == (3, 3, 6) and batch["image"].shape == (3, 3, 64, 64)
    assert batch["box"].shape == (3, 1, 4) and batch["gt_box"].shape == (3, 1, 4) and batch["info"].shape == (3, 7)
    iids = [iid for b in batches for iid in b["info"][:, 6].tolist()]
    assert len(set(iids)) == 6 and iids != sorted(iids)


def test_eval_loader_keeps_every_sample_in_order(tmp_path):
    cfg = loader_config(tmp_path, "BATCH_SIZE=3")
    dataset = RefDataset(cfg, "val")
    iids = [iid for b in build_loader(cfg, dataset, train=False) for iid in b["info"][:, 6].tolist()]
    assert iids == list(range(1, 8))


def test_loader_is_repeatable_with_workers(tmp_path):
    cfg = loader_config(tmp_path, "BATCH_SIZE=2", "NUM_WORKER=2")
    dataset = RefDataset(cfg, "train")
    first = build_loader(cfg, dataset, train=True, seed=5)
    assert first.num_workers == 2 and first.persistent_workers
    run = first_tokens(first)
    assert run == first_tokens(build_loader(cfg, dataset, train=True, seed=5))
    assert run != first_tokens(build_loader(cfg, dataset, train=True, seed=6))
    assert first_tokens(first) == run  # the epoch, not the worker state, decides the draws
    first.sampler.set_epoch(1)
    assert first_tokens(first) != run  # the next epoch: another order and other primaries


def test_an_epoch_resumed_mid_way_replays_its_tail(tmp_path):
    cfg = loader_config(tmp_path, "BATCH_SIZE=2")
    dataset = RefDataset(cfg, "train")
    loader = build_loader(cfg, dataset, train=True, seed=3)
    loader.sampler.set_epoch(4)
    full = [(b["info"][:, 6].tolist(), b["refs"].tolist()) for b in loader]
    cfg = cfg.replace(NUM_WORKER=2)
    workers = build_loader(cfg, dataset, train=True, seed=3)
    workers.sampler.set_epoch(4, start_batch=2)
    tail = [(b["info"][:, 6].tolist(), b["refs"].tolist()) for b in workers]
    assert len(full) == 4 and tail == full[2:]


def test_too_small_training_set_is_an_error(tmp_path):
    cfg = loader_config(tmp_path, "BATCH_SIZE=16")
    with pytest.raises(ValueError, match="8 samples.*BATCH_SIZE"):
        build_loader(cfg, RefDataset(cfg, "train"), train=True)


def test_shard_sampler_splits_exactly():
    for length in (0, 1, 7, 10):
        for world in (1, 3, 4):
            shards = [list(ShardSampler(length, rank, world)) for rank in range(world)]
            assert [i for shard in shards for i in shard] == list(range(length))
            assert all(len(ShardSampler(length, r, world)) == len(shards[r]) for r in range(world))


def test_distributed_loaders(tmp_path):
    cfg = loader_config(tmp_path, "BATCH_SIZE=2")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        train = build_loader(cfg, RefDataset(cfg, "train"), train=True, distributed=True)
        assert isinstance(train.sampler, EpochSampler) and len(train) == 4
        evaluation = build_loader(cfg, RefDataset(cfg, "val"), train=False, distributed=True)
        assert isinstance(evaluation.sampler, ShardSampler) and len(evaluation.sampler) == 7
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="initialised"):
        build_loader(cfg, RefDataset(cfg, "train"), train=True, distributed=True)
