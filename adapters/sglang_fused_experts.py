"""MoECheck adapter: sglang's Triton `fused_moe` (sglang.srt.layers.moe.fused_moe_triton) on the
fused layer (shared expert at slot E), bf16 weights. Needs sglang and a CUDA/ROCm GPU. NOT RUN:
sglang is not installed on any machine MoECheck was run on.

Rounding points (docs/python-adapters.md): the kernel is vLLM's (bf16 gate/up cache, silu·up once
to bf16, fp32 weight multiply before the bf16 store of each slot, K+1 slots summed in fp32 by
moe_sum_reduce into a bf16 output): fused-bf16 with bf16 gate/up and bf16 weighted contributions.
Older sglang releases take topk_weights/topk_ids directly; both signatures are handled.
"""
import _fused_engine as eng

eng.require("sglang.srt.layers.moe.fused_moe_triton", "sglang_fused_experts.py")  # at import: the worker's hello reports a missing package once

NAME = "sglang fused_moe (Triton), bf16"
RECIPE = {"base": "fused-bf16", "gateUp": "bf16", "weighted": "bf16"}
FORMATS = ["bf16"]  # weight formats of the case files this adapter takes
MUTANTS = eng.MUTANTS


def _call(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, fp8=False):
    import inspect
    fmt = eng.require("sglang.srt.layers.moe.fused_moe_triton", "sglang_fused_experts.py")
    kw = dict(use_fp8_w8a8=True, w1_scale=w13_scale, w2_scale=w2_scale, block_shape=[128, 128]) if fp8 else {}
    params = inspect.signature(fmt.fused_moe).parameters
    if "topk_output" in params:
        from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
        from sglang.srt.layers.moe.topk import StandardTopKOutput
        out = StandardTopKOutput(topk_weights=topk_weights, topk_ids=topk_ids, router_logits=None)
        return fmt.fused_moe(x, w13, w2, out, MoeRunnerConfig(inplace=False), **kw)
    return fmt.fused_experts(x, w13, w2, topk_weights, topk_ids, inplace=False, **kw)


def forward(layer, x):
    return eng.forward(layer, x, _call, False)


def route(layer, x):
    return eng.route(layer, x)
