#!/usr/bin/env python3
"""mma_layout_check.py — host check of the matrix-core tile addressing in src/moe_kernels_mma.hip.

No GPU needed (numpy only). For each vendor it simulates one 256-thread workgroup executing
mma_k32 on a random 32x32 (A) and 128x32 (B) shared-memory tile:

  * every lane's operand registers are filled with the shared-memory addresses the KERNEL uses
    (transcribed from mma_k32 below: keep the two in step when either changes);
  * the instruction itself is modelled from the VENDOR's documented layout, written the other
    way round (which lane / register holds matrix element (row, k)), and computes D = A*B + C;
  * the accumulators are read back through the kernel's mma_acc_row / mma_acc_col.

It passes when the gathered tile equals A @ B^T exactly (small integers, exact in float64) and
every tile element is owned by exactly one (thread, accumulator). It checks the transcription
of the documented layouts into addresses, not the hardware: only a GPU run can do that.

Sources of the modelled layouts:
  NVIDIA: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type".
  AMD:    AMD Matrix Instruction Calculator, v_mfma_f32_32x32x8bf16_1k (CDNA2/3); the same
          numbers as composable_kernel's mfma_type<MfmaInstr::mfma_f32_32x32x8bf16_1k>.
  AMD fp8 (gfx94x): AMD Matrix Instruction Calculator, v_mfma_f32_32x32x16_fp8_fp8 (CDNA3);
          composable_kernel's mfma_type<MfmaInstr::mfma_f32_32x32x16f8f8> (k_per_blk 8,
          num_input_blks 2). The fp8 path also checks the LDS staging (byte placement of the
          converted activation codes and the raw weight codes) and moe_bf16_to_fnuz on all 256
          e4m3fnuz codes. The AMD code is compiled by hipcc (clang 15) and has never run: no AMD GPU.
"""
import numpy as np

BM, BN, KT = 32, 128, 32   # rows, columns, the K handled by one mma_k32 call


# ---- NVIDIA: kernel side (transcription of mma_k32 / mma_acc_row / mma_acc_col) ------------
def nv_kernel_regs(warp, lane, step):
    """(A addresses [4 regs][2 halves], B addresses per n-tile [4][2 regs][2 halves])."""
    g, tig = lane >> 2, lane & 3
    r0, c0 = 16 * (warp & 1) + g, 32 * (warp >> 1) + g
    kk = 16 * step + 2 * tig
    a = [[(r0, kk), (r0, kk + 1)], [(r0 + 8, kk), (r0 + 8, kk + 1)],
         [(r0, kk + 8), (r0, kk + 9)], [(r0 + 8, kk + 8), (r0 + 8, kk + 9)]]
    b = [[[(c0 + 8 * nt, kk), (c0 + 8 * nt, kk + 1)], [(c0 + 8 * nt, kk + 8), (c0 + 8 * nt, kk + 9)]]
         for nt in range(4)]
    return a, b


def nv_acc_coord(warp, lane, i):
    return (16 * (warp & 1) + (lane >> 2) + 8 * ((i & 3) >> 1),
            32 * (warp >> 1) + 8 * (i >> 2) + 2 * (lane & 3) + (i & 1))


# ---- NVIDIA: the instruction, from the PTX ISA formulas ------------------------------------
def ptx_mma_m16n8k16(areg, breg, creg):
    """areg[lane][i] = a_i (i = 0..7), breg[lane][i] = b_i (0..3), creg[lane][i] = c_i (0..3)."""
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); D = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(8):
            row = g if (i < 2 or 4 <= i < 6) else g + 8
            col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
            A[row, col] = areg[lane][i]
        for i in range(4):
            B[t * 2 + (i & 1) + (8 if i >= 2 else 0), g] = breg[lane][i]
    P = A @ B
    out = [[0.0] * 4 for _ in range(32)]
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(4):
            row = g if i < 2 else g + 8
            col = t * 2 + (i & 1)
            out[lane][i] = creg[lane][i] + P[row, col]
    return out


def check_nvidia(As, Bs):
    acc = {(w, l): [0.0] * 16 for w in range(8) for l in range(32)}
    for step in range(2):
        for warp in range(8):
            regs = [nv_kernel_regs(warp, lane, step) for lane in range(32)]
            areg = [[As[r, k] for pair in regs[l][0] for (r, k) in pair] for l in range(32)]
            for nt in range(4):
                breg = [[Bs[c, k] for pair in regs[l][1][nt] for (c, k) in pair] for l in range(32)]
                creg = [acc[(warp, l)][4 * nt:4 * nt + 4] for l in range(32)]
                d = ptx_mma_m16n8k16(areg, breg, creg)
                for l in range(32):
                    acc[(warp, l)][4 * nt:4 * nt + 4] = d[l]
    C = np.full((BM, BN), np.nan); owners = np.zeros((BM, BN), int)
    for (warp, lane), v in acc.items():
        for i in range(16):
            r, c = nv_acc_coord(warp, lane, i)
            C[r, c] = v[i]; owners[r, c] += 1
    return C, owners


# ---- AMD: kernel side (transcription) ------------------------------------------------------
def amd_kernel_regs(wave, lane, step):
    i, kq = lane & 31, 4 * (lane >> 5)
    kk = 8 * step
    a = [(i, kk + kq + j) for j in range(4)]
    b = [(32 * wave + i, kk + kq + j) for j in range(4)]
    return a, b


def amd_acc_coord(wave, lane, r):
    return 8 * (r >> 2) + 4 * (lane >> 5) + (r & 3), 32 * wave + (lane & 31)


# ---- AMD: the instructions, from the calculator's layouts ----------------------------------
def mfma_32x32(areg, breg, creg, per_lane):
    """v_mfma_f32_32x32x(2*per_lane): A[i][k] in lane i + 32*(k//per_lane), item k%per_lane;
    B[k][j] in lane j + 32*(k//per_lane), item k%per_lane; D[i][j] in lane j + 32*((i//4)%2),
    register 4*(i//8) + i%4. per_lane = 4: v_mfma_f32_32x32x8bf16_1k (4 bf16 per lane);
    per_lane = 8: v_mfma_f32_32x32x16_fp8_fp8 (8 fp8 bytes per lane), same D layout."""
    K = 2 * per_lane
    A = np.zeros((32, K)); B = np.zeros((K, 32))
    for i in range(32):
        for k in range(K):
            A[i, k] = areg[i + 32 * (k // per_lane)][k % per_lane]
            B[k, i] = breg[i + 32 * (k // per_lane)][k % per_lane]
    P = A @ B
    out = [list(c) for c in creg]
    for i in range(32):
        for j in range(32):
            out[j + 32 * ((i // 4) % 2)][4 * (i // 8) + i % 4] += P[i, j]
    return out


def mfma_32x32x8(areg, breg, creg):
    return mfma_32x32(areg, breg, creg, 4)


def mfma_32x32x16_fp8(areg, breg, creg):
    return mfma_32x32(areg, breg, creg, 8)


def run_amd_tile(As, Bs, steps, kernel_regs, instruction):
    """One workgroup (4 waves x 64 lanes) over `steps` MFMA K steps: the tile and how many
    accumulator registers own each element."""
    acc = {(w, l): [0.0] * 16 for w in range(4) for l in range(64)}
    for step in range(steps):
        for wave in range(4):
            regs = [kernel_regs(wave, lane, step) for lane in range(64)]
            areg = [[As[r, k] for (r, k) in regs[l][0]] for l in range(64)]
            breg = [[Bs[c, k] for (c, k) in regs[l][1]] for l in range(64)]
            d = instruction(areg, breg, [acc[(wave, l)] for l in range(64)])
            for l in range(64):
                acc[(wave, l)] = d[l]
    C = np.full((BM, BN), np.nan); owners = np.zeros((BM, BN), int)
    for (wave, lane), v in acc.items():
        for r in range(16):
            i, j = amd_acc_coord(wave, lane, r)
            C[i, j] = v[r]; owners[i, j] += 1
    return C, owners


def check_amd(As, Bs):
    return run_amd_tile(As, Bs, 4, amd_kernel_regs, mfma_32x32x8)


# ---- AMD gfx94x fp8 MFMA: kernel side (transcription of mma_k32_fp8) ------------------------
def amd_fp8_kernel_regs(wave, lane, step):
    i, kq = lane & 31, 8 * (lane >> 5)
    kk = 16 * step
    a = [(i, kk + kq + j) for j in range(8)]
    b = [(32 * wave + i, kk + kq + j) for j in range(8)]
    return a, b


def check_amd_fp8(As, Bs):
    return run_amd_tile(As, Bs, 2, amd_fp8_kernel_regs, mfma_32x32x16_fp8)


# e4m3fnuz: bias 8, 0x80 NaN, no inf, no -0 (ROCm HIP "FP8 numbers"); the kernel's moe_fp8_decode
def fnuz_value(c):
    if c == 0x80:
        return float("nan")
    s = -1.0 if c & 0x80 else 1.0
    e, m = (c >> 3) & 15, c & 7
    return s * (m * 2.0 ** -10 if e == 0 else (1 + m / 8) * 2.0 ** (e - 8))


def bf16_bits(v):
    b = int(np.array([v], dtype=np.float32).view(np.uint32)[0])
    assert b & 0xFFFF == 0, "not exact in bf16"
    return b >> 16


def bf16_to_fnuz(h):   # transcription of moe_bf16_to_fnuz
    sgn, e, m = (h >> 8) & 0x80, (h >> 7) & 0xFF, h & 0x7F
    if e > 134:
        return 0x80
    if e >= 120:
        return sgn | ((e - 119) << 3) | (m >> 4)
    if e >= 117:
        return sgn | (((0x80 | m) << (e - 117)) >> 7)
    return 0


def check_fnuz_conversion():
    bad = [c for c in range(256) if c != 0x80 and bf16_to_fnuz(bf16_bits(fnuz_value(c))) != c]
    ok = not bad and bf16_to_fnuz(0x8000) == 0 and bf16_to_fnuz(0x7FC0) == 0x80 \
        and bf16_to_fnuz(0x7F80) == 0x80 and bf16_to_fnuz(bf16_bits(256.0)) == 0x80
    print(f"amd fp8: moe_bf16_to_fnuz on the 255 finite e4m3fnuz codes (+-0 -> 0x00, NaN/inf -> 0x80): "
          f"{'ok' if ok else 'FAIL ' + str(bad[:8])}")
    return ok


def check_fp8_staging(rng):
    """mma_store_a_fnuz / mma_store_fp8_raw: chunk i of a thread -> LDS row/col (stride MMA_LDS8);
    every tile byte written once, with the code of (row, k)."""
    BK, LDS8, NT = 64, 72, 256
    ok = True
    for name, rows, per in (("A (8 bf16 -> 8 codes)", BM, 8), ("B (16 raw codes)", BN, 16)):
        codes = rng.integers(0, 256, size=(rows, BK))
        lds = np.full((rows, LDS8), -1); writes = np.zeros((rows, LDS8), int)
        CH = BK // per
        for it in range(rows * CH // NT):
            for t in range(NT):
                i = t + NT * it
                r, c = i // CH, (i % CH) * per       # the fetch's chunk: row, first k
                chunk = [int(codes[r, c + j]) for j in range(per)]
                # store: 8-byte pieces at S[i/CH][(i%CH)*per + 8*piece], byte j of piece = k offset j
                for piece in range(per // 8):
                    for j in range(8):
                        rr, cc = i // CH, (i % CH) * per + 8 * piece + j
                        lds[rr, cc] = chunk[8 * piece + j]; writes[rr, cc] += 1
        good = (writes[:, :BK] == 1).all() and (writes[:, BK:] == 0).all() and np.array_equal(lds[:, :BK], codes)
        print(f"amd fp8 staging {name}: {'ok' if good else 'FAIL'}")
        ok &= good
    return ok


# ---- NVIDIA gemm2 (moe_gemm2_kernel): cp.async chunks, ldmatrix.x4 fragments, stage-1 -------
# interleaving, K-step order, 64-row pairing. Transcribed from the kernel; ldmatrix modelled from
# the PTX ISA ("ldmatrix"): lane l gives the address of row l%8 of matrix l//8 (8 contiguous b16),
# register i of lane t receives row t//4, elements 2*(t%4), 2*(t%4)+1 of matrix i.
G2_BK, G2_LDS = 64, 72
G2_CFGS = {  # name: (BM, BN, WM, WN, threads)
    "prefill 64x128": (64, 128, 32, 32, 256),
    "medium 32x128": (32, 128, 16, 32, 256),
    "decode 32x32": (32, 32, 16, 16, 128),
}


def ldmatrix_x4(smem, addrs):
    """smem: flat array of b16; addrs[lane] = element offset of the row that lane supplies."""
    mats = [[smem[addrs[8 * i + r]:addrs[8 * i + r] + 8] for r in range(8)] for i in range(4)]
    return [[(mats[i][t // 4][2 * (t % 4)], mats[i][t // 4][2 * (t % 4) + 1]) for i in range(4)] for t in range(32)]


def g2_check_tile(name, BM, BN, WM, WN, NT, rng):
    WARPS_N = BN // WN
    FM, FN = WM // 16, WN // 8
    Ag = rng.integers(-8, 9, size=(BM, G2_BK)).astype(float)
    Bg = rng.integers(-8, 9, size=(BN, G2_BK)).astype(float)
    # cp.async placement (bf16): chunk idx -> row idx>>3, 8 elements at 8*(idx&7), smem row stride G2_LDS
    sA = np.full(BM * G2_LDS, np.nan); sB = np.full(BN * G2_LDS, np.nan)
    cntA = np.zeros((BM, G2_BK), int); cntB = np.zeros((BN, G2_BK), int)
    for tid in range(NT):
        for i in range(BM * 8 // NT):
            idx = tid + NT * i; r, c = idx >> 3, idx & 7
            sA[r * G2_LDS + 8 * c:r * G2_LDS + 8 * c + 8] = Ag[r, 8 * c:8 * c + 8]; cntA[r, 8 * c:8 * c + 8] += 1
        for i in range(BN * 8 // NT):
            idx = tid + NT * i; r, c = idx >> 3, idx & 7
            sB[r * G2_LDS + 8 * c:r * G2_LDS + 8 * c + 8] = Bg[r, 8 * c:8 * c + 8]; cntB[r, 8 * c:8 * c + 8] += 1
    # fp8 path: raw chunk idx -> row idx>>2, 16 codes at 16*(idx&3); decoded into the same place
    cnt8 = np.zeros((BN, G2_BK), int)
    for tid in range(NT):
        for i in range(BN * 4 // NT):
            idx = tid + NT * i; r, c = idx >> 2, idx & 3
            cnt8[r, 16 * c:16 * c + 16] += 1
    ok = (cntA == 1).all() and (cntB == 1).all() and (cnt8 == 1).all()
    acc = {}
    for warp in range(NT // 32):
        wm, wn = warp // WARPS_N, warp % WARPS_N
        a_ = [[[0.0] * 4 for _ in range(FN)] for _ in range(FM)]
        accw = [[[[0.0] * 4 for _ in range(FN)] for _ in range(FM)] for _ in range(32)]
        for kk in range(G2_BK // 16):
            k16 = 16 * kk
            af = []
            for fm in range(FM):
                addrs = [(wm * WM + fm * 16 + (l & 7) + 8 * ((l >> 3) & 1)) * G2_LDS + k16 + 8 * (l >> 4) for l in range(32)]
                regs = ldmatrix_x4(sA, addrs)   # regs[lane][i] = (lo, hi)
                af.append([[x for i in range(4) for x in regs[l][i]] for l in range(32)])  # a0..a7
            bf = [None] * FN
            for fp in range(FN // 2):
                addrs = [(wn * WN + fp * 16 + (l & 7) + 8 * (l >> 4)) * G2_LDS + k16 + 8 * ((l >> 3) & 1) for l in range(32)]
                regs = ldmatrix_x4(sB, addrs)
                bf[2 * fp] = [[*regs[l][0], *regs[l][1]] for l in range(32)]       # b0..b3
                bf[2 * fp + 1] = [[*regs[l][2], *regs[l][3]] for l in range(32)]
            for fm in range(FM):
                for fn in range(FN):
                    creg = [accw[l][fm][fn] for l in range(32)]
                    d = ptx_mma_m16n8k16(af[fm], bf[fn], creg)
                    for l in range(32):
                        accw[l][fm][fn] = d[l]
        for l in range(32):
            acc[(warp, l)] = accw[l]
    C = np.full((BM, BN), np.nan); owners = np.zeros((BM, BN), int)
    for (warp, l), v in acc.items():
        wm, wn = warp // WARPS_N, warp % WARPS_N
        g, tig = l >> 2, l & 3
        for fm in range(FM):
            for fn in range(FN):
                for q in range(4):
                    r = wm * WM + fm * 16 + g + 8 * (q >> 1)
                    c = wn * WN + fn * 8 + 2 * tig + (q & 1)
                    C[r, c] = v[fm][fn][q]; owners[r, c] += 1
    good = ok and (owners == 1).all() and np.array_equal(C, Ag @ Bg.T)
    print(f"nvidia gemm2 {name}: cp.async chunks cover A/B/fp8 once: {ok}; ldmatrix+mma tile == A @ B^T: "
          f"{np.array_equal(C, Ag @ Bg.T)}, owners min {owners.min()} max {owners.max()}: {'ok' if good else 'FAIL'}")
    return good


def g2_brow(BN, stage1, nt, c, N):
    if stage1:
        F = c >> 3
        j = nt * (BN // 2) + (F >> 1) * 8 + (c & 7)
        if j >= N: return -1
        return N + j if F & 1 else j
    n = nt * BN + c
    return n if n < N else -1


def g2_check_stage1_pairing(name, BN, WN, NT, N):
    """every gate row j and up row N+j land in one tile, and the epilogue's (fn, fn+1, q) of a
    thread are gate j and up j with j = nt*(BN/2) + (F>>1)*8 + 2*tig + (q&1)."""
    WARPS_N = BN // WN; FN = WN // 8
    seen = {}
    ok = True
    ntiles = (N + BN // 2 - 1) // (BN // 2)
    for nt in range(ntiles):
        for warp_n in range(WARPS_N):
            for l in range(4):  # lanes g = 0 (the other g hold other rows of the same columns)
                tig = l & 3
                for fn in range(0, FN, 2):
                    F = (warp_n * WN) // 8 + fn
                    for cc in range(2):
                        j = nt * (BN // 2) + (F >> 1) * 8 + 2 * tig + cc
                        cg = warp_n * WN + fn * 8 + 2 * tig + cc          # gate accumulator column
                        cu = warp_n * WN + (fn + 1) * 8 + 2 * tig + cc    # up accumulator column
                        rg, ru = g2_brow(BN, True, nt, cg, N), g2_brow(BN, True, nt, cu, N)
                        if j < N:
                            ok &= rg == j and ru == N + j
                            seen[j] = seen.get(j, 0) + 1
                        else:
                            ok &= rg == -1 and ru == -1
    ok &= sorted(seen) == list(range(N)) and all(v == 1 for v in seen.values())
    print(f"nvidia gemm2 {name} stage-1 gate/up interleave, N={N}: {'ok' if ok else 'FAIL'}")
    return ok


def old_order(nKB, K, kb_begin, kb_end, rev):
    """(k0, promote-after) sequence of moe_mma_gemm_kernel's q loop, skipped stages removed"""
    out = []
    nq = (kb_end - kb_begin) * 2
    for q in range(nq):
        kbi = q // 2
        kb = kb_end - 1 - kbi if rev else kb_begin + kbi
        sub = q % 2
        k0 = kb * 128 + (1 - sub if rev else sub) * 64
        if k0 < K:
            out.append([k0, False])
        if sub == 1 and out:
            out[-1][1] = True
    return [tuple(x) for x in out]


def new_order(nKB, K, kb_begin, kb_end, rev):
    skip_last = kb_end == nKB and (nKB - 1) * 128 + 64 >= K
    nsteps = (kb_end - kb_begin) * 2 - (1 if skip_last else 0)
    out = []
    for s in range(nsteps):
        if not rev:
            kb = kb_begin + s // 2; sub = s % 2
            first = sub == 0; last = sub == 1 or (skip_last and kb == nKB - 1)
        else:
            s2 = s + (1 if skip_last else 0)
            kb = kb_end - 1 - s2 // 2; pos = s2 % 2; sub = 1 - pos
            first = pos == 0 or (skip_last and kb == nKB - 1); last = pos == 1
        out.append((kb * 128 + sub * 64, last, first, kb))
    return out


def g2_check_order():
    ok = True
    for K in list(range(16, 700, 16)) + [4096, 4096 + 16]:
        nKB = (K + 127) // 128
        for split in range(1, nKB + 1):
            for z in range(split):
                b, e = z * nKB // split, (z + 1) * nKB // split
                for rev in (False, True):
                    o, n = old_order(nKB, K, b, e, rev), new_order(nKB, K, b, e, rev)
                    ok &= o == [(k0, last) for (k0, last, _, _) in n]
                    # first/last bracket each 128-K block exactly once; every k0 < K
                    kbs = [kb for (_, _, _, kb) in n]
                    ok &= all(k0 < K for (k0, _, _, _) in n)
                    ok &= sum(f for (_, _, f, _) in n) == e - b and sum(l for (_, l, _, _) in n) == e - b
                    ok &= sorted(set(kbs)) == list(range(b, e))
    print(f"nvidia gemm2 K-step order == moe_mma_gemm_kernel (K 16..4112, every split, reverse): {'ok' if ok else 'FAIL'}")
    return ok


def g2_first_of_run(be, blk):
    """the kernel's 32-lane search: first index of be[blk] in the ascending prefix be[0..blk]"""
    e = be[blk]; lo, hi = 0, blk
    while lo < hi:
        span = hi - lo
        pos = [lo + (span * lane) // 32 for lane in range(32)]
        lt = [be[p] < e for p in pos]
        L = sum(lt)
        assert lt == [True] * L + [False] * (32 - L)
        if L == 0: break
        last = lo + (span * (L - 1)) // 32
        if L < 32: hi = lo + (span * L) // 32
        lo = last + 1
    return lo


def g2_check_pairing(rng):
    ok = True
    for trial in range(300):
        E1 = int(rng.integers(1, 600))
        counts = rng.integers(0, 400 if trial % 3 else 40, size=E1)
        nb = [(c + 31) // 32 for c in counts]
        be = [e for e in range(E1) for _ in range(nb[e])]
        if not be: continue
        covered = [0] * len(be)
        for blk in range(len(be)):
            f = g2_first_of_run(be, blk)
            ok &= f == be.index(be[blk])
            if (blk - f) % 2 == 0:
                covered[blk] += 1
                if blk + 1 < len(be) and be[blk + 1] == be[blk]: covered[blk + 1] += 1
        ok &= all(c == 1 for c in covered)
    print(f"nvidia gemm2 64-row pairing (32-way search, every block covered once, 300 random alignments): {'ok' if ok else 'FAIL'}")
    return ok


def check_gemm2():
    rng = np.random.default_rng(90)
    ok = True
    for name, (BM, BN, WM, WN, NT) in G2_CFGS.items():
        ok &= g2_check_tile(name, BM, BN, WM, WN, NT, rng)
        for N in (32, 96, 128, 136, 512):
            ok &= g2_check_stage1_pairing(name, BN, WN, NT, N)
    ok &= g2_check_order()
    ok &= g2_check_pairing(rng)
    return ok


def main():
    rng = np.random.default_rng(13)
    As = rng.integers(-8, 9, size=(BM, KT)).astype(float)
    Bs = rng.integers(-8, 9, size=(BN, KT)).astype(float)
    ref = As @ Bs.T
    ok = True
    for name, fn in (("nvidia mma.sync m16n8k16", check_nvidia), ("amd mfma 32x32x8 bf16_1k", check_amd)):
        C, owners = fn(As, Bs)
        good = (owners == 1).all() and np.array_equal(C, ref)
        ok &= good
        print(f"{name}: tile {'==' if np.array_equal(C, ref) else '!='} A @ B^T, "
              f"owners per element min {owners.min()} max {owners.max()}: {'ok' if good else 'FAIL'}")
    # gfx94x fp8 MFMA on the same tile, with the values of e4m3fnuz codes (exact products)
    fv = np.array([fnuz_value(c) for c in range(256)])
    Ac = rng.integers(0, 256, size=(BM, KT)); Ac[Ac == 0x80] = 0
    Bc = rng.integers(0, 256, size=(BN, KT)); Bc[Bc == 0x80] = 0
    Af, Bf = fv[Ac], fv[Bc]
    C, owners = check_amd_fp8(Af, Bf)
    good = (owners == 1).all() and np.array_equal(C, Af @ Bf.T)
    ok &= good
    print(f"amd mfma 32x32x16 fp8_fp8 (gfx94x): tile {'==' if np.array_equal(C, Af @ Bf.T) else '!='} A @ B^T, "
          f"owners per element min {owners.min()} max {owners.max()}: {'ok' if good else 'FAIL'}")
    ok &= check_fnuz_conversion()
    ok &= check_fp8_staging(rng)
    # stage-1 pairing: tile column c < 64 is gate j = c, c >= 64 is up j = c - 64 (both read
    # from the shared fp32 tile in the epilogue, so no register pairing is assumed)
    ok &= check_gemm2()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
