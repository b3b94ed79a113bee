"""MoECheck adapter: HF transformers 5.x sparse-MoE block in bf16, experts implementation
"sonicmoe" (SonicMoE's CuteDSL kernels from the HF kernel hub; needs `kernels`,
`nvidia-cutlass-dsl`, CUDA SM90+).

Rounding points (docs/python-adapters.md): the routed experts run in SonicMoE (up-projection
GEMM with the SwiGLU epilogue, bf16 intermediate; down GEMM to a bf16 buffer; the router-weighted
sum over K in fp32 to a bf16 output, weights cast bf16 -> fp32), while the shared expert runs in
HF's bf16 MLP (every linear, silu and product rounded) and is added in bf16. No single named recipe
has both, so gate/up, silu and w·down are "bf16-or-fp32" (either is correct).
"""
import moecheck_adapter as mc

IMPLEMENTATION = "sonicmoe"
NAME = "HF transformers block, experts sonicmoe, bf16"
RECIPE = {"base": "hf-bf16", "gateUp": "bf16-or-fp32", "activation": "bf16-or-fp32", "weighted": "bf16-or-fp32"}
FORMATS = ["bf16"]  # weight formats of the case files this adapter takes
MUTANTS = ["expert_down_x1p01", "shared_slot_weight_zero", "fnuz_as_fn"]


def forward(layer, x):
    return mc.hf_forward(layer, x, IMPLEMENTATION)


def route(layer, x):
    return mc.hf_route(layer, x, IMPLEMENTATION)
