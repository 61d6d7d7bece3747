"""Checkpoints of APL's code: its parameter names (tests/fixtures/apl_checkpoint_keys.tsv) mapped onto
the project's APL model by models/reference_keys.py, and loaded by utils/checkpoint.py."""
import pytest
import torch

from models import build_model
from models.reference_keys import NOT_IN_APL_CHECKPOINTS, reference_state_dict, to_ours, to_reference
from reference_weights import FIXTURES, read_keys, reference_state_dict as apl_random_state_dict
from utils.checkpoint import CheckpointMismatchError, is_apl_checkpoint, load_apl_state_dict, model_for_evaluation
from utils.config import load_config


@pytest.fixture(scope="module")
def apl():
    """APL's keys and shapes, the fixture recorded from APL's code, and the project's APL model at
    APL's sizes (config/apl/refcoco.yaml, APL's 10344-token vocabulary)."""
    fx = torch.load(f"{FIXTURES}/apl_reference.pt", weights_only=True)
    vocab = fx["meta"]["inputs"]["vocab"]
    model = build_model(load_config("config/apl/refcoco.yaml"), None, len(vocab), vocab)
    keys = {key: shape for key, _, shape in read_keys("apl_checkpoint_keys.tsv")}
    return keys, fx, model


def _fit(keys: dict, model) -> tuple[dict, dict]:
    """(APL key -> why it does not fit the model, model key -> why no APL key maps onto it)."""
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    misfits = {k: "not in the model" if to_ours(k) not in ours else f"{shape} in APL, {ours[to_ours(k)]} here"
               for k, shape in keys.items() if ours.get(to_ours(k)) != shape}
    mapped = {to_ours(k) for k in keys}
    return misfits, {k: "no APL key" for k in ours if k not in mapped}


def test_apl_names_round_trip(apl):
    keys = list(apl[0])
    ours = [to_ours(k) for k in keys]
    assert len(set(ours)) == len(keys)
    assert [to_reference(k) for k in ours] == keys
    apl_words = ("module_list", "sa_list", "mhatt", "att_flat", "batch_norm", "_manner", "sup_head", "linear_")
    assert not [k for k in ours if any(word in k for word in apl_words)]


def test_every_apl_key_fits_the_model(apl):
    keys, _, model = apl
    misfits, unmapped = _fit(keys, model)
    assert not misfits and set(unmapped) == set(NOT_IN_APL_CHECKPOINTS), "\n".join(
        f"{k}: {why}" for k, why in {**misfits, **unmapped}.items())


def _apl_named(model, fx=None) -> dict:
    """The model's state in APL's naming, with the fixture's APL-named weights in place of ours."""
    state = reference_state_dict(model)
    for component in ("d_tag_fusion", "f_reconstruction", "h_sup_head") if fx else ():
        state.update(fx[component]["weights"])
    return state


def test_apl_weights_load_into_the_right_modules(apl):
    _, fx, model = apl
    steps = model.alignment.steps.clone()
    state = _apl_named(model, fx)
    assert is_apl_checkpoint(state) and not set(NOT_IN_APL_CHECKPOINTS) & set(state)
    load_apl_state_dict(model, {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}})
    weights = {k: v for c in ("d_tag_fusion", "f_reconstruction", "h_sup_head") for k, v in fx[c]["weights"].items()}
    ours = model.state_dict()
    for key, value in weights.items():
        assert torch.equal(ours[to_ours(key)], value), key
    assert torch.equal(model.alignment.steps, steps)
    pairs = [(model.prompts.visual_proj.weight, "linear_vs_pos.weight"),
             (model.prompts.tag_proj.bias, "linear_tag.bias"),
             (model.prompts.soft_weights.weight, "soft_weights.weight"),
             (model.prompts.tag_encoder.layers[1].attn.query.weight, "tag_encoder.sa_list.1.mhatt.linear_q.weight"),
             (model.prompts.tag_encoder.pool.out.bias, "tag_encoder.att_flat.linear_merge.bias"),
             (model.reconstruction.decoder[4].weight, "linear_decoder.4.weight"),
             (model.alignment.head.stem.bn.running_var, "sup_head.stems.0.bn.running_var"),
             (model.alignment.head.convs[1].conv.weight, "sup_head.reg_convs.0.1.conv.weight"),
             (model.alignment.head.reg.bias, "sup_head.reg_preds.0.bias"),
             (model.alignment.head.obj.bias, "sup_head.obj_preds.0.bias")]
    for tensor, key in pairs:
        assert torch.equal(tensor, weights[key]), key

    # The mapped modules compute what APL's did with these weights (eval mode, no dropout). Float32
    # tolerances: the fixture's README measured assert_close's defaults across thread counts.
    model.eval()
    d, f = fx["d_tag_fusion"], fx["f_reconstruction"]
    with torch.no_grad():
        tag, _ = model.prompts.tag_encoder(d["inputs"]["tag_tokens"].flatten(0, 1))
        torch.testing.assert_close(tag, d["outputs"]["tag_flat"])
        tag = tag.view_as(d["inputs"]["visual_emb"])
        visual, position = d["inputs"]["visual_emb"], d["inputs"]["position_embedding"]
        w = model.prompts.soft_weights(visual + tag + position).softmax(dim=-1)
        torch.testing.assert_close(w, d["outputs"]["soft_weights"])
        fused = (model.prompts.visual_proj(visual * w[..., :1]) + position * w[..., 1:2]
                 + model.prompts.tag_proj(tag * w[..., 2:]))
        torch.testing.assert_close(fused, d["outputs"]["visual_emb"])
        torch.testing.assert_close(model.prompts.tag_proj(tag), d["outputs"]["tag_emb"])
        torch.testing.assert_close(model.reconstruction.decoder(f["outputs"]["max_sim_vis_emb"]),
                                   f["outputs"]["recon_lang_emb"])


def test_an_apl_checkpoint_with_a_missing_key_is_refused_naming_it(apl):
    _, _, model = apl
    state = _apl_named(model)
    del state["linear_tag.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"prompts\.tag_proj\.bias \(linear_tag\.bias in the file\)"):
        load_apl_state_dict(model, state)


def test_a_whole_checkpoint_of_apl_code_loads_and_its_alignment_head_answers(apl):
    """Every key of APL's Net, each a random tensor of its shape: all load (nothing skipped), each
    into the module APL's name says, and the alignment branch runs on them in evaluation."""
    keys, _, model = apl
    state = apl_random_state_dict("apl_checkpoint_keys.tsv")
    assert set(state) == set(keys)
    steps = model.alignment.steps.clone()
    load_apl_state_dict(model, {"epoch": 25, "state_dict": {f"module.{k}": v for k, v in state.items()}})
    ours = model.state_dict()
    assert not [k for k, v in state.items() if not torch.equal(ours[to_ours(k)], v)]
    assert torch.equal(model.alignment.steps, steps)
    alignment = model.alignment
    pairs = [(alignment.gates[2].visual[0].bias, "fusion_manner.2.v_proj.0.bias"),
             (alignment.gates[0].text[1].running_var, "fusion_manner.0.q_proj.1.running_var"),
             (alignment.gates[1].norm[0].weight, "fusion_manner.1.norm.0.weight"),
             (alignment.multi_scale.bot_proj.bn.running_mean, "multi_scale_manner_sup.bot_proj.batch_norm.running_mean"),
             (alignment.multi_scale.up[1][1].conv.weight, "multi_scale_manner_sup.up_modules.1.1.conv.weight"),
             (alignment.attention.mask_pred.weight, "attention_manner.w_m.weight"),
             (alignment.attention.collect_key.bias, "attention_manner.w_kc.bias"),
             (alignment.attention.norm.running_mean, "attention_manner.layer_norm.running_mean")]
    for tensor, key in pairs:
        assert torch.equal(tensor, state[key]), key

    # APL's widths: 1024-channel fused maps, HIDDEN_SIZE 512; a 4x4 stride-32 grid keeps it small.
    g = torch.Generator().manual_seed(0)
    maps = tuple(torch.randn(2, 1024, side, side, generator=g) for side in (16, 8, 4))
    visual, language = torch.randn(2, 5, 512, generator=g), torch.randn(2, 512, generator=g)
    cells = torch.tensor([[3, 0, 9, 15, 6], [1, 2, 4, 8, 12]])
    alignment.eval()
    with torch.no_grad():
        first = alignment(maps, visual, cells, language)
        again = alignment(maps, visual, cells, language)
        boxes = alignment.decode(first)
    assert first.shape == (2, 4, 4, 5) and torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert boxes.shape == (2, 1, 5) and torch.isfinite(boxes).all()


def test_test_py_evaluates_an_apl_checkpoint(tmp_path, tiny_overrides):
    vocab = ["PAD", "UNK", "CLS", "red", "dog"]
    overrides = tiny_overrides + ["DETECTOR_CLASS_NAMES=[red, dog, cat]"]
    cfg = load_config("config/apl/refcoco.yaml", overrides)
    torch.manual_seed(0)
    trained = build_model(cfg, None, len(vocab), vocab)
    path = tmp_path / "apl.pth"
    state = {f"module.{k}": v for k, v in reference_state_dict(trained).items()}
    torch.save({"epoch": 25, "state_dict": state, "lr": 1e-6}, path)
    model = model_for_evaluation(str(path), cfg, vocab, torch.device("cpu"))
    assert not model.training
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(CheckpointMismatchError, match="evaluate it with an APL config"):
        model_for_evaluation(str(path), load_config("config/refcoco.yaml", tiny_overrides), vocab, torch.device("cpu"))
