import CFastGEMM
import Foundation
import LowPrecision
import MoEReference
import Testing
import TensorIO
import MoECheckTestSupport

/// The float32 mode's fused bf16-weight GEMM (CFastGEMM): each code path this CPU has, against a
/// float64 dot product with the float32 accumulation bound γ_k·Σ|x||w|; every tail of m, n and k;
/// weights at odd addresses; padding columns of W and C never touched; NaN/Inf weights reported.
@Suite("Fused bf16-weight GEMM (CFastGEMM)")
struct FastGEMMTests {
    @Test("OpenBLAS fallen back to a pre-AVX2 family on an AVX2+FMA CPU is upgraded to Haswell; nothing else is")
    func openBLASCoreUpgrade() {
        let avx2 = Int32(MC_PATH_AVX2), avx512 = Int32(MC_PATH_AVX512)
        #expect(BLAS.upgradedCore(current: "Prescott", cpuPath: avx512) == "Haswell")
        #expect(BLAS.upgradedCore(current: "Nehalem", cpuPath: avx2) == "Haswell")
        #expect(BLAS.upgradedCore(current: "Prescott", cpuPath: 0) == nil, "no AVX2: the fallback is right")
        for good in ["Haswell", "Zen", "SkylakeX", "CooperLake", "SapphireRapids"] {
            #expect(BLAS.upgradedCore(current: good, cpuPath: avx512) == nil, "\(good)")
        }
        #expect(!BLAS.coreName.isEmpty)
    }

    static let best = mc_gemm_best_path()
    /// The paths to test: those this CPU runs (a path it lacks is checked to be refused with -1
    /// in `degenerate`, and has no argument in the parameterized tests).
    static let paths: [Int32] = [MC_PATH_AVX2, MC_PATH_AVX512].map { Int32($0) }.filter { $0 <= best }

    struct Problem {
        var m: Int, n: Int, k: Int, ldw: Int, ldc: Int, offset: Int
    }

    /// Random x in [-1, 1) and bf16 weights over several binades (no NaN/Inf) in a byte buffer
    /// starting `offset` bytes in; columns k..<ldw of W hold NaN (must not be read).
    static func make(_ p: Problem, seed: UInt64) -> (x: [Float], bytes: [UInt8], w: [[Float]]) {
        var rng = SeededGenerator(seed: seed)
        let x = (0..<(p.m * p.k)).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 }
        var bytes = [UInt8](repeating: 0xAA, count: p.offset + 2 * p.n * p.ldw + 8)
        var w = [[Float]](repeating: [], count: p.n)
        for j in 0..<p.n {
            for q in 0..<p.ldw {
                let bits: UInt16
                if q < p.k {
                    let v = Float(Int(rng.next() % 2001) - 1000) / 1000 * Float(sign: .plus, exponent: Int(rng.next() % 9) - 4, significand: 1)
                    bits = BFloat16.bits(Double(v))
                    w[j].append(Float(bitPattern: UInt32(bits) << 16))
                } else {
                    bits = 0x7FC1   // NaN in the padding columns
                }
                bytes[p.offset + 2 * (j * p.ldw + q)] = UInt8(bits & 0xFF)
                bytes[p.offset + 2 * (j * p.ldw + q) + 1] = UInt8(bits >> 8)
            }
        }
        return (x, bytes, w)
    }

    static func run(_ p: Problem, _ x: [Float], _ bytes: [UInt8], path: Int32, c: inout [Float]) -> Int32 {
        x.withUnsafeBufferPointer { xp in bytes.withUnsafeBytes { wb in c.withUnsafeMutableBufferPointer { cp in
            mc_gemm_xwt_bf16(xp.baseAddress ?? UnsafePointer(bitPattern: 8)!, p.m, p.k, wb.baseAddress! + p.offset, p.ldw, p.n,
                             cp.baseAddress!, p.ldc, path)
        } } }
    }

    static let problems: [Problem] = {
        var out: [Problem] = []
        let ks = [1, 7, 8, 9, 15, 16, 17, 31, 33, 128, 200, 2051]
        for (i, k) in ks.enumerated() {
            for m in [1, 2, 3, 4, 5, 9] {
                let n = [1, 2, 3, 4, 5, 7, 8, 13][(i + m) % 8]
                out.append(Problem(m: m, n: n, k: k, ldw: k + (m % 3), ldc: n + (k % 2) * 3, offset: (i + m) % 2 == 0 ? 0 : 1))
            }
        }
        return out
    }()

    @Test("every tail of m, n, k; odd weight addresses; within the float32 dot-product bound", arguments: paths)
    func accuracy(_ path: Int32) {
        var failures: [String] = []
        for (pi, p) in Self.problems.enumerated() {
            let (x, bytes, w) = Self.make(p, seed: UInt64(pi) &* 7919 &+ 17)
            let sentinel: Float = -12345.5
            var c = [Float](repeating: sentinel, count: p.m * p.ldc)
            let status = Self.run(p, x, bytes, path: path, c: &c)
            guard status == 1 else { failures.append("\(p): status \(status)"); continue }
            let gamma = Double(p.k) * 0x1p-24 / (1 - Double(p.k) * 0x1p-24)
            for i in 0..<p.m {
                for j in 0..<p.ldc {
                    let got = c[i * p.ldc + j]
                    if j >= p.n {
                        if got != sentinel { failures.append("\(p): C[\(i), \(j)] past n was written") }
                        continue
                    }
                    var exact = 0.0, mag = 0.0
                    for q in 0..<p.k { exact += Double(x[i * p.k + q]) * Double(w[j][q]); mag += Swift.abs(Double(x[i * p.k + q]) * Double(w[j][q])) }
                    let err = Swift.abs(Double(got) - exact)
                    if !(err <= gamma * mag * 1.0001 + 1e-38) {
                        failures.append("\(p): C[\(i), \(j)] = \(got), exact \(exact), error \(err) > bound \(gamma * mag)")
                    }
                }
            }
            if failures.count > 5 { break }
        }
        #expect(failures.isEmpty, "path \(path): \(failures.count) failure(s): \(failures.prefix(5))")
    }

    @Test("a NaN or Inf weight inside the first k columns is reported (status 0); padding columns are not read", arguments: paths)
    func nonFinite(_ path: Int32) {
        let p = Problem(m: 3, n: 6, k: 37, ldw: 40, ldc: 6, offset: 1)
        let (x, clean, _) = Self.make(p, seed: 5)
        var c = [Float](repeating: 0, count: p.m * p.ldc)
        #expect(Self.run(p, x, clean, path: path, c: &c) == 1, "path \(path): NaN padding columns were read")
        var missed: [String] = []
        for (j, q, bits) in [(0, 0, UInt16(0x7F80)), (5, 36, 0xFF80), (2, 16, 0x7FC0), (3, 31, 0xFFFF), (4, 17, 0x7F81)] {
            var bytes = clean
            bytes[p.offset + 2 * (j * p.ldw + q)] = UInt8(bits & 0xFF)
            bytes[p.offset + 2 * (j * p.ldw + q) + 1] = UInt8(bits >> 8)
            if Self.run(p, x, bytes, path: path, c: &c) != 0 { missed.append("row \(j) column \(q) = 0x\(String(bits, radix: 16))") }
        }
        #expect(missed.isEmpty, "path \(path): non-finite weights not reported: \(missed)")
    }

    @Test("degenerate sizes: k = 0 writes zeros, m = 0 or n = 0 writes nothing; unavailable paths are refused")
    func degenerate() {
        var c = [Float](repeating: 7, count: 6)
        let w: [UInt8] = [0, 0]
        let x: [Float] = [1]
        let path = Int32(Self.best)
        if path != 0 {
            let zeroK = x.withUnsafeBufferPointer { xp in w.withUnsafeBytes { wb in c.withUnsafeMutableBufferPointer { cp in
                mc_gemm_xwt_bf16(xp.baseAddress!, 2, 0, wb.baseAddress!, 0, 3, cp.baseAddress!, 3, path)
            } } }
            #expect(zeroK == 1 && c == [0, 0, 0, 0, 0, 0], "k = 0: status \(zeroK), C \(c)")
            c = [Float](repeating: 7, count: 6)
            let empty = x.withUnsafeBufferPointer { xp in w.withUnsafeBytes { wb in c.withUnsafeMutableBufferPointer { cp in
                mc_gemm_xwt_bf16(xp.baseAddress!, 0, 1, wb.baseAddress!, 1, 3, cp.baseAddress!, 3, path)
            } } }
            #expect(empty == 1 && c.allSatisfy { $0 == 7 }, "m = 0: status \(empty), C \(c)")
        }
        // a path the CPU lacks (or none) is refused
        for missing in [Int32(MC_PATH_AVX2), Int32(MC_PATH_AVX512)] where missing > Self.best {
            let s = x.withUnsafeBufferPointer { xp in w.withUnsafeBytes { wb in c.withUnsafeMutableBufferPointer { cp in
                mc_gemm_xwt_bf16(xp.baseAddress!, 1, 1, wb.baseAddress!, 1, 1, cp.baseAddress!, 1, missing)
            } } }
            #expect(s == -1, "path \(missing) is not on this CPU but returned \(s)")
        }
        #expect(Self.best == 0 || !Self.paths.isEmpty)
    }

    // MARK: through the reference

    @Test("float32 mode on bf16 case files (both layouts): fused GEMM and decode + sgemm both inside the oracle's bound",
          .enabled(if: FastGEMM.path != 0, "skipped: this CPU has neither AVX2 nor AVX-512, so the float32 mode uses decode + sgemm only (covered by the property tests)"))
    func referenceFusedPath() throws {
        var checked = 0
        for (i, spec) in testSpecs(10, seed: 97, formats: [.bf16]).enumerated() {
            let layer = try SyntheticLayer(spec)
            let layout: ExpertLayout = i % 2 == 0 ? .combined : .perExpert
            let path = scratchFile("fused-\(i).safetensors")
            defer { try? FileManager.default.removeItem(atPath: path) }
            try layer.writeCaseFile(to: path, layout: layout)
            let file = try MoECaseFile(path: path)
            #expect(file.rawBF16(expert: 0, .up) != nil, "\(path): bf16 case file gives no raw weights")
            let x = try file.inputs(), T = spec.tokens
            let oracle = try runReference(file, x, tokens: T, recipe: .fusedBF16)
            for fused in [true, false] {
                let fast = try runReference(file, x, tokens: T, recipe: .fusedBF16,
                                            options: ReferenceOptions(computeBounds: false, float32: true, fusedBF16GEMM: fused))
                #expect(fast.topkIds == oracle.topkIds, "\(label(spec, .fusedBF16)) \(layout), fused \(fused): routes differently")
                let check = checkBound(fast.output, oracle)
                #expect(check.violations == 0, "\(label(spec, .fusedBF16)) \(layout), fused GEMM \(fused) (\(FastGEMM.name)): outside the oracle bound: \(check)")
            }
            checked += 1
        }
        #expect(checked == 10)
    }

    @Test("a NaN bf16 weight stops the fused float32 run with the tensor and element named",
          .enabled(if: FastGEMM.path != 0, "skipped: this CPU has neither AVX2 nor AVX-512, so there is no fused path"))
    func referenceNaNWeight() throws {
        let spec = testSpecs(1, seed: 98, formats: [.bf16])[0]
        let layer = try SyntheticLayer(spec)
        let clean = scratchFile("nan-clean.safetensors"), dirty = scratchFile("nan.safetensors")
        defer { try? FileManager.default.removeItem(atPath: clean); try? FileManager.default.removeItem(atPath: dirty) }
        try layer.writeCaseFile(to: clean, layout: .perExpert)
        // poison every expert's up_proj (which experts a token routes to is the router's choice)
        let file = try SafetensorsFile(path: clean)
        var tensors: [(String, Tensor)] = []
        for name in file.names {
            var t = try file.tensor(name)
            if name.hasSuffix("up_proj.weight") {
                var bits = t.bits(as: UInt16.self)
                bits[1 * t.shape[1] + 2] = 0x7FC0   // row 1, column 2
                t = Tensor(bits: bits, shape: t.shape, dtype: .bf16)
            }
            tensors.append((name, t))
        }
        try SafetensorsWriter.write(tensors, metadata: file.metadata, to: dirty)
        let bad = try MoECaseFile(path: dirty)
        do {
            _ = try runReference(bad, try bad.inputs(), tokens: spec.tokens, recipe: .fusedBF16,
                                 options: ReferenceOptions(computeBounds: false, float32: true))
            Issue.record("\(dirty): NaN weights accepted by the fused float32 run")
        } catch {
            let text = "\(error)"
            #expect(text.contains("up_proj.weight") && text.contains("non-finite weight nan") && text.contains("row 1, column 2"),
                    "\(dirty): error does not name the tensor and element: \(text)")
        }
    }
}
