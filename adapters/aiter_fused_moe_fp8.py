"""MoECheck adapter: aiter's `fused_moe` with fp8 block-scaled weights (QuantType.per_128x128:
128x128 weight blocks, dynamic 1x128 activation groups; e4m3fnuz on gfx942, e4m3fn on gfx950:
give it the case file whose format the GPU runs). NOT RUN (no AMD GPU, no aiter).

Rounding points as aiter_fused_moe.py plus aiter's per_1x128 quantisation of the input and of the
bf16 intermediate (scale = amax·fp32(1/FP8_MAX), multiply by the reciprocal): fused-fp8 with a
bf16 combine.
"""
import aiter_fused_moe as base

NAME = "aiter fused_moe, fp8 block scale"
# aiter's quantiser build flags (fast math or not) are not checked here: a scaled value on an fp8
# midpoint may take either code
RECIPE = {"base": "fused-fp8", "weighted": "bf16-or-fp32", "combine": "bf16", "quantization": "approximate"}
FORMATS = ["fp8-e4m3fnuz", "fp8-e4m3fn"]  # weight formats of the case files this adapter takes
MUTANTS = base.MUTANTS


def _call(*args):
    return base._call(*args, fp8=True)


def forward(layer, x):
    return base.eng.forward(layer, x, _call, True)


def route(layer, x):
    return base.eng.route(layer, x)
