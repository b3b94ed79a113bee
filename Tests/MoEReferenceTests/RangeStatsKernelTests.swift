import CFastGEMM
import Foundation
import MoEReference
import Testing
import MoECheckTestSupport

/// The packed range-statistics kernels (CFastGEMM `mc_range_stats_packed`, every path this CPU
/// has) and the weight preparation that feeds them (`mc_prepare_weights_*`): the same bits as the
/// scalar index-order loop they replace, for every tail of m, n (panels of 8, pairs of panels) and
/// k (blocks of 32), with signed zeros, cancellation and a spread of magnitudes.
@Suite("Range statistics kernels (CFastGEMM)")
struct RangeStatsKernelTests {
    /// The definition as the scalar loop computed it before the packed kernels: per dot product,
    /// float32, index order (term, prefix sum, block partial; max/min as comparisons; block
    /// partials into the positive or negative sum in block order).
    static func scalar(_ a: [Float], m: Int, k: Int, _ b: [Float], n: Int, block: Int) -> (range: [Float], split: [Float]) {
        var range = [Float](repeating: 0, count: m * n), split = [Float](repeating: 0, count: m * n)
        for i in 0..<m {
            for j in 0..<n {
                var s: Float = 0, hi: Float = 0, lo: Float = 0, pos: Float = 0, neg: Float = 0
                var q0 = 0
                while q0 < k {
                    let q1 = Swift.min(q0 + block, k)
                    var bp: Float = 0
                    for q in q0..<q1 {
                        let t = a[i * k + q] * b[j * k + q]
                        let v = s + t
                        s = v
                        bp = bp + t
                        hi = v > hi ? v : hi
                        lo = v < lo ? v : lo
                    }
                    pos = pos + (bp > 0 ? bp : 0)
                    neg = neg + (bp < 0 ? -bp : 0)
                    q0 = q1
                }
                range[i * n + j] = hi - lo
                split[i * n + j] = pos > neg ? pos : neg
            }
        }
        return (range, split)
    }

    /// Random values over 2⁻²⁰…2²⁰ with both signs, exact zeros and negative zeros, and runs of
    /// equal magnitude and alternating sign (prefix sums that return to zero).
    static func values(_ count: Int, _ rng: inout SeededGenerator) -> [Float] {
        (0..<count).map { q in
            switch rng.next() % 8 {
            case 0: return 0
            case 1: return -0.0
            case 2: return q % 2 == 0 ? 0.375 : -0.375
            default:
                let mantissa = Float(Int(rng.next() % 2001) - 1000) / 1000
                return mantissa * Float(sign: .plus, exponent: Int(rng.next() % 41) - 20, significand: 1)
            }
        }
    }

    static let paths: [StatisticalModel.RangeStatsPath] = StatisticalModel.RangeStatsPath.allCases

    static func same(_ x: [Float], _ y: [Float]) -> Bool { x.map(\.bitPattern) == y.map(\.bitPattern) }

    @Test("every path equals the scalar loop, bit for bit", arguments: [1, 2, 3, 5, 9])
    func pathsEqualScalar(m: Int) {
        var rng = SeededGenerator(seed: UInt64(100 + m))
        for n in [1, 7, 8, 9, 15, 16, 17, 24, 33] {
            for k in [1, 2, 31, 32, 33, 64, 65, 300] {
                let a = Self.values(m * k, &rng), b = Self.values(n * k, &rng)
                let want = Self.scalar(a, m: m, k: k, b, n: n, block: StatisticalModel.accumulationBlock)
                var packed = [Float](repeating: .nan, count: StatisticalModel.packedCount(rows: n, columns: k))
                b.withUnsafeBufferPointer { bp in packed.withUnsafeMutableBufferPointer { pp in
                    mc_prepare_weights_f32(bp.baseAddress!, n, k, nil, nil, nil, pp.baseAddress!, nil)
                } }
                for path in Self.paths {
                    // outputs in a wider matrix (ldc > n): the columns past n are not written
                    let ldc = n + 3
                    var range = [Float](repeating: .nan, count: m * ldc), split = [Float](repeating: .nan, count: m * ldc)
                    let ok = a.withUnsafeBufferPointer { ap in packed.withUnsafeBufferPointer { pp in
                        range.withUnsafeMutableBufferPointer { rp in split.withUnsafeMutableBufferPointer { sp in
                            StatisticalModel.rangeStats(ap.baseAddress!, lda: k, m: m, k: k, packed: pp.baseAddress!, n: n,
                                                        range: rp.baseAddress!, split: sp.baseAddress!, ldc: ldc, path: path)
                        } } } }
                    if path == .avx2 && !ok { continue }   // not on this CPU
                    #expect(ok, "path \(path) refused")
                    let r = (0..<m).flatMap { i in range[(i * ldc)..<(i * ldc + n)] }, s = (0..<m).flatMap { i in split[(i * ldc)..<(i * ldc + n)] }
                    #expect(Self.same(r, want.range) && Self.same(s, want.split), "path \(path), m=\(m) n=\(n) k=\(k)")
                    #expect((0..<m).allSatisfy { i in (n..<ldc).allSatisfy { range[i * ldc + $0].isNaN && split[i * ldc + $0].isNaN } },
                            "path \(path) wrote past column n (m=\(m) n=\(n) k=\(k))")
                }
                // the unpacked entry point and the row-parallel one
                let direct = StatisticalModel.rangeStats(a, m: m, k: k, b, n: n)
                let parallel = StatisticalModel.rangeStats(a, m: m, k: k, packed: packed, n: n, parallel: true)
                #expect(Self.same(direct.range, want.range) && Self.same(direct.split, want.split), "unpacked, m=\(m) n=\(n) k=\(k)")
                #expect(Self.same(parallel.range, want.range) && Self.same(parallel.split, want.split), "parallel, m=\(m) n=\(n) k=\(k)")
            }
        }
    }

    @Test("the weight preparation: |Float(W)|, Float(W), Float(W²), the packing and the column norms in row order")
    func weightPreparation() {
        var rng = SeededGenerator(seed: 7)
        for (n, k) in [(1, 1), (3, 5), (8, 8), (9, 31), (17, 40)] {
            let w64 = (0..<(n * k)).map { _ in Double(Int(rng.next() % 20001) - 10000) / 3000 * 1.000_000_1 }   // not exact in float32
            let w32 = w64.map { Float($0) }
            for wide in [true, false] {
                var absolute = [Float](repeating: .nan, count: n * k), values = absolute, square = absolute
                var packed = [Float](repeating: .nan, count: StatisticalModel.packedCount(rows: n, columns: k))
                var norms = [Double](repeating: .nan, count: k)
                absolute.withUnsafeMutableBufferPointer { ap in values.withUnsafeMutableBufferPointer { vp in square.withUnsafeMutableBufferPointer { sp in
                    packed.withUnsafeMutableBufferPointer { pp in norms.withUnsafeMutableBufferPointer { np in
                        if wide {
                            w64.withUnsafeBufferPointer { mc_prepare_weights_f64($0.baseAddress!, n, k, ap.baseAddress!, vp.baseAddress!, sp.baseAddress!, pp.baseAddress!, np.baseAddress!) }
                        } else {
                            w32.withUnsafeBufferPointer { mc_prepare_weights_f32($0.baseAddress!, n, k, ap.baseAddress!, vp.baseAddress!, sp.baseAddress!, pp.baseAddress!, np.baseAddress!) }
                        }
                    } }
                } } }
                var wantNorms = [Double](repeating: 0, count: k)
                for j in 0..<n { for q in 0..<k { let v = wide ? w64[j * k + q] : Double(w32[j * k + q]); wantNorms[q] += v * v } }
                #expect(Self.same(absolute, w64.map { Float(Swift.abs($0)) }), "absolute n=\(n) k=\(k) wide=\(wide)")
                #expect(Self.same(values, w32), "values n=\(n) k=\(k) wide=\(wide)")
                #expect(Self.same(square, wide ? w64.map { Float($0 * $0) } : w32.map { $0 * $0 }), "square n=\(n) k=\(k) wide=\(wide)")
                #expect(norms.map(\.bitPattern) == wantNorms.map(\.bitPattern), "column norms n=\(n) k=\(k) wide=\(wide)")
                let panels = (n + 7) / 8
                var wantPacked = [Float](repeating: 0, count: panels * k * 8)
                for j in 0..<n { for q in 0..<k { wantPacked[((j / 8) * k + q) * 8 + j % 8] = w32[j * k + q] } }
                #expect(Self.same(packed, wantPacked), "packed n=\(n) k=\(k) wide=\(wide)")
            }
        }
    }
}

@Suite("Accumulation sigma, vectorized")
struct AccumulationVarianceTests {
    @Test("AccumulationSigma.variances equals the square of the scalar sigma, bit for bit")
    func vectorEqualsScalar() {
        var rng = SeededGenerator(seed: 21)
        let count = 1003
        var absSum = (0..<count).map { _ in Double(rng.next() % 1_000_000) / 997 * Double(sign: .plus, exponent: Int(rng.next() % 60) - 30, significand: 1) }
        absSum[3] = .infinity; absSum[4] = 0; absSum[5] = .nan; absSum[6] = .greatestFiniteMagnitude
        let range = (0..<count).map { i in Float(absSum[i].isFinite ? absSum[i] : 1) * Float(rng.next() % 1000) / 1000 }
        let split = (0..<count).map { i in Float(absSum[i].isFinite ? absSum[i] : 1) * Float(rng.next() % 1000) / 1000 }
        for order in AccumulationOrder.allCases {
            for (terms, length) in [(132, 128), (4172, 4096), (1, 1), (40, 33)] {
                let sigma = StatisticalModel.AccumulationSigma(terms: terms, length: length, unitRoundoff: 0x1p-24, order: order)
                for ranged in [true, false] {
                    var out = [Double](repeating: .nan, count: count)
                    absSum.withUnsafeBufferPointer { a in range.withUnsafeBufferPointer { r in split.withUnsafeBufferPointer { s in
                        out.withUnsafeMutableBufferPointer { o in
                            sigma.variances(absSum: a.baseAddress!, range: ranged ? r.baseAddress : nil, split: ranged ? s.baseAddress : nil,
                                            count: count, into: o.baseAddress!)
                        }
                    } } }
                    let want = (0..<count).map { i -> Double in
                        let v = sigma(absSum: absSum[i], range: ranged ? Double(range[i]) : 0, split: ranged ? Double(split[i]) : 0)
                        return v * v
                    }
                    #expect(out.map(\.bitPattern) == want.map(\.bitPattern), "order \(order) terms \(terms) ranged \(ranged)")
                }
            }
        }
    }
}
