"""MoECheck adapter: HF transformers 5.x sparse-MoE block (Qwen2-MoE / Qwen3-Next / Qwen3.5-MoE by
layer.config["model_type"]) in bf16, experts implementation "eager".

Rounding points (derivation in docs/python-adapters.md): every linear's output, silu, silu·up,
the down projection and w·down are rounded to bf16; routing weights are cast to bf16; the shared
expert's sigmoid gate is bf16; the contributions are added into a bf16 buffer one expert at a
time in ascending expert id (`index_add_`), then the shared contribution in bf16: the
hf-eager-bf16 recipe, whose reference adds in that order and rounds every partial sum. Runs on CUDA when available, else CPU.
"""
import moecheck_adapter as mc

IMPLEMENTATION = "eager"
NAME = "HF transformers block, experts eager, bf16"
RECIPE = "hf-eager-bf16"
FORMATS = ["bf16"]  # weight formats of the case files this adapter takes
# mutants acting through the weights the helper loads into the module
MUTANTS = ["expert_down_x1p01", "shared_slot_weight_zero", "fnuz_as_fn"]


def forward(layer, x):
    return mc.hf_forward(layer, x, IMPLEMENTATION)


def route(layer, x):
    return mc.hf_route(layer, x, IMPLEMENTATION)
