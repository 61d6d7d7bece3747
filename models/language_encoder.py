"""Expression encoder: word embedding -> GRU -> post-norm self-attention -> attention pooling."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

_MASKED = -1e9  # the reference fills masked scores with this, not -inf: an all-padding row stays finite


class LayerNorm(nn.Module):
    """w * (x - mean) / (std + eps) + b with the unbiased std, as the reference computes it
    (``nn.LayerNorm`` uses the biased variance inside the square root)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.weight * (x - mean) / (std + self.eps) + self.bias


def _mlp(dim_in: int, dim_hidden: int, dim_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(dim_hidden, dim_out))


class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.value = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """x ``[N,T,D]``, pad ``[N,T]`` (True at padding)."""
        n, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # [N,T,D] -> [N,heads,T,D/heads]
            return y.view(n, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5
        scores = scores.masked_fill(pad[:, None, None, :], _MASKED)
        attended = self.dropout(scores.softmax(-1)) @ v
        return self.out(attended.transpose(1, 2).reshape(n, t, d))


class SelfAttentionLayer(nn.Module):
    """Post-norm transformer encoder layer."""

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads, dropout)
        self.ffn = _mlp(dim, ff_dim, dim, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.attn(x, pad)))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class AttentionPooling(nn.Module):
    """Softmax-weighted sum of token features (padding excluded), then a linear map."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.score = _mlp(dim, dim // 2, 1, dropout)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        weights = self.score(x).masked_fill(pad[..., None], _MASKED).softmax(dim=1)  # [N,T,1]
        return self.out((weights * x).sum(dim=1))


class LanguageEncoder(nn.Module):
    """Token ids ``[N,T]`` (0 = padding) -> pooled ``[N,D]`` and per-token ``[N,T,D]`` features."""

    def __init__(self, token_size: int, embed_dim: int, dim: int = 512, layers: int = 3,
                 heads: int = 8, ff_dim: int = 2048, dropout: float = 0.1,
                 pretrained_emb: np.ndarray | torch.Tensor | None = None, freeze_embedding: bool = True):
        super().__init__()
        self.embedding = nn.Embedding(token_size, embed_dim)
        if pretrained_emb is not None:
            weight = torch.as_tensor(np.asarray(pretrained_emb), dtype=torch.float32)
            if tuple(weight.shape) != (token_size, embed_dim):
                raise ValueError(f"pretrained embedding has shape {tuple(weight.shape)}, expected "
                                 f"[vocabulary size {token_size}, WORD_EMBED_SIZE {embed_dim}]")
            self.embedding.weight.data.copy_(weight)
        self.embedding.weight.requires_grad_(not freeze_embedding)
        self.gru = nn.GRU(embed_dim, dim, batch_first=True)
        self.layers = nn.ModuleList(SelfAttentionLayer(dim, heads, ff_dim, dropout) for _ in range(layers))
        self.pool = AttentionPooling(dim, dropout)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = tokens == 0
        x, _ = self.gru(self.embedding(tokens))
        for layer in self.layers:
            x = layer(x, pad)
        return self.pool(x, pad), x
