"""APL (models/apl.py, models/alignment.py): the prompts' content, the losses, the switches."""
import math

import pytest
import torch

from datasets import RefDataset, build_loader
from datasets.tokens import UNK
from models import build_model
from models.apl import (APL_COLOURS, AnchorPrompts, TextReconstruction, nearest_colour, region_mean_colours,
                        sine_position_embedding)
from models.box_prediction import cell_boxes
from models.loss import rec_loss
from tiny_data import make_tiny_dataset, tiny_cli_overrides
from utils.config import ConfigError, load_config
from utils.ema import ModelEMA
from utils.engine import to_device

VOCAB = ["PAD", "UNK", "CLS", "the", "red", "gray", "blue", "square", "traffic", "light", "one"]
PROMPTS = ["APL_POSITION_PROMPT=true", "APL_COLOUR_PROMPT=true", "APL_CATEGORY_PROMPT=true"]
ALL_APL = PROMPTS + ["APL_RECON_WEIGHT=1.0", "APL_ALIGNMENT=true"]


def _cfg(tiny_overrides, *extra):
    return load_config("config/refcoco.yaml", tiny_overrides + [
        "USE_CMA=false", "NUM_REFS=1", "FNS_WEIGHT=0.0", "ER_WEIGHT=0.0",
        "DETECTOR_CLASS_NAMES=[red square, traffic light, zebra]", *extra])


def _normalised(rgb: torch.Tensor, cfg) -> torch.Tensor:
    """``[B,3,S,S]`` RGB in [0, 1] -> the network input."""
    return (rgb - torch.tensor(cfg.MEAN)[:, None, None]) / torch.tensor(cfg.STD)[:, None, None]


def _cells(centres_sizes, classes=3, top_class=0):
    """``[1, K, 4, 5+C]`` anchor boxes: each cell's 4 boxes (cx, cy, w, h) equal, class ``top_class`` likeliest."""
    cells = torch.zeros(1, len(centres_sizes), 4, 5 + classes)
    for k, (cx, cy, w, h) in enumerate(centres_sizes):
        cells[0, k, :, :4] = torch.tensor([cx, cy, w, h], dtype=torch.float32)
    cells[..., 5 + top_class] = 0.9
    return cells


def _word(token):
    return VOCAB[int(token)]


def test_a_red_squares_anchor_gets_the_word_red(tiny_overrides):
    cfg = _cfg(tiny_overrides, "APL_COLOUR_PROMPT=true")
    prompts = AnchorPrompts(cfg, VOCAB, None, len(VOCAB))
    rgb = torch.full((2, 3, 128, 128), 0.5)
    rgb[0, :, 10:40, 20:50] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # red square, image 0
    rgb[1, :, 60:100, 60:100] = torch.tensor([0.05, 0.1, 0.9])[:, None, None]  # blue square, image 1
    rgb[1, :, 0:20, 0:20] = torch.tensor([0.1, 0.9, 0.1])[:, None, None]  # green: not in VOCAB
    boxes = torch.cat([_cells([(35, 25, 30, 30), (100, 100, 20, 20)]),
                       _cells([(80, 80, 40, 40), (10, 10, 20, 20)])])
    tokens = prompts.tag_tokens(_normalised(rgb, cfg), boxes)
    assert tokens.shape == (2, 2, 1)
    assert [[_word(t) for t in image[:, 0]] for image in tokens] == [["red", "gray"], ["blue", "UNK"]]


def test_mean_colours_equal_a_loop_over_pixels():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(3, 3, 40, 40, generator=g)
    boxes = torch.tensor([[[20, 20, 10, 6], [5, 5, 30, 30], [-10, 35, 30, 30]],
                          [[0.4, 0.4, 0.5, 0.5], [39.5, 39.5, 9, 9], [20, 20, 80, 80]],
                          [[12.3, 7.9, 4.4, 13.1], [30, 10, 3, 3], [25, 25, 2, 2]]])
    got = region_mean_colours(rgb, boxes, "one_pixel")
    for i in range(3):
        for k in range(3):
            cx, cy, w, h = boxes[i, k].tolist()
            x1, y1 = int(min(max(cx - w / 2, 0), 39)), int(min(max(cy - h / 2, 0), 39))
            x2, y2 = max(int(min(max(cx + w / 2, 0), 40)), x1 + 1), max(int(min(max(cy + h / 2, 0), 40)), y1 + 1)
            expected = rgb[i, :, y1:y2, x1:x2].mean(dim=(1, 2))
            torch.testing.assert_close(got[i, k], expected, atol=1e-5, rtol=0)
    # APL's code: a box with no whole pixel (here 0.4 +- 0.25 px) has no mean, and takes the first word.
    apl = region_mean_colours(rgb, boxes, "first_colour")
    assert apl[1, 0].isnan().all() and not apl[0].isnan().any()
    assert nearest_colour(apl, torch.tensor(list(APL_COLOURS.values())))[1, 0] == 0


def test_position_embedding_is_the_sine_of_the_centre_and_changes_with_it(tiny_overrides):
    cfg = _cfg(tiny_overrides, "APL_POSITION_PROMPT=true", "APL_POSITION_SIDE=0")
    prompts = AnchorPrompts(cfg, VOCAB, None, len(VOCAB))
    embedding = prompts.position_embedding(_cells([(32, 64, 10, 10), (96, 64, 10, 10), (32, 64, 50, 20)]), 128)
    assert embedding.shape == (1, 3, cfg.HIDDEN_SIZE)
    assert not torch.allclose(embedding[0, 0], embedding[0, 1])  # another centre
    torch.testing.assert_close(embedding[0, 0], embedding[0, 2])  # same centre, another size
    half = cfg.HIDDEN_SIZE // 2
    y_part, x_part = embedding[0, 0, :half], embedding[0, 0, half:]
    assert y_part[0] == pytest.approx(math.sin(2 * math.pi * 0.5), abs=1e-6)  # y = 64 / 128
    assert x_part[0] == pytest.approx(math.sin(2 * math.pi * 0.25), abs=1e-6)  # x = 32 / 128
    assert x_part[1] == pytest.approx(math.cos(2 * math.pi * 0.25), abs=1e-6)
    third = 2 * math.pi * 0.25 / 10000 ** (2 / half)
    assert x_part[2] == pytest.approx(math.sin(third), abs=1e-6)
    torch.testing.assert_close(sine_position_embedding(torch.tensor([0.0, 0.0]), 4), torch.tensor([0.0, 1, 0, 1]))
    # APL's code divides by 416 whatever the input side (APL_POSITION_SIDE's default).
    apl = AnchorPrompts(_cfg(tiny_overrides, "APL_POSITION_PROMPT=true"), VOCAB, None, len(VOCAB))
    centre = apl.position_embedding(_cells([(32, 64, 10, 10)]), 128)[0, 0]
    assert centre[half] == pytest.approx(math.sin(2 * math.pi * 32 / 416), abs=1e-6)


def test_category_prompt_is_the_detectors_top_class_name(tiny_overrides):
    cfg = _cfg(tiny_overrides, "APL_CATEGORY_PROMPT=true", "APL_COLOUR_PROMPT=true", "APL_TAG_WORDS=tokens")
    prompts = AnchorPrompts(cfg, VOCAB, None, len(VOCAB))
    boxes = torch.cat([_cells([(20, 20, 10, 10)], top_class=1), _cells([(20, 20, 10, 10)], top_class=2)])
    boxes[0, 0, 0, 5:] = torch.tensor([0.0, 0.0, 0.99])  # one box of four disagrees: the mean decides
    images = _normalised(torch.full((2, 3, 64, 64), 0.5), cfg)
    tokens = prompts.tag_tokens(images, boxes)
    assert tokens.shape == (2, 1, 3)  # colour word, then the longest class name's two tokens
    assert [_word(t) for t in tokens[0, 0]] == ["gray", "traffic", "light"]
    assert [_word(t) for t in tokens[1, 0]] == ["gray", "UNK", "PAD"]  # 'zebra' is not in VOCAB
    assert prompts.colour_ids.tolist() == [VOCAB.index(w) if w in VOCAB else UNK for w in APL_COLOURS]
    # APL's code looks the whole class name up as one word: two-word names are UNK, every tag 2 tokens.
    apl = AnchorPrompts(_cfg(tiny_overrides, "APL_CATEGORY_PROMPT=true", "APL_COLOUR_PROMPT=true",
                             "APL_UNNORMALIZE=per_channel"), VOCAB, None, len(VOCAB))
    assert [[_word(t) for t in image[0]] for image in apl.tag_tokens(images, boxes)] == [["gray", "UNK"]] * 2


def test_prompts_change_the_anchor_embeddings_by_the_soft_weights(tiny_overrides):
    cfg = _cfg(tiny_overrides, *PROMPTS)
    torch.manual_seed(0)
    prompts = AnchorPrompts(cfg, VOCAB, None, len(VOCAB)).eval()
    anchors = torch.randn(2, 2, cfg.HIDDEN_SIZE)
    images = _normalised(torch.full((2, 3, 64, 64), 0.5), cfg)
    boxes = torch.cat([_cells([(16, 16, 8, 8), (48, 48, 8, 8)])] * 2)
    with torch.no_grad():
        visual, scored = prompts(anchors, images, boxes)
        assert visual.shape == scored.shape == anchors.shape
        prompts.soft_weights.weight.zero_()
        prompts.soft_weights.bias.copy_(torch.tensor([0.0, -1e4, -1e4]))  # all weight on the visual part
        visual, scored = prompts(anchors, images, boxes)
        # APL projects the weighted tag: a zero weight leaves the projection's bias.
        torch.testing.assert_close(visual, prompts.visual_proj(anchors) + prompts.tag_proj.bias)
        tag, _ = prompts.tag_encoder(prompts.tag_tokens(images, boxes).flatten(0, 1))
        torch.testing.assert_close(scored - visual, prompts.tag_proj(tag).view_as(anchors))


def test_reconstruction_reads_the_best_anchor_of_its_own_image():
    torch.manual_seed(0)
    recon = TextReconstruction(4)
    visual = torch.zeros(2, 3, 4)
    visual[0, 1, 0] = 1.0  # image 0's anchor 1 matches text 0
    visual[1, 2, 1] = 1.0
    visual[1, 0, 0] = 5.0  # image 1's anchor 0 matches text 0 better, but it is another image
    texts = torch.tensor([[[1.0, 0, 0, 0]], [[0, 1.0, 0, 0]]])
    expected = torch.nn.functional.mse_loss(recon.decoder(torch.stack([visual[0, 1], visual[1, 2]]))[None],
                                            texts.transpose(0, 1))
    torch.testing.assert_close(recon(visual, texts), expected)
    summed = TextReconstruction(4, "batch_sum")
    summed.load_state_dict(recon.state_dict())
    assert not torch.allclose(summed(visual, texts), expected)  # APL's code ranks the batch's sum


def _tiny_batch(tmp_path, cfg_extra=()):
    ann, images = make_tiny_dataset(str(tmp_path))
    cfg = load_config("config/refcoco.yaml", tiny_cli_overrides(str(tmp_path), ann, images) + [
        "USE_CMA=false", "NUM_REFS=1", "FNS_WEIGHT=0.0", "ER_WEIGHT=0.0", "DROPOUT_R=0.0",
        "DETECTOR_CLASS_NAMES=[red square, blue square]", *cfg_extra])
    dataset = RefDataset(cfg, "train")
    batch = next(iter(build_loader(cfg, dataset, train=False, batch_size=8)))
    return cfg, dataset.vocab, to_device(batch, torch.device("cpu"), (cfg.MEAN, cfg.STD))


def test_each_apl_loss_falls_on_a_tiny_dataset(tmp_path):
    cfg, vocab, batch = _tiny_batch(tmp_path, ALL_APL)
    torch.manual_seed(0)
    model = build_model(cfg, None, len(vocab), vocab)
    assert model.prompts.colour_ids[list(APL_COLOURS).index("red")] == vocab.index("red")
    # The expressions' embeddings held still: they are the reconstruction's targets, which the
    # contrast would otherwise keep moving.
    model.language_encoder.requires_grad_(False)
    model.expr_proj.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    history = []
    for _ in range(30):
        out = model(batch["image"], batch["refs"])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in out.items()})
    for part in ("ce", "recon", "align", "loss"):
        first, last = history[0][part], min(h[part] for h in history[-5:])
        assert last < 0.7 * first, (part, [round(h[part], 3) for h in history])
    assert int(model.alignment.steps) == 30
    assert not model.ranks_anchors  # the alignment head answers (predict.py reports its one box)
    model.eval()
    with torch.no_grad():
        assert model(batch["image"], batch["refs"]).shape == (8, 1, 5)


def _same_weights(source, target):
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected
    return missing


def test_switches_off_give_exactly_the_refclip_path(tiny_overrides):
    fixed = ["DROPOUT_R=0.0", "FREEZE_BACKBONE_BN=true"]
    cfg = _cfg(tiny_overrides, *fixed)
    torch.manual_seed(0)
    refclip = build_model(load_config("config/refclip/refcoco.yaml", tiny_overrides + fixed), None, len(VOCAB))
    off = build_model(cfg, None, len(VOCAB), VOCAB)
    assert off.state_dict().keys() == refclip.state_dict().keys()
    assert off.prompts is off.reconstruction is off.alignment is None
    _same_weights(refclip, off)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 128, 128, generator=g)
    refs = torch.randint(3, len(VOCAB), (4, 1, 6), generator=g)

    def run(model):
        model.train()
        loss = model(images, refs)
        model.eval()
        with torch.no_grad():
            return loss, model(images, refs)

    (loss_off, boxes_off), (loss_refclip, boxes_refclip) = run(off), run(refclip)
    assert loss_off.keys() == {"loss", "ce"}
    torch.testing.assert_close(loss_off["loss"], loss_refclip["loss"], rtol=0, atol=0)
    torch.testing.assert_close(boxes_off, boxes_refclip, rtol=0, atol=0)
    # The RefCLIP computation itself: the selected cells' projection, ranked by the contrastive loss.
    for model in (off, refclip):
        model.train()
        s32, s16, s8, detected = model.detect(images)
        cells = model.select_cells(detected)
        rows = torch.arange(4)[:, None]
        anchors = model.anchor_proj(model.fusion(s8, s16, s32).flatten(2).transpose(1, 2)[rows, cells])
        texts = model.expr_proj(model.language_encoder(refs.flatten(0, 1))[0].view(4, 1, -1))
        torch.testing.assert_close(model(images, refs)["loss"], rec_loss(anchors, texts, 0.0, 0.0)["loss"])
        model.eval()
        with torch.no_grad():
            s32, s16, s8, detected = model.detect(images)
            anchors = model.anchor_proj(model.fusion(s8, s16, s32).flatten(2).transpose(1, 2)[rows, cells])
            texts = model.expr_proj(model.language_encoder(refs[:, 0])[0])
            best = torch.einsum("bkd,bd->bk", anchors, texts).argmax(dim=1)
            expected = cell_boxes(detected[rows, cells])[torch.arange(4), best][:, None]
            torch.testing.assert_close(model(images, refs), expected)


def test_alignment_in_burn_in_and_reconstruction_leave_the_refclip_terms_unchanged(tiny_overrides):
    torch.manual_seed(0)
    base_cfg = _cfg(tiny_overrides, "DROPOUT_R=0.0")
    refclip = build_model(base_cfg, None, len(VOCAB), VOCAB)
    apl = build_model(_cfg(tiny_overrides, "DROPOUT_R=0.0", "APL_RECON_WEIGHT=0.5", "APL_ALIGNMENT=true",
                           "APL_ALIGN_BURN_IN=1", "APL_ALIGN_PREDICT=false", "APL_BURN_IN_COUNT=training_steps"),
                      None, len(VOCAB), VOCAB)
    assert apl.ranks_anchors and refclip.ranks_anchors
    missing = _same_weights(refclip, apl)
    assert missing and all(k.startswith(("reconstruction.", "alignment.")) for k in missing)
    g = torch.Generator().manual_seed(1)
    images, refs = torch.randn(4, 3, 128, 128, generator=g), torch.randint(3, len(VOCAB), (4, 1, 6), generator=g)
    refclip.eval(), apl.eval()
    with torch.no_grad():  # APL_ALIGN_PREDICT false: the anchor ranking answers
        torch.testing.assert_close(apl(images, refs), refclip(images, refs), rtol=0, atol=0)
    refclip.train(), apl.train()
    expected = refclip(images, refs)["loss"]
    first = apl(images, refs)  # step 1: inside the burn-in, the alignment loss weighs 0
    torch.testing.assert_close(first["loss"], expected + 0.5 * first["recon"])
    assert first["align"] > 0
    second = apl(images, refs)
    torch.testing.assert_close(second["loss"], expected + 0.5 * second["recon"] + second["align"])
    assert "alignment.steps" in apl.state_dict() and int(apl.alignment.steps) == 2


def test_apl_config_errors_say_what_to_fix():
    with pytest.raises(ConfigError, match=r"DETECTOR_CLASS_NAMES to list CLASS_NUM \(100\)"):
        load_config("config/referit.yaml", ["APL_CATEGORY_PROMPT=true"])
    with pytest.raises(ConfigError, match="APL_RECON_ANCHOR must be 'batch_sum' or 'own'"):
        load_config(None, ["APL_RECON_ANCHOR=best"])
    with pytest.raises(ConfigError, match="APL_ALIGN_BURN_IN must not be negative"):
        load_config(None, ["APL_ALIGN_BURN_IN=-1"])
    with pytest.raises(ValueError, match="need the vocabulary"):
        build_model(load_config(None, ["APL_COLOUR_PROMPT=true", "PRETRAIN_WEIGHT=none"]), None, 10)


@pytest.mark.parametrize("count, expected", [("every_forward", 3), ("training_steps", 1)])
def test_burn_in_counter_sees_the_evaluation_of_the_average(tiny_overrides, count, expected):
    """APL's code evaluates the model it trains, so its burn-in counts evaluation forwards; here the
    engine evaluates the EMA copy and hands its counters back (ModelEMA.return_counters)."""
    torch.manual_seed(0)
    cfg = _cfg(tiny_overrides, "APL_ALIGNMENT=true", f"APL_BURN_IN_COUNT={count}")
    model = build_model(cfg, None, len(VOCAB), VOCAB)
    g = torch.Generator().manual_seed(1)
    images, refs = torch.randn(2, 3, 128, 128, generator=g), torch.randint(3, len(VOCAB), (2, 1, 6), generator=g)
    model.train()
    model(images, refs)
    ema = ModelEMA(model)
    ema.update(model)
    with torch.no_grad():
        ema.module(images, refs)
        ema.module(images, refs)
    ema.return_counters(model)
    assert int(model.alignment.steps) == expected
    ema.update(model)
    assert int(ema.module.alignment.steps) == expected
