"""Shared scaffolding of the engine adapters (aiter, sglang, vLLM): not an adapter itself.

Routing comes from the helper (bf16 router logits from a torch linear, fp32 softmax / top-k with
ties to the lower index / renormalisation, shared gate bf16(sigmoid(bf16(ws·x))) appended as slot
id E), weights from the helper's fused layout (w13 [E+1, 2I, H], w2 [E+1, H, I], fp8 codes with
per-half 128x128 block scales). The engine's call gets (x bf16 [T,H], w13, w2, topk_weights fp32
[T,S], topk_ids int32 [T,S], w13_scale, w2_scale) and returns [T,H].

Mutants: the routing ones through the helper's routing, ``fnuz_as_fn`` through the helper's fp8
weights, ``expert_down_x1p01`` by scaling that expert's w2 (bf16: the weights, rounded; fp8: its
block scales, exact) for the call. ``drop_last_partial_block`` happens inside a kernel and is not
available here.
"""
import numpy as np

import moecheck_adapter as mc

MUTANTS = ["shared_slot_weight_zero", "shared_gate_no_sigmoid", "shared_gate_in_renorm", "no_renormalize",
           "shared_slot_id_e_minus_1", "expert_down_x1p01", "fnuz_as_fn"]


def require(module: str, what: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the Python package providing '{module}', which is not installed here "
                          f"({e}); run this adapter where it is") from None


def routing(layer, x):
    import torch
    dev = mc.device()
    xt = mc.to_torch(x, dev, torch.bfloat16)
    r = mc.select_experts(layer, *mc.router_logits_torch(layer, xt), probabilities="fp32", weights="fp32", gate="bf16")
    if layer.has_shared and not r.fused:
        raise mc.Unsupported(f"this adapter runs the fused shared expert (slot E); the layer's shared expert has "
                         f"Is={layer.shared_intermediate} != I={layer.intermediate} and cannot fuse")
    ids = torch.from_numpy(np.ascontiguousarray(r.ids, np.int32)).to(dev)
    w = torch.from_numpy(np.ascontiguousarray(r.weights, np.float32)).to(dev)
    return xt, r, ids, w


def route(layer, x):
    _, r, _, _ = routing(layer, x)
    return r.ids, r.weights


def forward(layer, x, call, fp8: bool):
    import torch
    if fp8 != (layer.fp8 is not None):
        raise mc.Unsupported(f"this adapter takes {'fp8 block-scaled' if fp8 else 'bf16'} weights; the layer stores "
                         f"{layer.weight_dtype} (use the {'bf16' if fp8 else 'fp8'} variant)")
    xt, r, ids, w = routing(layer, x)
    if fp8:
        w13, w2, s13, s2 = mc.fused_fp8_weights(layer, xt.device)
    else:
        (w13, w2), s13, s2 = mc.fused_weights_torch(layer, xt.device), None, None
    restore = None
    if mc.mutant("expert_down_x1p01"):
        e = int(r.ids[0, 0])
        t = s2 if fp8 else w2
        restore = (t, e, t[e].clone())
        t[e] = (t[e].float() * 1.01).to(t.dtype)
        mc.mutant_applied()
    try:
        with torch.no_grad():
            return call(xt, w13, w2, w, ids, s13, s2)
    finally:
        if restore is not None:
            t, e, old = restore
            t[e] = old
