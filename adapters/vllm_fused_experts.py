"""MoECheck adapter: vLLM's Triton `fused_experts` on the fused layer (shared expert at slot E),
bf16 weights. Needs vllm and a CUDA/ROCm GPU. NOT RUN: vllm is not installed on any machine
MoECheck was run on.

Rounding points (vLLM fused_moe.py, docs/python-adapters.md): stage 1 writes gate/up to a bf16
cache, silu_and_mul computes in fp32 and writes bf16 once, stage 2 multiplies the fp32 accumulator
by the fp32 routing weight before its bf16 store, moe_sum adds the K+1 slots in fp32 into the bf16
output: fused-bf16 with bf16 gate/up and bf16 weighted contributions.
"""
import _fused_engine as eng

eng.require("vllm.model_executor.layers.fused_moe", "vllm_fused_experts.py")  # at import: the worker's hello reports a missing package once

NAME = "vLLM fused_experts (Triton), bf16"
RECIPE = {"base": "fused-bf16", "gateUp": "bf16", "weighted": "bf16"}
FORMATS = ["bf16"]  # weight formats of the case files this adapter takes
MUTANTS = eng.MUTANTS


def _call(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, fp8=False):
    import inspect
    fm = eng.require("vllm.model_executor.layers.fused_moe", "vllm_fused_experts.py")
    params = inspect.signature(fm.fused_experts).parameters
    kw = {}
    if fp8:
        if "quant_config" in params:  # vLLM >= 0.11: a FusedMoEQuantConfig
            from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
            kw["quant_config"] = fp8_w8a8_moe_quant_config(w1_scale=w13_scale, w2_scale=w2_scale, block_shape=[128, 128])
        else:  # older: flags
            kw.update(use_fp8_w8a8=True, w1_scale=w13_scale, w2_scale=w2_scale, block_shape=[128, 128])
    return fm.fused_experts(x, w13, w2, topk_weights, topk_ids, inplace=False, **kw)


def forward(layer, x):
    return eng.forward(layer, x, _call, False)


def route(layer, x):
    return eng.route(layer, x)
