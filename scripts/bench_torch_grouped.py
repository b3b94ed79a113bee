#!/usr/bin/env python3
"""torch's grouped GEMMs on the fused-MoE shapes of Kernels/test/bench.cpp, timed the same way.

The baseline issue 13 asks for beside our kernel: the fused layer's two GEMMs as
`torch.nn.functional.grouped_mm` (bf16) and `torch._scaled_grouped_mm` (fp8 e4m3fn, row-wise
scales: the block-128 scales our kernel applies have no grouped torch API, so this is the
closest fp8 grouped GEMM torch has), with the shared expert at slot E (K + 1 experts per token).

forward = gather x by expert -> stage 1 ([M, H] x [H, 2I] per expert) -> silu(gate) * up ->
stage 2 ([M, I] x [I, H]) -> weighted scatter-add into [T, H]. No router and no align (torch
has none to offer; ours are timed separately by bench.cpp). Routing: the top K of standard
normal logits per token (distinct experts), plus slot E.

Each repetition overwrites a 512 MiB buffer first (the L2 holds nothing of the problem), then
replays the step captured in a CUDA graph (eager launches where capture fails) between two
events. Median and min of --reps repetitions.

usage: bench_torch_grouped.py [--shape 35b|397b-tp1|397b-tp8|all] [--tokens 1,16,64,256,4096]
                              [--format bf16|fp8|all] [--reps 20] [--time-limit S] [--csv]
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name: H, I, E, K   (FACTS.md section 4; shared I == I, fused as slot E)
    "35b": (2048, 512, 256, 8),
    "397b-tp1": (4096, 1024, 512, 10),
    "397b-tp8": (4096, 128, 512, 10),
}


def routing(T, E, K, dev):
    ids = torch.randn(T, E, device=dev).topk(K, dim=1).indices
    ids = torch.cat([ids, torch.full((T, 1), E, device=dev, dtype=ids.dtype)], dim=1)  # [T, K+1]
    w = torch.rand(T, K + 1, device=dev, dtype=torch.float32)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // (K + 1)
    counts = torch.bincount(flat, minlength=E + 1)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    return token, w.reshape(-1)[order], offs, int((counts > 0).sum())


def make_step(fmt, H, I, E, K, T, dev):
    G = E + 1
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    token, wsorted, offs, used = routing(T, E, K, dev)  # used: experts with tokens
    out = torch.zeros(T, H, device=dev, dtype=torch.float32)
    if fmt == "bf16":
        w13 = (torch.randn(G, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.02).transpose(1, 2)  # [G, H, 2I]
        w2 = (torch.randn(G, H, I, device=dev, dtype=torch.bfloat16) * 0.02).transpose(1, 2)  # [G, I, H]

        def step():
            a = x.index_select(0, token)
            h = F.grouped_mm(a, w13, offs=offs)
            act = F.silu(h[:, :I]) * h[:, I:]
            o = F.grouped_mm(act, w2, offs=offs)
            out.zero_()
            out.index_add_(0, token, o.float() * wsorted[:, None])
        nbytes = T * H * 2 + used * 3 * I * H * 2 + T * H * 4  # x, the used experts' weights, output
        return step, nbytes
    f8 = torch.float8_e4m3fn
    w13 = (torch.randn(G, 2 * I, H, device=dev) * 0.5).to(f8).transpose(1, 2)  # column-major [G, H, 2I]
    w2 = (torch.randn(G, H, I, device=dev) * 0.5).to(f8).transpose(1, 2)
    s13 = torch.rand(G, 2 * I, device=dev) * 0.01 + 0.001
    s2 = torch.rand(G, H, device=dev) * 0.01 + 0.001

    def quant(t):  # per-row activation quantisation, as a W8A8 fused kernel does before the GEMM
        amax = t.abs().amax(dim=1).float().clamp(min=1e-12)
        s = amax / 448.0
        return (t.float() / s[:, None]).to(f8), s

    def step():
        a = x.index_select(0, token)
        qa, sa = quant(a)
        h = torch._scaled_grouped_mm(qa, w13, sa, s13, offs=offs, out_dtype=torch.bfloat16)
        act = F.silu(h[:, :I]) * h[:, I:]
        qi, si = quant(act)
        o = torch._scaled_grouped_mm(qi, w2, si, s2, offs=offs, out_dtype=torch.bfloat16)
        out.zero_()
        out.index_add_(0, token, o.float() * wsorted[:, None])
    nbytes = T * H * 2 + used * (3 * I * H + (2 * I + H) * 4) + T * H * 4
    return step, nbytes


def time_step(step, reps, dev):
    flush = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
    step()
    torch.cuda.synchronize()
    run, how = step, "eager"
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            step()
        run, how = g.replay, "graph"
    except Exception as e:  # noqa: BLE001 — report and fall back to eager launches
        print(f"# CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); eager launches", file=sys.stderr)
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.fill_(1)
        b, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        b.record()
        run()
        e.record()
        e.synchronize()
        times.append(b.elapsed_time(e))
    return statistics.median(times), min(times), how


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="all")
    ap.add_argument("--tokens", default="1,16,64,256,4096")
    ap.add_argument("--format", default="all")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--time-limit", type=float, default=1e9)
    ap.add_argument("--csv", action="store_true")
    o = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_torch_grouped.py: needs a CUDA device (torch.cuda.is_available() is False)")
    dev = torch.device("cuda")
    shapes = list(SHAPES) if o.shape == "all" else o.shape.split(",")
    fmts = ["bf16", "fp8"] if o.format == "all" else o.format.split(",")
    start = time.time()
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name()}; median/min ms of {o.reps} reps, L2 flushed")
    print("shape,format,T,median_ms,min_ms,TB/s,TFLOP/s,launch" if o.csv else
          f"{'shape':9} {'fmt':5} {'T':>5} {'median ms':>10} {'min ms':>8} {'TB/s':>6} {'TFLOP/s':>8}  launch")
    for name in shapes:
        H, I, E, K = SHAPES[name]
        for fmt in fmts:
            for T in [int(t) for t in o.tokens.split(",")]:
                if time.time() - start > o.time_limit:
                    print(f"# time limit ({o.time_limit:.0f} s) reached before {name} {fmt} T={T}")
                    return
                try:
                    step, nbytes = make_step(fmt, H, I, E, K, T, dev)
                    med, mn, how = time_step(step, o.reps, dev)
                except Exception as e:  # noqa: BLE001 — one row's failure is reported, the sweep goes on
                    print(f"# {name} {fmt} T={T}: {type(e).__name__}: {str(e)[:200]}")
                    torch.cuda.empty_cache()
                    continue
                flops = 2 * T * (K + 1) * (2 * I * H + H * I)
                tbs, tf = nbytes / (med * 1e-3) / 1e12, flops / (med * 1e-3) / 1e12
                if o.csv:
                    print(f"{name},{fmt},{T},{med:.4f},{mn:.4f},{tbs:.2f},{tf:.1f},{how}")
                else:
                    print(f"{name:9} {fmt:5} {T:>5} {med:>10.4f} {mn:>8.4f} {tbs:>6.2f} {tf:>8.1f}  {how}")
                del step
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
