import Foundation
import LowPrecision
import MoEReference
import TensorIO

// MARK: - Deterministic random numbers

/// The fuzzer's generator: `SplitMix64` (LowPrecision) seeded from (campaign seed, case index),
/// integer-only, so case `i` of seed `S` is the same on every machine.
public struct FuzzRNG: RandomNumberGenerator {
    var generator: SplitMix64
    public init(seed: UInt64, index: UInt64 = 0) {
        generator = SplitMix64(seed: seed &* SplitMix64.increment ^ (index &+ 0x632B_E59B_D9B4_E019) &* 0xBF58_476D_1CE4_E5B9)
        _ = next(); _ = next()
    }
    public mutating func next() -> UInt64 { generator.next() }
    /// Uniform in `range` (integer arithmetic only).
    public mutating func int(_ range: ClosedRange<Int>) -> Int {
        let n = UInt64(range.upperBound - range.lowerBound + 1)
        return range.lowerBound + Int(next() % n)
    }
    /// True with probability `percent`/100.
    public mutating func chance(_ percent: Int) -> Bool { int(0...99) < percent }
    /// One element, weighted.
    public mutating func pick<T>(_ items: [(T, Int)]) -> T {
        let total = items.reduce(0) { $0 + $1.1 }
        var r = int(0...(total - 1))
        for (v, w) in items {
            if r < w { return v }
            r -= w
        }
        return items.last!.0
    }
    /// Log-uniform in 1…max: a bit length uniformly, then a value of that length.
    public mutating func logUniform(_ max: Int) -> Int {
        guard max > 1 else { return 1 }
        let bits = Int.bitWidth - max.leadingZeroBitCount   // max < 2^bits
        let b = int(0...(bits - 1))
        let lo = 1 << b, hi = Swift.min(max, (1 << (b + 1)) - 1)
        return lo > hi ? max : int(lo...hi)
    }
}

// MARK: - Limits and cost

/// Caps on generated cases, so a CPU campaign stays small and a GPU campaign's host reference
/// stays affordable.
public struct FuzzLimits: Codable, Sendable, Equatable {
    public var maxTokens: Int
    public var maxExperts: Int
    public var maxHidden: Int
    public var maxIntermediate: Int
    /// Upper limit of `FuzzCost.cost` of one case (multiply-adds, roughly).
    public var maxCost: Int

    public init(maxTokens: Int, maxExperts: Int, maxHidden: Int, maxIntermediate: Int? = nil, maxCost: Int) {
        self.maxTokens = Swift.max(1, maxTokens)
        self.maxExperts = Swift.max(1, maxExperts)
        self.maxHidden = Swift.max(1, maxHidden)
        self.maxIntermediate = Swift.max(1, maxIntermediate ?? Swift.min(2048, maxHidden))
        self.maxCost = Swift.max(1, maxCost)
    }

    /// Real shapes (a GPU kernel; the float64 reference runs on the host).
    public static let device = FuzzLimits(maxTokens: 8192, maxExperts: 512, maxHidden: 4096, maxIntermediate: 2048, maxCost: 3_000_000_000)
    /// The CPU model kernel (scalar Swift: every multiply-add is slow).
    public static let cpuModel = FuzzLimits(maxTokens: 512, maxExperts: 64, maxHidden: 1024, maxIntermediate: 512, maxCost: 6_000_000)
    /// The float32 reference as the kernel (BLAS on both sides).
    public static let selfCheck = FuzzLimits(maxTokens: 8192, maxExperts: 512, maxHidden: 2048, maxIntermediate: 1024, maxCost: 40_000_000)
}

public enum FuzzCost {
    /// Work of one case: the expert GEMMs `T·(K+1)·3·I·H`, the weights generated for every
    /// expert that can be touched `min(E, T·K)+1` (all `E`+1 when `allExperts`, as a kernel that
    /// uploads the whole layer does), and the router `T·E·H`.
    public static func cost(_ vc: VerifyCase, allExperts: Bool) -> Int {
        guard let spec = vc.spec else { return 0 }
        let c = spec.config, T = spec.tokens
        let I = Swift.max(c.intermediate, c.sharedIntermediate), H = c.hidden
        let touched = allExperts ? c.experts + 1 : Swift.min(c.experts, T * c.topK) + 1
        let (g, o1) = T.multipliedReportingOverflow(by: (c.topK + 1) * 3 * I * H)
        let w = touched * 3 * I * H * 4
        let r = T * c.experts * H
        return o1 ? Int.max : g &+ w &+ r
    }

    /// The reference's work on one case, for balancing shards, in the proportions of the oracle's
    /// times on the H200 host's catalogue (2026-12-03): the routed experts' GEMMs `T·K·3·I·H`; the
    /// shared expert's `T·3·Is·H` at half weight (one large GEMM runs near peak); the router
    /// `T·E·H` eight times over (its bounds and range statistics per logit); the weights decoded
    /// for the experts touched. (`cost` charges every slot at max(I, Is), which made an unfused
    /// Qwen2-57B layer, Is = 8·I, a whole shard's share of the catalogue.)
    public static func work(_ vc: VerifyCase) -> Double {
        guard let spec = vc.spec else { return 0 }
        let c = spec.config, T = Double(spec.tokens), H = Double(c.hidden)
        let I = Double(c.intermediate), Is = Double(c.hasSharedExpert ? c.sharedIntermediate : 0)
        let touched = Double(Swift.min(c.experts, spec.tokens * c.topK))
        return T * 3 * H * (Double(c.topK) * I + Is / 2) + 4 * 3 * H * (touched * I + Is) + 8 * T * Double(c.experts) * H
    }
}

// MARK: - The generator

/// Which cases a shard runs: index % count == index.
public struct FuzzShard: Codable, Sendable, Equatable, CustomStringConvertible {
    public var index: Int
    public var count: Int
    public init(index: Int = 0, count: Int = 1) { self.index = index; self.count = count }
    /// Parses `i/n`.
    public init(parsing s: String) throws {
        let parts = s.split(separator: "/")
        guard parts.count == 2, let i = Int(parts[0]), let n = Int(parts[1]), n >= 1, i >= 0, i < n else {
            throw VerifyError.badShard(s)
        }
        index = i; count = n
    }
    public func owns(_ caseIndex: Int) -> Bool { caseIndex % count == index }
    /// The `k`-th case index of this shard.
    public func caseIndex(_ k: Int) -> Int { k * count + index }
    public var description: String { "\(index)/\(count)" }

    /// This shard's part of a fixed case list, balanced by work: cases are dealt, largest
    /// `FuzzCost.work` first, each to the shard with the least work so far (ties to the lowest shard),
    /// so every shard of a catalogue gets its share of the T = 4096 cases. Deterministic: the
    /// same list gives the same partition in every process. Order within the shard is the list's.
    /// `multiplicity[i]`: how many references case i needs (several kernels of different recipes
    /// judged together); 1 when nil.
    public func part(of cases: [VerifyCase], multiplicity: [Int]? = nil) -> [VerifyCase] {
        guard count > 1 else { return cases }
        let costs = cases.indices.map { i in FuzzCost.work(cases[i]) * Double(multiplicity?[i] ?? 1) }
        let order = cases.indices.sorted { costs[$0] != costs[$1] ? costs[$0] > costs[$1] : $0 < $1 }
        var load = [Double](repeating: 0, count: count)
        var mine = Set<Int>()
        for i in order {
            let s = load.indices.min { load[$0] != load[$1] ? load[$0] < load[$1] : $0 < $1 }!
            load[s] += Swift.max(costs[i], 1)
            if s == index { mine.insert(i) }
        }
        return cases.indices.filter(mine.contains).map { cases[$0] }
    }
}

/// Random cases, a pure function of (seed, index, limits).
public struct FuzzGenerator: Sendable {
    public let seed: UInt64
    public let limits: FuzzLimits
    /// Count weight generation for all experts in the cost (kernels that upload the whole layer).
    public let allExperts: Bool
    /// Only these weight formats (a Python adapter's FORMATS): a drawn format outside them is
    /// replaced by `formats[index % count]`. nil: all formats.
    public var formats: [WeightFormat]? = nil
    /// Only layers an HF config expresses (a Python adapter gets the config dict): a
    /// qwen3_5_moe layer always renormalizes (transformers ignores `norm_topk_prob` there).
    public var huggingFaceConfigsOnly = false
    /// A kernel's shape constraints (a Python adapter's CONSTRAINTS): H, I and Is are rounded up
    /// to multiples of `shapeMultiple`; with `fusedSharedOnly` a shared expert is drawn fusable
    /// and fused. Drawing inside the contract costs nothing; generating a layer the kernel then
    /// refuses cost grouped_mm's campaign on the H200 most of its time.
    public var shapeMultiple = 1
    public var fusedSharedOnly = false

    public init(seed: UInt64, limits: FuzzLimits, allExperts: Bool = false) {
        self.seed = seed
        self.limits = limits
        self.allExperts = allExperts
    }

    /// Token counts kernels get wrong: tiny, odd, around tile sizes (16, 32, 64, 128) and 4096.
    static let interestingTokens = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 257,
                                    511, 1023, 1025, 2047, 2049, 4095, 4096, 4097, 8191, 8192]
    static let interestingExperts = [1, 2, 3, 4, 7, 8, 16, 31, 32, 60, 64, 128, 256, 512]

    /// A size in 1…max: a multiple of 128, of 16/32, or arbitrary (odd or small).
    static func dimension(_ rng: inout FuzzRNG, max: Int) -> Int {
        let v = rng.logUniform(max)
        switch rng.int(0...9) {
        case 0...3: return Swift.min(max, Swift.max(128, (v + 64) / 128 * 128)) // multiple of 128 when it fits
        case 4...5: let m = rng.chance(50) ? 16 : 32; return Swift.min(max, Swift.max(m, v / m * m))
        case 6: return Swift.min(max, v | 1)                                    // odd
        default: return v
        }
    }

    /// T in 1…max: half from the interesting list (with extra weight on 1–3), half log-uniform
    /// with a lean to odd.
    static func tokenCount(_ rng: inout FuzzRNG, max: Int) -> Int {
        if rng.chance(55) {
            let ok = interestingTokens.filter { $0 <= max }
            var T = ok.isEmpty ? 1 : ok[rng.int(0...(ok.count - 1))]
            if rng.chance(25) { T = Swift.min(max, 1 + rng.int(0...2)) }
            return T
        }
        let T = rng.logUniform(max)
        return rng.chance(50) ? Swift.min(max, T | 1) : T
    }

    /// E in 1…max: half from the interesting list, half log-uniform.
    static func expertCount(_ rng: inout FuzzRNG, max: Int) -> Int {
        if rng.chance(50) {
            let ok = interestingExperts.filter { $0 <= max }
            return ok.isEmpty ? 1 : ok[rng.int(0...(ok.count - 1))]
        }
        return rng.logUniform(max)
    }

    /// Case `index` of this campaign: a pure function of (seed, index, limits).
    public func makeCase(index: Int) -> VerifyCase {
        var rng = FuzzRNG(seed: seed, index: UInt64(index))
        let L = limits
        // format
        var format: WeightFormat = rng.pick([(.bf16, 40), (.fp8e4m3fn, 35), (.fp8e4m3fnuz, 25)])
        if let formats, !formats.isEmpty, !formats.contains(format) { format = formats[index % formats.count] }
        var T = Self.tokenCount(&rng, max: L.maxTokens)
        var E = Self.expertCount(&rng, max: L.maxExperts)
        var K = rng.chance(15) ? Swift.min(E, 16) : Swift.min(E, rng.logUniform(Swift.min(E, 16)))
        // sizes
        var H = Self.dimension(&rng, max: L.maxHidden)
        var I = Self.dimension(&rng, max: L.maxIntermediate)
        // shared expert: none, fusable (Is == I), or not fusable
        var sharedKind = rng.pick([(0, 30), (1, 45), (2, 25)])
        var Is = 0
        if sharedKind == 2 {
            Is = Self.dimension(&rng, max: L.maxIntermediate)
            if Is == I { Is = I > 1 ? I - 1 : 2 }
        }
        let family: ModelFamily = rng.pick([(.qwen35Moe, 40), (.qwen3Next, 30), (.qwen2Moe, 30)])
        var renormalize = family != .qwen2Moe
        if rng.chance(15) { renormalize.toggle() }
        if huggingFaceConfigsOnly && family == .qwen35Moe { renormalize = true }
        let routing: RoutingMode = rng.pick([(.uniform, 40), (.hotExperts, 15), (.oneExpert, 15), (.allNegative, 15), (.nearTies, 15)])
        var inputs: InputMode = rng.pick([(.normal, 40), (.outliers, 15), (.large, 15), (.fp8Grid, 15), (.coherent, 15)])
        var scales = ScaleProfile.counter
        if format.fp8 != nil && rng.chance(25) {
            scales = .spreadAcrossK
            if rng.chance(70) { inputs = .coherent }
        }
        let fuseDraw = rng.chance(85) || fusedSharedOnly
        if fusedSharedOnly && sharedKind == 2 { sharedKind = 1 }
        let splitDraw = rng.next()
        let splitOn = rng.chance(50)
        let caseSeed = rng.next() >> 16

        // bound the cost: halve dimensions (chosen at random, odd stays odd) until it fits
        func build() -> VerifyCase {
            let m = Swift.max(1, shapeMultiple)
            func up(_ v: Int) -> Int { v == 0 ? 0 : (v + m - 1) / m * m }
            var sharedI = sharedKind == 0 ? 0 : (sharedKind == 1 ? up(I) : up(Is))
            if sharedKind == 2 && sharedI == up(I) { sharedI += m }   // rounding must not make it fusable
            let config = MoEConfig(family: family, hidden: up(H), intermediate: up(I), sharedIntermediate: sharedI, experts: E, topK: K,
                                   renormalize: renormalize)
            let spec = SyntheticSpec(config: config, format: format, tokens: T, seed: caseSeed, routing: routing, inputs: inputs, scales: scales)
            var split = 1
            if format.fp8 != nil && splitOn {
                let kb = (config.hidden + 127) / 128
                split = 1 + Int(splitDraw % UInt64(kb))
            }
            return VerifyCase(name: "fuzz-s\(seed)-i\(index)", spec: spec, splitK: split, fuseShared: config.fusable && fuseDraw)
        }
        var vc = build()
        var guardCount = 0
        while FuzzCost.cost(vc, allExperts: allExperts) > L.maxCost && guardCount < 200 {
            guardCount += 1
            var options: [Int] = []
            if T > 1 { options.append(0) }
            if H > 1 { options.append(1) }
            if Swift.max(I, Is) > 1 { options.append(2) }
            if E > 1 { options.append(3) }
            if K > 1 { options.append(4) }
            guard !options.isEmpty else { break }
            switch options[rng.int(0...(options.count - 1))] {
            case 0: T = (T + 1) / 2
            case 1: H = (H + 1) / 2
            case 2: I = Swift.max(1, (I + 1) / 2); if Is > 0 { Is = Swift.max(1, (Is + 1) / 2); if Is == I { Is = I + 1 } }
            case 3: E = (E + 1) / 2; K = Swift.min(K, E)
            default: K = (K + 1) / 2
            }
            vc = build()
        }
        return vc
    }

    /// The cases of `shard` among the first `count` indices.
    public func cases(count: Int, shard: FuzzShard = FuzzShard()) -> [VerifyCase] {
        (0..<count).filter { shard.owns($0) }.map { makeCase(index: $0) }
    }
}

// MARK: - The float32 reference as a kernel

/// The reference engine in its float32 fast mode, presented as a kernel: its router outputs,
/// stage-1 intermediate (teacher-forced with the reference's ids) and output are judged against
/// the float64 oracle's bounds. A correct reference must never fail this (`moecheck fuzz --cpu-selfcheck`).
public final class ReferenceSelfCheckKernel: KernelUnderTest {
    public var name: String { "reference-float32" }
    public var device: String { "CPU (float32 reference engine)" }
    public init() {}

    public func recipe(for format: WeightFormat) throws -> Recipe { .default(for: format) }

    /// Runs the float32 engine (beside oracle runs: engines share OpenBLAS's thread count by
    /// phases, `BLAS.withThreads`, so each gives the bits it gives alone).
    public func run(_ vc: VerifyCase, layer: KernelLayerSource, referenceIds: [Int32], referenceWeights: [Float]) throws -> KernelRun {
        try runEngine(vc, layer: layer, referenceIds: referenceIds)
    }

    func runEngine(_ vc: VerifyCase, layer: KernelLayerSource, referenceIds: [Int32]) throws -> KernelRun {
        let c = layer.config, T = layer.tokens, K = c.topK, H = c.hidden, I = c.intermediate
        let refLayer: MoELayerSource = (vc.fuseShared || !c.hasSharedExpert) ? layer : RoutedOnlyLayer(layer)
        let engine = try MoEReferenceEngine(layer: refLayer, recipe: try recipe(for: layer.weightFormat),
                                            options: ReferenceOptions(computeBounds: false, keepIntermediate: true, float32: true,
                                                                      fuseShared: vc.fuseShared))
        let x = try layer.kernelInputs()
        let free = try engine.run(inputs: x, tokens: T)
        let S = free.slots
        func routed(_ ids: [Int32]) -> [[Int]] { (0..<T).map { t in (0..<K).map { Int(ids[t * S + $0]) } } }
        let want = routed(referenceIds)
        let same = routed(free.topkIds) == want
        let forced = same ? free : try engine.run(inputs: x, tokens: T, routing: RoutingOverride(ids: want), replacing: free)
        var inter = [Double](repeating: 0, count: T * S * I)
        let width = forced.intermediateWidth
        if let fi = forced.intermediate {
            for p in 0..<(T * S) { for i in 0..<I { inter[p * I + i] = fi[p * width + i] } }
        }
        var weights = free.topkWeights.map { Float($0) }
        if vc.fuseShared { for t in 0..<T { weights[t * S + K] = Float(free.sharedGate[t]) } }
        precondition(free.output.count == T * H)
        // The engine returns the output before its final rounding; a kernel writes it rounded
        // (fp32 accumulator, then the recipe's output format).
        let output = engine.recipe.output
        func store(_ v: [Double]) -> [Double] {
            v.map { x in
                let f = Float(x)
                switch output {
                case .bf16, .bf16OrFP32: return Double(BFloat16.round(f))
                case .fp32: return Double(f)
                case .none: return x
                }
            }
        }
        let out = store(free.output)
        return KernelRun(routing: KernelRouting(logits: free.routerLogits.map { Float($0) }, ids: free.topkIds, weights: weights.map(Double.init), slots: S),
                         alignProblems: [], intermediate: inter, stagedOutput: same ? out : store(forced.output),
                         forwardOutputs: [out, out], forwardMilliseconds: 0)
    }
}

// MARK: - Shrinking

/// What a failure looks like, to keep shrinking toward the same bug.
public func failureSignature(_ r: CaseReport) -> String? {
    if r.passed { return nil }
    if r.error != nil { return "error" }
    return r.stages.first(where: { !$0.passed })?.stage ?? "failed"
}

public struct ShrinkStep: Codable, Sendable {
    public var change: String
    public var spec: String
}

public struct ShrinkResult: Codable, Sendable {
    public var original: VerifyCase
    public var minimal: VerifyCase
    public var report: CaseReport
    public var attempts: Int
    public var steps: [ShrinkStep]
}

/// Greedy shrinking of a failing case: smaller T, fewer experts, smaller K, smaller H and I,
/// simpler distributions, split 1, no shared expert, bf16. A candidate is kept only when it still
/// fails at the same first failing stage (or any stage, when `sameStage` is false).
public struct Shrinker {
    public let verifier: CaseVerifier
    public var budget: Int
    public var sameStage: Bool
    /// The kernel's contract (the generator's): candidates keep H, I and Is multiples of
    /// `shapeMultiple`, a fused shared expert fused, and a weight format in `formats` — a
    /// candidate outside it only comes back `Unsupported` (or fails for the wrong reason).
    public var shapeMultiple = 1
    public var fusedSharedOnly = false
    public var formats: [WeightFormat]? = nil

    public init(verifier: CaseVerifier, budget: Int = 150, sameStage: Bool = true) {
        self.verifier = verifier
        self.budget = budget
        self.sameStage = sameStage
    }

    /// Smaller values of a dimension, largest reduction first: the minimum, halving, rounding
    /// down to a multiple of 16 and 8, then v − v/4, v − v/8, … (a bisection toward v − 1: the
    /// failing element often sits near the end, where halving cuts it off), then v − 1.
    static func smaller(_ v: Int, min: Int = 1) -> [Int] {
        var out: [Int] = []
        func add(_ x: Int) { if x >= min && x < v && !out.contains(x) { out.append(x) } }
        add(min)
        add(v / 2)
        add(v / 16 * 16)
        add(v / 8 * 8)
        var d = v / 4
        while d >= 1 { add(v - d); d /= 2 }
        add(v - 1)
        return out
    }

    /// Candidates, simplest change first within each dimension, inside the contract: H, I and
    /// Is stay multiples of `multiple`, a fused shared expert stays fused (`fusedSharedOnly`),
    /// the format stays in `formats`.
    public static func candidates(_ vc: VerifyCase, multiple: Int = 1, fusedSharedOnly: Bool = false,
                                  formats: [WeightFormat]? = nil) -> [(String, VerifyCase)] {
        var out: [(String, VerifyCase)] = []
        guard let s = vc.spec else { return [] }
        let c = s.config
        let m = Swift.max(1, multiple)
        // a dimension's smaller values that keep it a multiple of m (all of them when m = 1)
        func dims(_ v: Int) -> [Int] { v % m == 0 ? smaller(v / m).map { $0 * m } : smaller(v).filter { $0 % m == 0 } }
        func with(_ what: String, _ f: (inout VerifyCase) -> Void) {
            var n = vc
            f(&n)
            // keep the case valid
            n.spec!.config.topK = Swift.min(n.spec!.config.topK, n.spec!.config.experts)
            if !n.spec!.config.fusable { n.fuseShared = false }
            if n.spec!.format.fp8 == nil { n.splitK = 1 }
            n.splitK = Swift.max(1, Swift.min(n.splitK, (n.spec!.config.hidden + 127) / 128))
            if n.spec!.format.fp8 == nil && n.spec!.scales != .counter { n.spec!.scales = .counter }
            out.append((what, n))
        }
        for t in smaller(s.tokens) { with("T \(s.tokens)→\(t)") { $0.spec!.tokens = t } }
        for e in smaller(c.experts) { with("E \(c.experts)→\(e)") { $0.spec!.config.experts = e } }
        for k in smaller(c.topK) { with("K \(c.topK)→\(k)") { $0.spec!.config.topK = k } }
        for h in dims(c.hidden) { with("H \(c.hidden)→\(h)") { $0.spec!.config.hidden = h } }
        for i in dims(c.intermediate) {
            with("I \(c.intermediate)→\(i)") {
                if c.fusable { $0.spec!.config.sharedIntermediate = i }
                $0.spec!.config.intermediate = i
            }
        }
        if c.hasSharedExpert && !c.fusable {
            for i in dims(c.sharedIntermediate) where i != c.intermediate {
                with("Is \(c.sharedIntermediate)→\(i)") { $0.spec!.config.sharedIntermediate = i }
            }
        }
        if s.routing != .uniform { with("routing \(s.routing.rawValue)→uniform") { $0.spec!.routing = .uniform } }
        if s.inputs != .normal { with("inputs \(s.inputs.rawValue)→normal") { $0.spec!.inputs = .normal } }
        if s.scales != .counter { with("scales \(s.scales.rawValue)→counter") { $0.spec!.scales = .counter } }
        if vc.splitK > 1 {
            with("split_k \(vc.splitK)→1") { $0.splitK = 1 }
            if vc.splitK > 2 { with("split_k \(vc.splitK)→\(vc.splitK / 2)") { $0.splitK = vc.splitK / 2 } }
        }
        if c.hasSharedExpert { with("shared expert off") { $0.spec!.config.sharedIntermediate = 0; $0.fuseShared = false } }
        if vc.fuseShared && !fusedSharedOnly { with("shared expert unfused") { $0.fuseShared = false } }
        if s.format != .bf16 {
            let allowed = { (f: WeightFormat) in formats?.contains(f) ?? true }
            if allowed(.bf16) { with("format \(s.format.rawValue)→bf16") { $0.spec!.format = .bf16 } }
            if s.format == .fp8e4m3fnuz && allowed(.fp8e4m3fn) { with("format fnuz→fn") { $0.spec!.format = .fp8e4m3fn } }
        }
        return out
    }

    /// Shrinks `vc` (whose report is `report`, a failure). `progress` sees each accepted step.
    public func shrink(_ vc: VerifyCase, report: CaseReport, progress: ((ShrinkStep) -> Void)? = nil) -> ShrinkResult {
        let target = failureSignature(report)
        var best = vc, bestReport = report
        var attempts = 0
        var steps: [ShrinkStep] = []
        var tried = Set<String>()
        func key(_ v: VerifyCase) -> String {
            String(decoding: (try? JSONEncoder().encode(v)) ?? Data(), as: UTF8.self)
        }
        tried.insert(key(vc))
        var improved = true
        while improved && attempts < budget {
            improved = false
            for (what, cand) in Self.candidates(best, multiple: shapeMultiple, fusedSharedOnly: fusedSharedOnly, formats: formats) {
                if attempts >= budget { break }
                let k = key(cand)
                if tried.contains(k) { continue }
                tried.insert(k)
                attempts += 1
                let r = verifier.verify(cand)
                guard let sig = failureSignature(r) else { continue }
                if sameStage && sig != target { continue }
                best = cand
                bestReport = r
                let step = ShrinkStep(change: what, spec: cand.description)
                steps.append(step)
                progress?(step)
                improved = true
                break
            }
        }
        var named = best
        if named.name == vc.name && !steps.isEmpty { named.name = vc.name + "-shrunk" }
        bestReport.name = named.name
        return ShrinkResult(original: vc, minimal: named, report: bestReport, attempts: attempts, steps: steps)
    }
}

// MARK: - Replay JSON

public enum FuzzReplay {
    /// One-line JSON of a case (single-quote safe for a shell command line).
    public static func json(_ vc: VerifyCase) -> String {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return String(decoding: (try? enc.encode(vc)) ?? Data(), as: UTF8.self)
    }

    public static func decode(_ json: String) throws -> VerifyCase {
        do {
            return try JSONDecoder().decode(VerifyCase.self, from: Data(json.utf8))
        } catch {
            throw VerifyError.badReplay("\(error)")
        }
    }
}

// MARK: - Campaign

/// A campaign's outcome.
public struct FuzzSummary: Codable, Sendable {
    public var kernel: String
    public var device: String
    public var seed: UInt64
    public var shard: FuzzShard
    public var limits: FuzzLimits
    public var casesRun: Int
    public var failed: Int
    /// Generated cases the kernel declared outside its contract (not counted in `casesRun`).
    public var skipped: Int = 0
    /// Generated cases not judged because the adapter ran out of GPU memory after its retries
    /// (not counted in `casesRun`; another case is drawn).
    public var notJudged: Int = 0
    public var seconds: Double
    /// Seconds spent shrinking (included in `seconds`).
    public var shrinkSeconds: Double
    /// "all" or "failures" (reports of passing cases are dropped past `FuzzCampaign.allReportsLimit`).
    public var reportsIncluded: String
    public var reports: [CaseReport]
    public var shrunk: [ShrinkResult]
    /// One command line per shrunk failure that replays its minimal case.
    public var reproducers: [String]
    /// Where the campaign's time went, over every case run (shrinking excluded).
    public var referenceSeconds = 0.0, kernelSeconds = 0.0, judgeSeconds = 0.0
    /// Seconds the kernel side waited for references (pipelined campaigns; nil: serial).
    public var waitSeconds: Double? = nil
    /// Cases whose reference came from the on-disk cache (nil: no cache in use).
    public var cachedReferences: Int? = nil

    public var passed: Int { casesRun - failed }
    public var line: String {
        String(format: "fuzz: %@, seed %llu, shard %@: %d cases, %d failures, %.1f s%@ — %d passed, %d failed",
               kernel, seed, shard.description, casesRun, failed, seconds,
               (skipped > 0 ? " (\(skipped) generated cases outside the kernel's contract skipped)" : "")
               + (notJudged > 0 ? " (\(notJudged) not judged: the adapter ran out of GPU memory)" : ""), passed, failed)
    }
    /// Cases/s and where the time went: reference, kernel, judging, waiting for the reference
    /// (pipelined) and the rest (case generation, transfers, shrinking). Pipelined, the reference
    /// runs on its own thread: the rest is what the kernel side spent outside kernel, judging and
    /// waiting.
    public var timeSplit: String {
        let rest = Swift.max(0, seconds - kernelSeconds - judgeSeconds - (waitSeconds ?? referenceSeconds))
        var s = String(format: "fuzz: %.2f cases/s; reference %.1f s, kernel %.2f s, judging %.1f s", Double(casesRun) / Swift.max(seconds, 1e-9),
                       referenceSeconds, kernelSeconds, judgeSeconds)
        if let waitSeconds { s += String(format: ", waiting for the reference %.1f s (pipelined: references and judging ran beside the kernel)", waitSeconds) }
        s += String(format: ", the rest %.1f s (case generation, transfers, shrinking %.1f s)", rest, shrinkSeconds)
        if let cachedReferences { s += ", \(cachedReferences) of \(casesRun) references from the cache" }
        return s
    }
}

/// Runs generated cases against a kernel until a case count or a time budget is reached.
public struct FuzzCampaign {
    public var generator: FuzzGenerator
    public var verifier: CaseVerifier
    public var shard: FuzzShard
    /// Stop after this many cases (of this shard).
    public var maxCases: Int?
    /// Start no new case after this many seconds.
    public var seconds: Double?
    /// Shrink the first failure of each distinct failing stage, at most this many.
    public var maxShrinks: Int = 3
    public var shrinkBudget: Int = 150
    /// Reports of every case are kept up to this many cases; past it, failures only.
    public static let allReportsLimit = 1000
    /// Several cases in flight (`ReferencePipeline`): references computed ahead and concurrently,
    /// each case judged beside the next one's kernel; false: one case at a time.
    public var pipelined = true
    /// Cases in flight at most, and the memory budget of their estimated footprint (pipelined).
    public var inFlight = ReferencePipeline.defaultDepth
    public var memoryBudget = ReferencePipeline.defaultMemoryBudget

    public init(generator: FuzzGenerator, verifier: CaseVerifier, shard: FuzzShard = FuzzShard(), maxCases: Int? = nil, seconds: Double? = nil) {
        self.generator = generator
        self.verifier = verifier
        self.shard = shard
        self.maxCases = maxCases
        self.seconds = seconds
    }

    public enum Event {
        case caseDone(index: Int, report: CaseReport, run: Int, failed: Int, elapsed: Double)
        case shrinkStep(ShrinkStep)
        case shrunk(ShrinkResult)
    }

    /// `reproducer(vc)` builds the command line that replays a case. With `pipelined`, up to
    /// `inFlight` cases are generated ahead and their references computed while the kernel runs
    /// the earlier ones; the time and case budgets are then checked when a case is generated (up
    /// to `inFlight` cases early). Reports, verdicts and the summary's counts are the same as
    /// those of a serial campaign of the same cases.
    public func run(reproducer: (VerifyCase) -> String, event: (Event) -> Void = { _ in }) -> FuzzSummary {
        let start = Date()
        var reports: [CaseReport] = []
        var shrunk: [ShrinkResult] = []
        var reproducers: [String] = []
        var shrunkStages = Set<String>()
        var shrinkSeconds = 0.0
        var run = 0, failed = 0, generated = 0, skipped = 0, notJudged = 0
        var keepAll = true
        var k = 0
        var times = (reference: 0.0, kernel: 0.0, judge: 0.0, wait: 0.0)
        var indices: [Int] = []
        var cached = 0
        func next() -> VerifyCase? {
            if let maxCases, generated >= maxCases { return nil }
            if let seconds, Date().timeIntervalSince(start) >= seconds { return nil }
            if maxCases == nil && seconds == nil { return nil }
            if skipped + notJudged > 20 * Swift.max(run, 1) + 100 { return nil }   // a kernel that refuses (nearly) everything
            let index = shard.caseIndex(k)
            k += 1
            generated += 1
            indices.append(index)
            return generator.makeCase(index: index)
        }
        func judged(_ vc: VerifyCase, _ r: CaseReport) {
            let index = indices.removeFirst()
            if let why = r.skipped {
                // outside the kernel's contract (or no GPU memory): not a case of the campaign, another is drawn
                if why.hasPrefix(CaseReport.notJudged) { notJudged += 1 } else { skipped += 1 }
                generated -= 1
                return
            }
            run += 1
            times.reference += r.referenceSeconds; times.kernel += r.kernelMilliseconds / 1000
            times.judge += r.judgeSeconds ?? 0; times.wait += r.waitSeconds ?? 0
            if r.referenceCached == true { cached += 1 }
            if keepAll { reports.append(r) }
            if run > Self.allReportsLimit && keepAll {
                keepAll = false
                reports = reports.filter { !$0.passed }
            }
            if !r.passed {
                failed += 1
                if !keepAll { reports.append(r) }
            }
            event(.caseDone(index: index, report: r, run: run, failed: failed, elapsed: Date().timeIntervalSince(start)))
            if let sig = failureSignature(r), shrunk.count < maxShrinks, !shrunkStages.contains(sig) {
                shrunkStages.insert(sig)
                let t0 = Date()
                let res = withoutActuallyEscaping(event) { ev in
                    var shrinker = Shrinker(verifier: verifier, budget: shrinkBudget)
                    shrinker.shapeMultiple = generator.shapeMultiple
                    shrinker.fusedSharedOnly = generator.fusedSharedOnly
                    shrinker.formats = generator.formats
                    return shrinker.shrink(vc, report: r) { ev(.shrinkStep($0)) }
                }
                shrinkSeconds += Date().timeIntervalSince(t0)
                shrunk.append(res)
                reproducers.append(reproducer(res.minimal))
                event(.shrunk(res))
            }
        }
        if pipelined {
            ReferencePipeline(verifier: verifier, depth: inFlight, memoryBudget: memoryBudget).run(next: next, each: judged)
        } else {
            while let vc = next() { judged(vc, verifier.verify(vc)) }
        }
        return FuzzSummary(kernel: verifier.kernel.name, device: verifier.kernel.device, seed: generator.seed, shard: shard,
                           limits: generator.limits, casesRun: run, failed: failed, skipped: skipped, notJudged: notJudged, seconds: Date().timeIntervalSince(start),
                           shrinkSeconds: shrinkSeconds, reportsIncluded: keepAll ? "all" : "failures", reports: reports,
                           shrunk: shrunk, reproducers: reproducers,
                           referenceSeconds: times.reference, kernelSeconds: times.kernel, judgeSeconds: times.judge,
                           waitSeconds: pipelined ? times.wait : nil, cachedReferences: verifier.cache == nil ? nil : cached)
    }
}
