import Foundation
import LowPrecision
import MoEReference
@testable import MoEVerify
import Testing
import TensorIO
import MoECheckTestSupport

// The statistical tier (docs/error-bounds.md, "The statistical tier"): its rounding model, and
// that it passes a correct kernel (the CPU model) while seeing scale errors the rigorous bound
// cannot, on a case of moderate size so the suite stays quick.

private let medium = MoEConfig(family: .qwen35Moe, hidden: 1024, intermediate: 256, sharedIntermediate: 256, experts: 16, topK: 4)

private func mediumCase(_ format: WeightFormat, tokens: Int, seed: UInt64 = 5) -> VerifyCase {
    VerifyCase(name: "medium-\(format.tag)-T\(tokens)", spec: SyntheticSpec(config: medium, format: format, tokens: tokens, seed: seed))
}

/// The forward-only verdict of `vc` on the CPU model with `mutation` applied (nil: none).
private func forwardOnly(_ vc: VerifyCase, _ mutation: Mutation?, rigorousOnly: Bool = false) throws -> StageReport {
    let v = CaseVerifier(kernel: try CPUModelKernel(), rigorousOnly: rigorousOnly, mode: .forwardOnly)
    return try #require(try v.forwardOnlyStudy(vc, mutations: [mutation]).first).1
}

private func tiers(_ r: StageReport) -> (rigorous: Bool, statistical: Bool) {
    (!(r.verdict?.passed ?? true), !(r.precision?.passed ?? true))
}

private func line(_ r: StageReport) -> String { "\(r.verdict.map { "\($0)" } ?? "-") \(r.precision?.summary ?? "")" }

@Suite("Statistical tier: rounding model")
struct StatisticalModelTests {
    @Test("far from a boundary a rounding point adds (almost) nothing; on a tie it adds a step")
    func roundingVariance() {
        let q = SmallFloatFormat.bfloat16.ulp(of: 1.0)   // 2^-7
        // 1 + q/4 is a quarter step from 1 and a quarter from the midpoint: noise of q/1000 never crosses
        #expect(StatisticalModel.roundingVariance(1 + q / 4, sigma: q / 1000, .bf16) < 1e-100)
        // at the midpoint the kernel's noise decides: about a step²
        let atTie = StatisticalModel.roundingVariance(1 + q / 2, sigma: q / 1000, .bf16)
        #expect(atTie >= q * q && atTie < 4 * q * q)
        // noise wider than a step passes through (σ² + q² at least)
        #expect(StatisticalModel.roundingVariance(1, sigma: 4 * q, .bf16) >= 16 * q * q)
        // no rounding: the noise itself
        #expect(StatisticalModel.roundingVariance(3, sigma: 0.5, .none) == 0.25)
        // flushed subnormals are allowed for
        #expect(StatisticalModel.roundingVariance(1e-40, sigma: 0, .bf16) == 0x1p-252)
    }

    @Test("tieBias: one step exactly on a rounding boundary, nothing elsewhere")
    func tieBias() {
        let f = SmallFloatFormat.bfloat16, q = f.ulp(of: 1.0)
        #expect(StatisticalModel.tieBias(1 + q / 2, f) == q)
        #expect(StatisticalModel.tieBias(1 + q / 2 + q / 64, f) == 0)
        #expect(StatisticalModel.tieBias(1, f) == 0)
        #expect(StatisticalModel.tieBias(1 + 0x1p-20, .float32) == 0, "fp32 values are not ties at bf16's scale")
        #expect(StatisticalModel.tieBias(0.3, nil) == 0)
    }

    @Test("a group whose largest element is likely to round the other way gets its scale move as a known alternative")
    func scaleMoveIsKnownAlternative() throws {
        let bf = SmallFloatFormat.bfloat16
        let q = GroupQuantizer(format: .e4m3fn, convention: Recipe.fusedFP8.scaleConvention)
        let step = bf.ulp(of: 1.5)   // 2^-7 on both sides of 1.5
        // one group: bf16 values in (−1, 1), exact (no noise), and 1.5, whose value before the
        // bf16 rounding sits 0.05 steps below the boundary to 1.5 + step with noise σ = 0.1 step
        var row = (0..<128).map { bf.round(sin(Double($0) * 0.7) * 0.99) }
        row[37] = 1.5
        var pre = row, sigma = [Double](repeating: 0, count: 128)
        pre[37] = 1.5 + 0.45 * step
        sigma[37] = 0.1 * step
        func model(_ preRounding: (value: [Double], sigma: [Double])?) -> (factors: [Double], alternatives: [ScaleAlternative], variance: [Double]) {
            var variance = (0..<128).map { StatisticalModel.roundingVariance(pre[$0], sigma: sigma[$0], .bf16) }
            var tie = [Double](repeating: 0, count: 128)
            let r = StatisticalModel.requantizationVariance(row: row, variance: &variance, tie: &tie, offset: 0, count: 128, quantizer: q,
                                                            columnNorms2: [Double](repeating: 1, count: 128), approximate: false,
                                                            preRounding: preRounding)
            return (r.groupFactors, r.alternatives, variance)
        }
        let plain = model(nil), known = model((pre, sigma))
        #expect(plain.alternatives.isEmpty && plain.factors == known.factors && plain.variance == known.variance)
        let a = try #require(known.alternatives.first)
        #expect(known.alternatives.count == 1 && a.group == 0 && a.start == 0)
        // up one step only (the inward boundary is 0.55 steps + 5σ away), p = exp(−(0.05/0.1)²/2)
        #expect(a.moves.count == 1 && a.scales == [q.scale(amax: Float(1.5 + step))] && a.moves[0] > 0)
        #expect(Swift.abs(a.probabilities[0] - Foundation.exp(-0.125)) < 1e-12)
        #expect(a.residualFactor < 1e-12 * a.factor, "two steps away is 4.5σ²: nothing left")
        // the move's exact effect: every code at the other scale, times that scale
        let s0 = q.scale(amax: 1.5), s1 = a.scales[0]
        for i in 0..<128 {
            let deq0 = q.codec.round(Double(q.scaled(Float(row[i]), scale: s0)), saturating: true) * Double(s0)
            let deq1 = q.codec.round(Double(q.scaled(Float(row[i]), scale: s1)), saturating: true) * Double(s1)
            #expect(a.deltas[0][i] == deq1 - deq0, "element \(i)")
        }
        // no noise at the largest element: nothing moves
        sigma[37] = 0
        #expect(model((pre, sigma)).alternatives.isEmpty)
    }
}

@Suite("Statistical tier: verdicts on the CPU model")
struct StatisticalTierTests {
    @Test("a correct kernel passes both tiers, stage by stage and forward-only, and the case states its sensitivity",
          arguments: [WeightFormat.bf16, .fp8e4m3fn])
    func correctKernelPasses(_ format: WeightFormat) throws {
        let vc = mediumCase(format, tokens: 24)
        let staged = CaseVerifier(kernel: try CPUModelKernel()).verify(vc)
        #expect(staged.passed, "\(staged.line)")
        #expect(staged.stages.contains { $0.stage == "stage1" && $0.precision != nil })
        #expect(staged.stages.contains { $0.stage == "stage2" && $0.precision != nil })
        let fwd = try forwardOnly(vc, nil)
        #expect(fwd.passed, "\(line(fwd))")
        #expect(CaseVerifier(kernel: try CPUModelKernel(), mode: .forwardOnly).verify(vc).passed, "verify in forward-only mode")
        let s = try #require(fwd.precision?.sensitivity, "forward-only verdict states a sensitivity")
        // the statistical tier sees a whole-output scale error far below the rigorous one
        #expect(s.statisticalOutput < s.rigorousOutput / 5, "\(s.line)")
        #expect(s.statisticalOutput < 0.01, "\(s.line)")
    }

    @Test("scale errors far inside the worst-case bound are flagged by the statistical tier",
          arguments: [(Mutation.everyExpert1p01, WeightFormat.bf16), (.oneExpert1p05, .bf16), (.everyExpert1p01, .fp8e4m3fn)])
    func scaleErrorsFlagged(_ mutation: Mutation, _ format: WeightFormat) throws {
        let r = try forwardOnly(mediumCase(format, tokens: 24), mutation)
        let (_, statistical) = tiers(r)
        #expect(statistical, "\(mutation.rawValue) on \(format.tag) should be a precision failure: \(line(r))")
        #expect(!r.passed)
    }

    /// Issue 11: at the Qwen3.5-35B-A3B shape, fp8 e4m3fn, T = 1 (the sensitivity study's cell),
    /// one 1×128 group's largest bf16 element rounds the other way with probability 0.71 under
    /// the model, moving the group's scale. Charged as variance (p·r² and the codes it changes)
    /// it hid `every expert ×1.01` (stated output sensitivity 1.0e-2); tested as a known
    /// alternative the correct kernel still passes and the scale error is flagged.
    @Test("a likely fp8 group-scale move is a known alternative: 35B-A3B fp8 T = 1 passes as it is and flags every expert ×1.01")
    func knownAlternativeAtT1() throws {
        let vc = try #require(try SensitivityStudy.cases(tokens: [1], shapes: ["qwen3.5-35b-a3b-tp1"], formats: [.fp8e4m3fn]).first)
        let layer = try SyntheticLayer(vc.spec!)
        let options = ReferenceOptions(keepContributions: true)
        let ref = try MoEReferenceEngine(layer: layer, recipe: .fusedFP8, options: options).run(inputs: layer.inputs(), tokens: 1)
        let alt = try #require(ref.statistics?.alternatives)
        #expect(!alt[2].isNaN && alt[1] > alt[0], "the token has a known alternative along its output: \(alt.prefix(4))")
        var approximate = Recipe.fusedFP8
        approximate.quantization = .approximate
        let loose = try MoEReferenceEngine(layer: layer, recipe: approximate, options: options).run(inputs: layer.inputs(), tokens: 1)
        #expect(loose.statistics?.alternatives == nil, "approximate quantization arithmetic: the codes at a moved scale are not known")
        let correct = try forwardOnly(vc, nil)
        #expect(correct.passed, "\(line(correct))")
        let s = try #require(correct.precision?.sensitivity)
        #expect(s.statisticalOutput < 0.005, "\(s.line)")
        let flagged = try forwardOnly(vc, .everyExpert1p01)
        #expect(tiers(flagged).statistical, "every expert ×1.01: \(line(flagged))")
    }

    /// At H ≥ 2048 almost every token has an fp8 activation code whose scaled value sits on a
    /// rounding midpoint. With exact quantization arithmetic (the default) those codes are the
    /// reference's; with `approximate` the token's stage-1 noise is the rigorous radius.
    @Test("fp8 midpoint codes: exact quantization arithmetic keeps the statistical tier sharp, approximate widens it")
    func quantizationArithmetic() throws {
        let wide = MoEConfig(family: .qwen35Moe, hidden: 2048, intermediate: 128, sharedIntermediate: 128, experts: 8, topK: 2)
        var approximate = Recipe.fusedFP8
        approximate.quantization = .approximate
        #expect(Recipe.fusedFP8.quantizationArithmetic == .exact)
        #expect(try Recipe.fromJSON(#"{"base": "fused-fp8", "quantization": "approximate"}"#, origin: "t").quantization == .approximate)
        // the first seed whose inputs put some token's scaled value within 2^-21 of an fp8 midpoint
        // (the recipe's quantizer, binary32 as the kernel computes it)
        let q = GroupQuantizer(format: .e4m3fn, convention: Recipe.fusedFP8.scaleConvention)
        func hasMidpoint(_ x: [Double]) -> Bool {
            stride(from: 0, to: x.count, by: 128).contains { start in
                let g = x[start..<Swift.min(start + 128, x.count)].map { Float($0) }
                let s = q.scale(amax: g.map { Swift.abs($0) }.max()!)
                return g.contains { v in
                    let z = Double(q.scaled(v, scale: s)), eps = Swift.abs(z) * 0x1p-21 + 0x1p-60
                    return q.codec.round(z - eps, saturating: true) != q.codec.round(z + eps, saturating: true)
                }
            }
        }
        let seed = try #require((UInt64(1)...64).first { try! hasMidpoint(SyntheticLayer(SyntheticSpec(config: wide, format: .fp8e4m3fn, tokens: 6, seed: $0)).inputs()) })
        let vc = VerifyCase(name: "h2048-fp8fn-T6", spec: SyntheticSpec(config: wide, format: .fp8e4m3fn, tokens: 6, seed: seed))
        let layer = try SyntheticLayer(vc.spec!)
        #expect(throws: RecipeSpecError.self) { try Recipe.fromJSON(#"{"quantization": "fast"}"#, origin: "t") }
        let options = ReferenceOptions(keepContributions: true)
        let exactRef = try MoEReferenceEngine(layer: layer, recipe: .fusedFP8, options: options).run(inputs: layer.inputs(), tokens: 6)
        let approxRef = try MoEReferenceEngine(layer: layer, recipe: approximate, options: options).run(inputs: layer.inputs(), tokens: 6)
        #expect(try #require(approxRef.statistics).midpointTokens.contains(true), "H = 2048: some token has a code on a midpoint")
        #expect(!(try #require(exactRef.statistics).midpointTokens.contains(true)))
        // the rigorous tier allows either code at a midpoint whatever the recipe says
        #expect(exactRef.bound == approxRef.bound && exactRef.output == approxRef.output)
        // the CPU model quantizes exactly: it passes either way, and exact is the sharper
        let exact = try forwardOnly(vc, nil)
        let loose = try #require(try CaseVerifier(kernel: try CPUModelKernel(), adjustRecipe: { _ in approximate }, mode: .forwardOnly)
            .forwardOnlyStudy(vc, mutations: [nil]).first).1
        #expect(exact.passed && loose.passed, "\(line(exact)) / \(line(loose))")
        let se = try #require(exact.precision?.sensitivity), sa = try #require(loose.precision?.sensitivity)
        #expect(se.statisticalOutput < sa.statisticalOutput / 3, "exact \(se.line) vs approximate \(sa.line)")
        let flagged = try forwardOnly(vc, .everyExpert1p01)
        #expect(tiers(flagged).statistical, "every expert ×1.01 at H = 2048 fp8: \(line(flagged))")
    }

    /// fuzz-s91-i7797 (H200, IMPL=mma library, shrunk): I = 1, K = 1, T = 33, bf16 output. The
    /// kernel's forward showed 1.73× the predicted mean square of its output-rounding flips where
    /// the elementwise χ² limit was 1.31× (stages passing, no element near the rigorous bound).
    /// Here the routing weights' noise drives the flips, and it moves a token's whole row: the
    /// flips of a row are one χ² term, not H independent ones (the limit is ~24×). A kernel that
    /// flips the roundings of the elements most likely to flip, 1.75× as many as the model
    /// expects, must pass; ×1.01 and independent noise at twice the limit must still be flagged.
    @Test("a cause that moves a whole row is one term of the mean-square test (the I = 1 H200 fuzz case)")
    func correlatedFlipsAreOneTerm() throws {
        let json = #"{"fuseShared":false,"name":"fuzz-s91-i7797-shrunk","spec":{"config":{"experts":3,"family":"qwen2_moe","hidden":1680,"intermediate":1,"renormalize":false,"sharedIntermediate":0,"topK":1},"format":"bf16","inputs":"fp8-grid","routing":"all-negative","scales":"counter","seed":77684332644052,"tokens":33},"splitK":1}"#
        let vc = try JSONDecoder().decode(VerifyCase.self, from: Data(json.utf8))
        let spec = try #require(vc.spec)
        let layer = try SyntheticLayer(spec)
        let T = spec.tokens, H = spec.config.hidden
        let recipe = try CPUModelKernel().recipe(for: .bf16)
        let ref = try MoEReferenceEngine(layer: layer, recipe: recipe, options: ReferenceOptions(fuseShared: false)).run(inputs: layer.inputs(), tokens: T)
        let st = try #require(ref.statistics)
        let bf = SmallFloatFormat.bfloat16
        let exact = ref.output.map { bf.round($0) }
        // the verifier's statistical mask: tokens whose routing may go either way are left out
        let mask = st.ambiguousTokens.map { !$0 }
        // each element's flip probability ≈ its flip variance over a step²; flip the likeliest ones
        let pFlip = (0..<(T * H)).map { i -> Double in
            let q = bf.ulp(of: ref.output[i])
            return q > 0 && mask[i / H] ? Swift.min(1, st.outputFlipVariance[i] / (q * q)) : 0
        }
        let expected = pFlip.reduce(0, +)
        let count = Int((1.75 * expected).rounded())
        #expect(count >= 20, "the case has flip-prone outputs (expected \(expected) flips)")
        var out = exact
        for i in pFlip.indices.sorted(by: { pFlip[$0] > pFlip[$1] }).prefix(count) {
            // the other neighbour of the unrounded value
            let o = ref.output[i], r = exact[i], q = bf.ulp(of: o)
            out[i] = o >= r ? r + q : r - q
        }
        let v = try #require(StatisticalJudge.judgeOutput(out, reference: ref, tokens: mask))
        #expect(v.meanSquareRatio > 1.5, "the kernel stresses the mean-square test: \(v.summary)")
        #expect(v.passed, "\(v.summary) \(v.failures)")
        #expect(!(StatisticalJudge.judgeOutput(out.map { bf.round($0 * 1.01) }, reference: ref, tokens: mask)?.passed ?? true), "×1.01 flagged")
        // independent noise at twice the limit (the predicted mean square M from the kernel's ratio Σe²/M)
        let predicted = zip(out, exact).reduce(0.0) { $0 + ($1.0 - $1.1) * ($1.0 - $1.1) } / v.meanSquareRatio
        let judged = mask.filter { $0 }.count
        let sigma = (2 * v.meanSquareThreshold * predicted / Double(judged * H)).squareRoot()
        var g = SeededGenerator(seed: 3)
        let noisy = exact.enumerated().map { i, e -> Double in
            // Box–Muller from two uniforms in (0, 1]
            let u1 = Double(g.next() >> 11 + 1) * 0x1p-53, u2 = Double(g.next() >> 11) * 0x1p-53
            return mask[i / H] ? e + sigma * (-2 * Foundation.log(u1)).squareRoot() * Foundation.cos(2 * Double.pi * u2) : e
        }
        let nv = try #require(StatisticalJudge.judgeOutput(noisy, reference: ref, tokens: mask))
        #expect(!nv.passed, "independent noise at twice the limit is flagged: \(nv.summary)")
    }

    @Test("--rigorous-only reports the statistical tier but does not fail on it")
    func rigorousOnly() throws {
        let r = try forwardOnly(mediumCase(.bf16, tokens: 24), .everyExpert1p01, rigorousOnly: true)
        let (rigorous, statistical) = tiers(r)
        #expect(statistical && !rigorous, "\(line(r))")
        #expect(r.passed, "only the rigorous tier decides: \(line(r))")
    }

    @Test("repeated tokens are left out of the statistical tests (the same computation makes the same error)")
    func repeatedTokensExcluded() throws {
        let layer = try SyntheticLayer(mediumCase(.bf16, tokens: 4).spec!)
        let H = medium.hidden
        var x = layer.inputs()
        for h in 0..<H { x[3 * H + h] = x[h] }          // token 3 repeats token 0
        let ref = try MoEReferenceEngine(layer: layer, recipe: .fusedBF16, options: ReferenceOptions(keepContributions: true))
            .run(inputs: x, tokens: 4)
        let excluded = try #require(ref.statistics).excludedTokens
        #expect(excluded == [false, false, false, true])
    }

    @Test("the fault matrix labels families ordinary or designed and names the tier that caught each fault")
    func faultRowsCarryDataAndTier() throws {
        let families = FaultMatrix.families(large: false)
        #expect(families.contains { FaultMatrix.dataKind($0) == "ordinary" })
        #expect(families.contains { FaultMatrix.dataKind($0) == "designed" })
        let m = try FaultMatrix.run(faults: ["expert_scaled_1p2m6"], families: Array(families.prefix(2)),
                                    makeKernel: { try CPUModelKernel(fault: $0) }, progress: { _ in })
        let rows = m.rows
        #expect(rows.count == 2)
        #expect(rows.contains { $0.detected && $0.tier == "statistical" && $0.data == "ordinary" }, "\(rows)")
    }
}

@Suite("Router ambiguity")
struct RouterAmbiguityTests {
    /// Found by the H200 fuzz campaign (seed 11): at the last token the (K+1)-th expert by value
    /// had a radius of 0, but a lower logit sat on a bf16 rounding tie (radius one step) and a
    /// correct kernel rounded it up to the K-th's value, where the lower index won the tie.
    @Test("a left-out expert on a rounding tie that can reach the K-th makes the token ambiguous")
    func tieBelowTheKthIsAmbiguous() throws {
        let vc = try FuzzReplay.decode(#"{"fuseShared":false,"name":"fuzz-s11-i2232-shrunk","spec":{"config":{"experts":8,"family":"qwen2_moe","hidden":128,"intermediate":1,"renormalize":false,"sharedIntermediate":3,"topK":1},"format":"fp8-e4m3fnuz","inputs":"fp8-grid","routing":"all-negative","scales":"counter","seed":209936728338452,"tokens":2479},"splitK":1}"#)
        let layer = try SyntheticLayer(vc.spec!)
        let ref = try MoEReferenceEngine(layer: RoutedOnlyLayer(layer), recipe: .fusedFP8, options: ReferenceOptions(fuseShared: false))
            .run(inputs: layer.inputs(), tokens: vc.spec!.tokens)
        let t = 2478, E = 8
        // expert 7 leads at −63.75; expert 1 is −64 but on a tie (radius 0.25)
        #expect(ref.topkIds[t] == 7 && ref.routerLogitBound[t * E + 1] > 0)
        #expect(ref.ambiguousTokens[t], "expert 1 may round up to −63.75 and win the tie")
        let r = CaseVerifier(kernel: try CPUModelKernel()).verify(vc)
        #expect(r.passed, "\(r.line)")
    }
}
