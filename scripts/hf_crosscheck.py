#!/usr/bin/env python3
"""Independent expected outputs for MoECheck, made with HuggingFace transformers' own
sparse-MoE blocks (and, for the `fused-fp8` recipe, a separate torch/numpy float64
implementation written here from the recipe text).

For every case two safetensors files are written (default dir: Goldens/external):

  NAME.case.safetensors      the layer + inputs, HF checkpoint naming (DESIGN.md §4),
                             HF config as JSON in __metadata__["config"]
  NAME.expected.safetensors  output [T,H] F64, router_logits [T,E] F64, topk_ids [T,K] I32,
                             topk_weights [T,K] F64, shared_gate [T,1] F64

All inputs are exactly representable in the stored dtype (small integers times powers of
two), so the file and the computation see identical values. Randomness comes only from
numpy's PCG64 generator with fixed seeds, and all generated values are integers scaled by
powers of two: the files are a deterministic function of the seed.

Needs: torch, transformers (5.x with qwen2_moe / qwen3_next / qwen3_5_moe), safetensors
(>= 0.8.0 for F8_E4M3FNUZ), numpy. No GPU needed.

Usage: python3 scripts/hf_crosscheck.py [--out DIR] [--seed N] [--only NAME[,NAME]]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

PREFIX = "model.layers.0.mlp."
BLOCK = 128
FP8_CFG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
FP8_MAX = {"fn": 448.0, "fnuz": 240.0}
FP8_TORCH = {"fn": torch.float8_e4m3fn, "fnuz": torch.float8_e4m3fnuz}

SOFTMAX_NOTE = (
    "HF transformers routers compute softmax(router_logits, dtype=torch.float) i.e. in float32 "
    "even when the block runs in float64; torch.topk and the renormalization then run in float32 "
    "and the routing weights are cast back to float64. topk_weights therefore hold float32-precision "
    "values, and output uses them. Everything else (linear layers, silu, sigmoid, combine) is float64."
)


# ----------------------------------------------------------------------------------------------
# case description
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    family: str  # qwen2_moe | qwen3_next | qwen3_5_moe
    recipe: str  # exact | w8a16 | fused-fp8
    layout: str  # per-expert | combined
    T: int
    H: int
    I: int
    Is: int
    E: int
    K: int
    norm: bool | None = None  # norm_topk_prob (None: family has none -> always renormalize)
    store: str = "bf16"  # bf16 | f32 | fp8-fn | fp8-fnuz
    negative_logits: bool = False
    seed_offset: int = 0
    note: str = ""
    # filled while building
    info: dict = field(default_factory=dict)


def case_list() -> list[Case]:
    return [
        # ---- recipe exact, BF16 --------------------------------------------------------------
        Case("qwen2_moe_bf16_perexpert", "qwen2_moe", "exact", "per-expert",
             T=13, H=200, I=32, Is=64, E=6, K=4, norm=False,
             note="Qwen2-MoE style: norm_topk_prob=false, shared I = 2*I (not fusable); H=200 not a multiple of 128"),
        Case("qwen2_moe_bf16_combined", "qwen2_moe", "exact", "combined",
             T=7, H=128, I=32, Is=64, E=8, K=2, norm=False,
             note="Qwen2-MoE style: norm_topk_prob=false, shared I = 2*I (not fusable)"),
        Case("qwen3_next_bf16_perexpert", "qwen3_next", "exact", "per-expert",
             T=9, H=96, I=64, Is=64, E=4, K=2, norm=True),
        Case("qwen3_next_bf16_combined", "qwen3_next", "exact", "combined",
             T=17, H=64, I=32, Is=32, E=16, K=4, norm=True),
        Case("qwen3_5_moe_bf16_perexpert", "qwen3_5_moe", "exact", "per-expert",
             T=5, H=160, I=32, Is=32, E=8, K=3),
        Case("qwen3_5_moe_bf16_combined_t1", "qwen3_5_moe", "exact", "combined",
             T=1, H=320, I=32, Is=32, E=4, K=1,
             note="single token, K=1 (renormalized weight is exactly 1)"),
        Case("qwen3_5_moe_bf16_neglogits", "qwen3_5_moe", "exact", "combined",
             T=6, H=96, I=32, Is=32, E=8, K=2, negative_logits=True,
             note="every router logit is negative (x > 0, router weights < 0)"),
        # ---- recipe exact, F32 storage -------------------------------------------------------
        Case("qwen3_next_f32_perexpert", "qwen3_next", "exact", "per-expert",
             T=3, H=64, I=32, Is=32, E=4, K=2, norm=True, store="f32",
             note="hidden_states and all weights stored F32 with 21-bit mantissas (not bf16-representable)"),
        # ---- FP8 block-scale weights, recipe w8a16 ------------------------------------------
        Case("qwen3_5_moe_fp8fn_w8a16_perexpert", "qwen3_5_moe", "w8a16", "per-expert",
             T=5, H=272, I=136, Is=136, E=4, K=2, store="fp8-fn",
             note="H=272 -> 3 column blocks (128,128,16); I=136 -> 2 row blocks (128,8)"),
        Case("qwen3_5_moe_fp8fn_w8a16_combined", "qwen3_5_moe", "w8a16", "combined",
             T=4, H=256, I=128, Is=128, E=4, K=2, store="fp8-fn",
             note="I a multiple of 128 so gate/up row blocks of gate_up_proj do not straddle"),
        Case("qwen3_next_fp8fnuz_w8a16_perexpert", "qwen3_next", "w8a16", "per-expert",
             T=3, H=200, I=136, Is=136, E=4, K=2, norm=True, store="fp8-fnuz"),
        # ---- FP8, recipe fused-fp8 (own implementation) -------------------------------------
        Case("qwen3_5_moe_fp8fn_fusedfp8_perexpert", "qwen3_5_moe", "fused-fp8", "per-expert",
             T=6, H=200, I=136, Is=136, E=4, K=2, store="fp8-fn",
             note="H=200 -> activation groups (128,72); I=136 -> intermediate groups (128,8)"),
        Case("qwen3_5_moe_fp8fnuz_fusedfp8_combined", "qwen3_5_moe", "fused-fp8", "combined",
             T=7, H=256, I=128, Is=128, E=4, K=2, store="fp8-fnuz"),
    ]


# ----------------------------------------------------------------------------------------------
# exact rounding helpers (float64 in, float64 out)
# ----------------------------------------------------------------------------------------------


def round_to_format(x: np.ndarray, mant_bits: int, emin: int) -> np.ndarray:
    """Round float64 values to the nearest value with `mant_bits` explicit mantissa bits and
    minimum normal exponent `emin` (subnormals below), ties to even. No overflow handling."""
    x = np.asarray(x, dtype=np.float64)
    _, e = np.frexp(x)  # x = m * 2^e, 0.5 <= |m| < 1  -> leading bit exponent e-1
    exp = np.maximum(e - 1, emin)
    ulp_exp = exp - mant_bits
    scaled = np.ldexp(x, -ulp_exp)  # exact
    return np.ldexp(np.round(scaled), ulp_exp)  # np.round: half to even


def bf16_round(x: np.ndarray) -> np.ndarray:
    return round_to_format(x, 7, -126)


def fp8_codes_to_f64(codes: np.ndarray, fmt: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8)).view(FP8_TORCH[fmt])
    return t.to(torch.float64).numpy()


def quant_act_1x128(x: np.ndarray, fmt: str) -> np.ndarray:
    """Dynamic per-row 1x128-group quantization of x [N, C] (values exactly float32).
    amax = max(1e-10, max|x_g|) (float32); scale = amax * fp32(1/FP8_MAX) (float32 multiply);
    inv = fp32(1)/scale (float32); q = fp8(clamp(x*inv (float32), +-FP8_MAX)) (torch RNE cast).
    Returns the dequantized values q*scale in float64 (exact)."""
    fmax = np.float32(FP8_MAX[fmt])
    recip = np.float32(1.0) / fmax
    x32 = x.astype(np.float32)
    assert np.array_equal(x32.astype(np.float64), x), "activation not exactly float32"
    out = np.empty(x.shape, dtype=np.float64)
    C = x.shape[-1]
    for c0 in range(0, C, BLOCK):
        g = x32[:, c0:c0 + BLOCK]
        amax = np.maximum(np.float32(1e-10), np.max(np.abs(g), axis=1, keepdims=True)).astype(np.float32)
        scale = (amax * recip).astype(np.float32)
        inv = (np.float32(1.0) / scale).astype(np.float32)
        v = (g * inv).astype(np.float32)
        v = np.clip(v, -fmax, fmax).astype(np.float32)
        q = torch.from_numpy(np.ascontiguousarray(v)).to(FP8_TORCH[fmt]).to(torch.float64).numpy()
        out[:, c0:c0 + BLOCK] = q * scale.astype(np.float64)
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------------------------
# value generation (integers times powers of two)
# ----------------------------------------------------------------------------------------------

INT_STD = 73.5  # std of uniform integers in [-127, 127]


def pow2_for(fan_in: int, x_std: float, target: float = 1.5) -> int:
    """exponent k so that randint(-127,127)*2^-k weights give dot products of std ~ target."""
    return int(round(math.log2(math.sqrt(fan_in) * INT_STD * x_std / target)))


class Gen:
    def __init__(self, seed: int):
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def ints(self, shape, lo=-127, hi=127):
        return self.rng.integers(lo, hi + 1, size=shape).astype(np.float64)

    def bf16_weight(self, shape, fan_in, x_std=1.15):
        k = pow2_for(fan_in, x_std)
        return np.ldexp(self.ints(shape), -k)

    def f32_weight(self, shape, fan_in, x_std=0.58):
        # 21-bit integers: exactly float32, almost never bf16
        k = int(round(math.log2(math.sqrt(fan_in) * (2 ** 20 / math.sqrt(3)) * x_std / 1.5)))
        return np.ldexp(self.ints(shape, -(2 ** 20), 2 ** 20), -k)

    def fp8_weight(self, rows, cols, fmt):
        """codes uint8 [rows, cols], scale_inv float32 [ceil(r/128), ceil(c/128)] (powers of two,
        different per block), dequantized float64 [rows, cols]."""
        sign = self.rng.integers(0, 2, size=(rows, cols))
        # exponent field skewed towards the middle so values are mostly O(1..16) codes,
        # with some subnormals (field 0) and some top-of-range codes (field 15)
        # (integer-only: a sum of 16 coin flips, mean 8; ~3% forced to field 0 = subnormal or zero)
        ef = np.minimum(self.rng.integers(0, 2, size=(16, rows, cols)).sum(0), 15).astype(np.int64)
        ef[self.rng.integers(0, 32, size=(rows, cols)) == 0] = 0
        mf = self.rng.integers(0, 8, size=(rows, cols))
        codes = ((sign << 7) | (ef << 3) | mf).astype(np.uint8)
        if fmt == "fn":
            codes[(codes & 0x7F) == 0x7F] -= 1  # 0x7F/0xFF are NaN in e4m3fn -> max finite
        else:
            codes[codes == 0x80] = 0x00  # 0x80 is NaN in e4m3fnuz
        rb, cb = -(-rows // BLOCK), -(-cols // BLOCK)
        sexp = self.rng.integers(-11, -6, size=(rb, cb))  # 2^-11 .. 2^-7 per block
        if rb * cb > 1:  # make sure blocks really differ
            sexp.flat[0] = -7
            sexp.flat[-1] = -10
        if fmt == "fnuz":
            sexp = sexp + 1  # fnuz values are half the fn value of the same code
        scale_inv = np.ldexp(np.ones((rb, cb)), sexp).astype(np.float32)
        q = fp8_codes_to_f64(codes, fmt)
        assert np.all(np.isfinite(q))
        s_full = np.repeat(np.repeat(scale_inv.astype(np.float64), BLOCK, 0), BLOCK, 1)[:rows, :cols]
        return codes, scale_inv, q * s_full


# ----------------------------------------------------------------------------------------------
# building a case
# ----------------------------------------------------------------------------------------------


def router_clean(logits: np.ndarray, K: int, min_gap: float = 0.05) -> np.ndarray:
    """per token: True where the top-(K+1) logits are strictly ordered with gaps >= min_gap
    (so no tie can make top-K ids or their order ambiguous, also after float32 softmax)."""
    E = logits.shape[1]
    s = -np.sort(-logits, axis=1)
    m = min(K + 1, E)
    gaps = s[:, : m - 1] - s[:, 1:m]
    return np.all(gaps >= min_gap, axis=1)


def build_weights(c: Case, gen: Gen):
    """Returns dict of float64 weights (dequantized for FP8) + dict of tensors to store."""
    H, I, Is, E = c.H, c.I, c.Is, c.E
    W = {}
    store: dict[str, torch.Tensor] = {}
    fp8 = c.store.startswith("fp8")
    fmt = c.store.split("-")[1] if fp8 else None

    # router + shared gate (never quantized)
    if c.store == "f32":
        wg = gen.f32_weight((E, H), H)
        ws = gen.f32_weight((1, H), H)
    elif c.negative_logits:
        # x > 0 (mean ~1); choose scale so logits are around -4 with spread ~1
        wg = -np.ldexp(gen.ints((E, H), 1, 127), -int(round(math.log2(H * 64.0 / 4.0))))
        ws = gen.bf16_weight((1, H), H, x_std=1.0)
    else:
        wg = gen.bf16_weight((E, H), H)
        ws = gen.bf16_weight((1, H), H)
    W["gate"], W["shared_gate"] = wg, ws
    wdt = torch.float32 if c.store == "f32" else torch.bfloat16

    def put_plain(name, arr):
        t = torch.from_numpy(arr).to(wdt)
        assert np.array_equal(t.to(torch.float64).numpy(), arr), name
        store[PREFIX + name] = t.contiguous()

    put_plain("gate.weight", wg)
    put_plain("shared_expert_gate.weight", ws)

    def put_fp8(name, codes, scale_inv, scale_name):
        store[PREFIX + name] = torch.from_numpy(codes).view(FP8_TORCH[fmt]).contiguous()
        store[PREFIX + scale_name] = torch.from_numpy(scale_inv).contiguous()

    def dense(rows, cols):
        if c.store == "f32":
            return gen.f32_weight((rows, cols), cols)
        return gen.bf16_weight((rows, cols), cols, x_std=1.15 if cols == H else 1.0)

    def projection(name, r, cc):
        """One 2-D projection `<name>.weight` (fp8 codes + `<name>.weight_scale_inv`, or plain); its values."""
        if fp8:
            codes, si, deq = gen.fp8_weight(r, cc, fmt)
            put_fp8(f"{name}.weight", codes, si, f"{name}.weight_scale_inv")
        else:
            deq = dense(r, cc)
            put_plain(f"{name}.weight", deq)
        return deq

    # shared expert
    for proj, (r, cc) in (("gate_proj", (Is, H)), ("up_proj", (Is, H)), ("down_proj", (H, Is))):
        W["shared_" + proj] = projection(f"shared_expert.{proj}", r, cc)

    # routed experts
    gate_up = np.empty((E, 2 * I, H))
    down = np.empty((E, H, I))
    if c.layout == "per-expert":
        for e in range(E):
            for proj, (r, cc) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                deq = projection(f"experts.{e}.{proj}", r, cc)
                if proj == "gate_proj":
                    gate_up[e, :I] = deq
                elif proj == "up_proj":
                    gate_up[e, I:] = deq
                else:
                    down[e] = deq
    else:
        if fp8:
            gu_codes, gu_si, dn_codes, dn_si = [], [], [], []
            for e in range(E):
                a, b, d = gen.fp8_weight(2 * I, H, fmt)
                gu_codes.append(a); gu_si.append(b); gate_up[e] = d
                a, b, d = gen.fp8_weight(H, I, fmt)
                dn_codes.append(a); dn_si.append(b); down[e] = d
            put_fp8("experts.gate_up_proj", np.stack(gu_codes), np.stack(gu_si), "experts.gate_up_proj_scale_inv")
            put_fp8("experts.down_proj", np.stack(dn_codes), np.stack(dn_si), "experts.down_proj_scale_inv")
        else:
            for e in range(E):
                gate_up[e] = dense(2 * I, H)
                down[e] = dense(H, I)
            put_plain("experts.gate_up_proj", gate_up)
            put_plain("experts.down_proj", down)
    W["gate_up"], W["down"] = gate_up, down
    return W, store


def make_inputs(c: Case, gen: Gen, W) -> np.ndarray:
    """hidden_states [T,H] float64, re-drawing any token whose routing would be ambiguous."""
    T, H = c.T, c.H

    def draw(n):
        if c.store == "f32":
            return np.ldexp(gen.ints((n, H), -(2 ** 20), 2 ** 20), -20)
        if c.negative_logits:
            return np.ldexp(gen.ints((n, H), 1, 127), -6)
        return np.ldexp(gen.ints((n, H)), -6)

    x = draw(T)
    for attempt in range(2000):
        logits = x @ W["gate"].T  # exact: integer products, small sums
        ok = router_clean(logits, c.K)
        if c.recipe == "fused-fp8":
            ok &= router_clean(bf16_round(logits), c.K)
        if c.negative_logits:
            ok &= np.all(logits < 0, axis=1)
        if ok.all():
            c.info["redraws"] = attempt
            return x
        bad = np.nonzero(~ok)[0]
        x[bad] = draw(len(bad))
    raise RuntimeError(f"{c.name}: could not draw unambiguous router inputs")


# ----------------------------------------------------------------------------------------------
# HF transformers
# ----------------------------------------------------------------------------------------------


def hf_classes(family: str):
    if family == "qwen2_moe":
        from transformers.models.qwen2_moe import configuration_qwen2_moe as cm, modeling_qwen2_moe as mm
        return cm.Qwen2MoeConfig, mm.Qwen2MoeSparseMoeBlock, "qwen2_moe", ["Qwen2MoeForCausalLM"]
    if family == "qwen3_next":
        from transformers.models.qwen3_next import configuration_qwen3_next as cm, modeling_qwen3_next as mm
        return cm.Qwen3NextConfig, mm.Qwen3NextSparseMoeBlock, "qwen3_next", ["Qwen3NextForCausalLM"]
    if family == "qwen3_5_moe":
        from transformers.models.qwen3_5_moe import configuration_qwen3_5_moe as cm, modeling_qwen3_5_moe as mm
        return cm.Qwen3_5MoeTextConfig, mm.Qwen3_5MoeSparseMoeBlock, "qwen3_5_moe", ["Qwen3_5MoeForCausalLM"]
    raise ValueError(family)


def hf_config(c: Case):
    Cfg, Block, model_type, arch = hf_classes(c.family)
    kw = dict(hidden_size=c.H, moe_intermediate_size=c.I, shared_expert_intermediate_size=c.Is,
              num_experts=c.E, num_experts_per_tok=c.K, hidden_act="silu")
    if c.norm is not None:
        kw["norm_topk_prob"] = c.norm
    cfg = Cfg(**kw)
    try:
        cfg._experts_implementation = "eager"
    except Exception:
        pass
    j = {"model_type": model_type, "architectures": arch, "hidden_size": c.H,
         "moe_intermediate_size": c.I, "shared_expert_intermediate_size": c.Is,
         "num_experts": c.E, "num_experts_per_tok": c.K, "hidden_act": "silu"}
    if c.norm is not None:
        j["norm_topk_prob"] = bool(getattr(cfg, "norm_topk_prob"))
    if c.store.startswith("fp8"):
        j["quantization_config"] = dict(FP8_CFG)
    j["torch_dtype"] = "float32" if c.store == "f32" else "bfloat16"
    if c.family == "qwen3_5_moe":
        j["hf_config_class"] = "Qwen3_5MoeTextConfig (text part of a qwen3_5_moe checkpoint)"
    return cfg, Block, j


def run_hf(c: Case, W, x: np.ndarray):
    cfg, Block, _ = hf_config(c)
    blk = Block(cfg)
    blk = blk.double().eval()
    sd = {
        "gate.weight": W["gate"],
        "shared_expert_gate.weight": W["shared_gate"],
        "shared_expert.gate_proj.weight": W["shared_gate_proj"],
        "shared_expert.up_proj.weight": W["shared_up_proj"],
        "shared_expert.down_proj.weight": W["shared_down_proj"],
        "experts.gate_up_proj": W["gate_up"],
        "experts.down_proj": W["down"],
    }
    params = dict(blk.named_parameters())
    assert set(params) == set(sd), (sorted(params), sorted(sd))
    with torch.no_grad():
        for k, v in sd.items():
            assert tuple(params[k].shape) == v.shape, (k, params[k].shape, v.shape)
            params[k].copy_(torch.from_numpy(v))
        xt = torch.from_numpy(x).view(1, c.T, c.H)
        out = blk(xt)
        if isinstance(out, tuple):
            out = out[0]
        out = out.reshape(c.T, c.H)
        logits, weights, ids = blk.gate(xt.view(c.T, c.H))
        sg = torch.sigmoid(blk.shared_expert_gate(xt.view(c.T, c.H)))
    assert out.dtype == torch.float64 and logits.dtype == torch.float64
    return (out.numpy().copy(), logits.numpy().copy(), ids.numpy().astype(np.int32),
            weights.to(torch.float64).numpy().copy(), sg.numpy().copy())


# ----------------------------------------------------------------------------------------------
# own float64 implementations
# ----------------------------------------------------------------------------------------------


def own_unfused(c: Case, W, x, fp32_softmax=True):
    """Plain float64 layer (used only as a sanity check of the HF run)."""
    logits = x @ W["gate"].T
    if fp32_softmax:
        p = torch.softmax(torch.from_numpy(logits), dim=-1, dtype=torch.float32).double().numpy()
    else:
        z = np.exp(logits - logits.max(1, keepdims=True)); p = z / z.sum(1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, : c.K]
    w = np.take_along_axis(p, ids, 1)
    if c.norm is None or c.norm:
        if fp32_softmax:  # HF renormalizes the float32 probabilities in float32
            w32 = w.astype(np.float32)
            w = (w32 / w32.sum(1, keepdims=True, dtype=np.float32)).astype(np.float64)
        else:
            w = w / w.sum(1, keepdims=True)
    out = np.zeros((c.T, c.H))
    for t in range(c.T):
        for j in range(c.K):
            e = ids[t, j]
            gu = W["gate_up"][e] @ x[t]
            h = silu(gu[: c.I]) * gu[c.I:]
            out[t] += w[t, j] * (W["down"][e] @ h)
    g = sigmoid(x @ W["shared_gate"].T)
    hs = silu(W["shared_gate_proj"] @ x.T) * (W["shared_up_proj"] @ x.T)
    out += g * (W["shared_down_proj"] @ hs).T
    return out


def own_fused_fp8(c: Case, W, x, fmt: str):
    """Recipe fused-fp8 (see README): float64 except at the named rounding points."""
    assert c.Is == c.I and (c.norm is None or c.norm)
    T, H, I, E, K = c.T, c.H, c.I, c.E, c.K
    logits = bf16_round(x @ W["gate"].T)  # exact dot (integer products), then bf16 RNE
    z = np.exp(logits - logits.max(1, keepdims=True))
    p = z / z.sum(1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :K]  # ties: lower expert index first
    w = np.take_along_axis(p, ids, 1)
    w = w / w.sum(1, keepdims=True)
    g = bf16_round(sigmoid(bf16_round(x @ W["shared_gate"].T)))  # [T,1]

    xq = quant_act_1x128(x, fmt)  # [T,H] dequantized

    def expert(gate_up, down, xrow_q):
        gu = gate_up @ xrow_q
        h = bf16_round(silu(gu[:I]) * gu[I:])
        hq = quant_act_1x128(h[None, :], fmt)[0]
        return down @ hq

    out = np.zeros((T, H))
    shared_gu = np.concatenate([W["shared_gate_proj"], W["shared_up_proj"]], 0)
    for t in range(T):
        for j in range(K):
            e = ids[t, j]
            out[t] += w[t, j] * expert(W["gate_up"][e], W["down"][e], xq[t])
        out[t] += g[t, 0] * expert(shared_gu, W["shared_down_proj"], xq[t])
    return out, logits, ids.astype(np.int32), w, g


def canonical_header(path: str) -> None:
    """safetensors writes __metadata__ from a hash map, so its key order changes from run to run.
    Rewrite the header in place with the metadata keys sorted (same length, same offsets), so the
    files are byte-for-byte reproducible."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        h = json.loads(raw, object_pairs_hook=lambda kv: dict(kv))
        if "__metadata__" in h:
            h["__metadata__"] = dict(sorted(h["__metadata__"].items()))
            order = ["__metadata__"] + [k for k in h if k != "__metadata__"]
            h = {k: h[k] for k in order}
        new = json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > n:
            return  # keep as written (never happens for the files made here)
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def self_test():
    """Check the float64 rounding helpers against torch's own casts."""
    rng = np.random.Generator(np.random.PCG64(7))
    v = rng.standard_normal(20000).astype(np.float32) * np.float32(3.0)
    v = np.concatenate([v, np.float32([1e-39, -3e-40, 2.0 ** -133, 1.00390625, 1.01171875, 0.0, -0.0])])
    ref = torch.from_numpy(v).to(torch.bfloat16).to(torch.float64).numpy()
    mine = bf16_round(v.astype(np.float64))
    assert np.array_equal(ref, mine), "bf16_round disagrees with torch"
    # quant_act: codes in range, dequant close
    xq = quant_act_1x128(np.ldexp(rng.integers(-127, 128, size=(3, 200)).astype(np.float64), -6), "fn")
    assert np.all(np.isfinite(xq))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Goldens", "external"))
    ap.add_argument("--seed", type=int, default=20260415)
    ap.add_argument("--only", default="")
    args = ap.parse_args()

    import safetensors
    import transformers
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    versions = {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
                "safetensors_version": safetensors.__version__, "numpy_version": np.__version__,
                "python_version": sys.version.split()[0]}
    print("versions:", json.dumps(versions))
    self_test()
    os.makedirs(args.out, exist_ok=True)

    only = set(filter(None, args.only.split(",")))
    rows = []
    for idx, c in enumerate(case_list()):
        if only and c.name not in only:
            continue
        seed = args.seed + 1000 * idx + c.seed_offset
        gen = Gen(seed)
        W, store = build_weights(c, gen)
        x = make_inputs(c, gen, W)
        _, _, cfg_json = hf_config(c)
        hs_dt = torch.float32 if c.store == "f32" else torch.bfloat16
        hs = torch.from_numpy(x).to(hs_dt)
        assert np.array_equal(hs.to(torch.float64).numpy(), x)
        store = {"hidden_states": hs.contiguous(), **store}

        hf_out, hf_logits, hf_ids, hf_w, hf_sg = run_hf(c, W, x)
        own = own_unfused(c, W, x)
        hf_vs_own = float(np.max(np.abs(hf_out - own)) / max(1e-300, np.max(np.abs(hf_out))))
        assert hf_vs_own < 1e-12, f"{c.name}: HF block and float64 re-implementation disagree ({hf_vs_own:.3g})"

        fmt = c.store.split("-")[1] if c.store.startswith("fp8") else None
        if c.recipe in ("exact", "w8a16"):
            out, logits, ids, w, sg = hf_out, hf_logits, hf_ids, hf_w, hf_sg
            note = SOFTMAX_NOTE
            if c.recipe == "w8a16":
                note = ("w8a16: FP8 weights dequantized exactly (q * weight_scale_inv, float64), "
                        "activations not quantized; HF block run on the dequantized float64 weights. ") + note
            producer = f"transformers {hf_classes(c.family)[1].__name__} (float64)"
        else:
            out, logits, ids, w, sg = own_fused_fp8(c, W, x, fmt)
            rel = float(np.sqrt(np.mean((out - hf_out) ** 2)) / np.sqrt(np.mean(hf_out ** 2)))
            c.info["fp8_vs_unquantized_hf_rms_rel"] = rel
            assert np.array_equal(ids, hf_ids), f"{c.name}: fused-fp8 routing differs from HF routing"
            note = ("fused-fp8: own float64 implementation in scripts/hf_crosscheck.py (not HF, not MoECheck): "
                    "router logits bf16(x.Wg), softmax float64, top-K ties to lower index, renormalize; "
                    "g = bf16(sigmoid(bf16(x.ws))); activations and the bf16 intermediate quantized per "
                    "token per 1x128 group (float32 scale = amax*fp32(1/FP8_MAX), inv = 1/scale, "
                    "torch RNE cast after clamp), dequantized exactly; dots, silu, combine float64. "
                    f"RMS rel. difference to the unquantized HF block on the same weights: {rel:.3e}.")
            producer = "hf_crosscheck.py own fused-fp8 implementation (float64)"

        case_path = os.path.join(args.out, f"{c.name}.case.safetensors")
        exp_path = os.path.join(args.out, f"{c.name}.expected.safetensors")
        save_file(store, case_path, metadata={"config": json.dumps(cfg_json, sort_keys=True),
                                              "producer": "scripts/hf_crosscheck.py", "seed": str(seed)})
        exp = {
            "output": torch.from_numpy(np.ascontiguousarray(out, dtype=np.float64)),
            "router_logits": torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float64)),
            "topk_ids": torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int32)),
            "topk_weights": torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)),
            "shared_gate": torch.from_numpy(np.ascontiguousarray(sg, dtype=np.float64).reshape(c.T, 1)),
        }
        meta = {"recipe": c.recipe, "seed": str(seed), "family": c.family, "layout": c.layout,
                "weights": c.store, "producer": producer, "note": (note + (" " + c.note if c.note else "")).strip(),
                "normalize_topk": str(c.norm is None or bool(c.norm)).lower(), **versions}
        save_file(exp, exp_path, metadata=meta)
        canonical_header(case_path)
        canonical_header(exp_path)
        size = os.path.getsize(case_path) + os.path.getsize(exp_path)
        rows.append((c, size, hf_vs_own))

    print()
    hdr = f"{'case':40s} {'family':12s} {'recipe':9s} {'layout':10s} {'weights':8s} {'T':>3s} {'H':>4s} {'I':>4s} {'Is':>4s} {'E':>3s} {'K':>2s} {'KiB':>6s}  check"
    print(hdr)
    print("-" * len(hdr))
    total = 0
    for c, size, chk in rows:
        total += size
        extra = f"hf~own {chk:.1e}"
        if "fp8_vs_unquantized_hf_rms_rel" in c.info:
            extra += f"; fp8 vs hf rms {c.info['fp8_vs_unquantized_hf_rms_rel']:.2e}"
        print(f"{c.name:40s} {c.family:12s} {c.recipe:9s} {c.layout:10s} {c.store:8s} {c.T:3d} {c.H:4d} {c.I:4d} "
              f"{c.Is:4d} {c.E:3d} {c.K:2d} {size / 1024:6.1f}  {extra}")
    print(f"{len(rows)} cases, {2 * len(rows)} files, {total / 1024 / 1024:.2f} MiB total -> {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
