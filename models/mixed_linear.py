"""Gate mixture fused with the first tower layer, for many tasks on CPU.

MMoE's towers read, per task g, the mixture m[g, b] = Σ_e w[g, b, e] · experts[e, b] and
start with a linear layer: h[g, b] = m[g, b] @ W[g] + bias[g]. Done in two ops, the mixture is
a `[G, B, D]` tensor — 67 MB at G=64, B=1024, D=256 — allocated fresh in the forward and
again (its gradient) in the backward. On CPU every fresh allocation that size is new pages from
the OS: page-faulting it costs more than the arithmetic. `mixed_linear` computes the same
thing in batch chunks whose `[chunk, G, D]` mixture stays small and in cache, and recomputes
it in the backward instead of saving it (the `[G, B, D]` activation is never stored).
The autograd graph is one node; the arithmetic is the same batched matmuls as the plain path.
"""

from __future__ import annotations

import math

import torch

# Mixture elements per chunk: 1M floats (4 MB) keeps a chunk's mixture and its gradient
# within a core's share of cache on common server CPUs.
CHUNK_ELEMENTS = 1 << 20


def use_fused(w: torch.Tensor, width: int) -> bool:
    """Fused when the `[G, B, width]` mixture is larger than one chunk, on CPU in fp32/fp64
    without autocast. A small mixture is cheap to materialise (and saved, not recomputed); GPUs
    keep the plain path (their caching allocator already reuses memory; it follows autocast)."""
    return (
        w.shape[0] * w.shape[1] * width > CHUNK_ELEMENTS
        and w.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and w.dtype in (torch.float32, torch.float64)
    )


def mixed_linear(w: torch.Tensor, experts: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(Σ_e w[g,b,e] experts[e,b,:]) @ weight[g] + bias[g] for every gate g.

    w `[G, B, E]` gate weights, experts `[E, B, D]`, weight `[G, D, H]`, bias `[G, H]`
    -> `[G, B, H]`. Equal (to rounding) to `baddbmm(bias[:, None], mix(w, experts), weight)`.
    """
    return _MixedLinear.apply(w, experts, weight, bias)


def _chunk_size(batch: int, gates: int, width: int) -> int:
    return max(1, min(batch, CHUNK_ELEMENTS // max(1, gates * width)))


def _workspace(n: int, like: torch.Tensor):
    """A flat buffer reused by every chunk; `take(*shape)` is a contiguous view of its start."""
    buf = torch.empty(n, dtype=like.dtype, device=like.device)
    return lambda *shape: buf[: math.prod(shape)].view(shape)


class _MixedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, experts, weight, bias):
        G, B, _ = w.shape
        D, H = experts.shape[-1], weight.shape[-1]
        wb, eb = w.transpose(0, 1), experts.transpose(0, 1)  # [B, G, E], [B, E, D]
        out = torch.empty(G, B, H, dtype=w.dtype, device=w.device)
        c = _chunk_size(B, G, D)
        mix_ws, h_ws = _workspace(c * G * D, w), _workspace(c * G * H, w)
        for s in range(0, B, c):
            e = min(B, s + c)
            m = torch.bmm(wb[s:e], eb[s:e], out=mix_ws(e - s, G, D))  # mixture [c, G, D]
            out[:, s:e] = torch.baddbmm(bias.unsqueeze(1), m.transpose(0, 1), weight, out=h_ws(G, e - s, H))
        ctx.save_for_backward(w, experts, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        w, experts, weight = ctx.saved_tensors
        G, B, E = w.shape
        D, H = experts.shape[-1], weight.shape[-1]
        wb, eb = w.transpose(0, 1), experts.transpose(0, 1)
        grad_w = torch.empty(B, G, E, dtype=w.dtype, device=w.device)
        grad_e = torch.empty(B, E, D, dtype=w.dtype, device=w.device)
        grad_weight = torch.zeros_like(weight)
        c = _chunk_size(B, G, D)
        mix_ws, g_ws, gm_ws = _workspace(c * G * D, w), _workspace(c * G * H, w), _workspace(c * G * D, w)
        for s in range(0, B, c):
            e = min(B, s + c)
            m = torch.bmm(wb[s:e], eb[s:e], out=mix_ws(e - s, G, D))  # the mixture, recomputed
            g = g_ws(G, e - s, H).copy_(grad_out[:, s:e])  # [G, c, H]
            grad_weight.baddbmm_(m.permute(1, 2, 0), g)  # Σ_b m[b, g]ᵀ g[g, b]
            gm = torch.bmm(g, weight.transpose(1, 2), out=gm_ws(G, e - s, D)).transpose(0, 1)  # [c, G, D]
            torch.bmm(gm, eb[s:e].transpose(1, 2), out=grad_w[s:e])
            torch.bmm(wb[s:e].transpose(1, 2), gm, out=grad_e[s:e])
        return grad_w.transpose(0, 1), grad_e.transpose(0, 1), grad_weight, grad_out.sum(1)
