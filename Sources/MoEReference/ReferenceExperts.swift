import CFastGEMM
import Foundation
import LowPrecision
import TensorIO

/// The inputs every expert worker reads (immutable while the experts run).
struct ExpertInputs {
    /// Stage-1 activations `[T, H]` after the recipe's fp8 quantization, and the midpoint radius
    /// of each quantized element (empty without fp8 activations or bounds).
    let x: [Double]
    let xRadius: [Float]
    /// Tokens with an fp8 code at a rounding midpoint (empty without fp8 activations, bounds or
    /// statistics). With `approximateCodes` the statistical model takes the rigorous stage-1
    /// radius for them (a kernel's code there is not a random event); with exact quantization
    /// arithmetic their codes are the reference's and only the rigorous bound widens there.
    let midpointTokens: [Bool]
    /// The recipe's quantization arithmetic is `.approximate`.
    let approximateCodes: Bool
    /// Tokens whose quantized input repeats an earlier token's (statistics only).
    let duplicateTokens: [Bool]
    /// `(token, slot)` rows routed to each expert (index E: the shared expert).
    let rowsOf: [[(Int, Int)]]
    let requantizer: GroupQuantizer?
    /// Whether the statistical model tests likely fp8 group-scale moves as known alternatives
    /// (`MoEReferenceEngine.knownAlternativesEnabled`).
    var knownAlternatives = false
}

/// One expert's stage 1 and stage 2 for all its rows.
struct ExpertPart {
    var act: [Double], actBound: [Double], actVariance: [Double]   // stage-1 intermediate before fp8 requantization
    var actTie: [Double] = []                                       // its tie bias (StatisticalModel.tieBias)
    var y: [Double], yBound: [Double]       // stage-2 output per row, after the recipe's down rounding
    /// Statistical model: per element of y, the variance of independent errors `[n, H]`; per row,
    /// the variance reaching the row's output through correlated paths (Σ_i Var(a_i)·‖W2[:,i]‖²) and ‖y‖².
    var yVariance: [Double], rowVariance: [Double], rowNorm2: [Double]
    /// Per row, the largest single term of `rowVariance` (one element's flip, one fp8 group's scale move).
    var rowBlockMax: [Double] = []
    /// Per element of y, its share of the correlated variance (Σ_i W2[h,i]²·Var(a_i) + fp8 scale changes).
    var yCorrelated: [Double] = []
    /// Per element of y, the probability that a kernel's rounded y differs from the reference's
    /// (ordered combines only; empty: unknown, take 1).
    var yFlip: [Double] = []
    /// Per row, Σ_i ‖W2[:,i]‖·tie_i: a bound on the norm of the systematic error of the row's ties.
    var rowTieNorm: [Double] = []
    /// What the second pass needs to project this expert's correlated errors on any direction.
    var projection: ProjectionInput? = nil
    /// The bf16 intermediate before its rounding and the σ of a kernel's noise there (known
    /// alternatives only).
    var actPre: [Double] = [], actSigma: [Double] = []
    /// Likely fp8 group-scale moves of this expert's rows (known alternatives only).
    var alternatives: [RowAlternative] = []
}

/// A likely move of one row's fp8 group scale (`ScaleAlternative`) as it reaches the row's y
/// (`[H]` each, float32): the group's partial product `Σ_{i∈g} a_i·W2[:,i]` (its scale-move
/// variance in yCorrelated is `factor·partial²`), each move's exact change of y
/// `Σ_{i∈g} Δa_i·W2[:,i]`, and the code-change variance it takes over, `Σ_{i∈g} codeVariance_i·W2[:,i]²`.
struct RowAlternative {
    var row: Int
    var alternative: ScaleAlternative
    var partial: [Float]
    var shifts: [[Float]] = []
    var codeShare: [Float] = []
}

/// One expert's stage-2 inputs as the statistical model sees them, per row: the variance of
/// each input element `[n, Ie]`, and for fp8 the dequantized values `[n, Ie]` with each
/// 1×128 group's scale-change factor `[n, groups]`.
struct ProjectionInput {
    var rows: [(Int, Int)]
    var inputVariance: [Double]   // Double: variances of values near fp32's range end (≈1e-37) square below Float's
    var inputTie: [Float]
    var input: [Float]
    var groupFactors: [Double]
    var groups: Int
}

extension MoEReferenceEngine {
    /// Runs `count` independent tasks, each writing only its own outputs: side by side on the
    /// GCD pool when `concurrent`, else in order. The same operations either way (each GEMM
    /// single-threaded as the caller's BLAS phase has it), so the same bits.
    static func tasks(_ concurrent: Bool, _ count: Int, _ body: (Int) -> Void) {
        if concurrent && count > 1 {
            DispatchQueue.concurrentPerform(iterations: count, execute: body)
        } else {
            for i in 0..<count { body(i) }
        }
    }

    /// Stage 1 (gate/up GEMM, SwiGLU with the recipe's rounding points), the fp8 requantization
    /// and stage 2 (down GEMM) of expert `e` for all its rows. Pure: safe to run concurrently.
    /// `concurrent`: the expert's independent GEMMs side by side and its range statistics over
    /// the pinned thread count (the shared expert, the longest job, on a thread of its own
    /// beside the routed experts: the critical path on a many-core host).
    func processExpert(_ e: Int, _ inputs: ExpertInputs, _ scratch: inout WeightScratch, concurrent: Bool = false) throws -> ExpertPart {
        let c = layer.config
        let H = c.hidden
        let bounds = options.computeBounds, stats = statisticsEnabled
        let u = recipe.accumulatorUnitRoundoff
        let rows = inputs.rowsOf[e]
        let n = rows.count
        let Ie = c.intermediate(ofExpert: e)
        // float32 mode, no bounds, bf16 weights in memory: the fused GEMM reads them directly
        var fused: (gate: UnsafeRawPointer, up: UnsafeRawPointer, down: UnsafeRawPointer)? = nil
        if options.float32 && !bounds && options.fusedBF16GEMM && FastGEMM.path != 0,
           let g = layer.rawBF16(expert: e, .gate), let u = layer.rawBF16(expert: e, .up), let d = layer.rawBF16(expert: e, .down) {
            fused = (g, u, d)
        }
        var mark = PhaseProfile.start(cpu: true)
        func phase(_ name: String) {
            guard PhaseProfile.enabled else { return }
            PhaseProfile.stop("expert: " + name, since: mark, cpu: true)
            mark = PhaseProfile.start(cpu: true)
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
        phase("decode weights")
        // the float32 views the bound and statistics GEMMs read, one pass over each matrix
        let contiguous = stats && recipe.accumulationOrder == .contiguous
        if bounds {
            scratch.prepared13.prepare(w13, rows: 2 * Ie, columns: H, absolute: true, packed: contiguous)
            scratch.prepared2.prepare(w2, rows: H, columns: Ie, absolute: true, values: stats && inputs.requantizer != nil && w2.f32.isEmpty,
                                      square: stats, packed: contiguous, columnNorm2: stats)
        }
        let p13 = scratch.prepared13, p2 = scratch.prepared2
        phase("prepare float32 weights")
        var xe = [Double](repeating: 0, count: n * H)
        inputs.x.withUnsafeBufferPointer { xinP in xe.withUnsafeMutableBufferPointer { dst in
            for (r, (t, _)) in rows.enumerated() { (dst.baseAddress! + r * H).update(from: xinP.baseAddress! + t * H, count: H) }
        } }
        var gu = [Double](repeating: 0, count: n * 2 * Ie)
        var guBound = [Double](repeating: 0, count: bounds ? n * 2 * Ie : 0)
        phase("gather rows")
        // the value GEMM, its bound GEMM and the range statistics of every gate/up dot product
        // (statistics only) are independent
        var guRange: (range: [Float], split: [Float])? = nil
        var guAccumulation: [Double]? = nil   // γ·Σ|x||w| alone, where guBound also holds midpoint radii
        if let fused {
            try fusedGemm(Self.floats(xe) { $0 }, [(fused.gate, 0), (fused.up, Ie)], rowsEach: Ie, into: &gu, m: n, n: 2 * Ie, k: H) {
                var tmp = [Float](repeating: 0, count: 2 * Ie * H)
                try tmp.withUnsafeMutableBufferPointer { try layer.decodeGateUp(expert: e, into: $0.baseAddress!) }
            }
        }
        Self.tasks(concurrent, 3) { task in
            switch task {
            case 0:
                if fused == nil { PhaseProfile.measure("expert: stage-1 GEMM", cpu: true) { gemm(xe, w13, &gu, m: n, n: 2 * Ie, k: H) } }
            case 1:
                guard bounds else { break }
                PhaseProfile.measure("expert: stage-1 bound GEMM", cpu: true) {
                    let g1 = Self.gamma(H + 2 * ((H + 127) / 128) + 4, u)
                    var boundA1 = [Float](repeating: 0, count: n * H)
                    inputs.x.withUnsafeBufferPointer { xinP in boundA1.withUnsafeMutableBufferPointer { dst in
                        for (r, (t, _)) in rows.enumerated() {
                            for h in 0..<H { dst[r * H + h] = Float(g1 * Swift.abs(xinP[t * H + h])) }
                        }
                    } }
                    // exact quantization arithmetic: a midpoint code is the reference's, so the statistical
                    // model takes its accumulation noise from Σ|x||w| alone (without the codes' radius)
                    if stats && !inputs.approximateCodes && !inputs.midpointTokens.isEmpty && rows.contains(where: { inputs.midpointTokens[$0.0] }) {
                        var acc = [Double](repeating: 0, count: n * 2 * Ie)
                        boundGemm(boundA1, p13.absolute, &acc, m: n, n: 2 * Ie, k: H)
                        guAccumulation = acc
                    }
                    if !inputs.xRadius.isEmpty {
                        inputs.xRadius.withUnsafeBufferPointer { xinRadiusP in boundA1.withUnsafeMutableBufferPointer { dst in
                            for (r, (t, _)) in rows.enumerated() {
                                for h in 0..<H { dst[r * H + h] += xinRadiusP[t * H + h] }
                            }
                        } }
                    }
                    boundGemm(boundA1, p13.absolute, &guBound, m: n, n: 2 * Ie, k: H)
                }
            default:
                guard contiguous else { break }
                PhaseProfile.measure("expert: stage-1 range stats", cpu: true) {
                    guRange = StatisticalModel.rangeStats(Self.floats(xe) { $0 }, m: n, k: H, packed: p13.packed, n: 2 * Ie, parallel: concurrent)
                }
            }
        }
        mark = PhaseProfile.start(cpu: true)
        var part = swiGLU(gu: gu, guBound: guBound, guAccumulation: guAccumulation, guRange: guRange, rows: rows, inputs: inputs, n: n, Ie: Ie)
        phase("SwiGLU, rounding, variance")
        var act = part.act, actBound = part.actBound
        var actVariance = part.actVariance
        var actTie = part.actTie
        var groupRowVariance = [Double](repeating: 0, count: stats ? n : 0)
        var groupFactors: [Double] = []
        var candidates: [(row: Int, alternative: ScaleAlternative)] = []
        let colNorm2 = stats ? p2.columnNorm2 : []
        if let q = inputs.requantizer {
            let pre = part.actPre.isEmpty ? nil : (value: part.actPre, sigma: part.actSigma)
            for r in 0..<n {
                if stats {
                    let g = StatisticalModel.requantizationVariance(
                        row: act, variance: &actVariance, tie: &actTie, offset: r * Ie, count: Ie, quantizer: q, columnNorms2: colNorm2,
                        approximate: inputs.approximateCodes, preRounding: pre)
                    groupRowVariance[r] = g.trace
                    groupFactors += g.groupFactors
                    candidates += g.alternatives.map { (r, $0) }
                }
                Self.requantize(row: &act, rowBound: &actBound, offset: r * Ie, count: Ie, quantizer: q, bounds: bounds)
            }
        }
        phase("fp8 requantization")
        // stage 2: the value GEMM, its bound GEMM and the statistics' GEMMs are independent
        var y = [Double](repeating: 0, count: n * H)
        var yBound = [Double](repeating: 0, count: bounds ? n * H : 0)
        let g2 = Self.gamma(Ie + 2 * ((Ie + 127) / 128) + 4, u)
        if let fused {
            try fusedGemm(Self.floats(act) { $0 }, [(fused.down, 0)], rowsEach: H, into: &y, m: n, n: H, k: Ie) {
                var tmp = [Float](repeating: 0, count: H * Ie)
                try tmp.withUnsafeMutableBufferPointer { try layer.decodeDown(expert: e, into: $0.baseAddress!) }
            }
        }
        var yVariance: [Double] = [], rowVariance: [Double] = [], rowNorm2: [Double] = [], rowBlockMax: [Double] = []
        let (actNow, actBoundNow, actVarianceNow) = (act, actBound, actVariance)
        Self.tasks(concurrent, 3) { task in
            switch task {
            case 0:
                if fused == nil { PhaseProfile.measure("expert: stage-2 GEMM", cpu: true) { gemm(actNow, w2, &y, m: n, n: H, k: Ie) } }
            case 1:
                guard bounds else { break }
                PhaseProfile.measure("expert: stage-2 bound GEMM", cpu: true) {
                    var boundA2 = [Float](repeating: 0, count: n * Ie)
                    for i in 0..<(n * Ie) { boundA2[i] = Float(g2 * Swift.abs(actNow[i]) + actBoundNow[i]) }
                    boundGemm(boundA2, p2.absolute, &yBound, m: n, n: H, k: Ie)
                }
            default:
                guard stats else { break }
                var partials: [[Float]] = []
                (yVariance, rowVariance, part.yCorrelated, rowBlockMax, partials) = stage2Variance(
                    act: actNow, actVariance: actVarianceNow, w2: w2, prepared: p2, colNorm2: colNorm2, groupRowVariance: groupRowVariance,
                    groupFactors: groupFactors, candidates: candidates.map { ($0.row, $0.alternative.group) }, n: n, H: H, Ie: Ie, concurrent: concurrent)
                part.alternatives = zip(candidates, partials).map { RowAlternative(row: $0.row, alternative: $0.alternative, partial: $1) }
            }
        }
        mark = PhaseProfile.start(cpu: true)
        if !part.alternatives.isEmpty {
            // each move's exact change of y and the code-change variance it takes over, through W2
            let wf = w2.f32.isEmpty ? p2.values : w2.f32
            for k in part.alternatives.indices {
                let a = part.alternatives[k].alternative
                var shifts = [[Float]](repeating: [Float](repeating: 0, count: H), count: a.deltas.count)
                var share = [Float](repeating: 0, count: H)
                for h in 0..<H {
                    let w = h * Ie + a.start
                    for (m, delta) in a.deltas.enumerated() {
                        var v = 0.0
                        for i in delta.indices where delta[i] != 0 { v += delta[i] * Double(wf[w + i]) }
                        shifts[m][h] = Float(v)
                    }
                    var c = 0.0
                    for i in a.codeVariance.indices where a.codeVariance[i] != 0 { c += a.codeVariance[i] * Double(wf[w + i]) * Double(wf[w + i]) }
                    share[h] = Float(c)
                }
                part.alternatives[k].shifts = shifts
                part.alternatives[k].codeShare = share
            }
            phase("known alternatives' shifts")
        }
        if stats {
            rowNorm2 = (0..<n).map { r in (0..<H).reduce(0.0) { $0 + y[r * H + $1] * y[r * H + $1] } }
            phase("row norms")
        }
        if recipe.down != .none {
            let flips = stats && recipe.combine.simulatesOrder
            if flips { part.yFlip = [Double](repeating: 0, count: n * H) }
            for i in 0..<(n * H) {
                if stats {
                    // σ of y before its rounding: its own accumulation plus its share of the row's
                    // correlated variance (Σ_i W2[h,i]²·Var(a_i): the marginal of this element)
                    let sigma = (yVariance[i] + part.yCorrelated[i]).squareRoot()
                    if flips { part.yFlip[i] = StatisticalModel.flipProbability(y[i], sigma: sigma, recipe.down) }
                    yVariance[i] = StatisticalModel.roundingVariance(y[i], sigma: sigma, recipe.down)
                }
                let (v, b) = Self.roundInterval(y[i], bounds ? yBound[i] : 0, recipe.down)
                y[i] = v
                if bounds { yBound[i] = b }
            }
        }
        phase("y rounding, flips, variance")
        if stats {
            part.rowTieNorm = (0..<n).map { r in (0..<Ie).reduce(0.0) { $0 + actTie[r * Ie + $1] * colNorm2[$1].squareRoot() } }
        }
        if stats && options.keepContributions {
            part.projection = ProjectionInput(rows: rows, inputVariance: actVariance, inputTie: actTie.map { Float($0) },
                                              input: inputs.requantizer == nil ? [] : act.map { Float($0) },
                                              groupFactors: groupFactors, groups: inputs.requantizer == nil ? 0 : (Ie + 127) / 128)
        }
        if !options.keepIntermediate { part.act = []; part.actBound = []; part.actVariance = []; part.actTie = [] }
        part.actPre = []; part.actSigma = []
        part.y = y; part.yBound = yBound
        part.yVariance = yVariance; part.rowVariance = rowVariance; part.rowNorm2 = rowNorm2; part.rowBlockMax = rowBlockMax
        phase("tie norms, projection input")
        return part
    }

    /// SwiGLU with the recipe's rounding points (gate/up, silu, product), the bounds and the
    /// statistical variances of the intermediate.
    private func swiGLU(gu: [Double], guBound: [Double], guAccumulation: [Double]?, guRange: (range: [Float], split: [Float])?, rows: [(Int, Int)], inputs: ExpertInputs,
                        n: Int, Ie: Int) -> ExpertPart {
        let bounds = options.computeBounds, stats = statisticsEnabled
        let u = recipe.accumulatorUnitRoundoff
        let trans = recipe.transcendentalRelativeError
        let H = layer.config.hidden
        let n1 = H + 2 * ((H + 127) / 128) + 4
        // guBound = γ(n1)·Σ|x||w| where no fp8 code sat on a midpoint (else guAccumulation holds
        // it): σ from Σ|x||w| and the dot product's range statistics (StatisticalModel.accumulationSigma)
        let g1 = Self.gamma(n1, u)
        let sigmaPerBound = StatisticalModel.accumulationSigmaFactor(terms: n1, unitRoundoff: u) / g1
        let contiguousSigma = StatisticalModel.AccumulationSigma(terms: n1, length: H, unitRoundoff: u, order: .contiguous)
        func accumulationSigma(_ bound: Double, _ index: Int) -> Double {
            guard let guRange else { return bound * sigmaPerBound }
            return contiguousSigma(absSum: bound / g1, range: Double(guRange.range[index]), split: Double(guRange.split[index]))
        }
        var act = [Double](repeating: 0, count: n * Ie)
        var actBound = [Double](repeating: 0, count: bounds ? n * Ie : 0)
        var actVariance = [Double](repeating: 0, count: stats ? n * Ie : 0)
        var actTie = [Double](repeating: 0, count: stats ? n * Ie : 0)
        let keepPre = stats && inputs.knownAlternatives
        var actPre = [Double](repeating: 0, count: keepPre ? n * Ie : 0), actSigma = actPre
        for r in 0..<n {
            // a token with an fp8 code on a midpoint, approximate quantization: the rigorous radius stands for σ
            let midpoint = inputs.approximateCodes && !inputs.midpointTokens.isEmpty && inputs.midpointTokens[rows[r].0]
            for i in 0..<Ie {
                var g = gu[r * 2 * Ie + i], up = gu[r * 2 * Ie + Ie + i]
                var gb = bounds ? guBound[r * 2 * Ie + i] : 0, ub = bounds ? guBound[r * 2 * Ie + Ie + i] : 0
                var vg = 0.0, vu = 0.0, upstreamTie = 0.0
                if stats {
                    let ag = guAccumulation?[r * 2 * Ie + i] ?? gb, au = guAccumulation?[r * 2 * Ie + Ie + i] ?? ub
                    let sg = midpoint ? gb : accumulationSigma(ag, r * 2 * Ie + i)
                    let su = midpoint ? ub : accumulationSigma(au, r * 2 * Ie + Ie + i)
                    vg = StatisticalModel.roundingVariance(g, sigma: sg, recipe.gateUp)
                    vu = StatisticalModel.roundingVariance(up, sigma: su, recipe.gateUp)
                    let tg = StatisticalModel.tieBias(g, recipe.gateUp.format), tu = StatisticalModel.tieBias(up, recipe.gateUp.format)
                    // (tieBias is 0 without a format: no sigmoid to evaluate then)
                    let ts = recipe.activation.format == nil ? 0 : StatisticalModel.tieBias(g * Self.sigmoid(g), recipe.activation.format)
                    if tg + tu + ts > 0 { upstreamTie = 1.1 * Swift.abs(up) * (tg + ts) + Swift.abs(g * Self.sigmoid(g)) * tu }
                }
                (g, gb) = Self.roundInterval(g, gb, recipe.gateUp)
                (up, ub) = Self.roundInterval(up, ub, recipe.gateUp)
                let sigmoidG = Self.sigmoid(g)
                var s = g * sigmoidG
                var sb = 1.1 * gb + trans * Swift.abs(s)
                // An fp32 silu of a gate below about −87 gives 0: x/(1+exp(−x)) with exp(−x) past
                // fp32's range, or a result in fp32's subnormal range flushed (measured: HF
                // transformers' silu on CPU and CUDA returns −0 at g = −92.5, where silu ≈ −6e−39).
                let mayVanish = u >= 0x1p-24 && (g - gb < Self.fp32SiluVanishingGate || Swift.abs(s) + sb < 0x1p-126)
                if mayVanish { sb = Swift.max(sb, Swift.abs(s) * (1 + 0x1p-20) + 0x1p-126) }
                var vs = 0.0
                if stats {
                    let sg = sigmoidG
                    let d = sg * (1 + g * (1 - sg))
                    vs = StatisticalModel.roundingVariance(s, sigma: (d * d * vg).squareRoot() + trans * Swift.abs(s), recipe.activation)
                    if mayVanish { vs = Swift.max(vs, s * s + 0x1p-252) }
                }
                (s, sb) = Self.roundInterval(s, sb, recipe.activation)
                var h = s * up
                var hb = Swift.abs(up) * sb + Swift.abs(s) * ub + sb * ub + (trans + 2 * u) * Swift.abs(h)
                if stats {
                    let sigma = (up * up * vs + s * s * vu + vs * vu).squareRoot() + (trans + 2 * u) * Swift.abs(h)
                    let (variance, t) = StatisticalModel.roundingVarianceAndTieBias(h, sigma: sigma, recipe.intermediate)
                    actVariance[r * Ie + i] = variance
                    if keepPre { actPre[r * Ie + i] = h; actSigma[r * Ie + i] = sigma }
                    actTie[r * Ie + i] = upstreamTie > 0 ? Swift.max(t, upstreamTie, recipe.intermediate.format?.ulp(of: h) ?? 0) : t
                }
                (h, hb) = Self.roundInterval(h, bounds ? hb : 0, recipe.intermediate)
                act[r * Ie + i] = h
                if bounds { actBound[r * Ie + i] = hb }
            }
        }
        var part = ExpertPart(act: act, actBound: actBound, actVariance: actVariance, actTie: actTie, y: [], yBound: [], yVariance: [], rowVariance: [],
                              rowNorm2: [])
        part.actPre = actPre; part.actSigma = actSigma
        return part
    }

    /// The statistical model's stage 2: the independent part of each output element's variance
    /// (the dot product's own fp32 accumulation, `StatisticalModel.accumulationSigma`) and each row's correlated part
    /// (`Σ_i Var(a_i)·‖W2[:,i]‖²` plus the fp8 groups' scale changes).
    private func stage2Variance(act: [Double], actVariance: [Double], w2: WeightMatrix, prepared p2: PreparedWeights, colNorm2: [Double],
                                groupRowVariance: [Double],
                                groupFactors: [Double], candidates: [(row: Int, group: Int)] = [], n: Int, H: Int, Ie: Int,
                                concurrent: Bool) -> ([Double], [Double], [Double], [Double], [[Float]]) {
        let u = recipe.accumulatorUnitRoundoff
        var mark = PhaseProfile.start(cpu: true)
        func phase(_ name: String) {
            guard PhaseProfile.enabled else { return }
            PhaseProfile.stop("expert: stage-2 variance: " + name, since: mark, cpu: true)
            mark = PhaseProfile.start(cpu: true)
        }
        // Σ|a||W2|, each element's share of the correlated variance Σ_i W2[h,i]²·Var(a_i) (+ the
        // fp8 groups' scale changes below, at most max_g factor_g·(Σ|a||W2|)²) and the range
        // statistics of the dot product's own accumulation: independent
        let order = recipe.accumulationOrder
        var partials: [[Float]] = []
        var absDot = [Double](repeating: 0, count: n * H)
        var correlated = [Double](repeating: 0, count: n * H)
        var rowBlockMax = [Double](repeating: 0, count: n)   // the largest single cause per row (one χ² block)
        var yRange: (range: [Float], split: [Float])? = nil
        Self.tasks(concurrent, 3) { task in
            switch task {
            case 0:
                PhaseProfile.measure("expert: stage-2 variance: |a|·|W2| GEMM", cpu: true) {
                    boundGemm(Self.floats(act) { Swift.abs($0) }, p2.absolute, &absDot, m: n, n: H, k: Ie)
                }
            case 1:
                PhaseProfile.measure("expert: stage-2 variance: Var(a)·W2² GEMM", cpu: true) {
                    boundGemm(actVariance.map { Float($0) }, p2.square, &correlated, m: n, n: H, k: Ie)
                }
            default:
                guard order == .contiguous else { break }
                PhaseProfile.measure("expert: stage-2 variance: range stats", cpu: true) {
                    yRange = StatisticalModel.rangeStats(Self.floats(act) { $0 }, m: n, k: Ie, packed: p2.packed, n: H, parallel: concurrent)
                }
            }
        }
        mark = PhaseProfile.start(cpu: true)
        if !groupFactors.isEmpty {
            // A group's scale moving by r moves every dequantized value of the group by r·a_i: along
            // output h that is r·Σ_{i∈g} a_i·W2[h,i], the group's signed partial dot product (not
            // Σ|a||W2| over every group: that was up to I/128·√128 times too wide per element).
            // float32 partial products, their error bounded by (k+8)·2⁻²³·Σ|a||W2|.
            let groups = groupFactors.count / Swift.max(n, 1)
            let af = Self.floats(act) { $0 }
            let wf = w2.f32.isEmpty ? p2.values : w2.f32
            var part = [Float](repeating: 0, count: n * H)
            partials = [[Float]](repeating: [], count: candidates.count)
            for g in 0..<groups {
                let k0 = g * 128, k = Swift.min(128, Ie - k0)
                guard k > 0 else { break }
                af.withUnsafeBufferPointer { ap in wf.withUnsafeBufferPointer { wp in part.withUnsafeMutableBufferPointer { cp in
                    BLAS.sgemmABtBlock(ap.baseAddress!, lda: Ie, wp.baseAddress!, ldb: Ie, cp.baseAddress!, m: n, n: H, k0: k0, k: k)
                } } }
                // the known alternatives' partial products: exactly these moves, along any direction
                for (c, (r, cg)) in candidates.enumerated() where cg == g { partials[c] = Array(part[(r * H)..<((r + 1) * H)]) }
                let slack = Double(k + 8) * 0x1p-23
                for r in 0..<n {
                    let f = groupFactors[r * groups + g]
                    guard f > 0 else { continue }
                    var block = 0.0
                    for h in 0..<H {
                        let d = Swift.abs(Double(part[r * H + h])) + slack * absDot[r * H + h]
                        let v = f * d * d
                        correlated[r * H + h] += v
                        block += v
                    }
                    rowBlockMax[r] = Swift.max(rowBlockMax[r], block)
                }
            }
        }
        phase("fp8 group partials")
        // the dot product's own accumulation: from Σ|a||w| and its range statistics
        let n2 = Ie + 2 * ((Ie + 127) / 128) + 4
        let sigma = StatisticalModel.AccumulationSigma(terms: n2, length: Ie, unitRoundoff: u, order: order)
        let range = yRange?.range ?? [], split = yRange?.split ?? []
        let yVariance = [Double](unsafeUninitializedCapacity: n * H) { out, count in
            absDot.withUnsafeBufferPointer { ad in range.withUnsafeBufferPointer { rp in split.withUnsafeBufferPointer { sp in
                let (o, a) = (out.baseAddress!, ad.baseAddress!)
                let (r, s) = yRange != nil ? (rp.baseAddress, sp.baseAddress) : (nil, nil)
                ParallelLoops.chunks(n * H, minimum: concurrent ? 1 << 14 : Int.max) { chunk in
                    sigma.variances(absSum: a + chunk.lowerBound, range: r.map { $0 + chunk.lowerBound }, split: s.map { $0 + chunk.lowerBound },
                                    count: chunk.count, into: o + chunk.lowerBound)
                }
            } } }
            count = n * H
        }
        phase("accumulation sigma")
        var rowVariance = [Double](repeating: 0, count: n)
        defer { phase("row variance") }
        for r in 0..<n {
            var v = groupRowVariance.isEmpty ? 0 : groupRowVariance[r]
            var b = rowBlockMax[r]
            for i in 0..<Ie {
                let term = actVariance[r * Ie + i] * colNorm2[i]
                v += term
                b = Swift.max(b, term)
            }
            rowVariance[r] = v
            rowBlockMax[r] = b
        }
        return (yVariance, rowVariance, correlated, rowBlockMax, partials)
    }
}
