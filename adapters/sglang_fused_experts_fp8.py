"""MoECheck adapter: sglang's Triton `fused_moe` with fp8 block-scaled weights. NOT RUN (sglang not
installed). Activation and intermediate groups are quantised by per_token_group_quant_fp8
(sgl-kernel's per_token_group_quant_8bit on CUDA: y_s = amax / FP8_MAX, q = x / y_s, a division).
"""
import sglang_fused_experts as base

NAME = "sglang fused_moe (Triton), fp8 block scale"
# the quantiser's division may be approximate (Triton's fp32 `/` is div.full.f32; sgl-kernel's build flags
# unchecked): a scaled value on an fp8 midpoint may take either code
RECIPE = {"base": "fused-fp8", "gateUp": "bf16", "weighted": "bf16", "scaleConvention": "divide", "quantization": "approximate"}
FORMATS = ["fp8-e4m3fn"]  # weight formats of the case files this adapter takes
MUTANTS = base.MUTANTS


def _call(*args):
    return base._call(*args, fp8=True)


def forward(layer, x):
    return base.eng.forward(layer, x, _call, True)


def route(layer, x):
    return base.eng.route(layer, x)
