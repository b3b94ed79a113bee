"""MoECheck adapter: the shared-expert fusion composed in plain torch, bf16 (fused-bf16 recipe).

The shared expert rides at slot E of w13 [E+1, 2I, H] / w2 [E+1, H, I] with its sigmoid gate as
routing weight. Router logits and the shared gate logit come from bf16 torch linears (fp32
accumulation, one bf16 rounding); softmax, top-k (ties to the lower index) and renormalisation in
fp32; the shared gate rounded bf16(sigmoid(.)). Experts: slots sorted by expert and run as grouped
GEMMs (torch.nn.functional.grouped_mm with out_dtype=float32 on CUDA; an fp32 matmul loop
elsewhere), gate/up kept fp32, silu(g)·u rounded once to bf16, down in fp32 times the fp32 weight,
combined in fp32 (index_add_), output bf16. Built from the helper's blocks: every helper-level
mutant applies. fp8 layers are accepted only where the dequantised weights are exact in bf16.
"""
import moecheck_adapter as mc

NAME = "torch fused composition, bf16"
RECIPE = "fused-bf16"
FORMATS = ["bf16"]  # weight formats of the case files this adapter takes
MUTANTS = list(mc.MUTANT_NAMES)


def _inputs(layer, x):
    import torch
    return mc.to_torch(x, mc.device(), torch.bfloat16)


def _routing(layer, xt):
    logits, gate_logit = mc.router_logits_torch(layer, xt)
    return mc.select_experts(layer, logits, gate_logit, probabilities="fp32", weights="fp32", gate="bf16")


def route(layer, x):
    r = _routing(layer, _inputs(layer, x))
    return r.ids, r.weights


def forward(layer, x):
    xt = _inputs(layer, x)
    w13, w2 = mc.fused_weights_torch(layer, xt.device)
    return mc.moe_torch(layer, xt, _routing(layer, xt), w13=w13, w2=w2)
