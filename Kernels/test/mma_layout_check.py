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


# ---- AMD: the instruction, from the calculator's layout ------------------------------------
def mfma_32x32x8(areg, breg, creg):
    """A[i][k]: lane i + 32*(k//4), item k%4; B[k][j]: lane j + 32*(k//4), item k%4;
    D[i][j]: lane j + 32*((i//4)%2), register 4*(i//8) + i%4."""
    A = np.zeros((32, 8)); B = np.zeros((8, 32))
    for i in range(32):
        for k in range(8):
            A[i, k] = areg[i + 32 * (k // 4)][k % 4]
            B[k, i] = breg[i + 32 * (k // 4)][k % 4]
    P = A @ B
    out = [list(c) for c in creg]
    for i in range(32):
        for j in range(32):
            out[j + 32 * ((i // 4) % 2)][4 * (i // 8) + i % 4] += P[i, j]
    return out


def check_amd(As, Bs):
    acc = {(w, l): [0.0] * 16 for w in range(4) for l in range(64)}
    for step in range(4):
        for wave in range(4):
            regs = [amd_kernel_regs(wave, lane, step) for lane in range(64)]
            areg = [[As[r, k] for (r, k) in regs[l][0]] for l in range(64)]
            breg = [[Bs[c, k] for (c, k) in regs[l][1]] for l in range(64)]
            d = mfma_32x32x8(areg, breg, [acc[(wave, l)] for l in range(64)])
            for l in range(64):
                acc[(wave, l)] = d[l]
    C = np.full((BM, BN), np.nan); owners = np.zeros((BM, BN), int)
    for (wave, lane), v in acc.items():
        for r in range(16):
            i, j = amd_acc_coord(wave, lane, r)
            C[i, j] = v[r]; owners[i, j] += 1
    return C, owners


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
    # stage-1 pairing: tile column c < 64 is gate j = c, c >= 64 is up j = c - 64 (both read
    # from the shared fp32 tile in the epilogue, so no register pairing is assumed)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
