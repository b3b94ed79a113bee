"""MoECheck adapter: the shared-expert fusion composed in plain torch with block-scaled FP8
weights (fused-fp8 recipe: W8A8, 128x128 weight blocks, dynamic 1x128 activation groups).

Routing as torch_fused_bf16.py. Each GEMM quantises its bf16 input per token and 128-column group
the aiter way (amax = max(1e-10, max|x_g|), scale = amax·fp32(1/FP8_MAX), q = fp8(clamp(x·fp32(1/scale)))
with FP8_MAX 448 for e4m3fn, 240 for e4m3fnuz) and multiplies fp8 codes block by block: per
128-wide K block the products of fp8 values (exact in fp32) are summed in fp32, scaled by the
activation and weight block scales, and the K blocks are summed in fp32. Gate/up stay fp32,
silu(g)·u is rounded to bf16 and requantised the same way before the down GEMM; combine fp32,
output bf16. This is a composition of torch ops, not torch._scaled_mm: that op's block-wise modes
need CUDA 12.9+ on sm90 and could not be run here. Every helper-level mutant applies.
"""
import numpy as np

import moecheck_adapter as mc

NAME = "torch fused composition, fp8 block scale"
RECIPE = "fused-fp8"
FORMATS = ["fp8-e4m3fn", "fp8-e4m3fnuz"]  # weight formats of the case files this adapter takes
MUTANTS = list(mc.MUTANT_NAMES)
# fuzz draws only layers this composition takes: a shared expert that fuses (Is == I) at slot E
CONSTRAINTS = {"fused_shared_expert": True}


def _quantize(torch, a, fmt):
    """a [M, K] -> (codes as float32 [M, nK, 128], scales [M, nK]); K zero-padded to 128s."""
    M, K = a.shape
    nk = -(-K // 128)
    a = torch.nn.functional.pad(a.float(), (0, nk * 128 - K)).view(M, nk, 128)
    fmax = mc.FP8_MAX[fmt]
    amax = a.abs().amax(dim=2).clamp_min(1e-10)
    scale = amax * torch.tensor(1.0 / fmax, dtype=torch.float32)
    inv = torch.reciprocal(scale)
    q = (a * inv[:, :, None]).clamp(-fmax, fmax).to(getattr(torch, mc._TORCH_FP8[fmt]))
    return q.float(), scale


def _row_scales(torch, scales, rows, I, per_half_rows):
    """Weight block scales [n, rb, nK] expanded to one row each: [n, rows, nK]."""
    r = np.arange(rows)
    if per_half_rows:
        si = -(-I // 128)
        idx = np.where(r < I, r // 128, si + (r - I) // 128)
    else:
        idx = r // 128
    return scales[:, torch.from_numpy(idx).to(scales.device)]


def _weights(layer, dev):
    import torch

    def build():
        w13, w2, s13, s2 = mc.fused_fp8_weights(layer, dev)
        I, H = layer.intermediate, layer.hidden
        pad = lambda w, k: torch.nn.functional.pad(w.float(), (0, -(-k // 128) * 128 - k))
        q13 = pad(w13, H).view(w13.shape[0], 2 * I, -1, 128)
        q2 = pad(w2, I).view(w2.shape[0], H, -1, 128)
        return q13, _row_scales(torch, s13, 2 * I, I, True), q2, _row_scales(torch, s2, H, I, False)

    fnuz = mc.mutant("fnuz_as_fn") and layer.fp8 == "e4m3fnuz"
    r = layer.cached(("torch_fp8_blocks", str(dev), fnuz), build)
    if fnuz:
        mc.mutant_applied()
    return r


def forward(layer, x):
    import torch
    if layer.fp8 is None:
        raise mc.Unsupported("torch_fused_fp8 needs fp8 block-scaled weights; this layer stores "
                         f"{layer.weight_dtype} (use torch_fused_bf16.py)")
    dev = mc.device()
    xt = mc.to_torch(x, dev, torch.bfloat16)
    q13, s13, q2, s2 = _weights(layer, dev)
    fmt = layer.fp8

    def linear(a, counts, which):
        qw, sw = (q13, s13) if which == "w13" else (q2, s2)
        qa, sa = _quantize(torch, a, fmt)
        out = torch.empty(a.shape[0], qw.shape[1], dtype=torch.float32, device=a.device)
        start = 0
        for g, n in enumerate(counts.tolist()):
            if n:
                blocks = torch.einsum("mkc,nkc->kmn", qa[start:start + n], qw[g])  # fp32, exact products
                out[start:start + n] = (blocks * sa[start:start + n].T[:, :, None] * sw[g].T[:, None, :]).sum(0)
            start += n
        return out

    routing = mc.select_experts(layer, *mc.router_logits_torch(layer, xt), probabilities="fp32", weights="fp32",
                                gate="bf16")
    shared = None
    if routing.shared_gate is not None:
        raise mc.Unsupported("torch_fused_fp8 composes fusable layers only (shared_expert_intermediate_size == "
                         f"moe_intermediate_size); this layer has Is={layer.shared_intermediate}, I={layer.intermediate}")
    return mc.moe_torch(layer, xt, routing, linear=linear, shared=shared)


def route(layer, x):
    import torch
    xt = mc.to_torch(x, mc.device(), torch.bfloat16)
    r = mc.select_experts(layer, *mc.router_logits_torch(layer, xt), probabilities="fp32", weights="fp32", gate="bf16")
    return r.ids, r.weights
