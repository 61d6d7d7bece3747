"""Model behaviour beyond parity: weight formats, errors, switches, learning."""
import pytest
import torch

from models import build_model
from models.detector import SPP, YOLOv3
from models.loss import rec_loss
from models.reference_keys import (detector_weight_file_state_dict, reference_state_dict as ours_as_reference,
                                   to_ours, to_reference)
from reference_weights import read_keys, reference_state_dict
from utils.checkpoint import CheckpointMismatchError, load_pretrained_backbone, load_reference_state_dict
from utils.config import load_config


def _keys(tsv):
    return [key for key, _, _ in read_keys(tsv)]


@pytest.mark.parametrize("tsv,module", [("reference_checkpoint_keys.tsv", None),
                                        ("yolov3_checkpoint_keys.tsv", "visual_encoder")])
def test_name_mapping_round_trips(tsv, module):
    keys = _keys(tsv)
    ours = [to_ours(k, module) for k in keys]
    assert len(set(ours)) == len(keys)
    assert [to_reference(k, module) for k in ours] == keys
    assert not any("module_list" in k or "process_model" in k for k in ours)


def test_reference_checkpoint_keys_load_exactly():
    model = build_model(load_config("config/refcoco.yaml"), None, 64)
    state = reference_state_dict()
    load_reference_state_dict(model, {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}})
    ours = ours_as_reference(model)
    assert set(ours) == set(state)
    for key in ("process_model.inpu.weight", "visual_encoder.module_list.19.guide_wh.bias"):
        torch.testing.assert_close(ours[key], state[key])


def test_refclip_keys_load_into_refclip_config():
    model = build_model(load_config("config/refclip/refcoco.yaml"), None, 64)
    load_reference_state_dict(model, reference_state_dict(drop_prefix="process_model."))
    assert model.cma is None


def test_missing_unexpected_and_misshaped_keys_are_listed():
    model = build_model(load_config("config/refcoco.yaml"), None, 64)
    state = reference_state_dict()
    del state["linear_ts.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_reference_state_dict(model, state)
    assert "expr_proj.bias" in str(err.value) and "extra.weight" in str(err.value)
    other_vocab = build_model(load_config("config/refcoco.yaml"), None, 80)
    with pytest.raises(CheckpointMismatchError, match=r"language_encoder.embedding.weight: \(64, 300\)"):
        load_reference_state_dict(other_vocab, reference_state_dict())


def test_pretrained_backbone_file(tmp_path):
    cfg = load_config("config/refcoco.yaml")
    model = build_model(cfg, None, 64)
    weights = {k: (torch.zeros(s, dtype=torch.int64) if d == "int64" else torch.full(s, 0.5))
               for k, d, s in read_keys("yolov3_checkpoint_keys.tsv")}
    path = tmp_path / "yolov3_coco.pth"
    torch.save(weights, path)
    load_pretrained_backbone(model.visual_encoder, str(path))
    assert torch.all(model.visual_encoder.layers[19].adaption.deform_conv.weight == 0.5)
    assert set(detector_weight_file_state_dict(model.visual_encoder)) == set(weights)

    del weights["module_list.37.conv.bias"]
    torch.save(weights, path)
    with pytest.raises(CheckpointMismatchError, match="layers.37.pred.bias"):
        load_pretrained_backbone(model.visual_encoder, str(path))
    with pytest.raises(FileNotFoundError, match="PRETRAIN_WEIGHT"):
        load_pretrained_backbone(model.visual_encoder, str(tmp_path / "absent.pth"))
    with pytest.warns(UserWarning, match="random weights"):
        load_pretrained_backbone(model.visual_encoder, "none")


def _tiny(overrides, *extra):
    cfg = load_config("config/refcoco.yaml", overrides + list(extra))
    torch.manual_seed(0)
    return cfg, build_model(cfg, None, 20)


def _batch(cfg, b, e=3):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(b, 3, *cfg.INPUT_SHAPE, generator=g)
    refs = torch.randint(3, 20, (b, e, cfg.MAX_TOKEN), generator=g)
    refs[:, :, 4:] = 0
    return images, refs


def test_batch_of_one_in_training_is_a_clear_error(tiny_overrides):
    cfg, model = _tiny(tiny_overrides)
    images, refs = _batch(cfg, 1)
    model.train()
    with pytest.raises(ValueError, match="at least 2 samples"):
        model(images, refs)
    model.eval()
    with torch.no_grad():
        assert model(images, refs).shape == (1, 1, 5)


@pytest.mark.parametrize("extra", [[], ["CMA_ATTENTION=standard"], ["USE_CMA=false", "NUM_REFS=1"],
                                   ["CMA_CONDITION=query"]])
def test_a_few_steps_lower_the_loss(tiny_overrides, extra):
    cfg, model = _tiny(tiny_overrides, *extra)
    images, refs = _batch(cfg, 6, cfg.NUM_REFS)
    params = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.visual_encoder.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):
        out = model(images, refs)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert set(out) >= {"loss", "ce"}


def test_loss_parts_follow_the_weights(tiny_overrides):
    cfg, model = _tiny(tiny_overrides, "FNS_WEIGHT=0.0")
    model.train()
    out = model(*_batch(cfg, 4))
    assert "fns" not in out and "er" in out
    torch.testing.assert_close(out["loss"], out["ce"] + cfg.ER_WEIGHT * out["er"])


def test_attention_forms_differ_only_by_the_switch(tiny_overrides):
    _, reference = _tiny(tiny_overrides)
    _, standard = _tiny(tiny_overrides, "CMA_ATTENTION=standard")
    standard.load_state_dict(reference.state_dict())
    for gate in ("self_attn_gate", "cross_attn_gate"):
        getattr(reference.cma, gate).data.fill_(0.5)
        getattr(standard.cma, gate).data.fill_(0.5)
    reference.eval(), standard.eval()
    x, t = torch.randn(2, 128, 4, 4), torch.randn(2, 64)
    with torch.no_grad():
        assert not torch.allclose(reference.cma(x, t), standard.cma(x, t))
        reference.cma.self_attn_gate.data.zero_(), reference.cma.cross_attn_gate.data.zero_()
        standard.cma.self_attn_gate.data.zero_(), standard.cma.cross_attn_gate.data.zero_()
        torch.testing.assert_close(reference.cma(x, t), standard.cma(x, t))


def test_pairwise_conditioning_scores_each_image_as_its_text_sees_it(tiny_overrides):
    _, model = _tiny(tiny_overrides)
    cma = model.cma.eval()  # BatchNorm of the text MLP on running statistics: samples independent
    for gate in ("self_attn_gate", "self_ff_gate", "cross_attn_gate", "cross_ff_gate"):
        getattr(cma, gate).data.fill_(0.5)
    x, t = torch.randn(3, 128, 4, 4), torch.randn(3, 64)
    cells = torch.tensor([[0, 5, 9], [1, 2, 15], [3, 7, 8]])
    with torch.no_grad():
        pairwise = cma.anchors(x, t, cells, pairwise=True)
        assert pairwise.shape == (3, 3, 3, 64)
        for i in range(3):
            for j in range(3):
                torch.testing.assert_close(pairwise[i, j], cma.anchors(x[j:j + 1], t[i:i + 1], cells[j:j + 1])[0])
        grid = cma(x, t).flatten(2).transpose(1, 2)
        torch.testing.assert_close(cma.anchors(x, t, cells), grid[torch.arange(3)[:, None], cells])
        assert not torch.allclose(pairwise[0, 1], pairwise[1, 1])


def test_loss_of_anchors_conditioned_per_text_reduces_to_the_shared_case():
    g = torch.Generator().manual_seed(0)
    anchors, texts = torch.randn(4, 5, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    shared = rec_loss(anchors, texts)
    per_text = rec_loss(anchors.expand(4, -1, -1, -1), texts)
    for key in shared:
        torch.testing.assert_close(per_text[key], shared[key])
    varied = anchors.expand(4, -1, -1, -1).clone()
    varied[0, 1] += 1.0  # what text 0 sees of image 1 only
    assert not torch.allclose(rec_loss(varied, texts)["ce"], shared["ce"])


def test_refs_shape_is_checked(tiny_overrides):
    cfg, model = _tiny(tiny_overrides)
    images, refs = _batch(cfg, 2)
    model.eval()
    with pytest.raises(ValueError, match="refs must be"):
        model(images, refs[:, 0])


def test_text_blind_baselines_pick_among_the_selected_anchors(tiny_overrides):
    from utils.evaluation import text_blind_predictor

    cfg, model = _tiny(tiny_overrides)
    model.eval()
    images, refs = _batch(cfg, 3)
    info = torch.tensor([[128, 128, 128, 128, 0, 0, 0]] * 3)
    batch = {"image": images, "refs": refs, "info": info}
    candidates = model.candidate_boxes(images)
    assert candidates.shape[:3] == (3, cfg.SELECT_NUM, 4)
    confident = text_blind_predictor("most_confident_anchor")(model, batch, "none", torch.device("cpu"))
    flat = candidates.flatten(1, 2)
    best = flat[torch.arange(3), flat[..., 4].argmax(dim=1)]
    torch.testing.assert_close(confident[:, 0], best[:, 0] - best[:, 2] / 2)
    randoms = text_blind_predictor("random_anchor", seed=1)(model, batch, "none", torch.device("cpu"))
    centres = ((randoms[:, :2] + randoms[:, 2:]) / 2)[:, None, :]
    assert torch.all((candidates[..., :2].flatten(1, 2) - centres).abs().amin(dim=1) < 1e-3)
    with pytest.raises(ValueError, match="unknown baseline"):
        text_blind_predictor("oracle")


def test_spp_pool_sizes_follow_the_config():
    x = torch.randn(1, 2, 5, 5)
    identity = SPP((1, 1, 1))(x)
    assert torch.equal(identity, x.repeat(1, 4, 1, 1))
    reference = SPP()(x)  # 5, 9 and 13 on a 5x5 map: every cell sees the global maximum from 9 on
    assert torch.equal(reference[:, 4:6], x.amax(dim=(2, 3), keepdim=True).expand(1, 2, 5, 5))
    model = YOLOv3(3, [[8, 8]] * 9, [[6, 7, 8], [3, 4, 5], [0, 1, 2]], 0.125, (1, 3, 5))
    assert model.layers[13].kernels == (1, 3, 5)


def test_channel_floor_widens_only_the_narrow_layers():
    masks = [[6, 7, 8], [3, 4, 5], [0, 1, 2]]
    plain = YOLOv3(3, [[8, 8]] * 9, masks, 0.0625)
    floored = YOLOv3(3, [[8, 8]] * 9, masks, 0.0625, min_channels=16)
    assert plain.layers[0].conv.out_channels == 2 and floored.layers[0].conv.out_channels == 16
    assert floored.layers[9].conv.out_channels == plain.layers[9].conv.out_channels == 64
    assert floored.channels == plain.channels == (64, 32, 16)
    features, outputs = floored(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == [64, 32, 16]
    assert outputs[0].shape == (1, 4, 4, 8)
    reference = YOLOv3(3, [[8, 8]] * 9, masks, 1.0)
    assert YOLOv3(3, [[8, 8]] * 9, masks, 1.0, min_channels=16).state_dict().keys() == reference.state_dict().keys()
    assert all(a.shape == b.shape for a, b in zip(YOLOv3(3, [[8, 8]] * 9, masks, 1.0, min_channels=32).parameters(),
                                                  reference.parameters()))

