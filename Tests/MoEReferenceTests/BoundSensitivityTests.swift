import Foundation
import LowPrecision
import MoEReference
import Testing
import TensorIO
import MoECheckTestSupport

// "The bound is not blind": harmful fault models (FACTS §6) applied to the reference's own output
// must produce violations; a benign change (the output rounded to bf16, which every fused recipe
// allows) must not.

@Suite("Bound sensitivity")
struct BoundSensitivityTests {
    static let specs: [SyntheticSpec] =
        testSpecs(16, seed: 201, formats: [.bf16, .fp8e4m3fn, .bf16, .fp8e4m3fnuz])

    static func recipe(_ spec: SyntheticSpec) -> Recipe { spec.format == .bf16 ? .fusedBF16 : .fusedFP8 }

    /// Expects at least one violation; names the fault.
    func expectFlagged(_ y: [Double], _ ref: ReferenceResult, _ fault: String, _ tag: String) {
        let check = checkBound(y, ref)
        #expect(check.violations > 0, "\(tag): fault '\(fault)' not flagged by the bound (worst |Δ|/bound \(check.worstRatio) at token \(check.token), column \(check.column))")
    }

    @Test("benign: the output rounded to bf16 stays inside the bound")
    func benignRounding() throws {
        for spec in Self.specs + testSpecs(4, seed: 202, formats: [.bf16, .fp8e4m3fn], inputs: .large) {
            let layer = try SyntheticLayer(spec)
            for recipe in spec.format == .bf16 ? [Recipe.fusedBF16, .hfBF16] : [.fusedFP8, .w8a16] {
                let ref = try runReference(layer, layer.inputs(), tokens: spec.tokens, recipe: recipe)
                let rounded = ref.output.map { SmallFloatFormat.bfloat16.round($0) }
                let check = checkBound(rounded, ref)
                #expect(check.violations == 0, "\(label(spec, recipe)): bf16-rounded output flagged: \(check)")
            }
        }
    }

    @Test("dropping the shared expert is flagged")
    func droppedShared() throws {
        for spec in Self.specs {
            let layer = try SyntheticLayer(spec)
            let recipe = Self.recipe(spec), x = layer.inputs()
            let ref = try runReference(layer, x, tokens: spec.tokens, recipe: recipe)
            let none = EditedLayer(layer)
            none.config.sharedIntermediate = 0
            let dropped = try runReference(none, x, tokens: spec.tokens, recipe: recipe).output
            expectFlagged(dropped, ref, "shared expert dropped (ATOM #1076)", label(spec, recipe))
        }
    }

    @Test("unrenormalized weights are flagged where the top-K mass is below 1")
    func noRenormalization() throws {
        for spec in Self.specs where spec.config.renormalize && spec.config.topK < spec.config.experts {
            let layer = try SyntheticLayer(spec)
            let recipe = Self.recipe(spec), x = layer.inputs()
            let ref = try runReference(layer, x, tokens: spec.tokens, recipe: recipe)
            let raw = EditedLayer(layer)
            raw.config.renormalize = false
            let faulty = try runReference(raw, x, tokens: spec.tokens, recipe: recipe).output
            expectFlagged(faulty, ref, "weights not renormalized", label(spec, recipe))
        }
    }

    @Test("a zeroed last token row is flagged")
    func zeroedTail() throws {
        for spec in Self.specs {
            let layer = try SyntheticLayer(spec)
            let recipe = Self.recipe(spec)
            let ref = try runReference(layer, layer.inputs(), tokens: spec.tokens, recipe: recipe)
            var y = ref.output.map { SmallFloatFormat.bfloat16.round($0) }
            let H = spec.config.hidden, T = spec.tokens
            for h in 0..<H { y[(T - 1) * H + h] = 0 }
            expectFlagged(y, ref, "last token row never written (aiter #4451)", label(spec, recipe))
        }
    }

    @Test("one expert scaled by 2 (fnuz bytes read as fn) is flagged")
    func expertScaledByTwo() throws {
        for spec in Self.specs {
            let layer = try SyntheticLayer(spec)
            let recipe = Self.recipe(spec), x = layer.inputs()
            let ref = try runReference(layer, x, tokens: spec.tokens, recipe: recipe, options: ReferenceOptions(fuseShared: false))
            let victim = Int(ref.topkIds[0]) // token 0's top expert
            let doubled = EditedLayer(layer)
            doubled.downFactor[victim] = 2
            let faulty = try runReference(doubled, x, tokens: spec.tokens, recipe: recipe, options: ReferenceOptions(fuseShared: false)).output
            expectFlagged(faulty, ref, "expert \(victim) scaled by 2", label(spec, recipe))
        }
    }

    @Test("fp8: stage 1 with a neighbouring K block's scale is flagged (spread-across-k scales)")
    func wrongKBlockScale() throws {
        // H spans 2 or 3 K blocks of 128; the scales of neighbouring blocks differ by 2^4.
        let shapes = [
            MoEConfig(family: .qwen35Moe, hidden: 264, intermediate: 40, sharedIntermediate: 40, experts: 5, topK: 2),
            MoEConfig(family: .qwen3Next, hidden: 200, intermediate: 136, sharedIntermediate: 136, experts: 4, topK: 1),
            MoEConfig(family: .qwen2Moe, hidden: 256, intermediate: 32, sharedIntermediate: 64, experts: 6, topK: 3),
        ]
        for spec in testSpecs(12, seed: 203, formats: [.fp8e4m3fn, .fp8e4m3fnuz], scales: .spreadAcrossK, shapes: shapes) {
            let layer = try SyntheticLayer(spec)
            let x = layer.inputs(), T = spec.tokens
            let tag = label(spec, .fusedFP8)
            let ref = try runReference(layer, x, tokens: T, recipe: .fusedFP8)
            // control: the same scalar implementation without the fault is inside the bound
            let good = try ScalarFused.run(layer, x, tokens: T, recipe: .fusedFP8)
            let goodCheck = checkBound(good.output, ref)
            #expect(goodCheck.violations == 0, "\(tag): scalar fused-fp8 (no fault) outside the bound: \(goodCheck)")
            // fault: K block 0 of every expert's gate/up uses K block 1's scale
            let bad = try ScalarFused.run(layer, x, tokens: T, recipe: .fusedFP8) { _, _, kb in kb == 0 ? 1 : kb }
            expectFlagged(bad.output, ref, "stage-1 K block 0 uses block 1's scale", tag)
            // fault: the last K block uses the previous block's scale
            let nb = (spec.config.hidden + 127) / 128
            let bad2 = try ScalarFused.run(layer, x, tokens: T, recipe: .fusedFP8) { _, _, kb in kb == nb - 1 ? nb - 2 : kb }
            expectFlagged(bad2.output, ref, "stage-1 last K block uses block \(nb - 2)'s scale", tag)
        }
    }
}
