"""Cross-modality attention (CMA): the expression modulates the fused visual map.

Visual tokens first attend to themselves; the expression then scales and shifts
their normalised copy (FiLM-style), and the tokens attend to that copy. Each
branch enters through a tanh gate that starts at zero, so a fresh block is the
identity on top of its input projection.

The reference conditions each image's tokens on that image's own expression
and then scores them against every expression of the batch: a negative image's
anchors then carry another expression, and the contrastive loss can match
expressions to expressions through them instead of to what the image shows.
:meth:`CrossModalityAttention.anchors` can instead condition every image on
every expression (``pairwise``), which is what the expression scored sees at
test time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedAttention(nn.Module):
    """One-head attention, queries layer-normed, keys/values from the raw second input.

    ``form='reference'`` reproduces the reference: each value row is scaled by the sum
    of its attention column, ``out_j = v_j * sum_i P_ij``. ``form='standard'`` is
    the usual ``P @ V``.
    """

    def __init__(self, dim: int, form: str = "reference", scale_dim: int = 64):
        super().__init__()
        self.form = form
        self.scale = scale_dim ** -0.5  # the reference scales by a 64-wide head's factor
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.to_q(self.norm(x)) * self.scale
        k, v = self.to_kv(context).chunk(2, dim=-1)
        scores = q @ k.transpose(-2, -1)  # [..., N_q, N_kv]
        attn = (scores - scores.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        if self.form == "reference":
            out = v * attn.sum(dim=-2).unsqueeze(-1)
        else:
            out = attn @ v
        return self.to_out(out)


def _feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), nn.GELU(),
                         nn.Linear(mult * dim, dim, bias=False))


def _text_mlp(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True))


class CrossModalityAttention(nn.Module):
    def __init__(self, vis_dim: int = 1024, dim: int = 512, dropout: float = 0.1, form: str = "reference"):
        super().__init__()
        self.in_proj = nn.Linear(vis_dim, dim, bias=False)
        self.self_attn = GatedAttention(dim, form)
        self.self_ff = _feed_forward(dim)
        self.cross_attn = GatedAttention(dim, form)
        self.cross_ff = _feed_forward(dim)
        self.self_attn_gate = nn.Parameter(torch.zeros(1))
        self.self_ff_gate = nn.Parameter(torch.zeros(1))
        self.cross_attn_gate = nn.Parameter(torch.zeros(1))
        self.cross_ff_gate = nn.Parameter(torch.zeros(1))
        self.text_mlp = _text_mlp(dim, dropout)
        self.to_gamma = nn.Linear(dim, dim)
        self.to_beta = nn.Linear(dim, dim)
        self.film_scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """visual ``[B,C,H,W]``, text ``[B,D]`` -> ``[B,D,H,W]``."""
        b, _, h, w = visual.shape
        cells = torch.arange(h * w, device=visual.device).expand(b, -1)
        return self.anchors(visual, text, cells).transpose(1, 2).reshape(b, -1, h, w)

    def anchors(self, visual: torch.Tensor, text: torch.Tensor, cells: torch.Tensor,
                pairwise: bool = False) -> torch.Tensor:
        """visual ``[B,C,H,W]``, text ``[B,D]``, cells ``[B,K]`` (indices into H*W) -> the tokens of those
        cells, ``[B,K,D]`` with image i conditioned on text i, or with ``pairwise``
        ``[B_text,B_image,K,D]`` with every image conditioned on every text."""
        x = self.in_proj(visual.flatten(2).transpose(1, 2))  # [B, N=H*W, D]
        x = x + self.self_attn_gate.tanh() * self.self_attn(x, x)
        visual_tokens = x + self.self_ff_gate.tanh() * self.self_ff(x)
        # Normalised per sample over all N x D values at once (InstanceNorm2d on a 3-D tensor).
        normalised = F.layer_norm(visual_tokens, visual_tokens.shape[1:], eps=1e-5)

        e = self.text_mlp(text)
        gamma, beta = self.to_gamma(e).tanh(), self.to_beta(e).tanh()  # [B, D]
        if pairwise:  # text i on dim 0, image j on dim 1
            gamma, beta = gamma[:, None, None, :], beta[:, None, None, :]
            visual_tokens, normalised, cells = visual_tokens[None], normalised[None], cells[None]
        else:
            gamma, beta = gamma[:, None, :], beta[:, None, :]
        z = self.film_scale * (gamma * normalised + beta).relu() + visual_tokens

        x = visual_tokens + self.cross_attn_gate.tanh() * self.cross_attn(visual_tokens, z)
        # The last feed-forward is per token: run it on the kept cells only.
        x = _gather_tokens(x, cells)
        return _gather_tokens(visual_tokens, cells) + self.cross_ff_gate.tanh() * self.cross_ff(x)


def _gather_tokens(x: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """x ``[..., N, D]``, cells ``[..., K]`` (broadcast against x's leading dims) -> ``[..., K, D]``."""
    lead = torch.broadcast_shapes(x.shape[:-2], cells.shape[:-1])
    index = cells.expand(*lead, cells.shape[-1])[..., None].expand(*lead, cells.shape[-1], x.shape[-1])
    return x.expand(*lead, *x.shape[-2:]).gather(-2, index)
