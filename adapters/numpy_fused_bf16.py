"""MoECheck adapter: the fused-bf16 recipe modelled in NumPy (no torch; what CI runs).

Router logits rounded to bf16, softmax / top-k (ties to the lower index) / renormalisation in
fp32, shared gate bf16(sigmoid(bf16(ws·x))) as the weight of slot E (fusable layers; otherwise
the shared expert is added unfused with the same gate), gate/up unrounded, silu(g)·u rounded once
to bf16, down unrounded, combine unrounded, output bf16. Between rounding points it computes in
float64, which the fp32 bound of the recipe covers. Built from the helper's blocks: every
helper-level mutant applies.
"""
import moecheck_adapter as mc

NAME = "numpy fused-bf16 model"
RECIPE = "fused-bf16"
FORMATS = ["bf16"]  # weight formats of the case files this adapter takes
MUTANTS = list(mc.MUTANT_NAMES)


def route(layer, x):
    r = mc.route(layer, x)  # logits bf16, probabilities fp32, weights fp32, gate bf16
    return r.ids, r.weights


def forward(layer, x):
    return mc.moe_numpy(layer, x, mc.route(layer, x), intermediate="bf16", output="bf16")
