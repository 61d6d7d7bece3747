"""The model against the reference's own recorded outputs (tests/fixtures/README.md)."""
import pytest
import torch

from models import build_model
from models.loss import rec_loss
from models.reference_keys import to_ours
from reference_weights import reference_cases, reference_images, reference_state_dict
from utils.checkpoint import load_reference_state_dict
from utils.config import load_config

VARIANTS = {"accv": ("config/refcoco.yaml", None), "refclip": ("config/refclip/refcoco.yaml", "process_model.")}
VOCAB = 64


@pytest.fixture(scope="module")
def cases():
    return reference_cases()


def _model(variant):
    path, drop = VARIANTS[variant]
    cfg = load_config(path, ["DROPOUT_R=0.0"])
    model = build_model(cfg, None, VOCAB)
    load_reference_state_dict(model, reference_state_dict(drop_prefix=drop))
    return cfg, model


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant_model(request):
    cfg, model = _model(request.param)
    return request.param, cfg, model


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch", [2, 8])
def test_head_loss_and_gradients(cases, variant, batch):
    cfg = load_config(VARIANTS[variant][0])
    prefix = f"{variant}/head_b{batch}"
    vis = cases[f"{prefix}/vis"].clone().requires_grad_()
    lan = cases[f"{prefix}/lan"].clone().requires_grad_()
    out = rec_loss(vis, lan, cfg.FNS_WEIGHT, cfg.ER_WEIGHT)
    out["loss"].backward()
    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["loss"], cases[f"{prefix}/loss"], **tol)
    torch.testing.assert_close(vis.grad, cases[f"{prefix}/grad_vis"], **tol)
    if f"{prefix}/grad_lan" in cases:
        torch.testing.assert_close(lan.grad, cases[f"{prefix}/grad_lan"], **tol)
    if variant == "accv":
        for part in ("ce", "fns", "er"):
            torch.testing.assert_close(out[part], cases[f"{prefix}/loss/{part}"], **tol)
        ce_fns = rec_loss(vis, lan, 1.0, 0.0)["loss"]
        ce_er = rec_loss(vis, lan, 0.0, 1.0)["loss"]
        torch.testing.assert_close(ce_fns, cases[f"{prefix}/loss/ce+fns"], **tol)
        torch.testing.assert_close(ce_er, cases[f"{prefix}/loss/ce+er"], **tol)


def test_cross_modality_attention(cases):
    _, model = _model("accv")
    model.eval()
    with torch.no_grad():
        out = model.cma(cases["accv/cma/x"], cases["accv/cma/y"])
    torch.testing.assert_close(out, cases["accv/cma/out"], atol=1e-5, rtol=1e-4)


def test_language_encoder(cases):
    _, model = _model("accv")
    model.eval()
    with torch.no_grad():
        flat, feat = model.language_encoder(cases["accv/lang/tokens"])
    torch.testing.assert_close(flat, cases["accv/lang/flat"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(feat, cases["accv/lang/feat"], atol=1e-5, rtol=1e-4)


def test_whole_network_eval_boxes(cases, variant_model):
    variant, _, model = variant_model
    model.eval()
    with torch.no_grad():
        boxes = model(reference_images(), cases[f"{variant}/net_b2_s416/refs"])
    expected = cases[f"{variant}/net_b2_s416/eval_boxes"]
    assert boxes.shape == expected.shape == (2, 1, 5)
    torch.testing.assert_close(boxes, expected, rtol=1e-3, atol=1e-3)


def test_whole_network_train_loss_and_moving_buffers(cases, variant_model):
    variant, _, model = variant_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    out = model(reference_images(), cases[f"{variant}/net_b2_s416/refs"])
    torch.testing.assert_close(out["loss"].detach(), cases[f"{variant}/net_b2_s416/train_loss"],
                               rtol=1e-4, atol=0)
    prefix = f"{variant}/net_b2_s416/after_train_forward/"
    buffers = [k for k in cases if k.startswith(prefix)]
    assert any(k.split(prefix)[1].startswith("visual_encoder.") for k in buffers)
    state = model.state_dict()
    for key in buffers:
        ours = to_ours(key[len(prefix):])
        assert not torch.equal(state[ours], before[ours]), f"{ours} did not move in train mode"
        torch.testing.assert_close(state[ours], cases[key], rtol=1e-3, atol=1e-5)
    model.load_state_dict(before)
    model.eval()


def test_frozen_backbone_batchnorm_switch(cases):
    cfg = load_config("config/refcoco.yaml", ["DROPOUT_R=0.0", "FREEZE_BACKBONE_BN=true"])
    model = build_model(cfg, None, VOCAB)
    load_reference_state_dict(model, reference_state_dict())
    key = "visual_encoder.layers.0.bn.running_mean"
    before = model.state_dict()[key].clone()
    model.train()
    assert not model.visual_encoder.training and model.fusion.training
    model(reference_images(), cases["accv/net_b2_s416/refs"])
    torch.testing.assert_close(model.state_dict()[key], before, rtol=0, atol=0)
