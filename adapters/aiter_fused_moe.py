"""MoECheck adapter: aiter's `fused_moe` (ROCm; the path sglang PR #20736 fuses Qwen3.5's shared
expert into) on the fused layer, bf16 weights. Needs aiter on an AMD Instinct GPU. NOT RUN: no
AMD GPU and no aiter were available.

Weights are pre-shuffled for the CK kernels with aiter.ops.shuffle.shuffle_weight(w, (16, 16)),
as sglang does. Rounding points (FACTS §2, docs/python-adapters.md): gate/up stay fp32,
silu(gate)·up rounded once to bf16, stage 2 multiplies by the fp32 routing weight, rounds each
(token, slot) contribution to bf16 and adds it atomically in bf16: fused-bf16 with a bf16 combine
(the weighted contribution "bf16-or-fp32", as kernels differ in where they round).
"""
import _fused_engine as eng

eng.require("aiter.fused_moe", "aiter_fused_moe.py")  # at import: the worker's hello reports a missing package once

NAME = "aiter fused_moe, bf16"
RECIPE = {"base": "fused-bf16", "weighted": "bf16-or-fp32", "combine": "bf16"}
FORMATS = ["bf16"]  # weight formats of the case files this adapter takes
MUTANTS = eng.MUTANTS


def _call(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, fp8=False):
    fm = eng.require("aiter.fused_moe", "aiter_fused_moe.py")
    import aiter
    from aiter.ops.shuffle import shuffle_weight
    w13s, w2s = shuffle_weight(w13, (16, 16)), shuffle_weight(w2, (16, 16))
    kw = {}
    if fp8:
        kw = dict(quant_type=aiter.QuantType.per_128x128, w1_scale=w13_scale, w2_scale=w2_scale)
    return fm.fused_moe(x, w13s, w2s, topk_weights, topk_ids, activation=aiter.ActivationType.Silu, **kw)


def forward(layer, x):
    return eng.forward(layer, x, _call, False)


def route(layer, x):
    return eng.route(layer, x)
