import Foundation
import LowPrecision
import MoEReference
import Testing
import TensorIO
import MoECheckTestSupport

// Teacher forcing of a few tokens: rerunning only the tokens whose override changes the
// reference's experts, spliced into the reference, gives what a rerun of the whole case gives.

@Suite("Teacher forcing of a few tokens")
struct TeacherForcingTests {
    /// The routed experts in the engine's own order (logit descending, ties to the lower id), so
    /// that a full rerun with them repeats the free run bit for bit.
    static func freeChoice(_ r: ReferenceResult, token t: Int) -> [Int] {
        let E = r.experts
        let row = (0..<E).map { r.routerLogits[t * E + $0] }
        return Array((0..<E).sorted { row[$0] != row[$1] ? row[$0] > row[$1] : $0 < $1 }.prefix(r.topK))
    }

    /// An override that takes, at every `every`-th token, the (K+1)-th expert instead of the K-th
    /// (where K < E), and the free choice elsewhere.
    static func override(_ r: ReferenceResult, every: Int) -> (RoutingOverride, changed: [Int]) {
        let E = r.experts, K = r.topK
        var changed: [Int] = []
        let ids = (0..<r.tokens).map { t -> [Int] in
            var chosen = freeChoice(r, token: t)
            guard t % every == every / 2, K < E else { return chosen }
            let row = (0..<E).map { r.routerLogits[t * E + $0] }
            let order = (0..<E).sorted { row[$0] != row[$1] ? row[$0] > row[$1] : $0 < $1 }
            chosen[K - 1] = order[K]
            changed.append(t)
            return chosen
        }
        return (RoutingOverride(ids: ids), changed)
    }

    struct Case: CustomTestStringConvertible, Sendable {
        var name: String
        var config: MoEConfig
        var format: WeightFormat
        var recipe: Recipe
        var tokens: Int
        /// Contributions (and the direction variances) kept only by a run of fewer tokens.
        var contributionsOnlyInSubRuns = false
        var testDescription: String { name }
    }

    static let fusedShape = MoEConfig(family: .qwen35Moe, hidden: 200, intermediate: 136, sharedIntermediate: 136, experts: 6, topK: 2)
    static let cases: [Case] = [
        Case(name: "fused bf16", config: fusedShape, format: .bf16, recipe: .fusedBF16, tokens: 40),
        Case(name: "fused fp8 e4m3fn", config: fusedShape, format: .fp8e4m3fn, recipe: .fusedFP8, tokens: 40),
        Case(name: "unfused bf16 hf-bf16, no renormalization",
             config: MoEConfig(family: .qwen2Moe, hidden: 96, intermediate: 32, sharedIntermediate: 80, experts: 8, topK: 3, renormalize: false),
             format: .bf16, recipe: .hfBF16, tokens: 33),
        Case(name: "fused bf16 exact (no rounding points)", config: fusedShape, format: .bf16, recipe: .exact, tokens: 40),
        Case(name: "fused fp8 e4m3fnuz, contributions beyond the limit", config: fusedShape, format: .fp8e4m3fnuz, recipe: .fusedFP8, tokens: 24,
             contributionsOnlyInSubRuns: true),
    ]

    /// Every array of a result (its statistics' included), by field path, as Double (Float,
    /// Int32 and Bool convert exactly).
    static func arrays(_ v: Any, _ path: String = "result") -> [(String, [Double])] {
        switch v {
        case let x as [Double]: return [(path, x)]
        case let x as [Float]: return [(path, x.map(Double.init))]
        case let x as [Int32]: return [(path, x.map(Double.init))]
        case let x as [Bool]: return [(path, x.map { $0 ? 1 : 0 })]
        default: break
        }
        let m = Mirror(reflecting: v)
        if m.displayStyle == .enum || m.displayStyle == .struct && path.hasSuffix(".recipe") { return [] }
        return m.children.flatMap { arrays($0.value, path + "." + ($0.label ?? "some")) }
    }

    /// How a field of a partial rerun may differ from a full rerun's. A row's values are the
    /// same computation, but OpenBLAS's bits for a row of a GEMM depend on how many rows the call
    /// holds, and each expert's GEMMs hold other rows in the two runs (as they already do in a
    /// full rerun against the free run). So: integer and flag fields not at all; float64 values
    /// by 1e-12 relative (bit for bit where the recipe rounds them to fp32/bf16; `exact` does
    /// not); values from the bounds' and the statistical model's float32 GEMMs by 1e-4 relative
    /// (measured: 2e-5 at most) in all but 0.5% of the elements (a rounding's flip variance, a
    /// bound that an fp8 scale decides: values that jump at a threshold).
    static func tolerance(_ field: String) -> (relative: Double, outliers: Double)? {
        switch field.split(separator: ".").last.map(String.init) ?? field {
        case "topkIds", "ambiguousTokens", "excludedTokens", "slotExperts", "midpointTokens": return (0, 0)
        case "output", "routerLogits", "topkWeights", "sharedGate", "routerTolerance", "intermediate", "contributions", "outputTieBias",
             "intermediateTieBias", "tieNorm", "routerTokenVariance": return (1e-12, 0)
        case "bound", "routerLogitBound", "topkWeightBound", "sharedGateBound", "intermediateBound", "elementVariance", "outputFlipVariance",
             "directionBias", "expertTokenVariance", "expertTokenBlockMax", "intermediateVariance", "directionVariance", "alternatives": return (1e-4, 0.005)
        default: return nil
        }
    }

    @Test("the spliced rerun puts every row of every field in its place and equals the full rerun", arguments: cases)
    func splicedEqualsFull(_ c: Case) throws {
        let layer = try SyntheticLayer(SyntheticSpec(config: c.config, format: c.format, tokens: c.tokens, seed: 29))
        let T = c.tokens, H = c.config.hidden
        // token 10 (forced below) repeats token 2's input (not forced): the statistical tier
        // leaves it out, which a sub-run without token 2 cannot see on its own
        var x = layer.inputs()
        x.replaceSubrange((10 * H)..<(11 * H), with: x[(2 * H)..<(3 * H)])
        var options = ReferenceOptions(keepIntermediate: true, keepContributions: true)
        if c.contributionsOnlyInSubRuns { options.contributionLimit = T * (c.config.topK + 1) * H - 1 }
        let engine = try MoEReferenceEngine(layer: layer, recipe: c.recipe, options: options)
        let base = try engine.run(inputs: x, tokens: T)
        let st = try #require(base.statistics)
        #expect((st.contributions == nil) == c.contributionsOnlyInSubRuns && (st.directionVariance == nil) == c.contributionsOnlyInSubRuns)
        #expect(base.intermediate != nil && st.intermediateVariance != nil)
        if c.format.fp8 != nil { #expect(!st.midpointTokens.isEmpty) }
        #expect(st.excludedTokens[10])
        for every in [7, 3] {
            let tag = "\(c.name), every \(every)th token forced"
            let (routing, changed) = Self.override(base, every: every)
            #expect(MoEReferenceEngine.changedTokens(routing, from: base) == changed && changed.contains(10) && !changed.contains(2), "\(tag)")
            let full = try engine.run(inputs: x, tokens: T, routing: routing)
            let spliced = try engine.run(inputs: x, tokens: T, routing: routing, replacing: base)
            #expect(changed.contains { t in (0..<H).contains { base.output[t * H + $0] != full.output[t * H + $0] } }, "\(tag): the override changed no output")

            // Placement, bit for bit: the forced tokens' rows are the sub-run's, the others the
            // reference's, in every field.
            let rows = changed.flatMap { x[($0 * H)..<(($0 + 1) * H)] }
            let subEngine = c.contributionsOnlyInSubRuns
                ? try MoEReferenceEngine(layer: layer, recipe: c.recipe, options: { var o = options; o.keepContributions = false; return o }())
                : engine
            let sub = try subEngine.run(inputs: rows, tokens: changed.count, routing: RoutingOverride(ids: changed.map { routing.ids[$0] }))
            let splicedArrays = Self.arrays(spliced), baseArrays = Self.arrays(base), subArrays = Self.arrays(sub), fullArrays = Self.arrays(full)
            try #require(splicedArrays.map(\.0) == baseArrays.map(\.0) && subArrays.map(\.0) == baseArrays.map(\.0)
                         && fullArrays.map(\.0) == baseArrays.map(\.0), "\(tag): the results hold the same fields")
            for (f, (name, a)) in splicedArrays.enumerated() {
                let b = baseArrays[f].1, s = subArrays[f].1
                let w = b.count / T
                #expect(a.count == b.count && s.count == w * changed.count, "\(tag): \(name) holds \(a.count), \(b.count), \(s.count) values")
                guard a.count == b.count, s.count == w * changed.count else { continue }
                var i = 0
                for t in 0..<T {
                    let forced = i < changed.count && changed[i] == t
                    for j in 0..<w {
                        var want = forced ? s[i * w + j] : b[t * w + j]
                        // a forced token stays excluded where the free run excluded it (conservative)
                        if forced && name.hasSuffix(".excludedTokens") && b[t * w + j] == 1 { want = 1 }
                        if a[t * w + j].bitPattern != want.bitPattern {
                            Issue.record("\(tag): \(name), token \(t)\(forced ? " (forced)" : ""), column \(j): \(a[t * w + j]), expected \(want)")
                            break
                        }
                    }
                    if forced { i += 1 }
                }
            }

            // Against the full rerun: the same computation per row, from other batches.
            for (f, (name, a)) in splicedArrays.enumerated() {
                let b = fullArrays[f].1
                guard let (relative, outliers) = Self.tolerance(name) else {
                    Issue.record("\(tag): \(name) has no tolerance: say how it may differ between batches")
                    continue
                }
                guard a.count == b.count else { Issue.record("\(tag): \(name) holds \(a.count) and \(b.count) values"); continue }
                var beyond: [Int] = []
                for k in a.indices where a[k].bitPattern != b[k].bitPattern {
                    // a forced token the free run excluded stays excluded: checked above
                    if name.hasSuffix(".excludedTokens") && a[k] == 1 && st.excludedTokens[k] { continue }
                    if !(Swift.abs(a[k] - b[k]) <= relative * Swift.max(Swift.abs(a[k]), Swift.abs(b[k]))) { beyond.append(k) }
                }
                let allowed = relative > 0 && outliers > 0 ? Swift.max(1, Int(outliers * Double(a.count))) : 0
                #expect(beyond.count <= allowed, "\(tag): \(name): \(beyond.count) of \(a.count) values beyond \(relative) relative (\(allowed) allowed), first \(beyond.prefix(3).map { "[\($0)] \(a[$0]) vs \(b[$0])" })")
            }
        }
    }

    @Test("no token changed: the reference itself; every token changed: a full rerun")
    func nothingOrEverything() throws {
        let c = Self.cases[0]
        let layer = try SyntheticLayer(SyntheticSpec(config: c.config, format: c.format, tokens: 9, seed: 31))
        let x = layer.inputs()
        let engine = try MoEReferenceEngine(layer: layer, recipe: c.recipe, options: ReferenceOptions(keepContributions: true))
        let base = try engine.run(inputs: x, tokens: 9)
        // the same sets in another order change nothing
        let reordered = RoutingOverride(ids: (0..<9).map { Self.freeChoice(base, token: $0).reversed() })
        #expect(MoEReferenceEngine.changedTokens(reordered, from: base).isEmpty)
        #expect(bitDifferences(try engine.run(inputs: x, tokens: 9, routing: reordered, replacing: base), base).isEmpty)
        let (allChanged, changed) = Self.override(base, every: 1)
        #expect(changed == Array(0..<9))
        #expect(MoEReferenceEngine.changedTokens(allChanged, from: base) == Array(0..<9))
        let full = try engine.run(inputs: x, tokens: 9, routing: allChanged)
        #expect(bitDifferences(try engine.run(inputs: x, tokens: 9, routing: allChanged, replacing: base), full).isEmpty)
    }

    @Test("a bad override or a mismatched splice throws, naming the problem")
    func mismatches() throws {
        let c = Self.cases[0]
        let layer = try SyntheticLayer(SyntheticSpec(config: c.config, format: c.format, tokens: 6, seed: 5))
        let x = layer.inputs()
        let engine = try MoEReferenceEngine(layer: layer, recipe: c.recipe, options: ReferenceOptions(keepContributions: true))
        let base = try engine.run(inputs: x, tokens: 6)
        let sub = try engine.run(inputs: Array(x[0..<(2 * c.config.hidden)]), tokens: 2)
        func expectInvalid(_ what: String, mentions: String, _ body: () throws -> ReferenceResult) {
            do {
                _ = try body()
                Issue.record("\(what): no error")
            } catch let e as ReferenceError {
                #expect("\(e)".contains(mentions), "\(what): \(e)")
            } catch {
                Issue.record("\(what): \(error)")
            }
        }
        expectInvalid("wrong token count", mentions: "the rerun has 2 token(s)") { try base.replacingTokens([1, 2, 3], with: sub) }
        expectInvalid("token out of range", mentions: "out of range") { try base.replacingTokens([1, 6], with: sub) }
        expectInvalid("token twice", mentions: "listed twice") { try base.replacingTokens([4, 4], with: sub) }
        var noStats = sub
        noStats.statistics = nil
        expectInvalid("statistics missing", mentions: "statistics") { try base.replacingTokens([0, 1], with: noStats) }
        var short = sub
        short.output.removeLast()
        expectInvalid("a short array", mentions: "output of the rerun") { try base.replacingTokens([0, 1], with: short) }
        var noContributions = sub
        noContributions.statistics!.contributions = nil
        expectInvalid("contributions missing", mentions: "contributions") { try base.replacingTokens([0, 1], with: noContributions) }
        let other = try MoEReferenceEngine(layer: layer, recipe: .exact, options: ReferenceOptions(keepContributions: true))
        let otherSub = try other.run(inputs: Array(x[0..<(2 * c.config.hidden)]), tokens: 2)
        expectInvalid("another recipe", mentions: "recipes differ") { try base.replacingTokens([0, 1], with: otherSub) }
        let badIds = RoutingOverride(ids: (0..<6).map { t in t == 3 ? [0, 0] : Self.freeChoice(base, token: t) })
        expectInvalid("an override choosing an expert twice", mentions: "twice") {
            try engine.run(inputs: x, tokens: 6, routing: badIds, replacing: base)
        }
        expectInvalid("an override of the wrong length", mentions: "5 tokens") {
            try engine.run(inputs: x, tokens: 6, routing: RoutingOverride(ids: Array(badIds.ids.prefix(5))), replacing: base)
        }
    }

    @Test("the splice handles every stored field of ReferenceResult and ReferenceStatistics")
    func everyFieldHandled() throws {
        let c = Self.cases[0]
        let layer = try SyntheticLayer(SyntheticSpec(config: c.config, format: c.format, tokens: 3, seed: 5))
        let r = try runReference(layer, layer.inputs(), tokens: 3, recipe: c.recipe, options: ReferenceOptions(keepIntermediate: true, keepContributions: true))
        let s = try #require(r.statistics)
        #expect(storedProperties(r) == ["tokens", "hidden", "experts", "topK", "slots", "sharedFused", "recipe", "output", "bound", "routerLogits",
                                        "routerLogitBound", "topkIds", "topkWeights", "topkWeightBound", "sharedGate", "sharedGateBound",
                                        "ambiguousTokens", "routerTolerance", "intermediate", "intermediateBound", "intermediateWidth", "statistics"],
                "ReferenceResult's fields changed: splice the new one in ReferenceResult.replacingTokens")
        #expect(storedProperties(s) == ["elementVariance", "outputFlipVariance", "outputTieBias", "tieNorm", "directionBias", "excludedTokens",
                                        "expertTokenVariance", "routerTokenVariance", "expertTokenBlockMax", "intermediateVariance", "intermediateTieBias", "slotExperts",
                                        "slots", "contributions", "ambiguousTokens", "midpointTokens", "directionVariance", "alternatives"],
                "ReferenceStatistics' fields changed: splice the new one in ReferenceResult.replacingTokens")
    }
}
