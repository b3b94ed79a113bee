"""MoECheck adapter: vLLM's Triton `fused_experts` with fp8 block-scaled weights (W8A8, 128x128
blocks, dynamic per-token 1x128 activation groups). NOT RUN (vllm not installed).

Rounding points as vllm_fused_experts.py, plus: the bf16 input and the bf16 intermediate are
quantised per token and 128-column group by per_token_group_quant_fp8 (scale = amax / FP8_MAX, a
division); the Triton kernel multiplies fp8 blocks and applies both block scales in fp32.
"""
import vllm_fused_experts as base

NAME = "vLLM fused_experts (Triton), fp8 block scale"
# per_token_group_quant_fp8 may run in Triton, whose fp32 `/` is div.full.f32 (up to 2 ulp): a scaled
# value on an fp8 midpoint may take either code
RECIPE = {"base": "fused-fp8", "gateUp": "bf16", "weighted": "bf16", "scaleConvention": "divide", "quantization": "approximate"}
FORMATS = ["fp8-e4m3fn"]  # weight formats of the case files this adapter takes
MUTANTS = base.MUTANTS


def forward(layer, x):
    return base.eng.forward(layer, x, _call, True)


def _call(*args):
    return base._call(*args, fp8=True)


def route(layer, x):
    return base.eng.route(layer, x)
