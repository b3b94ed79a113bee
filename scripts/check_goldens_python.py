#!/usr/bin/env python3
"""Load every file of a MoECheck golden set with the Python safetensors package and check it.

    python3 scripts/check_goldens_python.py [Goldens]

For every case in DIR/manifest.json: sha256 and size of each file (hashlib), every tensor readable
through safetensors.deserialize (+ ml_dtypes views for BF16 / F8), metadata through
safetensors.safe_open, case-file tensor names/dtypes/shapes per DESIGN 4, expected-file tensors with
the shapes the manifest implies, finite outputs and bounds >= 0, ambiguous-token count as in the
manifest. Prints one line per file, then "python goldens: N files OK" (exit 0) or the problems (exit 1).
Needs numpy, ml_dtypes, safetensors >= 0.8.0 (F8_E4M3FNUZ).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import ml_dtypes
import numpy as np
import safetensors
from safetensors import safe_open

DTYPES = {
    "F64": np.float64, "F32": np.float32, "BF16": ml_dtypes.bfloat16, "I32": np.int32, "U8": np.uint8,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
}
PRE = "model.layers.0.mlp."


def load(path):
    with open(path, "rb") as f:
        raw = f.read()
    out = {}
    for name, t in safetensors.deserialize(raw):
        out[name] = (t["dtype"], np.frombuffer(bytes(t["data"]), dtype=DTYPES[t["dtype"]]).reshape(t["shape"]))
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        assert sorted(f.keys()) == sorted(out), "safe_open and deserialize disagree on the tensor names"
    return raw, out, meta


def check_case(c, tensors, meta, problems):
    T, H, I, Is, E, K = (c[k] for k in ["T", "H", "I", "Is", "E", "K"])
    wd = c["weight_dtype"]
    spec = json.loads(meta["moecheck_spec"])
    if spec != c["spec"]:
        problems.append("moecheck_spec metadata differs from the manifest spec")
    cfg = json.loads(meta["config"])
    if (cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"], cfg["num_experts_per_tok"]) != (H, I, E, K):
        problems.append(f"config {cfg} does not match the manifest")
    want = {"hidden_states": ("BF16", [T, H]), PRE + "gate.weight": ("BF16", [E, H])}
    blocks = lambda n: (n + 127) // 128

    def proj(base, rows, cols):
        want[base + "weight"] = (wd, [rows, cols])
        if wd != "BF16":
            want[base + "weight_scale_inv"] = ("F32", [blocks(rows), blocks(cols)])

    if c["layout"] == "combined":
        want[PRE + "experts.gate_up_proj"] = (wd, [E, 2 * I, H])
        want[PRE + "experts.down_proj"] = (wd, [E, H, I])
        if wd != "BF16":
            want[PRE + "experts.gate_up_proj_scale_inv"] = ("F32", [E, 2 * blocks(I), blocks(H)])
            want[PRE + "experts.down_proj_scale_inv"] = ("F32", [E, blocks(H), blocks(I)])
    else:
        for e in range(E):
            b = f"{PRE}experts.{e}."
            proj(b + "gate_proj.", I, H); proj(b + "up_proj.", I, H); proj(b + "down_proj.", H, I)
    if Is > 0:
        want[PRE + "shared_expert_gate.weight"] = ("BF16", [1, H])
        b = PRE + "shared_expert."
        proj(b + "gate_proj.", Is, H); proj(b + "up_proj.", Is, H); proj(b + "down_proj.", H, Is)
    for name, (dt, shape) in want.items():
        if name not in tensors:
            problems.append(f"{name}: missing")
        elif (tensors[name][0], list(tensors[name][1].shape)) != (dt, shape):
            problems.append(f"{name}: {tensors[name][0]}{list(tensors[name][1].shape)}, expected {dt}{shape}")
    extra = set(tensors) - set(want)
    if extra:
        problems.append(f"unexpected tensors {sorted(extra)[:3]}")
    for name, (dt, a) in tensors.items():
        if not np.all(np.isfinite(a.astype(np.float64))):
            problems.append(f"{name}: non-finite values")


def check_expected(c, tensors, meta, problems):
    T, H, E, K = c["T"], c["H"], c["E"], c["K"]
    S = K + (1 if c["shared_fused"] else 0)
    want = {"output": ("F64", [T, H]), "bound": ("F64", [T, H]), "router_logits": ("F64", [T, E]),
            "router_logit_bound": ("F64", [T, E]), "topk_ids": ("I32", [T, S]), "topk_weights": ("F64", [T, S]),
            "topk_weight_bound": ("F64", [T, S]), "shared_gate": ("F64", [T, 1]), "shared_gate_bound": ("F64", [T, 1]),
            "ambiguous_tokens": ("U8", [T])}
    for name, (dt, shape) in want.items():
        if name not in tensors:
            problems.append(f"{name}: missing"); continue
        if (tensors[name][0], list(tensors[name][1].shape)) != (dt, shape):
            problems.append(f"{name}: {tensors[name][0]}{list(tensors[name][1].shape)}, expected {dt}{shape}")
    if problems:
        return
    g = lambda n: tensors[n][1]
    for n in ["output", "bound", "router_logits", "topk_weights", "shared_gate"]:
        if not np.all(np.isfinite(g(n))):
            problems.append(f"{n}: non-finite values")
    for n in ["bound", "router_logit_bound", "topk_weight_bound", "shared_gate_bound"]:
        if np.any(g(n) < 0):
            problems.append(f"{n}: negative")
    ids = g("topk_ids")
    if np.any(ids[:, :K] < 0) or np.any(ids[:, :K] >= E):
        problems.append("topk_ids: routed id out of range")
    if c["shared_fused"] and np.any(ids[:, K] != E):
        problems.append("topk_ids: shared slot is not id E")
    if any(len(set(r)) != len(r) for r in ids.tolist()):
        problems.append("topk_ids: repeated id in a row")
    if int(g("ambiguous_tokens").sum()) != c["ambiguous_tokens"]:
        problems.append(f"ambiguous_tokens: {int(g('ambiguous_tokens').sum())} flagged, manifest says {c['ambiguous_tokens']}")
    if meta.get("recipe") != c["recipe"]:
        problems.append(f"metadata recipe {meta.get('recipe')} != manifest {c['recipe']}")


def main(argv):
    d = argv[1] if len(argv) > 1 else "Goldens"
    with open(os.path.join(d, "manifest.json")) as f:
        m = json.load(f)
    ok, bad = 0, []
    for c in m["cases"]:
        for fe in c["files"]:
            problems = []
            path = os.path.join(d, fe["file"])
            try:
                raw, tensors, meta = load(path)
                if len(raw) != fe["bytes"]:
                    problems.append(f"{len(raw)} bytes, manifest says {fe['bytes']}")
                if hashlib.sha256(raw).hexdigest() != fe["sha256"]:
                    problems.append("sha256 differs from the manifest")
                if fe["file"].endswith(".case.safetensors"):
                    check_case(c, tensors, meta, problems)
                else:
                    check_expected(c, tensors, meta, problems)
            except Exception as e:  # noqa: BLE001 - report any load failure per file
                problems.append(f"cannot load: {type(e).__name__}: {e}")
            if problems:
                bad.append(f"{fe['file']}: " + "; ".join(problems))
                print(f"FAIL {fe['file']}: " + "; ".join(problems))
            else:
                ok += 1
                print(f"ok   {fe['file']} ({len(tensors)} tensors)")
    if bad:
        print(f"python goldens: {len(bad)} file(s) FAILED, {ok} OK")
        return 1
    print(f"python goldens: {ok} files OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
