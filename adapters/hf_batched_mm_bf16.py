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


def _fits(layer, x):
    """batched_mm gathers the weights of every (token, expert) pair before its bmm: gate_up alone
    is T·K·2I·H bf16 values (96 GiB for Qwen3.5-122B/TP4 at T = 4096, measured as a CUDA OOM on
    the H200). A layer that cannot fit is one this implementation cannot run, not a failure."""
    try:
        import torch
        if not torch.cuda.is_available():
            return
        free = torch.cuda.mem_get_info()[0]
    except Exception:
        return
    c = layer.config
    need = x.shape[0] * c["num_experts_per_tok"] * 2 * c["moe_intermediate_size"] * c["hidden_size"] * 2
    if need > 0.8 * free:
        raise mc.Unsupported(f"batched_mm would gather {need / 2**30:.1f} GiB of per-token expert weights "
                             f"(T={x.shape[0]}, K={c['num_experts_per_tok']}, I={c['moe_intermediate_size']}, "
                             f"H={c['hidden_size']}); {free / 2**30:.1f} GiB are free on the GPU")


def forward(layer, x):
    _fits(layer, x)
    return mc.hf_forward(layer, x, IMPLEMENTATION)


def route(layer, x):
    return mc.hf_route(layer, x, IMPLEMENTATION)
