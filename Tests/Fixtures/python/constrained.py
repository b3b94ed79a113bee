"""Fixture: a kernel that takes only H, I and Is multiples of 8 and a fused shared expert, and
declares it with CONSTRAINTS (fuzz then draws no other layer); it refuses any other layer with
moecheck_adapter.Unsupported, so a drawn layer outside the constraints shows as a skip."""
import moecheck_adapter as mc

RECIPE = "fused-bf16"
FORMATS = ["bf16"]
CONSTRAINTS = {"multiple_of": 8, "fused_shared_expert": True}


def forward(layer, x):
    if layer.hidden % 8 or layer.intermediate % 8 or layer.shared_intermediate % 8:
        raise mc.Unsupported(f"H, I, Is multiples of 8 only (H={layer.hidden}, I={layer.intermediate}, Is={layer.shared_intermediate})")
    routing = mc.route(layer, x)
    if layer.has_shared and not routing.fused:
        raise mc.Unsupported("fused shared expert only")
    return mc.moe_numpy(layer, x, routing, intermediate="bf16", output="bf16")
