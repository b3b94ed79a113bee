"""MoECheck adapter: HF transformers 5.x sparse-MoE block in bf16, experts implementation
"deepgemm" (DeepGEMM's grouped bf16 GEMM, loaded by transformers from the HF kernel hub through
the `kernels` package; CUDA SM90+ only).

Rounding points (docs/python-adapters.md): the grouped GEMMs write bf16 (gate/up, down), the
gate's silu and silu·up are bf16 tensors, w·down is a bf16 product, the per-token sum over K runs
in fp32 and is rounded to bf16, the bf16 shared contribution is added in bf16: hf-mm-bf16.
"""
import moecheck_adapter as mc

IMPLEMENTATION = "deepgemm"
NAME = "HF transformers block, experts deepgemm, bf16"
RECIPE = "hf-mm-bf16"
FORMATS = ["bf16"]  # weight formats of the case files this adapter takes
MUTANTS = ["expert_down_x1p01", "shared_slot_weight_zero", "fnuz_as_fn"]


def forward(layer, x):
    return mc.hf_forward(layer, x, IMPLEMENTATION)


def route(layer, x):
    return mc.hf_route(layer, x, IMPLEMENTATION)
