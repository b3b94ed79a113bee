"""MoECheck adapter: HF transformers 5.x sparse-MoE block (Qwen2-MoE / Qwen3-Next / Qwen3.5-MoE by
layer.config["model_type"]) in bf16, experts implementation "batched_mm".

Rounding points (derivation in docs/python-adapters.md): every linear's output, silu, silu·up,
the down projection and w·down are rounded to bf16; routing weights are cast to bf16; the shared
expert's sigmoid gate is bf16; the routed contributions are summed in fp32 (`.sum(1)`) and
rounded to bf16, then the shared contribution is added in bf16: the hf-mm-bf16 recipe. Runs on CUDA when available, else CPU.
"""
import moecheck_adapter as mc

IMPLEMENTATION = "batched_mm"
NAME = "HF transformers block, experts batched_mm, bf16"
RECIPE = "hf-mm-bf16"
FORMATS = ["bf16"]  # weight formats of the case files this adapter takes
# mutants acting through the weights the helper loads into the module
MUTANTS = ["expert_down_x1p01", "shared_slot_weight_zero", "fnuz_as_fn"]


def forward(layer, x):
    return mc.hf_forward(layer, x, IMPLEMENTATION)


def route(layer, x):
    return mc.hf_route(layer, x, IMPLEMENTATION)
