"""APL's alignment branch (models/alignment.py) keeps what APL's code computes: the attention's
height/width swap and dropout, GARAN's map that nothing reads, the second fusion's side projections
that run but never train, and the expression's BatchNorm in the gate."""
import torch

from models.alignment import AlignmentAttention, AlignmentGate, VisualAlignment


def _attention(seed: int = 0) -> AlignmentAttention:
    torch.manual_seed(seed)
    attention = AlignmentAttention(8, 6)
    with torch.no_grad():
        attention.norm.running_mean.normal_()
        attention.norm.running_var.uniform_(0.5, 1.5)
    return attention.eval()


def _context(attention: AlignmentAttention, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """What the attention hands its output convolution: the diffused map, as laid out."""
    seen = []
    handle = attention.out.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        attention(x, text)
    handle.remove()
    return seen[0]


def _hot_spot_context(h: int, w: int, row: int, col: int) -> torch.Tensor:
    """The context's size at each position ``[h, w]`` for a map whose diffuse key matches the
    expression at (row, col) only: the diffused vector lands there in a plain layout."""
    attention = _attention()
    with torch.no_grad():
        attention.diffuse_key.weight.copy_(torch.eye(8)[:, :, None, None])
        attention.diffuse_key.bias.zero_()
        attention.query.weight.zero_()
        attention.query.bias.fill_(1.0)
    x = torch.full((1, 8, h, w), -10.0)
    x[..., row, col] = 10.0  # sigmoid(+-10 * 4 / 2): 1 there, 2e-9 elsewhere
    return _context(attention, x, torch.randn(1, 6))[0].norm(dim=0)


def test_the_attention_lays_the_diffused_map_out_with_height_and_width_swapped():
    square = _hot_spot_context(4, 4, 0, 3)
    assert square.argmax() == 3 * 4 + 0 and square[3, 0] > 1e3 * square[0, 3]  # transposed
    # [2, 3]: (0, 2) is index 2 * 2 + 0 = 4 of APL's [w, h] layout, read back as [h, w]: (1, 1).
    shuffled = _hot_spot_context(2, 3, 0, 2)
    assert shuffled.argmax() == 1 * 3 + 1 and shuffled[1, 1] > 1e3 * shuffled[0, 2]


def test_attention_dropout_acts_in_training_only():
    attention = _attention()
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 6, generator=g)
    with torch.no_grad():
        evaluated = [attention(x, text) for _ in range(2)]
        without_dropout = AlignmentAttention(8, 6, dropout=0.0).eval()
        without_dropout.load_state_dict(attention.state_dict())
        torch.testing.assert_close(evaluated[0], without_dropout(x, text), rtol=0, atol=0)
        assert torch.equal(*evaluated)
        attention.train()
        attention.norm.eval()  # running statistics, so that only the dropout differs
        torch.manual_seed(3)
        trained = [attention(x, text) for _ in range(2)]
    assert not torch.allclose(trained[0], trained[1]) and not torch.allclose(trained[0], evaluated[0])


def test_what_apl_computes_and_discards_never_trains():
    torch.manual_seed(0)
    alignment = VisualAlignment(16, 8).train()
    calls = []
    alignment.attention.mask_pred.register_forward_hook(lambda *args: calls.append(1))
    side = alignment.multi_scale.bot_proj.bn.running_mean.clone()
    maps = tuple(torch.randn(2, 16, s, s) for s in (8, 4, 2))
    raw = alignment(maps, torch.randn(2, 3, 8), torch.tensor([[0, 1, 3], [2, 1, 0]]), torch.randn(2, 8))
    raw.sum().backward()
    assert not calls
    frozen = [alignment.attention.mask_pred, alignment.multi_scale.mid_proj, alignment.multi_scale.bot_proj]
    assert all(p.grad is None and not p.requires_grad for m in frozen for p in m.parameters())
    # APL runs the side projections, so their BatchNorm statistics move in training.
    assert not torch.equal(alignment.multi_scale.bot_proj.bn.running_mean, side)
    assert alignment.attention.query.weight.grad is not None and alignment.gates[0].text[0].weight.grad is not None


def test_the_gate_normalises_the_expression_over_the_batch_in_training():
    torch.manual_seed(0)
    gate = AlignmentGate(6, 4, 5).train()
    x, text = torch.randn(3, 6, 2, 2), torch.randn(3, 4)
    with torch.no_grad():
        alone = gate(x, text)
        other = text.clone()
        other[1] = torch.randn(4)
        changed = gate(x, other)
    # Sample 0's expression and map are the same; its output moves with sample 1's expression (over
    # three samples: with two, each normalised value is +-1 whatever the other sample holds).
    assert not torch.allclose(alone[0], changed[0])
