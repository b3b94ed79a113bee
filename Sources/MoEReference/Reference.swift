import CFastGEMM
import Foundation
import LowPrecision
import TensorIO

/// Options of one reference run.
public struct ReferenceOptions: Sendable {
    /// Compute the per-element error bound (DESIGN §3). Costs one float32 GEMM per float64 GEMM.
    public var computeBounds: Bool = true
    /// Keep stage 1's intermediate (before any fp8 requantization) and its bound per (token, slot).
    public var keepIntermediate: Bool = false
    /// Value GEMMs in float32 (`sgemm`) instead of float64: the fast mode, itself a "kernel" that
    /// must stay inside the float64 oracle's bounds.
    public var float32: Bool = false
    /// Fuse the shared expert as slot K with id E (the layout of a fused kernel's outputs). The
    /// value is the same either way; only the routing outputs differ (K vs K+1 columns).
    public var fuseShared: Bool = true

    /// In the float32 mode without bounds, bf16 weights that the source holds in memory go
    /// through a fused GEMM that widens them a few rows at a time in cache (`FastGEMM`), instead
    /// of a decode into float32 followed by sgemm, when this CPU has AVX2 or AVX-512. Off: always
    /// decode + sgemm.
    public var fusedBF16GEMM: Bool = true

    public init(computeBounds: Bool = true, keepIntermediate: Bool = false, float32: Bool = false, fuseShared: Bool = true,
                fusedBF16GEMM: Bool = true) {
        self.computeBounds = computeBounds
        self.keepIntermediate = keepIntermediate
        self.float32 = float32
        self.fuseShared = fuseShared
        self.fusedBF16GEMM = fusedBF16GEMM
    }
}

/// Routed experts chosen per token by someone else (a kernel's router), used for teacher forcing.
public struct RoutingOverride: Sendable {
    /// `[T][K]` expert ids.
    public var ids: [[Int]]
    public init(ids: [[Int]]) { self.ids = ids }
}

/// Everything the reference computes for one case.
public struct ReferenceResult: Sendable {
    public let tokens: Int
    public let hidden: Int
    public let experts: Int
    public let topK: Int
    /// Columns of the routing outputs: K, plus 1 when the shared expert is fused as slot K.
    public let slots: Int
    public let sharedFused: Bool
    public let recipe: Recipe
    /// Exact value of the layer under the recipe's rounding points, before the output rounding `[T, H]`.
    public var output: [Double]
    /// Per-element bound: a correct kernel's output lies within `bound` of `output` `[T, H]`.
    public var bound: [Double]
    /// Router logits after the recipe's rounding `[T, E]`, and their bound.
    public var routerLogits: [Double]
    public var routerLogitBound: [Double]
    /// `[T, slots]`; with the shared expert fused, the last column is id E.
    public var topkIds: [Int32]
    public var topkWeights: [Double]
    public var topkWeightBound: [Double]
    /// Shared gate g `[T]` (0 without a shared expert) and its bound.
    public var sharedGate: [Double]
    public var sharedGateBound: [Double]
    /// Tokens whose K-th and (K+1)-th logits are within the logit error: either choice is correct.
    public var ambiguousTokens: [Bool]
    /// Tolerance used to compare logits when judging a router's choice `[T]`.
    public var routerTolerance: [Double]
    /// `[T·slots, Imax]` stage-1 intermediate before fp8 requantization, when kept.
    public var intermediate: [Double]?
    public var intermediateBound: [Double]?
    public var intermediateWidth: Int

    /// Relative bound width, for reports: max over elements of bound / max(|output|).
    public var maxBound: Double { bound.max() ?? 0 }
}

/// The float64 oracle: router, shared-expert gate, SwiGLU experts on OpenBLAS and the weighted
/// combine, with the recipe's rounding points modelled and a rigorous per-element bound.
///
/// The bound derivation is written down in `docs/error-bounds.md`. In short: every value carries
/// a radius; an fp32 dot product of n terms adds `γ_n · Σ|a||b|` (γ_n = nu/(1−nu)); an input
/// radius propagates through `|W|`; a rounding point maps `[v−r, v+r]` to
/// `[round(v−r), round(v+r)]` (rounding is monotone), which is exact and tight, and is where the
/// "a correct kernel may round either way" ambiguity is captured.
public final class MoEReferenceEngine {
    public let layer: MoELayerSource
    public let recipe: Recipe
    public let options: ReferenceOptions

    public init(layer: MoELayerSource, recipe: Recipe, options: ReferenceOptions = ReferenceOptions()) throws {
        self.layer = layer
        self.recipe = recipe
        self.options = options
        if let problem = recipe.check(weights: layer.weightFormat.rawValue, isFP8: layer.weightFormat.fp8 != nil) {
            throw ReferenceError.unsupported(problem)
        }
    }

    @inline(__always)
    static func gamma(_ n: Int, _ u: Double) -> Double {
        let nu = Double(n) * u
        return nu / (1 - nu)
    }

    /// Rounds `v` with radius `r` at a rounding point: (rounded value, radius around it).
    @inline(__always)
    static func roundInterval(_ v: Double, _ r: Double, _ rounding: Rounding) -> (Double, Double) {
        guard let f = rounding.format else { return (v, r) }
        let rv = f.round(v)
        let either = rounding == .bf16OrFP32 ? Swift.abs(v - rv) + r * (1 + 0x1p-20) : 0
        if r == 0 { return (rv, either) }
        let lo = f.round(v - r), hi = f.round(v + r)
        return (rv, Swift.max(Swift.abs(lo - rv), Swift.abs(hi - rv), either))
    }

    @inline(__always)
    static func sigmoid(_ x: Double) -> Double { 1 / (1 + Foundation.exp(-x)) }

    /// exp(l − max) below 2^-126 (l − max < −87.3) may be flushed to 0 by an fp32 softmax.
    public static let fp32UnderflowLogitGap = -87.0

    @inline(__always)
    public static func mayUnderflow(_ logitHigh: Double, max maxLow: Double) -> Bool {
        logitHigh - maxLow < fp32UnderflowLogitGap
    }

    /// Runs the layer on `x` (`[T, H]` row-major).
    public func run(inputs x: [Double], tokens T: Int, routing: RoutingOverride? = nil) throws -> ReferenceResult {
        let c = layer.config
        let H = c.hidden, E = c.experts, K = c.topK
        guard T >= 1 else { throw ReferenceError.invalid("tokens must be >= 1, got \(T)") }
        guard x.count == T * H else { throw ReferenceError.invalid("inputs hold \(x.count) values, expected T·H = \(T)·\(H)") }
        if let i = x.firstIndex(where: { !$0.isFinite }) {
            throw ReferenceError.invalid("hidden_states has a non-finite value \(x[i]) at token \(i / H), column \(i % H)")
        }
        let bounds = options.computeBounds
        let u = recipe.accumulatorUnitRoundoff
        let trans = recipe.transcendentalRelativeError
        let shared = c.hasSharedExpert
        let fused = c.fusable && options.fuseShared
        let S = K + (fused ? 1 : 0)
        let slotsAll = K + (shared ? 1 : 0)

        // ---- router --------------------------------------------------------------------------
        let wg = try layer.routerWeight()
        var logits = [Double](repeating: 0, count: T * E)
        var logitBound = [Double](repeating: 0, count: T * E)
        x.withUnsafeBufferPointer { xp in wg.withUnsafeBufferPointer { wp in logits.withUnsafeMutableBufferPointer { lp in
            BLAS.gemmABt(xp.baseAddress!, wp.baseAddress!, lp.baseAddress!, m: T, n: E, k: H)
        } } }
        if bounds {
            let absX: [Float] = x.map { Float(Swift.abs($0)) }
            let g = Self.gamma(H + 4, u)
            let absW = wg.map { Float(Swift.abs($0)) }
            var tmp = [Float](repeating: 0, count: T * E)
            absX.withUnsafeBufferPointer { a in absW.withUnsafeBufferPointer { b in tmp.withUnsafeMutableBufferPointer { t in
                BLAS.sgemmABt(a.baseAddress!, b.baseAddress!, t.baseAddress!, m: T, n: E, k: H)
            } } }
            let safety = 1 + Double(H + 8) * 0x1p-23
            for i in 0..<(T * E) { logitBound[i] = g * Double(tmp[i]) * safety }
        }
        for i in 0..<(T * E) {
            (logits[i], logitBound[i]) = Self.roundInterval(logits[i], logitBound[i], recipe.routerLogits)
        }

        var topkIds = [Int32](repeating: 0, count: T * S)
        var topkWeights = [Double](repeating: 0, count: T * S)
        var topkWeightBound = [Double](repeating: 0, count: T * S)
        var sharedGate = [Double](repeating: 0, count: T)
        var sharedGateBound = [Double](repeating: 0, count: T)
        var ambiguous = [Bool](repeating: false, count: T)
        var routerTolerance = [Double](repeating: 0, count: T)
        // per token: routed (expert, weight, weight bound) plus shared
        var slotExpert = [Int](repeating: 0, count: T * slotsAll)
        var slotWeight = [Double](repeating: 0, count: T * slotsAll)
        var slotWeightBound = [Double](repeating: 0, count: T * slotsAll)

        let ws = try layer.sharedGateWeight()
        for t in 0..<T {
            let row = Array(logits[(t * E)..<((t + 1) * E)])
            let rb = Array(logitBound[(t * E)..<((t + 1) * E)])
            let order = (0..<E).sorted { row[$0] != row[$1] ? row[$0] > row[$1] : $0 < $1 }
            let maxLogit = row[order[0]]
            // fp32 softmax evaluation slack on the comparison of two logits
            let slack = 4 * u * (1 + Swift.abs(maxLogit)) + 2 * trans
            routerTolerance[t] = slack
            let maxBound = rb[order[0]]
            if K < E {
                let a = order[K - 1], b = order[K]
                if row[a] - row[b] <= rb[a] + rb[b] + slack { ambiguous[t] = true }
                // Where the K-th probability may underflow to 0 in fp32 (flushed below 2^-126), the
                // experts that underflow are tied at 0 and a kernel may take any of them.
                if Self.mayUnderflow(row[a] + rb[a] + slack, max: maxLogit - maxBound) { ambiguous[t] = true }
            }
            var chosen = Array(order.prefix(K))
            if let routing {
                guard routing.ids.count == T, routing.ids[t].count == K else {
                    throw ReferenceError.invalid("routing override has the wrong shape at token \(t): expected \(K) ids")
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
                slotExpert[t * slotsAll + s] = e
                slotWeight[t * slotsAll + s] = wr
                slotWeightBound[t * slotsAll + s] = wb
                topkIds[t * S + s] = Int32(e)
                topkWeights[t * S + s] = wr
                topkWeightBound[t * S + s] = wb
            }
            if shared, let ws {
                var dot = 0.0, absDot = 0.0
                for h in 0..<H { dot += x[t * H + h] * ws[h]; absDot += Swift.abs(x[t * H + h] * ws[h]) }
                var db = bounds ? Self.gamma(H + 4, u) * absDot : 0
                (dot, db) = Self.roundInterval(dot, db, recipe.sharedGate)
                var g = Self.sigmoid(dot)
                var gb = bounds ? 0.25 * db + trans * g + 0x1p-126 : 0   // an fp32 sigmoid may flush a tiny gate to 0
                (g, gb) = Self.roundInterval(g, gb, recipe.sharedGate)
                sharedGate[t] = g
                sharedGateBound[t] = gb
                slotExpert[t * slotsAll + K] = E
                slotWeight[t * slotsAll + K] = g
                slotWeightBound[t * slotsAll + K] = gb
                if fused {
                    topkIds[t * S + K] = Int32(E)
                    topkWeights[t * S + K] = g
                    topkWeightBound[t * S + K] = gb
                }
            }
        }

        // ---- activations (fp8 quantization per token per 1×128 group) -------------------------
        var xin = x
        var xinRadius = [Float](repeating: 0, count: bounds && recipe.activationFP8 ? T * H : 0)
        if recipe.activationFP8, let f = layer.weightFormat.fp8 {
            let q = GroupQuantizer(format: f, convention: recipe.scaleConvention)
            for t in 0..<T {
                let row = x[(t * H)..<((t + 1) * H)].map { Float($0) }
                let deq = q.fakeQuantize(row: row)
                for h in 0..<H { xin[t * H + h] = deq[h] }
                if bounds {
                    // A kernel whose x·(1/scale) differs in the last bit may pick the other code where
                    // the scaled value sits on a rounding midpoint: one fp8 step there.
                    Self.midpointRadius(row: row.map(Double.init), quantizer: q) { i, r in xinRadius[t * H + i] = Float(r) }
                }
            }
        }

        // ---- experts ---------------------------------------------------------------------------
        var out = [Double](repeating: 0, count: T * H)
        var outBound = [Double](repeating: 0, count: T * H)
        var absSum = [Double](repeating: 0, count: T * H)
        let Imax = Swift.max(c.intermediate, c.sharedIntermediate)
        var inter: [Double]? = options.keepIntermediate ? [Double](repeating: 0, count: T * S * Imax) : nil
        var interBound: [Double]? = options.keepIntermediate ? [Double](repeating: 0, count: T * S * Imax) : nil

        // rows routed to each expert: (token, slot)
        var rowsOf = [[(Int, Int)]](repeating: [], count: E + 1)
        for t in 0..<T {
            for s in 0..<slotsAll { rowsOf[slotExpert[t * slotsAll + s]].append((t, s)) }
        }
        let fp8q: GroupQuantizer? = recipe.intermediateFP8 ? layer.weightFormat.fp8.map { GroupQuantizer(format: $0, convention: recipe.scaleConvention) } : nil

        // One expert's stage 1 and stage 2 for all its rows (pure: safe to run concurrently).
        struct ExpertPart {
            var act: [Double], actBound: [Double]   // stage-1 intermediate before fp8 requantization
            var y: [Double], yBound: [Double]       // stage-2 output per row, after the recipe's down rounding
        }
        let g1 = Self.gamma(H + 2 * ((H + 127) / 128) + 4, u)
        // Read-only views of the (now final) inputs for the concurrent expert workers.
        let xinFinal = xin, xinRadiusFinal = xinRadius
        func processExpert(_ e: Int, _ scratch: inout WeightScratch) throws -> ExpertPart {
            let rows = rowsOf[e]
            let n = rows.count
            let Ie = c.intermediate(ofExpert: e)
            // float32 mode, no bounds, bf16 weights in memory: the fused GEMM reads them directly
            var fused: (gate: UnsafeRawPointer, up: UnsafeRawPointer, down: UnsafeRawPointer)? = nil
            if options.float32 && !bounds && options.fusedBF16GEMM && FastGEMM.path != 0,
               let g = layer.rawBF16(expert: e, .gate), let u = layer.rawBF16(expert: e, .up), let d = layer.rawBF16(expert: e, .down) {
                fused = (g, u, d)
            }
            // weight buffers are reused from expert to expert (decode overwrites every element)
            if fused != nil {
                // nothing to decode
            } else if options.float32 {
                scratch.reserve(gateUp: 2 * Ie * H, down: H * Ie, float32: true)
                try scratch.w13.f32.withUnsafeMutableBufferPointer { try layer.decodeGateUp(expert: e, into: $0.baseAddress!) }
                try scratch.w2.f32.withUnsafeMutableBufferPointer { try layer.decodeDown(expert: e, into: $0.baseAddress!) }
            } else {
                scratch.reserve(gateUp: 2 * Ie * H, down: H * Ie, float32: false)
                try scratch.w13.f64.withUnsafeMutableBufferPointer { try layer.decodeGateUp(expert: e, into: $0.baseAddress!) }
                try scratch.w2.f64.withUnsafeMutableBufferPointer { try layer.decodeDown(expert: e, into: $0.baseAddress!) }
            }
            let w13 = scratch.w13, w2 = scratch.w2
            var xe = [Double](repeating: 0, count: n * H)
            xinFinal.withUnsafeBufferPointer { xinP in xe.withUnsafeMutableBufferPointer { dst in
                for (r, (t, _)) in rows.enumerated() { (dst.baseAddress! + r * H).update(from: xinP.baseAddress! + t * H, count: H) }
            } }
            var gu = [Double](repeating: 0, count: n * 2 * Ie)
            var guBound = [Double](repeating: 0, count: bounds ? n * 2 * Ie : 0)
            var boundA1: [Float] = []
            if bounds {
                boundA1 = [Float](repeating: 0, count: n * H)
                xinFinal.withUnsafeBufferPointer { xinP in xinRadiusFinal.withUnsafeBufferPointer { xinRadiusP in boundA1.withUnsafeMutableBufferPointer { dst in
                    for (r, (t, _)) in rows.enumerated() {
                        for h in 0..<H {
                            dst[r * H + h] = Float(g1 * Swift.abs(xinP[t * H + h])) + (xinRadiusP.isEmpty ? 0 : xinRadiusP[t * H + h])
                        }
                    }
                } } }
            }
            if let fused {
                try fusedGemm(Self.floats(xe) { $0 }, [(fused.gate, 0), (fused.up, Ie)], rowsEach: Ie, into: &gu, m: n, n: 2 * Ie, k: H) {
                    var tmp = [Float](repeating: 0, count: 2 * Ie * H)
                    try tmp.withUnsafeMutableBufferPointer { try layer.decodeGateUp(expert: e, into: $0.baseAddress!) }
                }
            } else {
                gemm(xe, w13, &gu, m: n, n: 2 * Ie, k: H)
            }
            if bounds { boundGemm(boundA1, w13, &guBound, m: n, n: 2 * Ie, k: H) }
            // SwiGLU with the recipe's rounding points
            var act = [Double](repeating: 0, count: n * Ie)
            var actBound = [Double](repeating: 0, count: bounds ? n * Ie : 0)
            for r in 0..<n {
                for i in 0..<Ie {
                    var g = gu[r * 2 * Ie + i], up = gu[r * 2 * Ie + Ie + i]
                    var gb = bounds ? guBound[r * 2 * Ie + i] : 0, ub = bounds ? guBound[r * 2 * Ie + Ie + i] : 0
                    (g, gb) = Self.roundInterval(g, gb, recipe.gateUp)
                    (up, ub) = Self.roundInterval(up, ub, recipe.gateUp)
                    var s = g * Self.sigmoid(g)
                    var sb = 1.1 * gb + trans * Swift.abs(s)
                    (s, sb) = Self.roundInterval(s, sb, recipe.activation)
                    var h = s * up
                    var hb = Swift.abs(up) * sb + Swift.abs(s) * ub + sb * ub + (trans + 2 * u) * Swift.abs(h)
                    (h, hb) = Self.roundInterval(h, bounds ? hb : 0, recipe.intermediate)
                    act[r * Ie + i] = h
                    if bounds { actBound[r * Ie + i] = hb }
                }
            }
            let part = ExpertPart(act: act, actBound: actBound, y: [], yBound: [])
            if let q = fp8q {
                for r in 0..<n {
                    Self.requantize(row: &act, rowBound: &actBound, offset: r * Ie, count: Ie, quantizer: q, bounds: bounds)
                }
            }
            // stage 2
            var y = [Double](repeating: 0, count: n * H)
            var yBound = [Double](repeating: 0, count: bounds ? n * H : 0)
            var boundA2: [Float] = []
            if bounds {
                let g2 = Self.gamma(Ie + 2 * ((Ie + 127) / 128) + 4, u)
                boundA2 = [Float](repeating: 0, count: n * Ie)
                for i in 0..<(n * Ie) { boundA2[i] = Float(g2 * Swift.abs(act[i]) + actBound[i]) }
            }
            if let fused {
                try fusedGemm(Self.floats(act) { $0 }, [(fused.down, 0)], rowsEach: H, into: &y, m: n, n: H, k: Ie) {
                    var tmp = [Float](repeating: 0, count: H * Ie)
                    try tmp.withUnsafeMutableBufferPointer { try layer.decodeDown(expert: e, into: $0.baseAddress!) }
                }
            } else {
                gemm(act, w2, &y, m: n, n: H, k: Ie)
            }
            if bounds { boundGemm(boundA2, w2, &yBound, m: n, n: H, k: Ie) }
            if recipe.down != .none {
                for i in 0..<(n * H) {
                    let (v, b) = Self.roundInterval(y[i], bounds ? yBound[i] : 0, recipe.down)
                    y[i] = v
                    if bounds { yBound[i] = b }
                }
            }
            return ExpertPart(act: options.keepIntermediate ? part.act : [], actBound: options.keepIntermediate ? part.actBound : [],
                              y: y, yBound: yBound)
        }

        // Experts run concurrently (each GEMM single-threaded), in batches that bound the memory.
        let touched = (0...E).filter { !rowsOf[$0].isEmpty }
        let workers = Swift.max(1, BLAS.threads)
        let rowBudget = Swift.max(1, (1 << 24) / Swift.max(H, 1))
        var batchStart = 0
        var serialScratch = WeightScratch()
        let savedThreads = BLAS.threads
        if workers > 1 { BLAS.setThreads(1) }
        defer { if workers > 1 { BLAS.setThreads(savedThreads) } }
        while batchStart < touched.count {
            var batchEnd = batchStart, rowsInBatch = 0
            while batchEnd < touched.count && (batchEnd == batchStart || rowsInBatch + rowsOf[touched[batchEnd]].count <= rowBudget) {
                rowsInBatch += rowsOf[touched[batchEnd]].count
                batchEnd += 1
            }
            let batch = Array(touched[batchStart..<batchEnd])
            var parts = [ExpertPart?](repeating: nil, count: batch.count)
            var failure: Error? = nil
            let lock = NSLock()
            if workers > 1 && batch.count > 1 {
                // Dynamic scheduling, largest expert first (the shared expert holds every token):
                // a static split leaves one worker idle while the other finishes the big one.
                let order = (0..<batch.count).sorted { rowsOf[batch[$0]].count != rowsOf[batch[$1]].count ? rowsOf[batch[$0]].count > rowsOf[batch[$1]].count : $0 < $1 }
                var next = 0
                parts.withUnsafeMutableBufferPointer { slots in
                    let base = slots.baseAddress!
                    let lanes = Swift.min(workers, batch.count)
                    DispatchQueue.concurrentPerform(iterations: lanes) { _ in
                        var scratch = WeightScratch()
                        while true {
                            lock.lock()
                            let k = next
                            next += 1
                            let stop = k >= order.count || failure != nil
                            lock.unlock()
                            if stop { break }
                            let i = order[k]
                            do { base[i] = try processExpert(batch[i], &scratch) } catch { lock.lock(); failure = failure ?? error; lock.unlock() }
                        }
                    }
                }
            } else {
                for i in 0..<batch.count { parts[i] = try processExpert(batch[i], &serialScratch) }
            }
            if let failure { throw failure }
            // Combine in expert order. Workers own disjoint token ranges, so every element is
            // summed in the same order as a serial combine (identical bits).
            let lanes = workers > 1 && T > 1 ? Swift.min(workers, T) : 1
            let interWidth = Imax
            out.withUnsafeMutableBufferPointer { outP in outBound.withUnsafeMutableBufferPointer { outBoundP in absSum.withUnsafeMutableBufferPointer { absSumP in
                let o = outP.baseAddress!, ob = outBoundP.baseAddress, asum = absSumP.baseAddress
                withOptionalPointers(&inter, &interBound) { ip, ibp in
                    func combine(_ lane: Int) {
                        let t0 = T * lane / lanes, t1 = T * (lane + 1) / lanes
                        for (bi, e) in batch.enumerated() {
                            let part = parts[bi]!
                            let Ie = c.intermediate(ofExpert: e)
                            part.y.withUnsafeBufferPointer { yP in part.yBound.withUnsafeBufferPointer { ybP in
                                for (r, (t, s)) in rowsOf[e].enumerated() where t >= t0 && t < t1 {
                                    if let ip, s < S {
                                        for i in 0..<Ie {
                                            ip[(t * S + s) * interWidth + i] = part.act[r * Ie + i]
                                            if bounds, let ibp { ibp[(t * S + s) * interWidth + i] = part.actBound[r * Ie + i] }
                                        }
                                    }
                                    let w = slotWeight[t * slotsAll + s], wb = slotWeightBound[t * slotsAll + s]
                                    let y = yP.baseAddress! + r * H, orow = o + t * H
                                    if bounds {
                                        let yb = ybP.baseAddress! + r * H, obrow = ob! + t * H, arow = asum! + t * H
                                        for h in 0..<H {
                                            let yv = y[h]
                                            var cv = w * yv
                                            var cb = Swift.abs(w) * yb[h] + wb * (Swift.abs(yv) + yb[h]) + u * Swift.abs(cv)
                                            (cv, cb) = Self.roundInterval(cv, cb, recipe.weighted)
                                            orow[h] += cv
                                            obrow[h] += cb
                                            arow[h] += Swift.abs(cv) + cb
                                        }
                                    } else if recipe.weighted == .none {
                                        for h in 0..<H { orow[h] += w * y[h] }
                                    } else {
                                        for h in 0..<H { orow[h] += Self.roundInterval(w * y[h], 0, recipe.weighted).0 }
                                    }
                                }
                            } }
                        }
                    }
                    if lanes > 1 {
                        DispatchQueue.concurrentPerform(iterations: lanes) { combine($0) }
                    } else {
                        combine(0)
                    }
                }
            } } }
            batchStart = batchEnd
        }
        var finalBound = outBound
        if bounds {
            let combineFactor: Double
            switch recipe.combine {
            case .exact: combineFactor = Self.gamma(slotsAll + 2, 0x1p-53)
            case .fp32: combineFactor = Self.gamma(slotsAll + 2, 0x1p-24)
            case .bf16: combineFactor = Double(slotsAll + 1) * 0x1p-8
            }
            let smallest = recipe.combine == .bf16 ? 0x1p-133 : 0x1p-149
            for i in 0..<(T * H) {
                let b = outBound[i] + combineFactor * absSum[i] + Double(slotsAll) * smallest
                let (rv, _) = Self.roundInterval(out[i], 0, recipe.output)
                if let f = recipe.output.format {
                    let lo = f.round(out[i] - b), hi = f.round(out[i] + b)
                    finalBound[i] = Swift.max(Swift.abs(lo - out[i]), Swift.abs(hi - out[i]), Swift.abs(rv - out[i]))
                } else {
                    finalBound[i] = b
                }
            }
        }
        return ReferenceResult(
            tokens: T, hidden: H, experts: E, topK: K, slots: S, sharedFused: fused, recipe: recipe,
            output: out, bound: finalBound, routerLogits: logits, routerLogitBound: logitBound,
            topkIds: topkIds, topkWeights: topkWeights, topkWeightBound: topkWeightBound,
            sharedGate: sharedGate, sharedGateBound: sharedGateBound, ambiguousTokens: ambiguous,
            routerTolerance: routerTolerance, intermediate: inter, intermediateBound: interBound, intermediateWidth: Imax)
    }

    // MARK: GEMM helpers

    /// One expert matrix: float64 for the oracle, or float32 (decoded directly) in the fast mode.
    struct WeightMatrix {
        var f64: [Double] = []
        var f32: [Float] = []

        /// Sizes the buffer of the active precision to exactly `count` elements (contents undefined
        /// until decoded), reallocating only when the size changes.
        mutating func reserve(_ count: Int, float32: Bool) {
            if float32 { if f32.count != count { f32 = [Float](repeating: 0, count: count) } }
            else if f64.count != count { f64 = [Double](repeating: 0, count: count) }
        }
    }

    /// One worker's expert weight buffers, reused across the experts it processes.
    struct WeightScratch {
        var w13 = WeightMatrix(), w2 = WeightMatrix()
        mutating func reserve(gateUp: Int, down: Int, float32: Bool) {
            w13.reserve(gateUp, float32: float32)
            w2.reserve(down, float32: float32)
        }
    }

    /// `C = A · Bᵀ`: float64, or float32 in the fast mode.
    private func gemm(_ a: [Double], _ b: WeightMatrix, _ c: inout [Double], m: Int, n: Int, k: Int) {
        if options.float32 {
            let af = Self.floats(a) { $0 }
            var cf = [Float](repeating: 0, count: m * n)
            af.withUnsafeBufferPointer { ap in b.f32.withUnsafeBufferPointer { bp in cf.withUnsafeMutableBufferPointer { cp in
                BLAS.sgemmABt(ap.baseAddress!, bp.baseAddress!, cp.baseAddress!, m: m, n: n, k: k)
            } } }
            cf.withUnsafeBufferPointer { cp in c.withUnsafeMutableBufferPointer { dp in
                for i in 0..<(m * n) { dp[i] = Double(cp[i]) }
            } }
        } else {
            a.withUnsafeBufferPointer { ap in b.f64.withUnsafeBufferPointer { bp in c.withUnsafeMutableBufferPointer { cp in
                BLAS.gemmABt(ap.baseAddress!, bp.baseAddress!, cp.baseAddress!, m: m, n: n, k: k)
            } } }
        }
    }

    /// `C[m, n] = A[m, k] · Wᵀ` through the fused bf16-weight GEMM, W given as row blocks of
    /// `rowsEach` rows (`parts`: raw bf16 pointer, first column of C). Where a weight is NaN/Inf,
    /// `report` decodes the matrix the ordinary way, which throws naming the tensor and element.
    private func fusedGemm(_ a: [Float], _ parts: [(UnsafeRawPointer, Int)], rowsEach: Int, into c: inout [Double],
                           m: Int, n: Int, k: Int, report: () throws -> Void) throws {
        var cf = [Float](repeating: 0, count: m * n)
        var status: Int32 = 1
        a.withUnsafeBufferPointer { ap in cf.withUnsafeMutableBufferPointer { cp in
            for (w, col) in parts where status == 1 {
                status = mc_gemm_xwt_bf16(ap.baseAddress!, m, k, w, k, rowsEach, cp.baseAddress! + col, n, FastGEMM.path)
            }
        } }
        if status == 0 {
            try report()
            throw ReferenceError.invalid("a bf16 weight is NaN/Inf but decoding found none (internal error)")
        }
        guard status == 1 else { throw ReferenceError.invalid("fused bf16 GEMM failed (status \(status))") }
        cf.withUnsafeBufferPointer { cp in c.withUnsafeMutableBufferPointer { dp in
            for i in 0..<(m * n) { dp[i] = Double(cp[i]) }
        } }
    }

    /// `C = A · |B|ᵀ` for non-negative `A` in float32, rounded up by the float32 GEMM's own
    /// worst-case error so the result is an upper bound.
    private func boundGemm(_ a: [Float], _ b: WeightMatrix, _ c: inout [Double], m: Int, n: Int, k: Int) {
        let bf = b.f32.isEmpty ? Self.floats(b.f64) { Swift.abs($0) } : b.f32.map { Swift.abs($0) }
        var cf = [Float](repeating: 0, count: m * n)
        a.withUnsafeBufferPointer { ap in bf.withUnsafeBufferPointer { bp in cf.withUnsafeMutableBufferPointer { cp in
            BLAS.sgemmABt(ap.baseAddress!, bp.baseAddress!, cp.baseAddress!, m: m, n: n, k: k)
        } } }
        let safety = 1 + Double(k + 8) * 0x1p-23
        cf.withUnsafeBufferPointer { cp in c.withUnsafeMutableBufferPointer { dp in
            for i in 0..<(m * n) { dp[i] = Double(cp[i]) * safety }
        } }
    }

    /// `Float(f(v))` for every element, through raw pointers (no bounds checks, vectorizable).
    @inline(__always)
    private static func floats(_ v: [Double], _ f: (Double) -> Double) -> [Float] {
        [Float](unsafeUninitializedCapacity: v.count) { out, count in
            v.withUnsafeBufferPointer { src in
                for i in 0..<src.count { out[i] = Float(f(src[i])) }
            }
            count = v.count
        }
    }

    // MARK: fp8 requantization with bounds

    /// Calls `radius(i, r)` for each element whose scaled value lies so close to an fp8 rounding
    /// midpoint that a kernel computing `x·(1/scale)` slightly differently may pick the other code.
    static func midpointRadius(row: [Double], quantizer q: GroupQuantizer, _ radius: (Int, Double) -> Void) {
        let n = row.count
        var start = 0
        while start < n {
            let end = Swift.min(start + q.groupSize, n)
            var amax: Float = 0
            for i in start..<end { amax = Swift.max(amax, Float(Swift.abs(row[i]))) }
            let s = q.scale(amax: amax)
            for i in start..<end {
                let v = Double(q.scaled(Float(row[i]), scale: s))
                let eps = Swift.abs(v) * 0x1p-21 + 0x1p-60
                let lo = q.codec.round(v - eps, saturating: true), hi = q.codec.round(v + eps, saturating: true)
                if lo != hi { radius(i, Swift.abs(hi - lo) * Double(s)) }
            }
            start = end
        }
    }

    /// Requantizes `row[offset..<offset+count]` (the bf16 intermediate) to fp8 per 1×128 group
    /// and dequantizes it in place, widening `rowBound` where the kernel's own intermediate (within
    /// the bound) could quantize differently.
    static func requantize(row: inout [Double], rowBound: inout [Double], offset: Int, count: Int, quantizer q: GroupQuantizer, bounds: Bool) {
        var start = 0
        while start < count {
            let end = Swift.min(start + q.groupSize, count)
            var amax = 0.0, amaxLo = 0.0, amaxHi = 0.0
            for i in start..<end {
                let v = Swift.abs(row[offset + i]), r = bounds ? rowBound[offset + i] : 0
                amax = Swift.max(amax, v)
                amaxLo = Swift.max(amaxLo, Swift.max(0, v - r))
                amaxHi = Swift.max(amaxHi, v + r)
            }
            let s = q.scale(amax: Float(amax))
            let scaleIsCertain = !bounds || (q.scale(amax: Float(amaxLo)) == s && q.scale(amax: Float(amaxHi)) == s && Double(Float(amaxHi)) == amaxHi)
            let fmax = q.codec.maximum
            for i in start..<end {
                let v = row[offset + i]
                let deq = Double(q.codec.value(q.codec.code(q.scaled(Float(v), scale: s), saturating: true))) * Double(s)
                if bounds {
                    let r = rowBound[offset + i]
                    if scaleIsCertain {
                        // same scale: the code interval of [v−r, v+r], plus a midpoint allowance
                        let lo = Double(q.scaled(Float(v - r), scale: s)), hi = Double(q.scaled(Float(v + r), scale: s))
                        let eps = Swift.max(Swift.abs(lo), Swift.abs(hi)) * 0x1p-21 + 0x1p-60
                        let clo = q.codec.round(Swift.max(-fmax, lo - eps), saturating: true) * Double(s)
                        let chi = q.codec.round(Swift.min(fmax, hi + eps), saturating: true) * Double(s)
                        rowBound[offset + i] = Swift.max(Swift.abs(clo - deq), Swift.abs(chi - deq))
                    } else {
                        // the scale itself may differ: one fp8 step at the largest scale on each side
                        let sHi = Double(q.scale(amax: Float(amaxHi)))
                        let ratio = Swift.min((Swift.abs(v) + r) / Double(q.scale(amax: Float(amaxLo))), fmax)
                        let step = q.codec.format.ulp(of: ratio) * sHi
                        rowBound[offset + i] = Swift.abs(deq - v) + r + step
                    }
                }
                row[offset + i] = deq
            }
            start = end
        }
    }
}

/// Calls `body` with the base addresses of two optional arrays (nil where an array is nil or empty).
private func withOptionalPointers(_ a: inout [Double]?, _ b: inout [Double]?, _ body: (UnsafeMutablePointer<Double>?, UnsafeMutablePointer<Double>?) -> Void) {
    guard a != nil else { body(nil, nil); return }
    a!.withUnsafeMutableBufferPointer { ap in
        if b != nil, !b!.isEmpty {
            b!.withUnsafeMutableBufferPointer { bp in body(ap.baseAddress, bp.baseAddress) }
        } else {
            body(ap.baseAddress, nil)
        }
    }
}

/// The fused bf16-weight GEMM's code path on this CPU (CFastGEMM).
public enum FastGEMM {
    /// 3 = AVX-512, 2 = AVX2+FMA, 0 = none (the float32 mode then decodes and calls sgemm).
    /// `MOECHECK_FAST_GEMM=off|avx2|avx512` overrides it (measurements, tests).
    public static let path: Int32 = {
        let best = mc_gemm_best_path()
        switch ProcessInfo.processInfo.environment["MOECHECK_FAST_GEMM"]?.lowercased() {
        case "off"?: return 0
        case "avx2"?: return best >= 2 ? 2 : 0
        case "avx512"?: return best == 3 ? 3 : 0
        default: return best
        }
    }()

    public static var name: String { path == 3 ? "avx512" : path == 2 ? "avx2" : "off" }
}

public enum ReferenceError: Error, CustomStringConvertible {
    case invalid(String)
    case unsupported(String)

    public var description: String {
        switch self {
        case .invalid(let s): return "invalid input: \(s)"
        case .unsupported(let s): return "unsupported: \(s)"
        }
    }
}
