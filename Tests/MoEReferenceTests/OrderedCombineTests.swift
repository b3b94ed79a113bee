import Foundation
import LowPrecision
import MoEReference
import Testing
import TensorIO
import MoECheckTestSupport

// The ordered combines (hf-eager-bf16, hf-mm-bf16): the reference's output must be the kernel's
// accumulation replayed from its own weighted contributions — recomputed here independently of
// the engine's combine, from the contributions it keeps and the experts of each slot — and the
// rigorous bound must be no wider than the order-agnostic hf-bf16 one on the same layer.

@Suite("Ordered combines")
struct OrderedCombineTests {
    /// The chain a kernel computes: bf16 partial sums in ascending expert id (shared, id E, last),
    /// or the routed contributions summed exactly, rounded to bf16, then the shared one added.
    func replay(_ contributions: [Double], experts: [Int], shared: Int, mode: CombineMode) -> Double {
        let bf = SmallFloatFormat.bfloat16
        let order = experts.indices.sorted { experts[$0] < experts[$1] }
        switch mode {
        case .bf16ExpertOrder:
            var s = 0.0
            for j in order { s = bf.round(s + contributions[j]) }
            return s
        case .fp32RoutedBF16Shared:
            var routed = 0.0, sharedC: Double? = nil
            for j in order { if experts[j] == shared { sharedC = contributions[j] } else { routed += contributions[j] } }
            let r = bf.round(routed)
            return sharedC.map { bf.round(r + $0) } ?? r
        default:
            return .nan
        }
    }

    @Test("the output is the kernel's own accumulation of the kept contributions, bit for bit; the bound is no wider than hf-bf16's")
    func replaysContributions() throws {
        for spec in testSpecs(15, seed: 71) {
            let layer = try SyntheticLayer(spec)
            let x = layer.inputs(), T = spec.tokens, c = spec.config, H = c.hidden
            let loose = try runReference(layer, x, tokens: T, recipe: .hfBF16)
            for recipe in [Recipe.hfEagerBF16, .hfMMBF16] {
                let tag = "\(recipe.name) \(c.family.rawValue) H\(H) I\(c.intermediate) E\(c.experts) K\(c.topK) T\(T)"
                let r = try runReference(layer, x, tokens: T, recipe: recipe, options: ReferenceOptions(keepContributions: true))
                let st = try #require(r.statistics, "\(tag): statistics")
                let contrib = try #require(st.contributions, "\(tag): contributions kept")
                let S = st.slots
                var mismatches = 0
                for t in 0..<T {
                    let experts = (0..<S).map { Int(st.slotExperts[t * S + $0]) }
                    for h in 0..<H {
                        let cs = (0..<S).map { Double(contrib[(t * S + $0) * H + h]) }
                        let want = replay(cs, experts: experts, shared: c.experts, mode: recipe.combine)
                        if r.output[t * H + h].bitPattern != want.bitPattern {
                            mismatches += 1
                            if mismatches == 1 { Issue.record("\(tag): token \(t), column \(h): reference \(r.output[t * H + h]), replayed \(want)") }
                        }
                        #expect(r.bound[t * H + h] <= loose.bound[t * H + h] || r.bound[t * H + h] == 0,
                                "\(tag): bound \(r.bound[t * H + h]) wider than hf-bf16's \(loose.bound[t * H + h]) at token \(t), column \(h)")
                    }
                }
                #expect(mismatches == 0, "\(tag): \(mismatches) of \(T * H) outputs differ from the replayed accumulation")
                // the kernel's value of an element may differ from the reference only through its inputs: the
                // flip variance is finite and non-negative, and no element variance is double counted
                #expect(st.outputFlipVariance.allSatisfy { $0.isFinite && $0 >= 0 }, "\(tag): flip variances")
                #expect(st.elementVariance.allSatisfy { $0 == 0 }, "\(tag): the ordered model keeps its noise in the flip variance")
            }
        }
    }

    @Test("orderedRounding: equal inputs round alike (a tie costs nothing without a flip); a flip at a tie costs its probability times a step")
    func orderedRoundingModel() {
        let bf = SmallFloatFormat.bfloat16
        let tie = 1.0 + 0x1p-8   // exactly between 1 and 1 + 2^-7
        #expect(StatisticalModel.orderedRounding(tie, variance: 0, probability: 0, bf) == (0, 0))
        let (v, p) = StatisticalModel.orderedRounding(tie, variance: 1e-10, probability: 0.01, bf)
        #expect(p == 0.01)
        let q = bf.ulp(of: 1.0 + 0x1p-7)
        #expect(v >= 0.01 * q * q && v <= (1e-5 + q * 0.1) * (1e-5 + q * 0.1) * 1.0001)
        // far from a boundary, Chebyshev caps the crossing probability below the flip probability
        let (_, pFar) = StatisticalModel.orderedRounding(1.0 + 0x1p-10, variance: 1e-12, probability: 0.5, bf)
        #expect(pFar < 1e-5)
    }
}

@Suite("fp32 silu of very negative gates")
struct SiluVanishingTests {
    /// Measured on the H200 and on CPU (fuzz seed 7, case 1518, shrunk): a gate of −92.5 makes
    /// HF's silu −0 in fp32 (exp(92.5) overflows), so expert 109's whole contribution to token 5
    /// is 0 where the float64 silu gives ≈ −6e−39 and outputs ≈ 1e−37. Both tiers must accept it.
    @Test("an expert whose gate is below −87 may contribute 0: the bound covers it, and the statistical variance of that contribution does not vanish in Float")
    func vanishingSiluIsCovered() throws {
        let json = #"{"config": {"experts": 110, "family": "qwen3_next", "hidden": 346, "intermediate": 1, "renormalize": true, "sharedIntermediate": 0, "topK": 1}, "format": "bf16", "inputs": "coherent", "routing": "uniform", "scales": "counter", "seed": 50620829847273, "tokens": 6}"#
        let spec = try JSONDecoder().decode(SyntheticSpec.self, from: Data(json.utf8))
        let layer = try SyntheticLayer(spec)
        let x = layer.inputs(), H = spec.config.hidden
        for recipe in [Recipe.hfEagerBF16, .hfBF16, .fusedBF16] {
            let r = try runReference(layer, x, tokens: spec.tokens, recipe: recipe, options: ReferenceOptions(keepContributions: true))
            let t = 5
            #expect(r.topkIds[t * r.slots] == 109, "\(recipe.name): token 5's expert is \(r.topkIds[t * r.slots])")
            var tiny = 0
            for h in 0..<H where r.output[t * H + h] != 0 {
                tiny += 1
                #expect(r.bound[t * H + h] >= Swift.abs(r.output[t * H + h]),
                        "\(recipe.name): column \(h): a kernel's 0 is outside ±\(r.bound[t * H + h]) of \(r.output[t * H + h])")
            }
            #expect(tiny > 0, "\(recipe.name): token 5's outputs are all 0 (the case no longer exercises the vanishing silu)")
            // the statistical tier: the variance along that contribution covers losing all of it
            let st = try #require(r.statistics), contrib = try #require(st.contributions), dv = try #require(st.directionVariance)
            var c2 = 0.0
            for h in 0..<H { let c = Double(contrib[(t * st.slots) * H + h]); c2 += c * c }
            #expect(dv[t * (st.slots + 1) + 1] >= 0.5 * c2 * c2, "\(recipe.name): variance along the contribution \(dv[t * (st.slots + 1) + 1]) against (Σc²)² = \(c2 * c2)")
        }
    }
}
