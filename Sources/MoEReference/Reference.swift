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

    /// With bounds, also compute the statistical model of a correct kernel's error
    /// (`ReferenceResult.statistics`; docs/error-bounds.md, "Statistical tier"). Costs one more
    /// float32 GEMM per expert in stage 2.
    public var statistics: Bool = true

    /// Keep every slot's weighted contribution `w_s·y_s` per token (`[T, slots, H]` binary32) for
    /// the per-expert statistical tests, when it holds at most `contributionLimit` values.
    public var keepContributions: Bool = false
    public var contributionLimit: Int = 1 << 26

    public init(computeBounds: Bool = true, keepIntermediate: Bool = false, float32: Bool = false, fuseShared: Bool = true,
                fusedBF16GEMM: Bool = true, statistics: Bool = true, keepContributions: Bool = false) {
        self.computeBounds = computeBounds
        self.keepIntermediate = keepIntermediate
        self.float32 = float32
        self.fuseShared = fuseShared
        self.fusedBF16GEMM = fusedBF16GEMM
        self.statistics = statistics
        self.keepContributions = keepContributions
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
    /// The statistical model of a correct kernel's error (with bounds and `options.statistics`).
    public var statistics: ReferenceStatistics?

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
    /// The combine's raw-pointer loop for the default recipes' case (on; tests turn it off to
    /// compare it with the general loop, bit for bit).
    var combineFastPath = true

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

    /// Below this gate value an fp32 `silu(g) = g/(1 + exp(−g))` may be 0 (exp(−g) overflows
    /// fp32 past g ≈ −88.7; the result is below fp32's smallest normal well before that).
    public static let fp32SiluVanishingGate = -80.0

    @inline(__always)
    public static func mayUnderflow(_ logitHigh: Double, max maxLow: Double) -> Bool {
        logitHigh - maxLow < fp32UnderflowLogitGap
    }

    /// Whether this run computes the statistical model (it needs the bounds' GEMMs).
    var statisticsEnabled: Bool { options.computeBounds && options.statistics }

    /// Whether a run of `T` tokens keeps the contributions (`options.keepContributions` within
    /// `options.contributionLimit` values).
    func keepsContributions(tokens T: Int) -> Bool {
        let c = layer.config
        let slotsAll = c.topK + (c.hasSharedExpert ? 1 : 0)
        return statisticsEnabled && options.keepContributions && T * slotsAll * c.hidden <= options.contributionLimit
    }

    /// Runs the layer on `x` (`[T, H]` row-major): the router, the activations' fp8
    /// quantization, the expert pipeline with the weighted combine, and the final bound.
    public func run(inputs x: [Double], tokens T: Int, routing: RoutingOverride? = nil) throws -> ReferenceResult {
        let c = layer.config
        guard T >= 1 else { throw ReferenceError.invalid("tokens must be >= 1, got \(T)") }
        guard x.count == T * c.hidden else { throw ReferenceError.invalid("inputs hold \(x.count) values, expected T·H = \(T)·\(c.hidden)") }
        if let i = x.firstIndex(where: { !$0.isFinite }) {
            throw ReferenceError.invalid("hidden_states has a non-finite value \(x[i]) at token \(i / c.hidden), column \(i % c.hidden)")
        }
        let started = PhaseProfile.start()
        let router = try PhaseProfile.measure("router") { try route(x, tokens: T, routing: routing) }
        let inputs = PhaseProfile.measure("activation quantization, rows") { quantizeActivations(x, tokens: T, router: router) }
        var combined = try PhaseProfile.measure("experts (wall)") { try runExperts(inputs, tokens: T, router: router) }
        let finalBound = PhaseProfile.measure("output bound, combine variance") { outputBound(&combined, tokens: T) }
        let fused = c.fusable && options.fuseShared
        let S = c.topK + (fused ? 1 : 0)
        var statistics: ReferenceStatistics? = nil
        if statisticsEnabled {
            let routerVariance = PhaseProfile.measure("router token variance") { routerTokenVariance(router, combined, tokens: T) }
            // likely fp8 group-scale moves become known alternatives: only their residual stays in the projections
            let known = combined.alternatives.isEmpty ? [] : selectAlternatives(&combined, tokens: T)
            // its GEMMs at the pinned thread count, in one phase (BLAS.withThreads)
            let direction = try PhaseProfile.measure("direction variance") {
                try BLAS.withPinnedThreads { try directionVariance(combined, router: router, tokens: T) }
            }
            var flip: [Double] = [], tie: [Double] = []
            let outputFlipStart = PhaseProfile.start()
            let routerElement = recipe.output.format != nil || !known.isEmpty ? routerElementVariance(router, combined, tokens: T) : nil
            func routerShare(_ i: Int) -> Double { routerElement.map { $0[i] } ?? routerVariance[i / c.hidden] }
            if let f = recipe.output.format {
                // the kernel's output about round(o): flips of the final rounding under its noise
                if let st = combined.ordered, st.stats {
                    // the last rounding of the kernel's own accumulation is the output's: its input
                    // and noise were kept; the routing weights' variance joins here. Ties are the
                    // kernel's own (the same rounding of the same sum), not a systematic error.
                    flip = ParallelLoops.map(T * c.hidden) { i in
                        StatisticalModel.orderedRounding(st.lastInput[i], variance: st.lastVariance[i] + routerShare(i),
                                                         probability: st.lastFlip[i], f).variance
                    }
                    tie = [Double](repeating: 0, count: T * c.hidden)
                    combined.elementVariance = [Double](repeating: 0, count: T * c.hidden)
                } else {
                    // one pass: each element's flip variance and its tie bias (tieBias(o, f), f the output's format)
                    tie = [Double](repeating: 0, count: T * c.hidden)
                    let (out, elementVariance, correlatedVariance, output) = (combined.out, combined.elementVariance, combined.correlatedVariance, recipe.output)
                    flip = tie.withUnsafeMutableBufferPointer { tp in
                        let ties = tp.baseAddress!
                        return ParallelLoops.map(T * c.hidden) { i in
                            let sigma = (elementVariance[i] + correlatedVariance[i] + routerShare(i)).squareRoot()
                            let (variance, t) = StatisticalModel.roundingVarianceAndTieBias(out[i], sigma: sigma, output)
                            ties[i] = t
                            return variance
                        }
                    }
                }
            }
            PhaseProfile.stop("output flips and ties", since: outputFlipStart)
            let alternatives = combined.alternatives.isEmpty ? nil : PhaseProfile.measure("known alternatives") {
                alternativeBounds(known, combined, routerShare: routerShare, tokens: T)
            }
            statistics = ReferenceStatistics(
                elementVariance: combined.elementVariance, outputFlipVariance: flip, outputTieBias: tie, tieNorm: combined.tieNorm,
                directionBias: direction?.bias,
                excludedTokens: (0..<T).map { router.tieTokens[$0] || inputs.duplicateTokens[$0] },
                expertTokenVariance: combined.expertTokenVariance,
                routerTokenVariance: routerVariance, expertTokenBlockMax: combined.expertTokenBlockMax,
                intermediateVariance: combined.interVariance, intermediateTieBias: combined.interTie, slotExperts: router.slotExpert.map { Int32($0) },
                slots: c.topK + (c.hasSharedExpert ? 1 : 0), contributions: combined.contributions,
                ambiguousTokens: router.statisticallyAmbiguous,
                midpointTokens: recipe.quantizationArithmetic == .approximate ? inputs.midpointTokens : inputs.midpointTokens.map { _ in false },
                directionVariance: direction?.variance, alternatives: alternatives)
        }
        let result = ReferenceResult(
            tokens: T, hidden: c.hidden, experts: c.experts, topK: c.topK, slots: S, sharedFused: fused, recipe: recipe,
            output: combined.out, bound: finalBound, routerLogits: router.logits, routerLogitBound: router.logitBound,
            topkIds: router.topkIds, topkWeights: router.topkWeights, topkWeightBound: router.topkWeightBound,
            sharedGate: router.sharedGate, sharedGateBound: router.sharedGateBound, ambiguousTokens: router.ambiguous,
            routerTolerance: router.routerTolerance, intermediate: combined.inter, intermediateBound: combined.interBound,
            intermediateWidth: Swift.max(c.intermediate, c.sharedIntermediate), statistics: statistics)
        if PhaseProfile.enabled {
            PhaseProfile.stop("total", since: started)
            PhaseProfile.report("T=\(T) \(c) recipe \(recipe.name) bounds \(options.computeBounds) statistics \(statisticsEnabled) "
                                + "contributions \(options.keepContributions) float32 \(options.float32) BLAS threads \(BLAS.threads)",
                                digest: result.profileDigest)
        }
        return result
    }

    /// Dynamic per-token 1×128 fp8 quantization of the activations (fp8 recipes), with the
    /// midpoint radius of each code, and the rows routed to each expert.
    func quantizeActivations(_ x: [Double], tokens T: Int, router: RouterStep) -> ExpertInputs {
        let c = layer.config
        let H = c.hidden, E = c.experts
        let bounds = options.computeBounds
        var xin = x
        var xinRadius = [Float](repeating: 0, count: bounds && recipe.activationFP8 ? T * H : 0)
        var midpointTokens = [Bool](repeating: false, count: statisticsEnabled && recipe.activationFP8 ? T : 0)
        if recipe.activationFP8, let f = layer.weightFormat.fp8 {
            let q = GroupQuantizer(format: f, convention: recipe.scaleConvention)
            // tokens in parallel chunks: each writes only its own row and flag
            let midpoints = !midpointTokens.isEmpty
            withPointer(&xin) { xp in withPointer(&xinRadius) { rp in withPointer(&midpointTokens) { mp in
                ParallelLoops.chunks(T, minimum: 4) { tokens in
                    for t in tokens {
                        let row = x[(t * H)..<((t + 1) * H)].map { Float($0) }
                        let deq = q.fakeQuantize(row: row)
                        for h in 0..<H { xp![t * H + h] = deq[h] }
                        if bounds {
                            // A kernel whose x·(1/scale) differs in the last bit may pick the other code where
                            // the scaled value sits on a rounding midpoint: one fp8 step there.
                            Self.midpointRadius(row: row.map(Double.init), quantizer: q) { i, r in
                                rp![t * H + i] = Float(r)
                                if midpoints { mp![t] = true }
                            }
                        }
                    }
                }
            } } }
        }
        let slotsAll = c.topK + (c.hasSharedExpert ? 1 : 0)
        var rowsOf = [[(Int, Int)]](repeating: [], count: E + 1)
        for t in 0..<T {
            for s in 0..<slotsAll { rowsOf[router.slotExpert[t * slotsAll + s]].append((t, s)) }
        }
        let fp8q: GroupQuantizer? = recipe.intermediateFP8 ? layer.weightFormat.fp8.map { GroupQuantizer(format: $0, convention: recipe.scaleConvention) } : nil
        // tokens whose (quantized) input repeats an earlier token's: the same computation, the same error
        let duplicateTokens = statisticsEnabled ? Self.repeatedRows(xin, rows: T, columns: H) : [Bool](repeating: false, count: T)
        return ExpertInputs(x: xin, xRadius: xinRadius, midpointTokens: midpointTokens, approximateCodes: recipe.quantizationArithmetic == .approximate,
                            duplicateTokens: duplicateTokens, rowsOf: rowsOf,
                            requantizer: fp8q, knownAlternatives: knownAlternativesEnabled(tokens: T))
    }

    /// Per row of `x` (`[rows, columns]`), whether an earlier row equals it element for element
    /// (`==`: −0 equals +0). The rows' hashes in parallel (zeros hashed alike), then in row order
    /// each row against the earlier distinct rows of its hash.
    static func repeatedRows(_ x: [Double], rows: Int, columns: Int) -> [Bool] {
        var hashes = [UInt64](repeating: 0, count: rows)
        x.withUnsafeBufferPointer { xp in hashes.withUnsafeMutableBufferPointer { hp in
            let (x, out) = (xp, hp.baseAddress!)
            ParallelLoops.chunks(rows, minimum: Swift.max(1, (1 << 14) / Swift.max(columns, 1))) { range in
                for t in range {
                    var h: UInt64 = 0xcbf2_9ce4_8422_2325
                    for v in x[(t * columns)..<((t + 1) * columns)] { h = (h ^ (v == 0 ? 0 : v.bitPattern)) &* 0x0000_0100_0000_01b3 }
                    out[t] = h
                }
            }
        } }
        var distinct: [UInt64: [Int]] = [:]
        var repeated = [Bool](repeating: false, count: rows)
        x.withUnsafeBufferPointer { xp in
            for t in 0..<rows {
                let row = xp[(t * columns)..<((t + 1) * columns)]
                let key = hashes[t]
                if distinct[key, default: []].contains(where: { row.elementsEqual(xp[($0 * columns)..<(($0 + 1) * columns)]) }) {
                    repeated[t] = true
                } else {
                    distinct[key, default: []].append(t)
                }
            }
        }
        return repeated
    }

    /// What the expert pipeline accumulates per token.
    struct Combined {
        var out: [Double], outBound: [Double], absSum: [Double]
        var inter: [Double]?, interBound: [Double]?, interVariance: [Double]?, interTie: [Double]?
        var elementVariance: [Double], expertTokenVariance: [Double]
        /// `[T]` the largest single cause in `expertTokenVariance` (`ReferenceStatistics.expertTokenBlockMax`).
        var expertTokenBlockMax: [Double] = []
        /// ‖y_s‖ per (token, slot) `[T, slotsAll]`, and the contributions `w_s·y_s` when kept.
        var slotNorm: [Double]
        /// Σ over the token's rows of |w|·Σ_i ‖W2[:,i]‖·tie_i `[T]`.
        var tieNorm: [Double]
        /// `[T, H]` each element's share of the expert pipeline's correlated variance.
        var correlatedVariance: [Double]
        var contributions: [Float]?
        /// Per touched expert, its rows' stage-2 inputs as the statistical model sees them.
        var projections: [Int: ProjectionInput] = [:]
        /// The ordered accumulation's state (recipes whose combine `simulatesOrder`).
        var ordered: OrderedCombineState? = nil
        /// `[T]`: each token's likely fp8 group-scale moves (known alternatives only, else empty).
        var alternatives: [[TokenAlternative]] = []
    }

    /// Adds an expert's likely group-scale moves to its rows' tokens (`Combined.alternatives`).
    private func collectAlternatives(_ e: Int, _ part: ExpertPart, into acc: inout Combined, router: RouterStep, rowsOf: [[(Int, Int)]]) {
        guard !acc.alternatives.isEmpty else { return }
        let c = layer.config
        let slotsAll = c.topK + (c.hasSharedExpert ? 1 : 0)
        for a in part.alternatives {
            let (t, s) = rowsOf[e][a.row]
            acc.alternatives[t].append(TokenAlternative(expert: e, row: a.row, weight: router.slotWeight[t * slotsAll + s], alternative: a.alternative,
                                                        partial: a.partial, shifts: a.shifts, codeShare: a.codeShare))
        }
    }

    /// Runs every touched expert (concurrently, each GEMM single-threaded, in batches that bound
    /// the memory) and combines their weighted outputs per token.
    func runExperts(_ inputs: ExpertInputs, tokens T: Int, router: RouterStep) throws -> Combined {
        let c = layer.config
        let H = c.hidden, E = c.experts
        let stats = statisticsEnabled
        let slotsAll = c.topK + (c.hasSharedExpert ? 1 : 0)
        let S = c.topK + (c.fusable && options.fuseShared ? 1 : 0)
        let Imax = Swift.max(c.intermediate, c.sharedIntermediate)
        let keep = options.keepIntermediate
        let keepContributions = keepsContributions(tokens: T)
        var acc = Combined(
            out: [Double](repeating: 0, count: T * H), outBound: [Double](repeating: 0, count: T * H),
            absSum: [Double](repeating: 0, count: T * H),
            inter: keep ? [Double](repeating: 0, count: T * S * Imax) : nil, interBound: keep ? [Double](repeating: 0, count: T * S * Imax) : nil,
            interVariance: keep && stats ? [Double](repeating: 0, count: T * S * Imax) : nil,
            interTie: keep && stats ? [Double](repeating: 0, count: T * S * Imax) : nil,
            elementVariance: [Double](repeating: 0, count: stats ? T * H : 0), expertTokenVariance: [Double](repeating: 0, count: stats ? T : 0),
            expertTokenBlockMax: [Double](repeating: 0, count: stats ? T : 0),
            slotNorm: [Double](repeating: 0, count: stats ? T * slotsAll : 0), tieNorm: [Double](repeating: 0, count: stats ? T : 0),
            correlatedVariance: [Double](repeating: 0, count: stats ? T * H : 0),
            contributions: keepContributions ? [Float](repeating: 0, count: T * slotsAll * H) : nil)
        if recipe.combine.simulatesOrder {
            acc.ordered = OrderedCombineState(tokens: T, hidden: H, stats: stats && options.computeBounds, mode: recipe.combine)
        }
        if inputs.knownAlternatives { acc.alternatives = [[TokenAlternative]](repeating: [], count: T) }
        let rowsOf = inputs.rowsOf
        var touched = (0...E).filter { !rowsOf[$0].isEmpty }
        let workers = Swift.max(1, BLAS.threads)
        let rowBudget = Swift.max(1, (1 << 24) / Swift.max(H, 1))
        var batchStart = 0
        var serialScratch = WeightScratch()
        // every expert GEMM runs single-threaded (with workers > 1 the experts run concurrently;
        // with one worker the pinned count is 1 anyway)
        try BLAS.withThreads(1) {
        // The shared expert (expert E: a row for every token) is the largest job, alone in its
        // batch, where it ran on one thread while the other workers idled. With several workers it
        // runs on a thread of its own beside the routed experts' batches and is combined after
        // them, last, where it always was: the same bits (an expert's part is a pure function of
        // its rows; the combine's order per element is unchanged). Memory: its part is held while
        // the routed batches run.
        var shared: (group: DispatchGroup, box: SharedExpertBox)? = nil
        if workers > 1, touched.count > 1, touched.last == E {
            touched.removeLast()
            let box = SharedExpertBox(), group = DispatchGroup()
            group.enter()
            // a thread of its own, not a queue's: it must start now, whatever else the process runs
            let thread = Thread {
                var scratch = WeightScratch()
                box.result = Result { try self.processExpert(E, inputs, &scratch, concurrent: workers > 2) }
                group.leave()
            }
            thread.stackSize = 1 << 23
            thread.start()
            shared = (group, box)
        }
        defer { shared?.group.wait() }
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
                            do { base[i] = try processExpert(batch[i], inputs, &scratch) } catch { lock.lock(); failure = failure ?? error; lock.unlock() }
                        }
                    }
                }
            } else {
                for i in 0..<batch.count { parts[i] = try processExpert(batch[i], inputs, &serialScratch) }
            }
            if let failure { throw failure }
            PhaseProfile.measure("combine") { combine(batch, parts.map { $0! }, into: &acc, tokens: T, router: router, rowsOf: rowsOf, workers: workers) }
            for (bi, e) in batch.enumerated() {
                if let p = parts[bi]!.projection { acc.projections[e] = p }
                collectAlternatives(e, parts[bi]!, into: &acc, router: router, rowsOf: rowsOf)
            }
            batchStart = batchEnd
        }
        if let shared {
            shared.group.wait()
            let part = try shared.box.result!.get()
            shared.box.result = nil
            PhaseProfile.measure("combine") { combine([E], [part], into: &acc, tokens: T, router: router, rowsOf: rowsOf, workers: workers) }
            if let p = part.projection { acc.projections[E] = p }
            collectAlternatives(E, part, into: &acc, router: router, rowsOf: rowsOf)
        }
        }
        return acc
    }

    /// The shared expert's part, computed on its own thread (`runExperts`).
    final class SharedExpertBox: @unchecked Sendable {
        var result: Result<ExpertPart, Error>?
    }

    /// Adds a batch of experts' weighted outputs into the per-token sums, in expert order.
    /// Workers own disjoint token ranges, so every element is summed in the same order as a
    /// serial combine (identical bits).
    private func combine(_ batch: [Int], _ parts: [ExpertPart], into acc: inout Combined, tokens T: Int, router: RouterStep,
                         rowsOf: [[(Int, Int)]], workers: Int) {
        let c = layer.config
        let H = c.hidden
        let bounds = options.computeBounds, stats = statisticsEnabled
        let u = recipe.accumulatorUnitRoundoff
        let slotsAll = c.topK + (c.hasSharedExpert ? 1 : 0)
        let S = c.topK + (c.fusable && options.fuseShared ? 1 : 0)
        let interWidth = Swift.max(c.intermediate, c.sharedIntermediate)
        let lanes = workers > 1 && T > 1 ? Swift.min(workers, T) : 1
        let E = c.experts, K = c.topK
        let weighted = recipe.weighted
        let mode = recipe.combine
        // flips of a contribution are known where it is a rounded grid value (else: may always differ)
        let discrete = weighted.format != nil && weighted != .bf16OrFP32
        let fastPath = combineFastPath
        var ordered = acc.ordered ?? OrderedCombineState(tokens: 0, hidden: 0, stats: false, mode: mode)
        let isOrdered = acc.ordered != nil
        acc.ordered = nil
        defer { if isOrdered { acc.ordered = ordered } }
        ordered.withPointers { sp in
        withUnsafeMutablePointers(&acc) { p in
            func lane(_ lane: Int) {
                let t0 = T * lane / lanes, t1 = T * (lane + 1) / lanes
                for (bi, e) in batch.enumerated() {
                    let part = parts[bi]
                    let Ie = c.intermediate(ofExpert: e)
                    part.y.withUnsafeBufferPointer { yP in part.yBound.withUnsafeBufferPointer { ybP in
                    part.yVariance.withUnsafeBufferPointer { yvP in part.yCorrelated.withUnsafeBufferPointer { ycP in
                        for (r, (t, s)) in rowsOf[e].enumerated() where t >= t0 && t < t1 {
                            if let ip = p.inter, s < S {
                                for i in 0..<Ie {
                                    ip[(t * S + s) * interWidth + i] = part.act[r * Ie + i]
                                    if bounds, let ibp = p.interBound { ibp[(t * S + s) * interWidth + i] = part.actBound[r * Ie + i] }
                                    if let ivp = p.interVariance { ivp[(t * S + s) * interWidth + i] = part.actVariance[r * Ie + i] }
                                    if let itp = p.interTie { itp[(t * S + s) * interWidth + i] = part.actTie[r * Ie + i] }
                                }
                            }
                            let w = router.slotWeight[t * slotsAll + s], wb = router.slotWeightBound[t * slotsAll + s]
                            let y = yP.baseAddress! + r * H, orow = p.out + t * H
                            let last = isOrdered && sp.added[t] == slotsAll - 1
                            let slotFlip = isOrdered && stats && discrete ? router.slotFlip[t * slotsAll + s] : 1
                            if stats {
                                p.expertTokenVariance![t] += w * w * part.rowVariance[r]
                                if let bm = p.expertTokenBlockMax, !part.rowBlockMax.isEmpty { bm[t] = Swift.max(bm[t], w * w * part.rowBlockMax[r]) }
                                p.slotNorm![t * slotsAll + s] = part.rowNorm2[r].squareRoot()
                                p.tieNorm![t] += Swift.abs(w) * part.rowTieNorm[r]
                            }
                            if bounds && !isOrdered && weighted == .none && fastPath {
                                // the default recipes' case through raw pointers, the loop below's
                                // operations in its order (w·w first, as `w * w * x` groups)
                                let yb = ybP.baseAddress! + r * H, obrow = p.outBound + t * H, arow = p.absSum + t * H
                                let ww = w * w, aw = Swift.abs(w)
                                let cp = p.contributions.map { $0 + (t * slotsAll + s) * H }
                                if stats {
                                    let yv = yvP.baseAddress! + r * H, yc = ycP.baseAddress! + r * H
                                    let ev = p.elementVariance! + t * H, cvr = p.correlatedVariance! + t * H
                                    for h in 0..<H {
                                        ev[h] += ww * yv[h]
                                        cvr[h] += ww * yc[h]
                                    }
                                }
                                for h in 0..<H {
                                    let yv = y[h], ybh = yb[h]
                                    let cv = w * yv
                                    let cb = aw * ybh + wb * (Swift.abs(yv) + ybh) + u * Swift.abs(cv)
                                    orow[h] += cv
                                    obrow[h] += cb
                                    arow[h] += Swift.abs(cv) + cb
                                }
                                if let cp { for h in 0..<H { cp[h] = Float(w * y[h]) } }
                            } else if bounds {
                                let yb = ybP.baseAddress! + r * H, obrow = p.outBound + t * H, arow = p.absSum + t * H
                                for h in 0..<H {
                                    let yv = y[h]
                                    var cv = w * yv
                                    var cb = Swift.abs(w) * yb[h] + wb * (Swift.abs(yv) + yb[h]) + u * Swift.abs(cv)
                                    var v = 0.0
                                    if stats {
                                        v = w * w * part.yVariance[r * H + h]
                                        if weighted != .none {
                                            let sigma = (v + w * w * part.yCorrelated[r * H + h]).squareRoot()
                                            v = StatisticalModel.roundingVariance(cv, sigma: sigma, weighted)
                                        }
                                        if !isOrdered { p.elementVariance![t * H + h] += v }
                                        p.correlatedVariance![t * H + h] += w * w * part.yCorrelated[r * H + h]
                                    }
                                    (cv, cb) = Self.roundInterval(cv, cb, weighted)
                                    if isOrdered {
                                        let pc = slotFlip >= 1 || part.yFlip.isEmpty ? 1 : Swift.min(1, part.yFlip[r * H + h] + slotFlip)
                                        Self.orderedAdd(cv, cb, v: v, p: pc, i: t * H + h, shared: e == E, last: last, routedTerms: K, mode: mode,
                                                        out: p.out, outBound: p.outBound, absSum: p.absSum, variance: stats ? p.elementVariance : nil, state: sp)
                                    } else {
                                        orow[h] += cv
                                        obrow[h] += cb
                                    }
                                    arow[h] += Swift.abs(cv) + cb
                                    if let cp = p.contributions { cp[(t * slotsAll + s) * H + h] = Float(cv) }
                                }
                            } else if isOrdered {
                                for h in 0..<H {
                                    let cv = Self.roundInterval(w * y[h], 0, weighted).0
                                    Self.orderedAdd(cv, 0, v: 0, p: 0, i: t * H + h, shared: e == E, last: last, routedTerms: K, mode: mode,
                                                    out: p.out, outBound: p.outBound, absSum: p.absSum, variance: nil, state: sp)
                                }
                            } else if weighted == .none {
                                for h in 0..<H { orow[h] += w * y[h] }
                            } else {
                                for h in 0..<H { orow[h] += Self.roundInterval(w * y[h], 0, weighted).0 }
                            }
                            if isOrdered { sp.added[t] += 1 }
                        }
                    } } } }
                }
            }
            if lanes > 1 {
                DispatchQueue.concurrentPerform(iterations: lanes) { lane($0) }
            } else {
                lane(0)
            }
        }
        }
    }

    /// The final bound: the combine's accumulation over the slots and the output rounding; and,
    /// with statistics, their share of each element's independent variance.
    func outputBound(_ acc: inout Combined, tokens T: Int) -> [Double] {
        guard options.computeBounds else { return acc.outBound }
        let c = layer.config
        let slotsAll = c.topK + (c.hasSharedExpert ? 1 : 0)
        let combineFactor: Double
        switch recipe.combine {
        case .exact: combineFactor = Self.gamma(slotsAll + 2, 0x1p-53)
        case .fp32: combineFactor = Self.gamma(slotsAll + 2, 0x1p-24)
        case .bf16: combineFactor = Double(slotsAll + 1) * 0x1p-8
        case .bf16ExpertOrder: combineFactor = 0   // every rounding taken in combine
        case .fp32RoutedBF16Shared: combineFactor = c.hasSharedExpert ? 0 : Self.gamma(slotsAll + 2, 0x1p-24)
        }
        let smallest = recipe.combine == .bf16 ? 0x1p-133 : 0x1p-149
        let out = acc.out, outBound = acc.outBound, absSum = acc.absSum
        let finalBound = ParallelLoops.map(T * c.hidden) { i in
            let b = outBound[i] + combineFactor * absSum[i] + Double(slotsAll) * smallest
            let (rv, _) = Self.roundInterval(out[i], 0, recipe.output)
            if let f = recipe.output.format {
                let lo = f.round(out[i] - b), hi = f.round(out[i] + b)
                return Swift.max(Swift.abs(lo - out[i]), Swift.abs(hi - out[i]), Swift.abs(rv - out[i]))
            } else {
                return b
            }
        }
        if statisticsEnabled {
            let combine = recipe.combine
            acc.elementVariance.withUnsafeMutableBufferPointer { ev in
                let base = ev.baseAddress
                ParallelLoops.chunks(T * c.hidden) { range in
                    for i in range { base![i] += StatisticalModel.combineVariance(absSum: absSum[i], slots: slotsAll, combine: combine) }
                }
            }
        }
        return finalBound
    }

    /// Per element `[T, H]`, the variance that the routing weights and the shared gate bring:
    /// `Σ_s Var(w_s)·y_s,h² + Σ_j Var(l_j)·w_j²·(y_j,h − ȳ_h)² + Σ_{left out} Var(l)·p²·ȳ_h²`;
    /// nil without the contributions (then the token's total stands for each element).
    func routerElementVariance(_ router: RouterStep, _ acc: Combined, tokens T: Int) -> [Double]? {
        guard let contrib = acc.contributions else { return nil }
        let c = layer.config
        let H = c.hidden, K = c.topK
        let slotsAll = K + (c.hasSharedExpert ? 1 : 0)
        return ParallelLoops.map(T * H) { i in
            let t = i / H, h = i % H
            return router.projectedVariance(token: t, slots: slotsAll, routed: K) { Double(contrib[(t * slotsAll + $0) * H + h]) }
        }
    }

    /// Per token, the variance that the routing weights and the shared gate bring along any unit
    /// direction of the output: `Σ_s Var(w_s)·‖y_s‖² + Σ_j Var(l_j)·w_j²·(‖y_j‖ + ‖ȳ‖)²`
    /// (+ the left-out experts' share of the denominator without renormalization), ȳ = Σ w_s·y_s.
    func routerTokenVariance(_ router: RouterStep, _ acc: Combined, tokens T: Int) -> [Double] {
        let c = layer.config
        let K = c.topK
        let slotsAll = K + (c.hasSharedExpert ? 1 : 0)
        return (0..<T).map { t in
            var ybar = 0.0
            for s in 0..<K { ybar += Swift.abs(router.slotWeight[t * slotsAll + s]) * acc.slotNorm[t * slotsAll + s] }
            var v = router.unchosenLogitVariance[t] * ybar * ybar
            for s in 0..<slotsAll {
                let norm = acc.slotNorm[t * slotsAll + s]
                v += router.slotWeightVariance[t * slotsAll + s] * norm * norm
                if s < K { v += router.slotLogitVariance[t * slotsAll + s] * (norm + ybar) * (norm + ybar) }
            }
            return v
        }
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

    /// The float32 views of one expert matrix `W [rows, columns]` that the bound and statistics
    /// GEMMs read, made in one pass over it (`prepare`); a view not asked for is empty.
    struct PreparedWeights {
        /// `|Float(W)|`: the bound GEMMs' operand.
        var absolute: [Float] = []
        /// `Float(W)`.
        var values: [Float] = []
        /// `Float(W²)`, the square in W's precision.
        var square: [Float] = []
        /// `Float(W)` packed for `StatisticalModel.rangeStats(_:m:k:packed:n:)`.
        var packed: [Float] = []
        /// `Σ_j W[j, q]²` per column, in float64.
        var columnNorm2: [Double] = []

        /// Fills the views asked for from `w` (its active precision), reusing the buffers.
        mutating func prepare(_ w: WeightMatrix, rows n: Int, columns k: Int, absolute wantAbsolute: Bool, values wantValues: Bool = false,
                              square wantSquare: Bool = false, packed wantPacked: Bool = false, columnNorm2 wantNorms: Bool = false) {
            func size<T: BinaryFloatingPoint>(_ a: inout [T], _ count: Int) { if a.count != count { a = [T](repeating: 0, count: count) } }
            size(&absolute, wantAbsolute ? n * k : 0)
            size(&values, wantValues ? n * k : 0)
            size(&square, wantSquare ? n * k : 0)
            size(&packed, wantPacked ? StatisticalModel.packedCount(rows: n, columns: k) : 0)
            size(&columnNorm2, wantNorms ? k : 0)
            withPointer(&absolute) { ap in withPointer(&values) { vp in withPointer(&square) { sp in withPointer(&packed) { pp in
                withPointer(&columnNorm2) { cp in
                    if w.f64.isEmpty {
                        w.f32.withUnsafeBufferPointer { mc_prepare_weights_f32($0.baseAddress!, n, k, ap, vp, sp, pp, cp) }
                    } else {
                        w.f64.withUnsafeBufferPointer { mc_prepare_weights_f64($0.baseAddress!, n, k, ap, vp, sp, pp, cp) }
                    }
                } } } } }
        }
    }

    /// One worker's expert weight buffers, reused across the experts it processes.
    struct WeightScratch {
        var w13 = WeightMatrix(), w2 = WeightMatrix()
        var prepared13 = PreparedWeights(), prepared2 = PreparedWeights()
        mutating func reserve(gateUp: Int, down: Int, float32: Bool) {
            w13.reserve(gateUp, float32: float32)
            w2.reserve(down, float32: float32)
        }
    }

    /// `C = A · Bᵀ`: float64, or float32 in the fast mode.
    func gemm(_ a: [Double], _ b: WeightMatrix, _ c: inout [Double], m: Int, n: Int, k: Int) {
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
    func fusedGemm(_ a: [Float], _ parts: [(UnsafeRawPointer, Int)], rowsEach: Int, into c: inout [Double],
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

    /// `C = A · Bᵀ` for non-negative `A` and `B` (`|W|`: `PreparedWeights.absolute`) in float32,
    /// rounded up by the float32 GEMM's own worst-case error so the result is an upper bound.
    func boundGemm(_ a: [Float], _ bf: [Float], _ c: inout [Double], m: Int, n: Int, k: Int) {
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
    static func floats(_ v: [Double], _ f: (Double) -> Double) -> [Float] {
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

/// Raw pointers into a `Combined` accumulator for the combine's workers (nil where an array is
/// absent or empty).
struct CombinedPointers {
    var out: UnsafeMutablePointer<Double>, outBound: UnsafeMutablePointer<Double>, absSum: UnsafeMutablePointer<Double>
    var inter: UnsafeMutablePointer<Double>?, interBound: UnsafeMutablePointer<Double>?, interVariance: UnsafeMutablePointer<Double>?
    var interTie: UnsafeMutablePointer<Double>?
    var elementVariance: UnsafeMutablePointer<Double>?, expertTokenVariance: UnsafeMutablePointer<Double>?, slotNorm: UnsafeMutablePointer<Double>?
    var tieNorm: UnsafeMutablePointer<Double>?, correlatedVariance: UnsafeMutablePointer<Double>?
    var contributions: UnsafeMutablePointer<Float>?
    var expertTokenBlockMax: UnsafeMutablePointer<Double>? = nil
}

/// Calls `body` with the base address of `a` (nil where it is nil or empty).
private func withPointer<E, R>(_ a: inout [E]?, _ body: (UnsafeMutablePointer<E>?) -> R) -> R {
    if a == nil || a!.isEmpty { return body(nil) }
    return a!.withUnsafeMutableBufferPointer { body($0.baseAddress) }
}

func withPointer<E, R>(_ a: inout [E], _ body: (UnsafeMutablePointer<E>?) -> R) -> R {
    a.isEmpty ? body(nil) : a.withUnsafeMutableBufferPointer { body($0.baseAddress) }
}

/// Calls `body` with raw pointers into every array of `acc`.
func withUnsafeMutablePointers(_ acc: inout MoEReferenceEngine.Combined, _ body: (CombinedPointers) -> Void) {
    withPointer(&acc.out) { o in withPointer(&acc.outBound) { ob in withPointer(&acc.absSum) { asum in
    withPointer(&acc.inter) { ip in withPointer(&acc.interBound) { ibp in withPointer(&acc.interVariance) { ivp in
    withPointer(&acc.elementVariance) { ev in withPointer(&acc.expertTokenVariance) { tv in withPointer(&acc.slotNorm) { sn in
    withPointer(&acc.contributions) { cp in withPointer(&acc.tieNorm) { tn in withPointer(&acc.interTie) { itp in
    withPointer(&acc.correlatedVariance) { cv in withPointer(&acc.expertTokenBlockMax) { bm in
        body(CombinedPointers(out: o!, outBound: ob!, absSum: asum!, inter: ip, interBound: ibp, interVariance: ivp, interTie: itp,
                              elementVariance: ev, expertTokenVariance: tv, slotNorm: sn, tieNorm: tn, correlatedVariance: cv, contributions: cp,
                              expertTokenBlockMax: bm))
    } } } } } } } } } } } } } }
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
