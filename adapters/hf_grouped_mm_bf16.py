"""MoECheck adapter: HF transformers 5.x sparse-MoE block (Qwen2-MoE / Qwen3-Next / Qwen3.5-MoE by
layer.config["model_type"]) in bf16, experts implementation "grouped_mm".

Rounding points (derivation in docs/python-adapters.md): every linear's output, silu, silu·up,
the down projection and w·down are rounded to bf16; routing weights are cast to bf16; the shared
expert's sigmoid gate is bf16; the routed sum and the shared contribution are added in bf16:
its combine is the routed sum in fp32 (`.sum(1)`), rounded to bf16, then the shared expert's
added in bf16: the hf-mm-bf16 recipe. Runs on CUDA when available, else CPU.

On CUDA, torch's grouped_mm needs 16-byte aligned strides (H and I multiples of 8 in bf16), and
transformers 5.17 calls it without checking (`_can_use_grouped_mm` checks alignment on CPU only):
other shapes raise "strides should be multiple of 16 bytes" in the model itself. Measured on the
H200 (1,177 of 1,991 fuzz cases); such layers are reported as unsupported here.
"""
import moecheck_adapter as mc

IMPLEMENTATION = "grouped_mm"
NAME = "HF transformers block, experts grouped_mm, bf16"
RECIPE = "hf-mm-bf16"
FORMATS = ["bf16"]  # weight formats of the case files this adapter takes
# mutants acting through the weights the helper loads into the module
MUTANTS = ["expert_down_x1p01", "shared_slot_weight_zero", "fnuz_as_fn"]
# fuzz draws only layers torch's CUDA grouped_mm takes (16-byte strides; see the docstring)
CONSTRAINTS = {"multiple_of": 8}


def _check(layer):
    import torch
    if mc.device().type == "cuda" and (layer.hidden % 8 or layer.intermediate % 8 or layer.shared_intermediate % 8):
        raise mc.Unsupported(f"torch's grouped_mm on CUDA needs 16-byte aligned strides: H, I and Is multiples of 8 "
                             f"(H={layer.hidden}, I={layer.intermediate}, Is={layer.shared_intermediate}); transformers "
                             f"{__import__('transformers').__version__} does not fall back (torch {torch.__version__})")


def forward(layer, x):
    _check(layer)
    return mc.hf_forward(layer, x, IMPLEMENTATION)


def route(layer, x):
    _check(layer)
    return mc.hf_route(layer, x, IMPLEMENTATION)
