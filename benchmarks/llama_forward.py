"""A Llama forward pass in plain torch, with random weights: prefill against a restored KV cache
on a GPU host without an inference engine (the GPU machine has no vLLM).

The math is Llama-3's (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP) and
the kernels are torch's (cuBLAS matmuls, scaled_dot_product_attention), so a prefill costs
what an engine's prefill costs at torch's kernel efficiency; it is not vLLM's own figure.

`forward(ids)` prefills a prompt and returns the last position's logits with every layer's
keys and values; `forward(ids, cache)` continues from a cache of earlier positions. A layer's
cache is `(k, v)`, each `[kv_heads, positions, head]`, keys after the rotation, as an engine
stores them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

Cache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Shape:
    """Llama-3-8B by default."""

    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head: int = 128
    mlp: int = 14336
    vocab: int = 128256
    rope_theta: float = 500000.0


class Llama:
    def __init__(self, shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> None:
        self.shape = shape
        g = torch.Generator(device=device).manual_seed(seed)

        def weight(*dims: int) -> torch.Tensor:
            return torch.empty(*dims, dtype=dtype, device=device).normal_(0, 0.02, generator=g)

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, dtype=dtype, device=device)

        s = shape
        qkv = (s.heads + 2 * s.kv_heads) * s.head
        self.embed = weight(s.vocab, s.hidden)
        self.layers = [
            {
                "attn_norm": ones(s.hidden),
                "qkv": weight(qkv, s.hidden),
                "o": weight(s.hidden, s.heads * s.head),
                "mlp_norm": ones(s.hidden),
                "gate_up": weight(2 * s.mlp, s.hidden),
                "down": weight(s.hidden, s.mlp),
            }
            for _ in range(s.layers)
        ]
        self.norm = ones(s.hidden)
        self.lm_head = weight(s.vocab, s.hidden)
        steps = torch.arange(0, s.head, 2, device=device, dtype=torch.float32) / s.head
        self.inv_freq = 1.0 / (s.rope_theta**steps)

    def forward(self, ids: torch.Tensor, cache: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        """The logits of the last of `ids` (positions after the cache's), and the keys and
        values of `ids` per layer. A continuation is one token (no mask is needed then)."""
        s = self.shape
        start = 0 if cache is None else cache[0][0].shape[1]
        n = ids.shape[0]
        assert cache is None or n == 1, "a continuation computes one token"
        positions = torch.arange(start, start + n, device=ids.device, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq[None]
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        x = self.embed[ids]
        computed: Cache = []
        for i, layer in enumerate(self.layers):
            h = _rms(x, layer["attn_norm"])
            q, k, v = (h @ layer["qkv"].T).split(
                [s.heads * s.head, s.kv_heads * s.head, s.kv_heads * s.head], dim=-1
            )
            q = _rotate(q.view(n, s.heads, s.head), cos, sin).transpose(0, 1)
            k = _rotate(k.view(n, s.kv_heads, s.head), cos, sin).transpose(0, 1)
            v = v.view(n, s.kv_heads, s.head).transpose(0, 1)
            computed.append((k, v))
            if cache is not None:
                k, v = torch.cat([cache[i][0], k], dim=1), torch.cat([cache[i][1], v], dim=1)
            attn = F.scaled_dot_product_attention(
                q[None], k[None], v[None], is_causal=cache is None, enable_gqa=True
            )[0]
            x = x + attn.transpose(0, 1).reshape(n, s.heads * s.head) @ layer["o"].T
            gate, up = (_rms(x, layer["mlp_norm"]) @ layer["gate_up"].T).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer["down"].T
        return _rms(x[-1:], self.norm) @ self.lm_head.T, computed


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, Hugging Face's half-split layout; x is [positions, heads, head]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
