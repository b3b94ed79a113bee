import Foundation
import LowPrecision
import TensorIO

/// What the router step hands to the expert pipeline and to the result.
struct RouterStep {
    /// Router logits after the recipe's rounding `[T, E]`, and their rigorous bound.
    var logits: [Double]
    var logitBound: [Double]
    /// `[T, S]` (S = K, +1 with the shared expert fused): ids, weights and the weights' bounds.
    var topkIds: [Int32]
    var topkWeights: [Double]
    var topkWeightBound: [Double]
    /// `[T]`: the shared gate g and its bound (0 without a shared expert).
    var sharedGate: [Double]
    var sharedGateBound: [Double]
    /// `[T]`: tokens whose K-th and (K+1)-th experts a correct kernel may swap (rigorous radii).
    var ambiguous: [Bool]
    /// `[T]`: the fp32 softmax's slack when two logits are compared.
    var routerTolerance: [Double]
    /// `[T, slotsAll]`: routed slots in descending weight, then the shared expert (id E).
    var slotExpert: [Int]
    var slotWeight: [Double]
    var slotWeightBound: [Double]
    /// Statistical model (empty without statistics): variance of a slot's weight from the
    /// softmax's own evaluation and the weight's rounding point `[T, slotsAll]`; the routed
    /// slots' logit variance × weight² `[T, slotsAll]`; Σ over experts left out of
    /// Var(logit)·p² (only without renormalization) `[T]`; tokens whose K-th and (K+1)-th
    /// experts a correct kernel may swap with more than negligible probability `[T]`.
    var slotWeightVariance: [Double] = []
    var slotLogitVariance: [Double] = []
    var unchosenLogitVariance: [Double] = []
    /// `[T, slotsAll]`: a bound on the probability that a kernel's weight of the slot differs from
    /// the reference's at all (its rounding flips, or a logit it depends on does); 1 where a
    /// value is unrounded. Used where the reference simulates a bf16 accumulation in order.
    var slotFlip: [Double] = []
    var statisticallyAmbiguous: [Bool] = []
    /// Tokens with a chosen logit or the shared gate on a rounding tie (StatisticalModel.tieBias).
    var tieTokens: [Bool] = []
}

/// Raw views of a `RouterStep`'s arrays for tokens routed concurrently: a token's work writes
/// only its own elements (`[t]`, `[t·S + s]`, `[t·slotsAll + s]`). Empty arrays give empty views.
struct RouterStepBuffers {
    var logits: UnsafeMutableBufferPointer<Double>, logitBound: UnsafeMutableBufferPointer<Double>
    var topkIds: UnsafeMutableBufferPointer<Int32>, topkWeights: UnsafeMutableBufferPointer<Double>
    var topkWeightBound: UnsafeMutableBufferPointer<Double>
    var sharedGate: UnsafeMutableBufferPointer<Double>, sharedGateBound: UnsafeMutableBufferPointer<Double>
    var ambiguous: UnsafeMutableBufferPointer<Bool>, routerTolerance: UnsafeMutableBufferPointer<Double>
    var slotExpert: UnsafeMutableBufferPointer<Int>, slotWeight: UnsafeMutableBufferPointer<Double>
    var slotWeightBound: UnsafeMutableBufferPointer<Double>
    var slotWeightVariance: UnsafeMutableBufferPointer<Double>, slotLogitVariance: UnsafeMutableBufferPointer<Double>
    var unchosenLogitVariance: UnsafeMutableBufferPointer<Double>, slotFlip: UnsafeMutableBufferPointer<Double>
    var statisticallyAmbiguous: UnsafeMutableBufferPointer<Bool>, tieTokens: UnsafeMutableBufferPointer<Bool>
}

extension RouterStep {
    /// Calls `body` with raw views of every array.
    mutating func withBuffers<R>(_ body: (RouterStepBuffers) -> R) -> R {
        logits.withUnsafeMutableBufferPointer { a in logitBound.withUnsafeMutableBufferPointer { b in
        topkIds.withUnsafeMutableBufferPointer { c in topkWeights.withUnsafeMutableBufferPointer { d in
        topkWeightBound.withUnsafeMutableBufferPointer { e in sharedGate.withUnsafeMutableBufferPointer { f in
        sharedGateBound.withUnsafeMutableBufferPointer { g in ambiguous.withUnsafeMutableBufferPointer { h in
        routerTolerance.withUnsafeMutableBufferPointer { i in slotExpert.withUnsafeMutableBufferPointer { j in
        slotWeight.withUnsafeMutableBufferPointer { k in slotWeightBound.withUnsafeMutableBufferPointer { l in
        slotWeightVariance.withUnsafeMutableBufferPointer { m in slotLogitVariance.withUnsafeMutableBufferPointer { n in
        unchosenLogitVariance.withUnsafeMutableBufferPointer { o in slotFlip.withUnsafeMutableBufferPointer { p in
        statisticallyAmbiguous.withUnsafeMutableBufferPointer { q in tieTokens.withUnsafeMutableBufferPointer { r in
            body(RouterStepBuffers(logits: a, logitBound: b, topkIds: c, topkWeights: d, topkWeightBound: e, sharedGate: f, sharedGateBound: g,
                                   ambiguous: h, routerTolerance: i, slotExpert: j, slotWeight: k, slotWeightBound: l, slotWeightVariance: m,
                                   slotLogitVariance: n, unchosenLogitVariance: o, slotFlip: p, statisticallyAmbiguous: q, tieTokens: r))
        } } } } } } } } } } } } } } } } } }
    }

    /// The variance the routing brings to `Σ_h d_h·e_h` at token `t`, from each slot's projected
    /// contribution `c_s·d` (`projected(s)`, s < slots; the first `routed` slots are the routed
    /// experts): `Σ_s Var(w_s)·(y_s·d)² + Σ_j Var(l_j)·w_j²·(y_j·d − ȳ·d)² + Σ_left out Var(l)·p²·(ȳ·d)²`,
    /// y_s = c_s / w_s, ȳ = Σ c_s over the routed slots.
    @inline(__always)
    func projectedVariance(token t: Int, slots: Int, routed K: Int, _ projected: (Int) -> Double) -> Double {
        var ybar = 0.0
        for s in 0..<K { ybar += projected(s) }
        var v = unchosenLogitVariance[t] * ybar * ybar
        for s in 0..<slots {
            let w = slotWeight[t * slots + s]
            let yd = w != 0 ? projected(s) / w : 0
            v += slotWeightVariance[t * slots + s] * yd * yd
            if s < K { v += slotLogitVariance[t * slots + s] * (yd - ybar) * (yd - ybar) }
        }
        return v
    }
}

extension MoEReferenceEngine {
    /// Router logits, top-K, renormalization, the shared gate, and (with a routing override) the
    /// kernel's own choice of experts.
    func route(_ x: [Double], tokens T: Int, routing: RoutingOverride?) throws -> RouterStep {
        let c = layer.config
        let H = c.hidden, E = c.experts, K = c.topK
        let bounds = options.computeBounds, stats = statisticsEnabled
        let u = recipe.accumulatorUnitRoundoff
        let trans = recipe.transcendentalRelativeError
        let shared = c.hasSharedExpert
        let fused = c.fusable && options.fuseShared
        let S = K + (fused ? 1 : 0)
        let slotsAll = K + (shared ? 1 : 0)

        let wg = try layer.routerWeight()
        var logits = [Double](repeating: 0, count: T * E)
        var logitBound = [Double](repeating: 0, count: T * E)
        var logitSigma = [Double](repeating: 0, count: stats ? T * E : 0)
        PhaseProfile.measure("router: logits GEMM") {
        x.withUnsafeBufferPointer { xp in wg.withUnsafeBufferPointer { wp in logits.withUnsafeMutableBufferPointer { lp in
            BLAS.withPinnedThreads { BLAS.gemmABt(xp.baseAddress!, wp.baseAddress!, lp.baseAddress!, m: T, n: E, k: H) }
        } } }
        }
        if bounds {
            let boundStart = PhaseProfile.start()
            let absX: [Float] = x.map { Float(Swift.abs($0)) }
            let g = Self.gamma(H + 4, u)
            // |W| for the bound GEMM and, for the statistics, W packed for the range statistics: one pass
            var prepared = PreparedWeights()
            prepared.prepare(WeightMatrix(f64: wg), rows: E, columns: H, absolute: true, packed: stats && recipe.accumulationOrder == .contiguous)
            let absW = prepared.absolute
            var tmp = [Float](repeating: 0, count: T * E)
            absX.withUnsafeBufferPointer { a in absW.withUnsafeBufferPointer { b in tmp.withUnsafeMutableBufferPointer { t in
                BLAS.withPinnedThreads { BLAS.sgemmABt(a.baseAddress!, b.baseAddress!, t.baseAddress!, m: T, n: E, k: H) }
            } } }
            let safety = 1 + Double(H + 8) * 0x1p-23
            for i in 0..<(T * E) { logitBound[i] = g * Double(tmp[i]) * safety }
            PhaseProfile.stop("router: bound GEMM", since: boundStart)
            if stats {
                let order = recipe.accumulationOrder
                let ranges = PhaseProfile.measure("router: range stats") {
                    order == .contiguous ? StatisticalModel.rangeStats(x.map { Float($0) }, m: T, k: H, packed: prepared.packed, n: E, parallel: true) : nil
                }
                let sigmaStart = PhaseProfile.start()
                let sigma = StatisticalModel.AccumulationSigma(terms: H + 4, length: H, unitRoundoff: u, order: order)
                logitSigma = ParallelLoops.map(T * E) { i in
                    sigma(absSum: Double(tmp[i]) * safety, range: Double(ranges?.range[i] ?? 0), split: Double(ranges?.split[i] ?? 0))
                }
                PhaseProfile.stop("router: logit sigma", since: sigmaStart)
            }
        }
        let restStart = PhaseProfile.start()
        defer { PhaseProfile.stop("router: top-K, softmax, shared gate", since: restStart) }
        let preRounding = stats ? logits : []
        logits.withUnsafeMutableBufferPointer { lp in logitBound.withUnsafeMutableBufferPointer { bp in
            let (l, b, rounding) = (lp.baseAddress!, bp.baseAddress!, recipe.routerLogits)
            ParallelLoops.chunks(T * E) { range in
                for i in range { (l[i], b[i]) = Self.roundInterval(l[i], b[i], rounding) }
            }
        } }
        var step = RouterStep(
            logits: logits, logitBound: logitBound,
            topkIds: [Int32](repeating: 0, count: T * S), topkWeights: [Double](repeating: 0, count: T * S),
            topkWeightBound: [Double](repeating: 0, count: T * S),
            sharedGate: [Double](repeating: 0, count: T), sharedGateBound: [Double](repeating: 0, count: T),
            ambiguous: [Bool](repeating: false, count: T), routerTolerance: [Double](repeating: 0, count: T),
            slotExpert: [Int](repeating: 0, count: T * slotsAll), slotWeight: [Double](repeating: 0, count: T * slotsAll),
            slotWeightBound: [Double](repeating: 0, count: T * slotsAll))
        var logitVariance: [Double] = []
        if stats {
            step.slotWeightVariance = [Double](repeating: 0, count: T * slotsAll)
            step.slotLogitVariance = [Double](repeating: 0, count: T * slotsAll)
            step.unchosenLogitVariance = [Double](repeating: 0, count: T)
            step.slotFlip = [Double](repeating: 0, count: T * slotsAll)
            step.statisticallyAmbiguous = [Bool](repeating: false, count: T)
            step.tieTokens = [Bool](repeating: false, count: T)
            let rounding = recipe.routerLogits
            logitVariance = ParallelLoops.map(T * E) { StatisticalModel.roundingVariance(preRounding[$0], sigma: logitSigma[$0], rounding) }
        }
        let ws = try layer.sharedGateWeight()
        /// The shared gate of token `t`: its dot product, rounding points and sigmoid, and its variances.
        func sharedGate(_ t: Int, _ step: RouterStepBuffers) {
            if shared, let ws {
                var dot = 0.0, absDot = 0.0
                for h in 0..<H { dot += x[t * H + h] * ws[h]; absDot += Swift.abs(x[t * H + h] * ws[h]) }
                var db = bounds ? Self.gamma(H + 4, u) * absDot : 0
                let gateStats = StatisticalModel.rangeStats(count: H) { x[t * H + $0] * ws[$0] }
                let dotSigma = StatisticalModel.accumulationSigma(terms: H + 4, length: H, unitRoundoff: u, absSum: absDot, range: gateStats.range,
                                                                  split: gateStats.split, order: recipe.accumulationOrder)
                let dotPre = dot
                (dot, db) = Self.roundInterval(dot, db, recipe.sharedGate)
                var g = Self.sigmoid(dot)
                var gb = bounds ? 0.25 * db + trans * g + 0x1p-126 : 0   // an fp32 sigmoid may flush a tiny gate to 0
                let gPre = g
                (g, gb) = Self.roundInterval(g, gb, recipe.sharedGate)
                step.sharedGate[t] = g
                step.sharedGateBound[t] = gb
                step.slotExpert[t * slotsAll + K] = E
                step.slotWeight[t * slotsAll + K] = g
                step.slotWeightBound[t * slotsAll + K] = gb
                if stats {
                    // The inner rounding's flips move σ by σ'·step (σ' ≤ 1/4); the outer one flips on its own.
                    let vDot = StatisticalModel.roundingVariance(dotPre, sigma: dotSigma, recipe.sharedGate)
                    let sigmaG = (0.25 * vDot.squareRoot() + trans * gPre)
                    step.slotWeightVariance[t * slotsAll + K] = StatisticalModel.roundingVariance(gPre, sigma: sigmaG, recipe.sharedGate) + sigmaG * sigmaG
                    step.slotFlip[t * slotsAll + K] = Swift.min(1, StatisticalModel.flipProbability(dotPre, sigma: dotSigma, recipe.sharedGate)
                        + StatisticalModel.flipProbability(gPre, sigma: sigmaG, recipe.sharedGate))
                    if StatisticalModel.tieBias(dotPre, recipe.sharedGate.format) + StatisticalModel.tieBias(gPre, recipe.sharedGate.format) > 0 {
                        step.tieTokens[t] = true
                    }
                }
                if fused {
                    step.topkIds[t * S + K] = Int32(E)
                    step.topkWeights[t * S + K] = g
                    step.topkWeightBound[t * S + K] = gb
                }
            }
        }
        // tokens in parallel chunks (each writes only its own elements: the same bits); a failure
        // is the lowest token's, the one a serial loop stops at
        var failure: (token: Int, error: Error)? = nil
        let lock = NSLock()
        step.withBuffers { step in
            ParallelLoops.chunks(T, minimum: 8) { tokens in
                for t in tokens {
                    do {
                        try routeToken(t, step: step, routing: routing, preRounding: preRounding, logitSigma: logitSigma, logitVariance: logitVariance)
                    } catch {
                        lock.lock()
                        if failure == nil || t < failure!.token { failure = (t, error) }
                        lock.unlock()
                        return
                    }
                    sharedGate(t, step)
                }
            }
        }
        if let failure { throw failure.error }
        return step
    }

    /// One token's top-K, softmax, renormalization and (statistics) routing-weight variances.
    private func routeToken(_ t: Int, step: RouterStepBuffers, routing: RoutingOverride?, preRounding: [Double], logitSigma: [Double],
                            logitVariance: [Double]) throws {
        let c = layer.config
        let E = c.experts, K = c.topK
        let bounds = options.computeBounds, stats = statisticsEnabled
        let u = recipe.accumulatorUnitRoundoff
        let trans = recipe.transcendentalRelativeError
        let fused = c.fusable && options.fuseShared
        let S = K + (fused ? 1 : 0)
        let slotsAll = K + (c.hasSharedExpert ? 1 : 0)
        let row = Array(step.logits[(t * E)..<((t + 1) * E)])
        let rb = Array(step.logitBound[(t * E)..<((t + 1) * E)])
        let order = (0..<E).sorted { row[$0] != row[$1] ? row[$0] > row[$1] : $0 < $1 }
        let maxLogit = row[order[0]]
        // fp32 softmax evaluation slack on the comparison of two logits
        let slack = 4 * u * (1 + Swift.abs(maxLogit)) + 2 * trans
        step.routerTolerance[t] = slack
        let maxBound = rb[order[0]]
        if K < E {
            let a = order[K - 1]
            // Ambiguous when a left-out expert may reach a chosen one: the lowest a chosen logit can
            // be against the highest a left-out one can be (not only the (K+1)-th by value: a
            // lower logit with a wider radius — a value on a rounding tie — may overtake it).
            let chosenLow = order.prefix(K).map { row[$0] - rb[$0] }.min()!
            let leftHigh = order.dropFirst(K).map { row[$0] + rb[$0] }.max()!
            if leftHigh + slack >= chosenLow { step.ambiguous[t] = true }
            // Where the K-th probability may underflow to 0 in fp32 (flushed below 2^-126), the
            // experts that underflow are tied at 0 and a kernel may take any of them.
            if Self.mayUnderflow(row[a] + rb[a] + slack, max: maxLogit - maxBound) { step.ambiguous[t] = true }
            if stats {
                let lowest = order.prefix(K).min { preRounding[t * E + $0] - 6 * logitSigma[t * E + $0] < preRounding[t * E + $1] - 6 * logitSigma[t * E + $1] }!
                let highest = order.dropFirst(K).max { preRounding[t * E + $0] + 6 * logitSigma[t * E + $0] < preRounding[t * E + $1] + 6 * logitSigma[t * E + $1] }!
                step.statisticallyAmbiguous[t] = step.ambiguous[t] && (
                    StatisticalModel.maySwap(high: preRounding[t * E + lowest], highSigma: logitSigma[t * E + lowest],
                                             low: preRounding[t * E + highest], lowSigma: logitSigma[t * E + highest], rounding: recipe.routerLogits, slack: slack)
                    || Self.mayUnderflow(row[a] + rb[a] + slack, max: maxLogit - maxBound))
            }
        }
        var chosen = Array(order.prefix(K))
        if let routing {
            guard routing.ids.count == step.ambiguous.count else {
                throw ReferenceError.invalid("routing override has \(routing.ids.count) tokens, expected \(step.ambiguous.count)")
            }
            guard routing.ids[t].count == K else {
                throw ReferenceError.invalid("routing override has the wrong shape at token \(t): \(routing.ids[t].count) ids, expected \(K)")
            }
            chosen = routing.ids[t]
            for e in chosen where e < 0 || e >= E {
                throw ReferenceError.invalid("routing override: expert id \(e) at token \(t) is out of range 0..<\(E)")
            }
            guard Set(chosen).count == K else {
                throw ReferenceError.invalid("routing override: token \(t) selects an expert twice: \(chosen)")
            }
        }
        // softmax over all E in float64 (from the max for stability)
        var denom = 0.0
        for e in 0..<E { denom += Foundation.exp(row[e] - maxLogit) }
        var p = chosen.map { Foundation.exp(row[$0] - maxLogit) / denom }
        var setMax = 0.0
        for e in chosen { setMax = Swift.max(setMax, rb[e]) }
        if c.renormalize {
            let s = p.reduce(0, +)
            p = p.map { $0 / s }
        } else {
            setMax = rb.max() ?? 0
        }
        let rel = Foundation.expm1(2 * setMax) + 2 * trans + Double(E + K + 8) * u
        // slots in descending weight (ties: lower id) — the order kernels report them in
        let ranked = zip(chosen, p).sorted { $0.1 != $1.1 ? $0.1 > $1.1 : $0.0 < $1.0 }
        for (s, (e, w)) in ranked.enumerated() {
            var (wr, wb) = Self.roundInterval(w, bounds ? rel * w : 0, recipe.routingWeights)
            if bounds && Self.mayUnderflow(row[e] + rb[e] + slack, max: maxLogit - maxBound) {
                wb = Swift.max(wb, Swift.abs(wr) * (1 + 0x1p-20) + 0x1p-126)   // may be exactly 0 in fp32
            }
            step.slotExpert[t * slotsAll + s] = e
            step.slotWeight[t * slotsAll + s] = wr
            step.slotWeightBound[t * slotsAll + s] = wb
            step.topkIds[t * S + s] = Int32(e)
            step.topkWeights[t * S + s] = wr
            step.topkWeightBound[t * S + s] = wb
            if stats {
                // the softmax's own fp32 evaluation, then the weight's rounding point
                let sigmaEval = (2 * trans + Double(E + K + 8) * u) * w
                step.slotWeightVariance[t * slotsAll + s] = StatisticalModel.roundingVariance(w, sigma: sigmaEval, recipe.routingWeights) + sigmaEval * sigmaEval
                step.slotLogitVariance[t * slotsAll + s] = logitVariance[t * E + e] * w * w
                step.slotFlip[t * slotsAll + s] = StatisticalModel.flipProbability(w, sigma: sigmaEval, recipe.routingWeights)
                if StatisticalModel.tieBias(preRounding[t * E + e], recipe.routerLogits.format) > 0
                    || StatisticalModel.tieBias(w, recipe.routingWeights.format) > 0 { step.tieTokens[t] = true }
            }
        }
        if stats && !c.renormalize {
            // Without renormalization every logit moves the softmax's denominator.
            let taken = Set(chosen)
            var v = 0.0
            for e in 0..<E where !taken.contains(e) {
                let pe = Foundation.exp(row[e] - maxLogit) / denom
                v += logitVariance[t * E + e] * pe * pe
            }
            step.unchosenLogitVariance[t] = v
        }
        if stats {
            // Every routed weight changes when a logit it depends on flips: the chosen ones (and,
            // without renormalization, all of them).
            var pLogit = 0.0
            for e in (c.renormalize ? chosen : Array(0..<E)) {
                pLogit += StatisticalModel.flipProbability(preRounding[t * E + e], sigma: logitSigma[t * E + e], recipe.routerLogits)
            }
            for s in 0..<K { step.slotFlip[t * slotsAll + s] = Swift.min(1, step.slotFlip[t * slotsAll + s] + pLogit) }
        }
    }
}
