"""MoECheck adapter: the layer in float64 NumPy, nothing rounded (the `exact` recipe).

Logits, softmax, top-k, renormalisation, sigmoid gate, SwiGLU experts and the combine all in
float64; fp8 weights dequantised exactly. Built from the helper's blocks: every helper-level
mutant applies.
"""
import moecheck_adapter as mc

NAME = "numpy float64"
RECIPE = "exact"
FORMATS = ["bf16", "fp8-e4m3fn", "fp8-e4m3fnuz", "f32", "f64"]  # weight formats of the case files this adapter takes
MUTANTS = list(mc.MUTANT_NAMES)


def _routing(layer, x):
    return mc.route(layer, x, logits="none", probabilities="none", weights="none", gate="none")


def route(layer, x):
    r = _routing(layer, x)
    return r.ids, r.weights


def forward(layer, x):
    return mc.moe_numpy(layer, x, _routing(layer, x), intermediate="none", output="none")
