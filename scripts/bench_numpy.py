#!/usr/bin/env python3
"""Straightforward grouped NumPy float64 MoE layer: the baseline of `moecheck bench`.

Reads a MoECheck case file (safetensors, HF naming, `experts.gate_up_proj` combined layout or
per-expert layout; BF16 or FP8 block-scaled weights) through a memory map and computes, in
float64, exactly the math of the reference's `exact` recipe:

    router softmax over all E -> top-k (ties: lower id) -> renormalize (Qwen3.5: always)
    per touched expert: gather rows -> x @ W13^T -> silu(gate) * up -> @ W2^T -> weighted scatter-add
    shared expert weighted by sigmoid(x . w_gate)

Weights are decoded per expert inside the timed region (as the Swift reference does): BF16 via
uint16 -> uint32 << 16 -> float32 view, FP8 via a 256-entry table times the 128x128 block scales.

Threads: OPENBLAS_NUM_THREADS (and OMP/MKL) are set from --threads before numpy is imported.
Runs --warmup untimed computations first (default 1), then --repeat timed ones.
Prints one JSON object: load_s, compute_s (one per repeat), peak_rss_mb, blas info, and with
--compare FILE (raw little-endian float64 [T, H]) the max relative difference to it.
"""
import argparse
import json
import os
import resource
import struct
import sys
import time

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("case")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeat", type=int, default=1)
ap.add_argument("--warmup", type=int, default=1,
                help="untimed runs first (map the case file's pages, start BLAS threads), as the Swift worker does")
ap.add_argument("--tokens", type=int, default=None, help="use the first T rows of hidden_states (default: all)")
ap.add_argument("--compare", default=None, help="raw float64 [T, H] output to compare against")
args = ap.parse_args()

for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(args.threads)
import numpy as np  # noqa: E402  (after the thread pin)


def fp8_e4m3fn_table():
    t = np.zeros(256, dtype=np.float64)
    for c in range(256):
        s = -1.0 if c & 0x80 else 1.0
        e = (c >> 3) & 0xF
        m = c & 7
        if e == 15 and m == 7:
            t[c] = np.nan
        elif e == 0:
            t[c] = s * m * 2.0 ** -9
        else:
            t[c] = s * (1 + m / 8) * 2.0 ** (e - 7)
    return t


def fp8_e4m3fnuz_table():
    t = np.zeros(256, dtype=np.float64)
    for c in range(256):
        if c == 0x80:
            t[c] = np.nan
            continue
        s = -1.0 if c & 0x80 else 1.0
        e = (c >> 3) & 0xF
        m = c & 7
        t[c] = s * (m * 2.0 ** -10 if e == 0 else (1 + m / 8) * 2.0 ** (e - 8))
    return t


DTYPES = {"BF16": np.uint16, "F32": np.float32, "F64": np.float64, "F16": np.float16,
          "F8_E4M3": np.uint8, "F8_E4M3FNUZ": np.uint8}


class Case:
    """Tensors of a safetensors file as views into one read-only memory map."""

    def __init__(self, path):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        self.meta = header.pop("__metadata__", {})
        self.header = header
        self.map = np.memmap(path, dtype=np.uint8, mode="r")
        self.base = 8 + n

    def raw(self, name):
        h = self.header[name]
        b, e = h["data_offsets"]
        return self.map[self.base + b:self.base + e].view(DTYPES[h["dtype"]]).reshape(h["shape"]), h["dtype"]

    def has(self, name):
        return name in self.header


def to_f64(a, dtype):
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype == "F8_E4M3":
        return FP8N[a]
    if dtype == "F8_E4M3FNUZ":
        return FP8UZ[a]
    return a.astype(np.float64)


FP8N, FP8UZ = fp8_e4m3fn_table(), fp8_e4m3fnuz_table()


def dequant(w, dtype, scale):
    """w [rows, cols] raw codes; scale [ceil(rows/128), ceil(cols/128)] or None."""
    v = to_f64(w, dtype)
    if scale is None:
        return v
    s = np.repeat(np.repeat(scale.astype(np.float64), 128, axis=0), 128, axis=1)[:v.shape[0], :v.shape[1]]
    return v * s


t0 = time.perf_counter()
case = Case(args.case)
cfg = json.loads(case.meta["config"])
pre = next(k for k in case.header if k.endswith("mlp.gate.weight"))[:-len("gate.weight")]
H = cfg["hidden_size"]
I = cfg["moe_intermediate_size"]
E = cfg["num_experts"]
K = cfg["num_experts_per_tok"]
Is = cfg.get("shared_expert_intermediate_size", 0)
renorm = cfg.get("norm_topk_prob", True) if cfg.get("model_type") != "qwen3_5_moe" else True
xr, xd = case.raw("hidden_states")
T = args.tokens or xr.shape[0]
x = to_f64(xr[:T], xd)
wg = to_f64(*case.raw(pre + "gate.weight"))
ws = to_f64(*case.raw(pre + "shared_expert_gate.weight")).reshape(-1) if Is else None
combined = case.has(pre + "experts.gate_up_proj")
load_s = time.perf_counter() - t0


def expert_weights(e):
    """(W13 [2Ie, H], W2 [H, Ie]) in float64; e == E is the shared expert."""
    if e < E and combined:
        gu, gd = case.raw(pre + "experts.gate_up_proj")
        dn, dd = case.raw(pre + "experts.down_proj")
        gs = ds = None
        if case.has(pre + "experts.gate_up_proj_scale_inv"):
            gs = case.raw(pre + "experts.gate_up_proj_scale_inv")[0][e]
            ds = case.raw(pre + "experts.down_proj_scale_inv")[0][e]
            if gs.shape[0] == 2 * ((I + 127) // 128):   # gate and up blocked separately
                half = gs.shape[0] // 2
                w13 = np.concatenate([dequant(gu[e][:I], gd, gs[:half]), dequant(gu[e][I:], gd, gs[half:])])
                return w13, dequant(dn[e], dd, ds)
        return dequant(gu[e], gd, gs), dequant(dn[e], dd, ds)
    base = pre + ("shared_expert." if e == E else f"experts.{e}.")
    mats = []
    for p in ("gate_proj", "up_proj", "down_proj"):
        w, d = case.raw(base + p + ".weight")
        s = case.raw(base + p + ".weight_scale_inv")[0] if case.has(base + p + ".weight_scale_inv") else None
        mats.append(dequant(w, d, s))
    return np.concatenate(mats[:2]), mats[2]


def moe(x):
    T = x.shape[0]
    logits = x @ wg.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :K]
    w = np.take_along_axis(p, topk, axis=1)
    if renorm:
        w /= w.sum(axis=1, keepdims=True)
    out = np.zeros((T, H))
    groups = [(e, *np.nonzero(topk == e)) for e in np.unique(topk)]
    if Is:
        g = 1 / (1 + np.exp(-(x @ ws)))
        groups.append((E, np.arange(T), None))
    for e, rows, slots in groups:
        w13, w2 = expert_weights(int(e))
        Ie = w2.shape[1]
        gu = x[rows] @ w13.T
        gate, up = gu[:, :Ie], gu[:, Ie:]
        h = gate / (1 + np.exp(-gate)) * up
        y = h @ w2.T
        scale = g[rows] if slots is None else w[rows, slots]
        out[rows] += scale[:, None] * y          # rows are distinct within one expert
    return out


def peak_rss_mb():
    """VmHWM of this process. ru_maxrss is not used first: Linux carries the parent's peak across
    fork+exec into it, so a child of a process that generated a big case would report that."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


out = None
for _ in range(args.warmup):
    out = moe(x)
times = []
for _ in range(args.repeat):
    t1 = time.perf_counter()
    out = moe(x)
    times.append(time.perf_counter() - t1)

result = {
    "load_s": load_s,
    "compute_s": times,
    "peak_rss_mb": peak_rss_mb(),
    "threads": args.threads,
    "numpy": np.__version__,
    "blas": "",
    "tokens": T,
}
try:
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    result["blas"] = f"{blas.get('name', '')} {blas.get('version', '')}".strip()
except Exception:  # older numpy
    pass
if args.compare:
    ref = np.fromfile(args.compare, dtype="<f8").reshape(T, H)
    result["max_rel_diff"] = float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-300))
print(json.dumps(result))
