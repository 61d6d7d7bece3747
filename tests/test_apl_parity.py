"""APL against numbers recorded by running APL's own code (tests/fixtures/apl_reference.pt).

The fixture was recorded one component at a time from APL's code (github.com/Yaxin9Luo/APL, commit
c968d7b), on CPU in float32, with weights under APL's parameter names and token ids in APL's own
vocabulary (``meta.inputs.vocab``), which the project's modules are built with here. Every check
runs with the APL configs' defaults, which keep the quirks of APL's code; the colour component is
also checked with APL_UNNORMALIZE=per_channel, the computation APL intends (the fixture holds that
counterfactual). Tolerances: integers, booleans and words must be equal; floats at float32's
defaults (rtol 1.3e-6, atol 1e-5), which hold between reruns of APL's code at 1, 2 and 4 threads,
except where this project sums in another order (box means as matrix products, fused scores): there
rtol/atol 1e-5, and train-mode BatchNorm outputs at atol 1e-3 px (APL's own reruns differ by 1.1e-4).
The recording made sure that no discrete output sits within rounding of a tie (margins in the
fixture's notes), so a different word, cell or positive is a real difference.
"""
import os

import pytest
import torch
from torchvision.ops import box_convert

from models.alignment import VisualAlignment, box_targets, write_anchors
from models.apl import APL_COLOURS, AnchorPrompts, TextReconstruction, nearest_colour, region_mean_colours, unnormalize
from models.box_head import aligned_iou
from models.box_prediction import cell_box
from models.loss import rec_loss
from models.rec import rank_cells
from models.reference_keys import to_ours
from utils.config import load_config

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "apl_reference.pt")
CLOSE = dict(rtol=1e-5, atol=1e-5)  # where this project sums in another order than APL


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=True)


def _cfg(*extra):
    return load_config("config/apl/refcoco.yaml", ["PRETRAIN_WEIGHT=none", "DROPOUT_R=0.0", *extra])


def _prompts(fx, *extra) -> AnchorPrompts:
    vocab = fx["meta"]["inputs"]["vocab"]
    return AnchorPrompts(_cfg(*extra), vocab, None, len(vocab)).eval()


def _apl_weights(weights: dict, module: str) -> dict:
    """The APL-named ``weights`` that map into the project's ``module`` (models/reference_keys.py),
    keyed as that module's state dict."""
    mapped = {to_ours(k): v for k, v in weights.items()}
    return {k[len(module) + 1:]: v for k, v in mapped.items() if k.startswith(module + ".")}


def _normalised_images(a) -> torch.Tensor:
    """ToTensor() + Normalize(MEAN, STD), as APL's loader makes its input."""
    x = a["images_uint8"].permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(a["mean"])[:, None, None]) / torch.tensor(a["std"])[:, None, None]


@pytest.mark.parametrize("unnormalize_mode", ["batch_axis", "per_channel"])
def test_colour_words(fx, unnormalize_mode):
    a = fx["a_colour"]["inputs"]
    out = fx["a_colour"]["outputs"]
    suffix = "" if unnormalize_mode == "batch_axis" else "_per_channel_unnormalize"
    images = _normalised_images(a)
    assert images.double().sum().item() == pytest.approx(a["images_normalised_sum"], rel=1e-9)
    prompts = _prompts(fx, "APL_CATEGORY_PROMPT=false", f"APL_UNNORMALIZE={unnormalize_mode}")
    assert list(APL_COLOURS) == a["colour_table_words"]
    torch.testing.assert_close(prompts.colour_rgb, a["colour_table_rgb"])
    cell = a["anchor_boxes"].mean(dim=2)
    rgb = unnormalize(images, prompts.mean, prompts.std, unnormalize_mode)
    means = region_mean_colours(rgb, cell[..., :4], prompts.empty_box)
    torch.testing.assert_close(means, out[f"mean_colour{suffix}"], equal_nan=True, **CLOSE)
    words = nearest_colour(means.abs(), prompts.colour_rgb)
    assert [[a["colour_table_words"][i] for i in row] for row in words.tolist()] == out[f"colour_words{suffix}"]
    tokens = prompts.tag_tokens(images, a["anchor_boxes"])
    assert torch.equal(tokens[..., 0], out[f"colour_ids{suffix}"])
    empty = a["box_kind"] == a["box_kind_names"].index("empty")
    assert empty.any() and (out["colour_ids"][empty] == a["colour_dict"]["blue"]).all()


def test_colour_and_category_tag_tokens(fx):
    a = fx["a_colour"]
    tokens = _prompts(fx).tag_tokens(_normalised_images(a["inputs"]), a["inputs"]["anchor_boxes"])
    assert torch.equal(tokens, a["outputs"]["tag_tokens"])


def test_category_words(fx):
    c = fx["c_category"]
    prompts = _prompts(fx, "APL_COLOUR_PROMPT=false")
    assert prompts.class_tokens.shape == (80, 1)
    assert torch.equal(prompts.class_tokens[:, 0], c["outputs"]["category_ids"])
    tokens = prompts.tag_tokens(torch.zeros(8, 3, 32, 32), c["inputs"]["anchor_boxes"])
    assert torch.equal(tokens[..., 0], c["outputs"]["anchor_category_ids"])


def test_position_prompt(fx):
    b = fx["b_position"]
    prompts = _prompts(fx)
    torch.testing.assert_close(prompts.position_embedding(b["inputs"]["anchor_boxes"], 416),
                               b["outputs"]["position_embedding"])
    # At another input side APL's code still divides by 416.
    torch.testing.assert_close(prompts.position_embedding(b["inputs"]["anchor_boxes_side256"], 256),
                               b["outputs"]["position_embedding_side256"])
    intended = _prompts(fx, "APL_POSITION_SIDE=0")
    assert not torch.allclose(intended.position_embedding(b["inputs"]["anchor_boxes_side256"], 256),
                              b["outputs"]["position_embedding_side256"])


def test_tag_encoder_and_soft_weighted_fusion(fx):
    d = fx["d_tag_fusion"]
    prompts = _prompts(fx)
    w = d["weights"]
    prompts.load_state_dict(_apl_weights(w, "prompts"))
    with torch.no_grad():
        tag_flat, _ = prompts.tag_encoder(d["inputs"]["tag_tokens"].view(136, 2))
        torch.testing.assert_close(tag_flat, d["outputs"]["tag_flat"], **CLOSE)
        visual, tag_emb = prompts.fuse(d["inputs"]["visual_emb"], d["inputs"]["position_embedding"],
                                       tag_flat.view(8, 17, -1))
    torch.testing.assert_close(visual, d["outputs"]["visual_emb"], **CLOSE)
    torch.testing.assert_close(tag_emb, d["outputs"]["tag_emb"], **CLOSE)


def test_contrastive_loss_and_weak_answer(fx):
    e = fx["e_contrast"]
    vis, tag, lan = e["inputs"]["visual_emb"], e["inputs"]["tag_emb"], e["inputs"]["language_emb"]
    scored = vis + tag  # what REC scores the expression against: APL's sim_vis + sim_tag
    torch.testing.assert_close(rec_loss(scored, lan, 0.0, 0.0)["loss"], e["outputs"]["loss"], **CLOSE)
    weak = torch.einsum("bkd,bd->bk", scored, lan[:, 0]).argmax(dim=1)
    assert torch.equal(weak, e["outputs"]["weak_point"][:, 0].float().argmax(dim=1))


@pytest.mark.parametrize("rule", ["batch_sum", "own"])
def test_reconstruction(fx, rule):
    f = fx["f_reconstruction"]
    vis, lan = f["inputs"]["visual_emb"], f["inputs"]["language_emb"]
    recon = TextReconstruction(512, rule)
    recon.load_state_dict(_apl_weights(f["weights"], "reconstruction"))
    index = recon.anchor_index(vis, lan)[0]
    if rule == "own":  # the intended rule picks other anchors on this batch
        assert not torch.equal(index, f["outputs"]["anchor_index"])
        return
    assert torch.equal(index, f["outputs"]["anchor_index"])
    with torch.no_grad():
        torch.testing.assert_close(recon(vis, lan), f["outputs"]["loss"], **CLOSE)
        torch.testing.assert_close(recon.decoder(f["outputs"]["max_sim_vis_emb"]), f["outputs"]["recon_lang_emb"])


def test_anchors_written_back_in_score_order(fx):
    g = fx["g_scatter"]
    ranked = rank_cells(g["inputs"]["boxes"], g["inputs"]["select_num"])
    assert torch.equal(ranked, g["outputs"]["indices"])
    grid = ranked.sort(dim=1).values
    assert torch.equal(grid, g["outputs"]["cells_grid_order"])
    rows = torch.arange(8)[:, None]
    torch.testing.assert_close(g["inputs"]["boxes"][rows, grid], g["outputs"]["selected_boxes"], rtol=0, atol=0)
    anchors = g["inputs"]["anchors"]
    assert torch.equal(write_anchors(g["inputs"]["map"], anchors, ranked), g["outputs"]["new_grid_emb"])
    own = write_anchors(g["inputs"]["map"], anchors, grid)  # APL_SCATTER_ORDER=grid
    assert torch.equal(own.flatten(2)[rows, :, grid], anchors)
    moved = (ranked != grid).sum().item()
    assert moved > 100  # most of the 136 cells receive another cell's anchor


def _head(fx, part="h_sup_head") -> VisualAlignment:
    """The alignment module at APL's sizes, its box head loaded with APL's sup_head weights."""
    alignment = VisualAlignment(1024, 512, obj_prior=_cfg().APL_HEAD_OBJ_PRIOR)
    if part == "h_sup_head":
        alignment.head.load_state_dict(_apl_weights(fx[part]["weights"], "alignment.head"))
    return alignment


def _check_training_outputs(head, raw, labels, out):
    """The decoded boxes, the SimOTA positives and the losses of raw outputs ``[B,h,w,5]``."""
    train = out["train_outputs"]
    tol = dict(rtol=1e-5, atol=1e-3) if train.shape[0] == 2 else CLOSE
    torch.testing.assert_close(head.boxes(raw), train[..., :4], **tol)
    torch.testing.assert_close(raw[..., 4].flatten(1), train[..., 4], **tol)
    target = labels[:, 0] * 416
    positive = head.assign(head.boxes(raw), raw[..., 4].flatten(1), target,
                           (head.cell_offsets(raw) + 0.5) * head.stride)
    assert torch.equal(positive, out["train_positives"])
    assert torch.equal(positive.sum(dim=1), out["train_num_fg"])
    assert not (positive & ~out["train_candidates"]).any()
    iou = aligned_iou(box_convert(head.boxes(raw), "cxcywh", "xyxy"),
                      box_convert(target[:, None].expand(-1, raw.shape[1] * raw.shape[2], -1), "cxcywh", "xyxy"))
    torch.testing.assert_close(iou[positive], out["train_matched_iou"], **tol)
    loss = head.loss(raw, labels[:, 0])
    torch.testing.assert_close(loss["iou"], out["train_loss_iou"], **tol)
    torch.testing.assert_close(loss["obj"], out["train_loss_obj"], **tol)
    torch.testing.assert_close(loss["loss"], out["train_loss"], **tol)


def _check_eval_outputs(head, raw, out):
    decoded = torch.cat([head.boxes(raw), raw[..., 4:].flatten(1, 2).sigmoid()], dim=-1)
    torch.testing.assert_close(decoded, out["eval_decoded"], **CLOSE)
    torch.testing.assert_close(head.decode(raw), out["eval_pred"], **CLOSE)


def test_box_head_forward_train_and_eval(fx):
    h = fx["h_sup_head"]
    head = _head(fx).head
    assert isinstance(head.stem.act, torch.nn.SiLU)
    bound = h["outputs"]["fresh_obj_bias_bound"]
    assert head.obj.bias.abs().item() <= bound  # PyTorch's default initialisation, no 0.01 prior
    assert _cfg().APL_HEAD_OBJ_PRIOR == 0
    head.eval()
    with torch.no_grad():
        _check_eval_outputs(head, head(h["inputs"]["features"]), h["outputs"])
    head.train()
    raw = head(h["inputs"]["features"])
    _check_training_outputs(head, raw.detach(), h["inputs"]["labels"], h["outputs"])
    for name, value in _apl_weights(h["outputs"]["bn_after_train"], "alignment.head").items():
        torch.testing.assert_close(head.state_dict()[name], value, **CLOSE)


def test_box_head_loss_and_decoding_on_given_outputs(fx):
    h = fx["h_sup_loss"]
    head = _head(fx, "h_sup_loss").head
    raw = h["inputs"]["raw"].permute(0, 2, 3, 1)  # APL's [B,5,h,w] -> the project's [B,h,w,5]
    _check_training_outputs(head, raw, h["inputs"]["labels"], h["outputs"])
    _check_eval_outputs(head, raw, h["outputs"])


def test_pseudo_box_target(fx):
    i = fx["i_pseudo_box"]
    best = i["inputs"]["weak_point"][:, 0].float().argmax(dim=1)
    box = cell_box(i["inputs"]["anchor_boxes"], best)
    targets = box_targets(box, 416)
    torch.testing.assert_close(targets, i["outputs"]["det_label"][:, 0], **CLOSE)
    torch.testing.assert_close(box[:, 0, 4], i["outputs"]["box_pred"][:, 0, 4])


@pytest.mark.parametrize("count", ["every_forward", "training_steps"])
def test_burn_in_counts_every_forward(fx, count):
    i = fx["i_pseudo_box"]
    included = torch.zeros(len(i["inputs"]["burn_in"]), len(i["inputs"]["forward_calls"]), dtype=torch.bool)
    for r, burn_in in enumerate(i["inputs"]["burn_in"]):
        alignment = VisualAlignment(8, 8, burn_in, count)
        for c in range(len(i["inputs"]["forward_calls"])):
            alignment.count_forward(training=c % 2 == 0)  # evaluation forwards interleaved
            included[r, c] = alignment.burn_in_over()
    if count == "every_forward":
        assert torch.equal(included, i["outputs"]["sup_loss_included"])
    else:  # only the training forwards (1st, 3rd, 5th) count, and the loss starts after burn_in of them
        training_steps = torch.tensor([1, 1, 2, 2, 3, 3])
        expected = training_steps[None] > torch.tensor(i["inputs"]["burn_in"])[:, None]
        assert torch.equal(included, expected)
