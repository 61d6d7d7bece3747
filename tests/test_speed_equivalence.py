"""The fast paths give the results of the straightforward ones (no timings here: see tools/benchmark.py)."""
import copy

import pytest
import torch
from torch import nn

from datasets import RefDataset, build_loader, normalize_images
from datasets.synthetic import generate
from models import DetectorCache, build_model
from utils.config import ConfigError, load_config
from utils.ema import ModelEMA
from utils.engine import prepare_batch, to_device, train_step
from utils.evaluation import BASELINES, evaluate_predictors, model_boxes, text_blind_predictor

VOCAB = 50
BATCH = 4
DEVICE = torch.device("cpu")


@pytest.fixture
def tiny_cfg(tiny_overrides):
    # No dropout: two runs of the model must draw nothing at random.
    return load_config("config/refcoco.yaml", tiny_overrides + ["DROPOUT_R=0.0"])


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg, None, VOCAB)


def _inputs(cfg):
    g = torch.Generator().manual_seed(1)
    size = cfg.INPUT_SHAPE[0]
    images = torch.randn(BATCH, 3, size, size, generator=g)
    refs = torch.randint(3, VOCAB, (BATCH, cfg.NUM_REFS, cfg.MAX_TOKEN), generator=g)
    refs[..., cfg.MAX_TOKEN // 2:] = 0
    return images, refs


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_skipping_unread_heads_changes_neither_boxes_nor_batchnorm_buffers(tiny_cfg):
    images, _ = _inputs(tiny_cfg)
    full = _model(tiny_cfg).visual_encoder.train()
    trunk = copy.deepcopy(full)
    with torch.no_grad():
        full_features, full_boxes = full(images)
        trunk_features, trunk_boxes = trunk(images, heads=(0,))
    assert trunk_boxes[1] is None and trunk_boxes[2] is None
    assert torch.equal(full_boxes[0], trunk_boxes[0])
    for a, b in zip(full_features, trunk_features):
        assert torch.equal(a, b)
    full_state, trunk_state = full.state_dict(), trunk.state_dict()
    assert all(torch.equal(full_state[k], trunk_state[k]) for k in full_state)


def test_in_place_activations_give_the_out_of_place_loss_and_gradients(tiny_cfg):
    images, refs = _inputs(tiny_cfg)
    fast = _model(tiny_cfg).train()
    plain = copy.deepcopy(fast)
    for module in plain.modules():
        if isinstance(module, nn.LeakyReLU):
            module.inplace = False
    losses = []
    for model in (fast, plain):
        loss = model(images, refs)["loss"]
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(*losses)
    fast_grads, plain_grads = _grads(fast), _grads(plain)
    assert fast_grads.keys() == plain_grads.keys() and fast_grads
    assert all(torch.equal(fast_grads[k], plain_grads[k]) for k in fast_grads)


def _fused_upsampling_first(fusion, s8, s16, s32):
    """The fusion as the reference orders it: each upward path upsamples before its 1x1 conv."""
    def up(path, x):
        return nn.Sequential(*path)(x)  # the modules in list order, without _UpPath's reordering
    s16 = torch.cat([up(fusion.up[1], s32), s16], dim=1)
    s8 = torch.cat([up(fusion.up[0], s16), s8], dim=1)
    s16 = torch.cat([fusion.down[0](s8), s16], dim=1)
    s32 = torch.cat([fusion.down[1](s16), s32], dim=1)
    return fusion.top_proj(s32)


def test_convolving_before_upsampling_gives_the_same_fusion(tiny_cfg):
    images, _ = _inputs(tiny_cfg)
    model = _model(tiny_cfg).train()
    with torch.no_grad():
        s32, s16, s8 = model.visual_encoder(images, heads=(0,))[0]
    fast = model.fusion
    plain = copy.deepcopy(fast)
    fast_out = fast(s8, s16, s32)
    plain_out = _fused_upsampling_first(plain, s8, s16, s32)
    torch.testing.assert_close(fast_out, plain_out, rtol=1e-5, atol=1e-6)
    fast_out.square().mean().backward()
    plain_out.square().mean().backward()
    fast_grads, plain_grads = _grads(fast), _grads(plain)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    fast_state, plain_state = fast.state_dict(), plain.state_dict()
    for key, value in plain_state.items():
        torch.testing.assert_close(fast_state[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_batched_expressions_match_one_language_pass_each(tiny_cfg):
    _, refs = _inputs(tiny_cfg)
    encoder = _model(tiny_cfg).language_encoder.eval()
    with torch.no_grad():
        batched, _ = encoder(refs.flatten(0, 1))
        each = torch.stack([encoder(refs[:, e])[0] for e in range(refs.shape[1])], dim=1)
    torch.testing.assert_close(batched.view_as(each), each, rtol=1e-5, atol=1e-6)


def test_channels_last_gives_the_same_loss_and_boxes(tiny_cfg):
    """Same values up to rounding. Gradients are not compared: with random weights, near-tied
    anchors can swap between the two layouts (which anchor is best or second), moving some
    gradients by a few percent while the loss moves by rounding only."""
    images, refs = _inputs(tiny_cfg)
    plain = _model(tiny_cfg)
    fast = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    fast_images = images.contiguous(memory_format=torch.channels_last)
    tol = dict(rtol=1e-5, atol=1e-6)
    plain.train(), fast.train()
    with torch.no_grad():
        torch.testing.assert_close(fast(fast_images, refs)["loss"], plain(images, refs)["loss"], **tol)
        plain.eval(), fast.eval()
        torch.testing.assert_close(fast(fast_images, refs), plain(images, refs), **tol)


def _plain_ema_update(ema_module, model, step, decay):
    """Every floating-point tensor averaged one by one, integer ones copied."""
    d = min(decay, (step + 1) / (step + 10))
    ema_state = ema_module.state_dict()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                ema_state[key].lerp_(value, 1.0 - d)
            else:
                ema_state[key].copy_(value)


def test_ema_equals_a_plain_per_tensor_average(tiny_cfg):
    images, refs = _inputs(tiny_cfg)
    model = _model(tiny_cfg).train()
    ema = ModelEMA(model, decay=0.9)
    plain = copy.deepcopy(ema.module)
    # A frozen parameter changed after the EMA was made still has to be followed.
    frozen = model.visual_encoder.layers[0].conv.weight
    with torch.no_grad():
        frozen.add_(1.0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        model(images, refs)["loss"].backward()
        optimizer.step()
        ema.update(model)
        _plain_ema_update(plain, model, step, 0.9)
    state, expected = ema.module.state_dict(), plain.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert not torch.equal(state["visual_encoder.layers.0.bn.running_mean"],
                           model.state_dict()["visual_encoder.layers.0.bn.running_mean"])

    # Loading an average whose frozen parameters differ from the model's: followed again.
    loaded = ema.state_dict()
    loaded["module"]["visual_encoder.layers.1.conv.weight"] = torch.zeros_like(
        loaded["module"]["visual_encoder.layers.1.conv.weight"])
    ema.load_state_dict(loaded)
    plain.load_state_dict(loaded["module"])
    ema.update(model)
    _plain_ema_update(plain, model, ema.step - 1, 0.9)
    state, expected = ema.module.state_dict(), plain.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_foreach_adam_is_the_default_adam_bit_for_bit():
    torch.manual_seed(0)
    params = [torch.randn(300, 70), torch.randn(70)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    results = []
    for foreach in (False, True):
        ps = [p.clone().requires_grad_() for p in params]
        optimizer = torch.optim.Adam(ps, lr=1e-3, betas=(0.9, 0.98), eps=1e-9, foreach=foreach)
        for step_grads in grads:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            optimizer.step()
        results.append(ps)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    return float((value.float() - expected).norm() / expected.norm())


def test_bf16_autocast_on_cpu_stays_close_to_fp32(tiny_cfg):
    """bf16 keeps 8 bits of mantissa. Every continuous output (detector features and boxes, fused
    map, expression embeddings) stays within 3 % (relative L2) of fp32, and the loss within 10 %:
    with random weights, near-tied anchors may be ranked differently, which moves the loss more."""
    images, refs = _inputs(tiny_cfg)
    model = _model(tiny_cfg)
    tokens = refs.flatten(0, 1)

    def outputs():
        features, (boxes, _, _) = model.visual_encoder(images, heads=(0,))
        return [*features, boxes, model.fusion(*features[::-1]), model.language_encoder(tokens)[0]]

    with torch.no_grad():
        model.eval()
        expected = outputs()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = outputs()
        for value, reference in zip(mixed, expected):
            assert _relative_error(value, reference) < 3e-2

        model.train()
        state = copy.deepcopy(model.state_dict())  # train mode moves the BatchNorm buffers
        expected_loss = model(images, refs)["loss"]
        model.load_state_dict(state)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(images, refs)["loss"]
    assert _relative_error(loss, expected_loss) < 1e-1


def test_detector_cache_gives_the_uncached_steps_and_boxes_running_each_image_once(tiny_overrides):
    cfg = load_config("config/refcoco.yaml", tiny_overrides + ["DROPOUT_R=0.0", "FREEZE_BACKBONE_BN=true",
                                                               "CACHE_DETECTOR=true"])
    _, refs = _inputs(cfg)
    size = cfg.INPUT_SHAPE[0]
    images = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))
    # Two epochs of two batches over the same four images, the second epoch in another order.
    order = [[0, 1], [2, 3], [3, 1], [0, 2]]
    batches = [{"image": images[i], "refs": refs[i], "info": torch.tensor([[0] * 6 + [100 + j] for j in i])}
               for i in order]
    mean_std = (cfg.MEAN, cfg.STD)
    plain, cached = _model(cfg), _model(cfg)
    cache, detected = DetectorCache(), []
    detect = cached.detect
    cached.detect = lambda x: detected.append(len(x)) or detect(x)
    losses = {}
    for name, model, detector_cache in (("plain", plain, None), ("cached", cached, cache)):
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        losses[name] = [train_step(model, prepare_batch(model, batch, DEVICE, cache=detector_cache, mean_std=mean_std),
                                   optimizer, scheduler, None, None, 10.0, "none", DEVICE)["loss"]
                        for batch in batches]
    assert detected == [2, 2] and len(cache) == 4
    torch.testing.assert_close(losses["cached"], losses["plain"], rtol=0, atol=0)
    for (name, a), b in zip(plain.state_dict().items(), cached.state_dict().values()):
        assert torch.equal(a, b), name
    for model in (plain, cached):
        model.eval()
    batch = prepare_batch(cached, batches[2], DEVICE, cache=cache, mean_std=mean_std)
    assert detected == [2, 2]
    with torch.no_grad():
        boxes = cached(batch["image"], batch["refs"], batch["detections"])
        assert torch.equal(boxes, plain(normalize_images(images[[3, 1]], *mean_std), refs[[3, 1]]))
    with pytest.raises(ConfigError, match="CACHE_DETECTOR needs a detector whose outputs do not change"):
        load_config("config/refcoco.yaml", ["CACHE_DETECTOR=true"])


# With oneDNN on (PyTorch's default on CPU), float32 convolutions are not bit for bit across batch
# sizes: oneDNN picks its kernel and its split of the work between threads by batch size, and the
# grouped path convolves each image once, in a smaller batch than the per-entry one (on this AMD
# EPYC, a batch of 1 differs from larger ones at 2 threads, and batches below 16 from 16 at 1
# thread). Measured on this test's data and model, seeds 0-2, 1 and 2 threads: boxes differ by at
# most 1.53e-5 letterboxed pixels (2 ulp), similarities by 2.98e-8; the tolerances are about 6 and
# 30 times that. With oneDNN off, PyTorch convolves each image of a batch on its own, so grouping
# cannot change a bit, and the test asserts equality.
GROUPED_ATOL = {"boxes": 1e-4, "similarities": 1e-6}

def _recording(predictor, store: list):
    def record(model, batch, amp, device):
        boxes = predictor(model, batch, amp, device)
        store.append(boxes)
        return boxes
    return record


@pytest.mark.parametrize("onednn", [False, True], ids=["bit_for_bit_without_onednn", "onednn"])
def test_detector_once_per_image_gives_the_per_entry_boxes_and_scores(tmp_path, onednn):
    with torch.backends.mkldnn.flags(enabled=onednn):
        _check_grouped_evaluation(tmp_path, exact=not onednn)


def _check_grouped_evaluation(tmp_path, exact: bool):
    paths = generate(str(tmp_path), num_images=30, image_size=96, seed=0, eval_images=3)
    cfg = load_config("config/synthetic/quickstart.yaml", [
        f"ANN_PATH={{synthetic: {paths['annotations']}}}", f"IMAGE_PATH={{synthetic: {paths['images']}}}",
        "USE_GLOVE=false", "PRETRAIN_WEIGHT=none", "INPUT_SHAPE=[128, 128]", "BATCH_SIZE=5", "NUM_WORKER=0",
        "DROPOUT_R=0.0"])
    dataset = RefDataset(cfg, "val")
    torch.manual_seed(0)
    model = build_model(cfg, None, len(dataset.vocab)).eval()
    detected, similarities = [], []
    detect, rank = model.detect, model.rank
    model.detect = lambda x: detected.append(len(x)) or detect(x)

    def recorded_rank(*args):
        out = rank(*args)
        similarities.append(out[0])
        return out
    model.rank = recorded_rank
    loader = build_loader(cfg, dataset, train=False)
    mean_std = (cfg.MEAN, cfg.STD)
    kinds = ("model", *BASELINES)

    def predictors(store):
        return {kind: _recording(model_boxes if kind == "model" else text_blind_predictor(kind, cfg.SEED),
                                 store[kind]) for kind in kinds}

    # Per entry, as before: each predictor its own pass, the detector on every entry's image.
    per_entry = {kind: [] for kind in kinds}
    for kind, predictor in predictors(per_entry).items():
        for batch in loader:
            predictor(model, to_device(batch, DEVICE, mean_std), "none", DEVICE)
    assert sum(detected) == len(kinds) * len(dataset)
    per_entry["similarities"], similarities[:] = list(similarities), []
    detected.clear()
    grouped = {kind: [] for kind in kinds}
    cache = DetectorCache(0)
    scores = evaluate_predictors(model, loader, DEVICE, predictors(grouped), mean_std, detector_cache=cache)
    grouped["similarities"] = similarities
    images = {entry["iid"] for entry in dataset.entries}
    assert len(images) < len(dataset) and sum(detected) == cache.detected == len(images)
    for kind in per_entry:
        atol = 0.0 if exact else GROUPED_ATOL["similarities" if kind == "similarities" else "boxes"]
        torch.testing.assert_close(torch.cat(grouped[kind]), torch.cat(per_entry[kind]), rtol=0, atol=atol)
    assert scores == evaluate_predictors(model, loader, DEVICE, predictors({kind: [] for kind in kinds}), mean_std)


def test_detector_cache_stays_within_its_bound_keeping_the_latest_batch():
    class Detector:
        def detect(self, images):
            return (images * 2, images + 1)

    per_image = 2 * 4 * 64 * 4  # two float32 outputs of 4 x 64 values
    cache = DetectorCache(max_mb=3 * per_image / 2**20)
    images = torch.arange(10 * 4 * 64, dtype=torch.float32).view(10, 4, 64)
    for ids in ([0, 0, 1], [1, 2], [3, 4, 4, 5], [5, 0]):
        outputs = cache(Detector(), images[ids], ids)
        assert torch.equal(outputs[0], images[ids] * 2) and torch.equal(outputs[1], images[ids] + 1)
        assert cache.bytes == len(cache) * per_image
    # Batch 3 alone held three images, so 0, 1 and 2 went; batch 4 detected 0 again and dropped 3, the
    # least recently used.
    assert cache.detected == 7 and len(cache) == 3
    assert cache.bytes <= 3 * per_image
    # A bound below one batch keeps that batch: entries of an image straddling batches are detected once.
    cache = DetectorCache(0)
    for ids in ([0, 1, 1], [1, 2], [2, 3]):
        cache(Detector(), images[ids], ids)
    assert cache.detected == 4 and len(cache) == 2
