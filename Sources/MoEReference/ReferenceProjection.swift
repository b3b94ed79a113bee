import Foundation
import LowPrecision
import TensorIO

extension MoEReferenceEngine {
    /// The statistical model's second pass: for each token and each test direction (the
    /// token's output, and each slot's contribution), the variance that the correlated errors
    /// bring along that direction, exactly under the model rather than by Cauchy–Schwarz:
    /// `Σ_{s,i} w_s²·Var(a_{s,i})·(W2_s[:,i]·d)²` (+ the fp8 groups' scale changes
    /// `factor_g·(Σ_{i∈g} a_i·W2_s[:,i]·d)²`) and the routing terms
    /// `Σ_j Var(l_j)·w_j²·(y_j·d − ȳ·d)² + Σ_s Var(w_s)·(y_s·d)²`. Costs one float32 GEMM of
    /// `(1 + slots)` directions per row against each touched expert's W2 (decoded again).
    func directionVariance(_ acc: Combined, router: RouterStep, tokens T: Int) throws -> (variance: [Double], bias: [Double])? {
        guard let contrib = acc.contributions else { return nil }
        let c = layer.config
        let H = c.hidden, K = c.topK
        let slotsAll = K + (c.hasSharedExpert ? 1 : 0)
        let D = 1 + slotsAll
        var result = [Double](repeating: 0, count: T * D)
        var bias = [Double](repeating: 0, count: T * D)
        let outF = acc.out.map { Float($0) }
        // routing terms: per token, the dot products of every slot's contribution with every direction
        var dots = [Float](repeating: 0, count: slotsAll * D)
        var dirs = [Float](repeating: 0, count: D * H)
        let routingStart = PhaseProfile.start()
        for t in 0..<T {
            dirs.withUnsafeMutableBufferPointer { dp in
                (dp.baseAddress!).update(from: outF.withUnsafeBufferPointer { $0.baseAddress! + t * H }, count: H)
                contrib.withUnsafeBufferPointer { cp in (dp.baseAddress! + H).update(from: cp.baseAddress! + t * slotsAll * H, count: slotsAll * H) }
            }
            contrib.withUnsafeBufferPointer { cp in dirs.withUnsafeBufferPointer { dp in dots.withUnsafeMutableBufferPointer { op in
                BLAS.sgemmABt(cp.baseAddress! + t * slotsAll * H, dp.baseAddress!, op.baseAddress!, m: slotsAll, n: D, k: H)
            } } }
            for j in 0..<D {
                result[t * D + j] = router.projectedVariance(token: t, slots: slotsAll, routed: K) { Double(dots[$0 * D + j]) }
            }
        }
        PhaseProfile.stop("direction variance: routing terms", since: routingStart)
        // expert terms: each touched expert's W2 against the directions of the rows it serves
        let expertStart = PhaseProfile.start()
        defer { PhaseProfile.stop("direction variance: expert terms", since: expertStart) }
        for e in acc.projections.keys.sorted() {
            let p = acc.projections[e]!
            let Ie = c.intermediate(ofExpert: e)
            var w2 = [Float](repeating: 0, count: H * Ie)
            try w2.withUnsafeMutableBufferPointer { try layer.decodeDown(expert: e, into: $0.baseAddress!) }
            let chunk = Swift.max(1, (1 << 22) / Swift.max(D * H, 1))
            var r0 = 0
            while r0 < p.rows.count {
                let r1 = Swift.min(p.rows.count, r0 + chunk)
                let m = (r1 - r0) * D
                var a = [Float](repeating: 0, count: m * H)
                a.withUnsafeMutableBufferPointer { ap in outF.withUnsafeBufferPointer { op in contrib.withUnsafeBufferPointer { cp in
                    for r in r0..<r1 {
                        let t = p.rows[r].0
                        let dst = ap.baseAddress! + (r - r0) * D * H
                        dst.update(from: op.baseAddress! + t * H, count: H)
                        (dst + H).update(from: cp.baseAddress! + t * slotsAll * H, count: slotsAll * H)
                    }
                } } }
                var proj = [Float](repeating: 0, count: m * Ie)
                a.withUnsafeBufferPointer { ap in w2.withUnsafeBufferPointer { wp in proj.withUnsafeMutableBufferPointer { op in
                    BLAS.sgemmAB(ap.baseAddress!, wp.baseAddress!, op.baseAddress!, m: m, n: Ie, k: H)
                } } }
                // per (row, direction): Σ_i Var(a_i)·p_i² (+ the groups' scale changes) and Σ_i tie_i·|p_i|,
                // each a pure function of its index (computed in parallel), then added in row order
                var projected = [Double](repeating: 0, count: m), tied = [Double](repeating: 0, count: m)
                proj.withUnsafeBufferPointer { pp in projected.withUnsafeMutableBufferPointer { vp in tied.withUnsafeMutableBufferPointer { bp in
                p.inputVariance.withUnsafeBufferPointer { ivp in p.inputTie.withUnsafeBufferPointer { itp in p.input.withUnsafeBufferPointer { inp in
                    let (proj, vOut, bOut) = (pp.baseAddress!, vp.baseAddress!, bp.baseAddress!)
                    ParallelLoops.chunks(m, minimum: Swift.max(1, (1 << 14) / Swift.max(Ie, 1))) { range in
                        for u in range {
                            let r = r0 + u / D
                            var v = 0.0, b = 0.0
                            for i in 0..<Ie {
                                let pu = Double(proj[u * Ie + i])
                                v += ivp[r * Ie + i] * pu * pu
                                b += Double(itp[r * Ie + i]) * Swift.abs(pu)
                            }
                            for g in 0..<p.groups {
                                var shift = 0.0
                                for i in (g * 128)..<Swift.min(Ie, (g + 1) * 128) { shift += Double(inp[r * Ie + i]) * Double(proj[u * Ie + i]) }
                                v += p.groupFactors[r * p.groups + g] * shift * shift
                            }
                            vOut[u] = v
                            bOut[u] = b
                        }
                    }
                } } } } } }
                for r in r0..<r1 {
                    let (t, s) = p.rows[r]
                    let w = router.slotWeight[t * slotsAll + s]
                    for j in 0..<D {
                        let u = (r - r0) * D + j
                        bias[t * D + j] += Swift.abs(w) * tied[u]
                        result[t * D + j] += w * w * projected[u]
                    }
                }
                r0 = r1
            }
        }
        return (result, bias)
    }
}
