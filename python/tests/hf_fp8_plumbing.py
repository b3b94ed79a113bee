#!/usr/bin/env python3
# Usage: python3 python/tests/hf_fp8_plumbing.py CASE.safetensors...  (needs torch + transformers; no GPU)
"""CPU check of the HF fine-grained FP8 adapter's plumbing: transformers' fp8_linear replaced by a
torch emulation of its Triton kernel (per-128 activation groups, scale amax/448 by division)."""
import os, sys, json, importlib.util
os.environ["MOECHECK_HF_FP8_ALLOW_CPU"] = "1"
sys.path.insert(0, "python")
import numpy as np, torch
import moecheck_adapter as mc
import transformers.integrations.finegrained_fp8 as fg

def emulated_fp8_linear(input, weight, weight_scale_inv, block_size=None, bias=None, activation_scale=None, allow_deepgemm=True):
    N, K = weight.shape
    s = weight_scale_inv.float().repeat_interleave(128, 0).repeat_interleave(128, 1)[:N, :K]
    w = weight.float() * s
    x = input.float()
    nk = -(-K // 128)
    xp = torch.nn.functional.pad(x, (0, nk * 128 - K)).view(*x.shape[:-1], nk, 128)
    sc = xp.abs().amax(-1, keepdim=True) / 448.0
    q = (xp / sc.clamp_min(1e-12)).to(torch.float8_e4m3fn).float() * sc
    return (q.reshape(*x.shape[:-1], nk * 128)[..., :K] @ w.T).to(input.dtype)
fg.fp8_linear = emulated_fp8_linear

spec = importlib.util.spec_from_file_location("hf_fp8", "adapters/hf_finegrained_fp8.py"); ad = importlib.util.module_from_spec(spec); spec.loader.exec_module(ad)
for f in sys.argv[1:]:
    F = mc.SafetensorsFile(f)
    pre = next(n for n in F.names() if n.endswith("mlp.gate.weight"))[:-len("gate.weight")]
    layer = mc.Layer(f, json.loads(F.metadata["config"]), {n[len(pre):]: F.tensor(n) for n in F.names() if n.startswith(pre)}, F.metadata, f, pre)
    x = F.tensor("hidden_states")
    try:
        y = mc.to_numpy(ad.forward(layer, x)).astype(np.float64)
    except Exception as e:
        print(os.path.basename(f), "->", type(e).__name__, str(e)[:200]); continue
    ex = mc.moe_numpy(layer, x, mc.route(layer, x, logits="none", probabilities="none", weights="none", gate="none"), intermediate="none", output="none")
    ids, w = ad.route(layer, x)
    print(f"{os.path.basename(f)}: {layer}: max|hf_fp8 - exact| {np.abs(y-ex).max():.3e} (max|exact| {np.abs(ex).max():.3e}), rel RMS {np.sqrt(((y-ex)**2).sum()/(ex**2).sum()):.3e}, route slots {ids.shape[1]}")
    mc.MUTANT = "expert_down_x1p01"; y2 = mc.to_numpy(ad.forward(layer, x)).astype(np.float64); mc.MUTANT = None
    y3 = mc.to_numpy(ad.forward(layer, x)).astype(np.float64)
    print("   mutant expert_down_x1p01 changes output:", not np.array_equal(y2, y), " restored:", np.array_equal(y3, y))
    spec2 = importlib.util.spec_from_file_location("tf8", "adapters/torch_fused_fp8.py"); t8 = importlib.util.module_from_spec(spec2); spec2.loader.exec_module(t8)
    z = mc.to_numpy(t8.forward(layer, x)).astype(np.float64)
    print(f"   vs torch_fused_fp8: max diff {np.abs(y-z).max():.3e}, rel RMS {np.sqrt(((y-z)**2).sum()/(z**2).sum()):.3e}")
