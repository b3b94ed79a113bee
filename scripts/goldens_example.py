#!/usr/bin/env python3
"""Check a MoE kernel against one MoECheck golden case (numpy + ml_dtypes + safetensors, no torch).

    python3 scripts/goldens_example.py Goldens/qwen3_5_moe_bf16_combined_t17

Loads NAME.case.safetensors (the layer and its input) and NAME.expected.safetensors (the reference
output and its per-element bound), calls my_kernel(...) and prints a verdict with the metrics
MoECheck reports. Exit 0 when every element satisfies |kernel - output| <= bound (NaN never passes).

Replace my_kernel with a call into your kernel. The placeholder is a plain numpy float32 version of
the layer (fp32 router and softmax, fp32 SwiGLU, fp32 combine, bf16 output): it passes the BF16
cases of the fused-bf16 recipe, and shows how the inputs are laid out.

safetensors 0.8.0 + numpy cannot hand out BF16 / F8 tensors on its own (safetensors.numpy.load_file
fails on F8_E4M3 with "module 'numpy' has no attribute 'float8_e4m3fn'"), so we read raw bytes with
safetensors.deserialize and view them through ml_dtypes.
"""
from __future__ import annotations

import json
import struct
import sys

import ml_dtypes
import numpy as np
import safetensors

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "U8": np.uint8,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
}


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a safetensors file (native dtypes, via ml_dtypes) and its __metadata__."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    metadata = json.loads(raw[8:8 + n]).get("__metadata__", {})
    tensors = {}
    for name, t in safetensors.deserialize(raw):
        tensors[name] = np.frombuffer(bytes(t["data"]), dtype=DTYPES[t["dtype"]]).reshape(t["shape"])
    return tensors, metadata


def dequant(w: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """FP8 block-scaled weight [.., N, K] with weight_scale_inv [.., ceil(N/128), ceil(K/128)] -> float32."""
    w = w.astype(np.float32)
    if scale is None:
        return w
    s = np.repeat(np.repeat(scale.astype(np.float32), 128, axis=-2), 128, axis=-1)
    return w * s[..., : w.shape[-2], : w.shape[-1]]


def experts(case: dict[str, np.ndarray], pre: str, E: int):
    """Routed experts as float32 (gate [E,I,H], up [E,I,H], down [E,H,I]) from either layout."""
    if pre + "experts.gate_up_proj" in case:
        gu = dequant(case[pre + "experts.gate_up_proj"], case.get(pre + "experts.gate_up_proj_scale_inv"))
        I = gu.shape[1] // 2
        # FP8 scale rows of the combined tensor block gate and up separately (2*ceil(I/128) rows)
        if pre + "experts.gate_up_proj_scale_inv" in case and I % 128:
            sc = case[pre + "experts.gate_up_proj_scale_inv"]
            half = sc.shape[1] // 2
            raw = case[pre + "experts.gate_up_proj"]
            g = dequant(raw[:, :I], sc[:, :half]); u = dequant(raw[:, I:], sc[:, half:])
        else:
            g, u = gu[:, :I], gu[:, I:]
        d = dequant(case[pre + "experts.down_proj"], case.get(pre + "experts.down_proj_scale_inv"))
        return g, u, d
    g, u, d = [], [], []
    for e in range(E):
        b = f"{pre}experts.{e}."
        g.append(dequant(case[b + "gate_proj.weight"], case.get(b + "gate_proj.weight_scale_inv")))
        u.append(dequant(case[b + "up_proj.weight"], case.get(b + "up_proj.weight_scale_inv")))
        d.append(dequant(case[b + "down_proj.weight"], case.get(b + "down_proj.weight_scale_inv")))
    return np.stack(g), np.stack(u), np.stack(d)


def bf16(v: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even) and back."""
    return np.asarray(v, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def silu(v: np.ndarray) -> np.ndarray:
    return v / (np.float32(1) + np.exp(-v))


def my_kernel(case: dict[str, np.ndarray], config: dict) -> np.ndarray:
    """PLACEHOLDER for the kernel under test: returns the layer output [T, H] (here bf16).

    Follows the fused-bf16 recipe's rounding points: router logits rounded to bf16, fp32 softmax,
    shared gate bf16(sigmoid(bf16(x.ws))), silu(gate)*up rounded to bf16, fp32 combine, bf16 output."""
    pre = next(k for k in case if k.endswith("mlp.gate.weight"))[: -len("gate.weight")]
    E, K = config["num_experts"], config["num_experts_per_tok"]
    renorm = config.get("norm_topk_prob", True) if config["model_type"] != "qwen3_5_moe" else True
    x = case["hidden_states"].astype(np.float32)
    logits = bf16(x @ case[pre + "gate.weight"].astype(np.float32).T)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :K]          # ties: lower expert index first
    w = np.take_along_axis(p, ids, axis=1)
    if renorm:
        w = w / w.sum(axis=1, keepdims=True)
    g, u, d = experts(case, pre, E)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(K):
            e = ids[t, k]
            y[t] += w[t, k] * (d[e] @ bf16(silu(g[e] @ x[t]) * (u[e] @ x[t])))
    if pre + "shared_expert.gate_proj.weight" in case:
        b = pre + "shared_expert."
        sg = dequant(case[b + "gate_proj.weight"], case.get(b + "gate_proj.weight_scale_inv"))
        su = dequant(case[b + "up_proj.weight"], case.get(b + "up_proj.weight_scale_inv"))
        sd = dequant(case[b + "down_proj.weight"], case.get(b + "down_proj.weight_scale_inv"))
        gate = bf16(1 / (1 + np.exp(-bf16(x @ case[pre + "shared_expert_gate.weight"].astype(np.float32).T))))   # [T, 1]
        y += gate * (bf16(silu(x @ sg.T) * (x @ su.T)) @ sd.T)
    return y.astype(ml_dtypes.bfloat16)


def bf16_ulp(r: np.ndarray) -> np.ndarray:
    """Spacing of bf16 numbers at |r| (MoECheck's max_ulp unit); 2^-133 at zero."""
    a = np.abs(r)
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    return np.where(a >= 2.0 ** -126, 2.0 ** (e - 7), 2.0 ** -133)


def verdict(actual: np.ndarray, expected: dict[str, np.ndarray]) -> dict:
    a = actual.astype(np.float64).ravel()
    r = expected["output"].ravel()
    b = expected["bound"].ravel()
    d = np.abs(a - r)
    bad = ~(d <= b)                         # NaN never passes: NaN <= b is False
    fin = np.isfinite(a)
    ratio = np.where(d == 0, 0.0, np.where(b > 0, d / np.where(b > 0, b, 1), np.inf))
    ratio = np.where(fin, ratio, np.inf)
    worst = int(np.argmax(ratio))
    se, sr = np.sum(d[fin] ** 2), np.sum(r[fin] ** 2)
    sa, sab = np.sum(a[fin] ** 2), np.sum(a[fin] * r[fin])
    H = expected["output"].shape[1]
    nz = fin & (r != 0)
    return {
        "passed": not bad.any(),
        "violations": int(bad.sum()), "elements": a.size, "non_finite": int((~fin).sum()),
        "max_abs": float(d[fin].max(initial=0)),
        "max_rel": float((d[nz] / np.abs(r[nz])).max(initial=0)),
        "max_ulp": float((d[fin] / bf16_ulp(r[fin])).max(initial=0)),
        "rms_rel": float(np.sqrt(se / sr)) if sr > 0 else 0.0,
        "calc_diff": float(max(0.0, (sa + sr - 2 * sab) / (sa + sr))) if sa + sr > 0 else 0.0,   # ||a-b||^2/(||a||^2+||b||^2)
        "worst": {"token": worst // H, "column": worst % H, "kernel": float(a[worst]), "reference": float(r[worst]),
                  "bound": float(b[worst]), "error/bound": float(ratio[worst])},
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    base = argv[1].removesuffix(".case.safetensors").removesuffix(".expected.safetensors")
    case, case_meta = load(base + ".case.safetensors")
    expected, exp_meta = load(base + ".expected.safetensors")
    config = json.loads(case_meta["config"])
    out = my_kernel(case, config)
    v = verdict(out, expected)
    amb = np.flatnonzero(expected["ambiguous_tokens"])
    print(f"{base}: recipe {exp_meta['recipe']}, T={out.shape[0]} H={out.shape[1]}, ambiguous tokens {amb.tolist()}")
    print(" ".join(f"{k}={v[k]:.3e}" for k in ["max_abs", "max_rel", "max_ulp", "rms_rel", "calc_diff"]) +
          f" violations={v['violations']}/{v['elements']} non_finite={v['non_finite']}")
    w = v["worst"]
    print(f"worst: token {w['token']} column {w['column']}: kernel {w['kernel']:.6g}, reference {w['reference']:.6g}, "
          f"bound {w['bound']:.3e}, error/bound {w['error/bound']:.3f}")
    print("PASS" if v["passed"] else "FAIL")
    return 0 if v["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
