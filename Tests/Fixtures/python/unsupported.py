"""Fixture: a kernel that runs fusable layers only and says so with moecheck_adapter.Unsupported
(the case is skipped, not failed); otherwise the NumPy fused-bf16 model."""
import moecheck_adapter as mc

RECIPE = "fused-bf16"
FORMATS = ["bf16"]


def forward(layer, x):
    if not layer.fusable:
        raise mc.Unsupported(f"fusable layers only (Is={layer.shared_intermediate}, I={layer.intermediate})")
    return mc.moe_numpy(layer, x, mc.route(layer, x), intermediate="bf16", output="bf16")
