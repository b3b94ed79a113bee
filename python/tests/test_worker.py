#!/usr/bin/env python3
"""End-to-end checks of moecheck_worker.py with the NumPy adapters, the fixtures and the goldens
(numpy + ml_dtypes only; no torch needed). Prints one line per check and 'N passed, N failed'.

    python3 python/tests/test_worker.py [--verbose]
"""
from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moecheck_adapter import SafetensorsFile  # noqa: E402
from worker_client import ROOT, Worker, case_request, read_output, read_route  # noqa: E402

ADAPTERS = os.path.join(ROOT, "adapters")
FIXTURES = os.path.join(ROOT, "Tests", "Fixtures", "python")
GOLDENS = os.path.join(ROOT, "Goldens")
results = []


def check(name, cond, detail=""):
    results.append(bool(cond))
    print(f"{'ok  ' if cond else 'FAIL'} {name}{': ' + detail if detail else ''}")


def expected(case_file):
    f = SafetensorsFile(case_file.replace(".case.", ".expected."))
    return {n: np.array(f.tensor(n)) for n in f.names()}, f.metadata


def judge(out, exp, ids=None):
    """(violations outside the bound among tokens whose routing is settled, max |err|, max err/bound)."""
    r, b = exp["output"], exp["bound"]
    amb = exp["ambiguous_tokens"].astype(bool)
    if ids is not None:
        same = np.array([set(ids[t]) == set(exp["topk_ids"][t]) for t in range(len(ids))])
        amb = amb & ~same
    d = np.abs(out.astype(np.float64) - r)[~amb]
    bb = b[~amb]
    return int((~(d <= bb)).sum()), float(d.max(initial=0)), float((d / np.where(bb > 0, bb, 1)).max(initial=0))


def goldens(recipe):
    out = []
    for f in sorted(glob.glob(os.path.join(GOLDENS, "*.case.safetensors"))):
        if os.path.exists(f.replace(".case.", ".expected.")) and expected(f)[1].get("recipe") == recipe:
            out.append(f)
    return out


def main():
    tmp = tempfile.mkdtemp(prefix="moecheck-worker-test-")
    # ---- the NumPy fused-bf16 model against the goldens of its recipe ----------------------
    w = Worker(os.path.join(ADAPTERS, "numpy_fused_bf16.py"))
    h = w.hello
    check("hello numpy_fused_bf16", h.get("ok") and h["recipe"] == "fused-bf16" and h["has_route"]
          and h["protocol"] == 1 and len(h["mutants"]) == 8 and h["device"] == "cpu", json.dumps(h)[:200])
    rid = 0
    for f in goldens("fused-bf16"):
        rid += 1
        exp, meta = expected(f)
        rep = w.request(case_request(rid, f, tmp))
        if not rep.get("ok"):
            check(f"fused-bf16 {os.path.basename(f)}", False, json.dumps(rep)[:400])
            continue
        out0, out1 = read_output(rep, 0), read_output(rep, 1)
        ids, wts = read_route(rep)
        v, mx, ratio = judge(out0, exp, ids)
        amb = exp["ambiguous_tokens"].astype(bool)
        ids_ok = all(set(ids[t]) == set(exp["topk_ids"][t]) for t in range(len(ids)) if not amb[t])
        fused = meta.get("shared_fused") == "true"
        check(f"fused-bf16 {os.path.basename(f)[:-17]}", v == 0 and ids_ok and np.array_equal(out0, out1)
              and ids.shape[1] == exp["topk_ids"].shape[1],
              f"violations {v}, max|err| {mx:.3e}, max err/bound {ratio:.3f}, ids ok {ids_ok}, slots {ids.shape[1]} "
              f"(fused {fused}), worker_ms {rep['worker_ms']}, forward_ms {[round(t, 2) for t in rep['forward_ms']]}")
    # layer cache: the same key again loads nothing
    f = os.path.join(GOLDENS, "qwen3_5_moe_bf16_combined_t17.case.safetensors")
    w.request(case_request(100, f, tmp, key="k17"))
    rep = w.request(case_request(101, f, tmp, key="k17"))
    check("layer cache reused (same key)", rep["ok"] and rep["worker_ms"]["load"] == 0.0, json.dumps(rep["worker_ms"]))
    t0 = time.perf_counter()
    for i in range(20):
        rep = w.request(case_request(200 + i, f, tmp, key="k17", route=False, repeats=1))
    per = (time.perf_counter() - t0) / 20 * 1e3
    overhead = per - rep["forward_ms"][0]
    check("worker overhead per case (T=17,H=128) < 5 ms", overhead < 5,
          f"{per:.2f} ms per request round trip, forward {rep['forward_ms'][0]:.2f} ms, worker_ms {rep['worker_ms']}")
    # mutants: each changes the output (or says it did not apply)
    base = read_output(w.request(case_request(300, f, tmp, key="k17", repeats=1)))
    for m in h["mutants"]:
        rep = w.request(case_request(301, f, tmp, key="k17", repeats=1, mutant=m))
        out = read_output(rep)
        changed = not np.array_equal(out, base, equal_nan=True)
        check(f"mutant {m}", rep["ok"] and rep["mutant"] == m and changed == rep["mutant_applied"]
              and (changed or m == "fnuz_as_fn"), f"applied {rep['mutant_applied']}, output changed {changed}")
    fz = os.path.join(GOLDENS, "qwen3_5_moe_fp8fnuz_perexpert_t2.case.safetensors")
    b = read_output(w.request(case_request(310, fz, tmp, repeats=1)))
    rep = w.request(case_request(311, fz, tmp, repeats=1, mutant="fnuz_as_fn"))
    o = read_output(rep)
    check("mutant fnuz_as_fn on an fnuz layer", rep["mutant_applied"] and not np.array_equal(b, o, equal_nan=True))
    again = read_output(w.request(case_request(312, fz, tmp, repeats=1)))
    check("mutant reset after the run (cache not poisoned)", np.array_equal(b, again))
    rep = w.request(case_request(320, f, tmp, mutant="no_such_mutant"))
    check("unknown mutant -> error mutant", not rep["ok"] and rep["error"] == "mutant", rep.get("message", ""))
    # request errors
    rep = w.request("{not json")
    check("bad JSON -> error request, worker lives", not rep["ok"] and rep["error"] == "request", rep["message"])
    rep = w.request({"op": "dance", "id": 1})
    check("unknown op -> error request", not rep["ok"] and rep["error"] == "request", rep["message"])
    r = case_request(330, f, tmp)
    r["layer"] = dict(r["layer"], key="missing", file="/nonexistent/case.safetensors")
    rep = w.request(r)
    check("missing layer file -> error load", not rep["ok"] and rep["error"] == "load", rep["message"])
    r = case_request(331, f, tmp, key="k17")
    r["x"] = {"file": f, "tensor": "no_such_tensor"}
    rep = w.request(r)
    check("missing x tensor -> error load", not rep["ok"] and rep["error"] == "load", rep["message"])
    rep = w.request(case_request(332, f, tmp, key="k17"))
    check("still serving after errors", rep["ok"])
    rep = w.request({"op": "quit"})
    check("quit", rep == {"ok": True, "op": "quit"} and w.close() == 0)

    # ---- the float64 adapter against the exact golden -------------------------------------
    w = Worker(os.path.join(ADAPTERS, "numpy_exact.py"))
    for f in goldens("exact"):
        exp, _ = expected(f)
        rep = w.request(case_request(1, f, tmp))
        out = read_output(rep)
        ids, _ = read_route(rep)
        v, mx, ratio = judge(out, exp, ids)
        check(f"exact {os.path.basename(f)[:-17]}", rep["ok"] and out.dtype == np.float64 and v == 0,
              f"violations {v}, max|err| {mx:.3e}, max err/bound {ratio:.3f}")
    w.send("")  # blank lines are ignored
    check("EOF -> exit 0", w.close() == 0)

    # ---- fixtures ------------------------------------------------------------------------
    f = os.path.join(GOLDENS, "qwen3_5_moe_bf16_perexpert_t1.case.safetensors")

    def fixture(name, env=None):
        return Worker(os.path.join(FIXTURES, name + ".py"), env=env)

    w = fixture("import_error")
    check("import_error -> hello error import, exit 1", not w.hello["ok"] and w.hello["error"] == "import"
          and "ImportError" in w.hello["message"] and w.close() == 1, w.hello["message"])
    w = fixture("no_forward")
    check("no_forward -> hello error contract", not w.hello["ok"] and w.hello["error"] == "contract"
          and "forward" in w.hello["message"] and "no_forward.py" in w.hello["message"] and w.close() == 1,
          w.hello["message"])
    for name, kind, text in [("raises", "exception", "ValueError: boom from fixture"),
                             ("wrong_shape", "shape", "expected shape [1, 192], got [1, 193]"),
                             ("int_output", "dtype", "int32")]:
        w = fixture(name)
        rep = w.request(case_request(1, f, tmp))
        rep2 = w.request(case_request(2, f, tmp))
        check(f"{name} -> error {kind}, worker survives", not rep["ok"] and rep["error"] == kind
              and text in rep["message"] and rep2["error"] == kind and w.close() == 0, rep["message"])
    w = fixture("nan_output")
    rep = w.request(case_request(1, f, tmp))
    check("nan_output -> ok, NaN written", rep["ok"] and np.isnan(read_output(rep)).all())
    w.close()
    w = fixture("dies")
    w.send(case_request(1, f, tmp))
    try:
        w.read(30)
        died = False
    except EOFError:
        died = True
    check("dies -> channel closes, exit 3", died and w.p.wait() == 3)
    marker = os.path.join(tmp, "dies_once.marker")
    w = fixture("dies_once", {"MOECHECK_FIXTURE_MARKER": marker})
    w.send(case_request(1, f, tmp))
    try:
        w.read(30)
        died = False
    except EOFError:
        died = True
    w = fixture("dies_once", {"MOECHECK_FIXTURE_MARKER": marker})
    rep = w.request(case_request(2, f, tmp))
    check("dies_once -> dies, then a restarted worker succeeds", died and rep["ok"] and w.close() == 0)
    w = fixture("hangs")
    w.send(case_request(1, f, tmp))
    try:
        w.read(2)
        timed_out = False
    except TimeoutError:
        timed_out = True
    w.p.kill()
    check("hangs -> no reply (client times out)", timed_out and w.p.wait() != 0)
    w = fixture("prints")
    rep = w.request(case_request(1, f, tmp))
    rep2 = w.request(case_request(2, f, tmp))
    ok = w.hello["ok"] and rep["ok"] and rep2["ok"]
    w.close()
    err = w.p.stderr.read().decode()
    check("prints -> channel survives, prints on stderr", ok and "raw write to fd 1" in err and "at import" in err)
    w = Worker(os.path.join(FIXTURES, "no_such_adapter.py"))
    check("missing adapter file -> hello error import", not w.hello["ok"] and w.hello["error"] == "import"
          and w.close() == 1, w.hello["message"])

    n_pass = sum(results)
    print(f"{n_pass} passed, {len(results) - n_pass} failed")
    return 0 if n_pass == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
