import Foundation
import LowPrecision
import MoEReference
import Testing
import TensorIO
import MoECheckTestSupport

// Cross-check against Goldens/external: expected outputs made by HF transformers' own float64 MoE
// blocks (recipes `exact` and `w8a16`) and by an independent numpy/torch implementation of the
// fused FP8 path (`fused-fp8`). None of MoECheck's code made them (Goldens/external/README.md).

let externalCases = [
    "qwen2_moe_bf16_perexpert", "qwen2_moe_bf16_combined",
    "qwen3_next_bf16_perexpert", "qwen3_next_bf16_combined",
    "qwen3_5_moe_bf16_perexpert", "qwen3_5_moe_bf16_combined_t1", "qwen3_5_moe_bf16_neglogits",
    "qwen3_next_f32_perexpert",
    "qwen3_5_moe_fp8fn_w8a16_perexpert", "qwen3_5_moe_fp8fn_w8a16_combined", "qwen3_next_fp8fnuz_w8a16_perexpert",
    "qwen3_5_moe_fp8fn_fusedfp8_perexpert", "qwen3_5_moe_fp8fnuz_fusedfp8_combined",
]

/// Per-slot float64 expert outputs `y_s = Down(silu(Gate x) ⊙ Up x)` for token `t`, computed with
/// plain loops from the layer's decoded weights (used to bound Σ_s |w_s · y_s|).
func slotOutputs(_ layer: MoELayerSource, x: ArraySlice<Double>, experts ids: [Int]) throws -> [[Double]] {
    let c = layer.config, H = c.hidden
    let xt = Array(x)
    return try ids.map { e in
        let Ie = c.intermediate(ofExpert: e)
        var w13 = [Double](repeating: 0, count: 2 * Ie * H), w2 = [Double](repeating: 0, count: H * Ie)
        try w13.withUnsafeMutableBufferPointer { try layer.decodeGateUp(expert: e, into: $0.baseAddress!) }
        try w2.withUnsafeMutableBufferPointer { try layer.decodeDown(expert: e, into: $0.baseAddress!) }
        var act = [Double](repeating: 0, count: Ie)
        for i in 0..<Ie {
            var g = 0.0, u = 0.0
            for h in 0..<H { g += xt[h] * w13[i * H + h]; u += xt[h] * w13[(Ie + i) * H + h] }
            act[i] = g / (1 + exp(-g)) * u
        }
        return (0..<H).map { h in
            var y = 0.0
            for i in 0..<Ie { y += w2[h * Ie + i] * act[i] }
            return y
        }
    }
}

@Suite("External cross-check (HF transformers float64 blocks, independent fused-fp8)")
struct ExternalCrossCheckTests {
    @Test("reference agrees with Goldens/external", arguments: externalCases)
    func crossCheck(name: String) throws {
        let layer = try MoECaseFile(path: packagePath("Goldens/external/\(name).case.safetensors"))
        let expected = try SafetensorsFile(path: packagePath("Goldens/external/\(name).expected.safetensors"))
        let c = layer.config
        let T = layer.tokens, H = c.hidden, E = c.experts, K = c.topK
        let shape = "T=\(T) \(c) weights=\(layer.weightFormat.rawValue)"
        let expectedRecipe = try #require(expected.metadata["recipe"], "\(name): expected file has no recipe metadata")
        // The goldens' "w8a16" is HF's block run on fp8 weights dequantized exactly (q × scale_inv)
        // with unquantized float64 activations and nothing rounded: that is MoECheck's `exact`
        // recipe on fp8 weights, not MoECheck's `w8a16` recipe (which rounds the intermediate to bf16).
        let fusedFP8 = expectedRecipe == "fused-fp8"
        #expect(["exact", "w8a16", "fused-fp8"].contains(expectedRecipe), "\(name): unknown recipe \(expectedRecipe)")
        let recipe: Recipe = fusedFP8 ? .fusedFP8 : .exact
        let tag = "\(name) [\(shape), golden recipe \(expectedRecipe), reference recipe \(recipe.name), seed \(expected.metadata["seed"] ?? "?")]"

        let x = try layer.inputs()
        let ref = try runReference(layer, x, tokens: T, recipe: recipe, options: ReferenceOptions(fuseShared: false))
        #expect(ref.slots == K, "\(tag): unfused run has \(ref.slots) columns, expected K = \(K)")

        let expOut = try expected.tensor("output").doubles()
        let expLogits = try expected.tensor("router_logits").doubles()
        let expIds = try expected.tensor("topk_ids").doubles().map { Int($0) }
        let expW = try expected.tensor("topk_weights").doubles()
        let expGate = try expected.tensor("shared_gate").doubles()
        #expect(expOut.count == T * H && expLogits.count == T * E && expIds.count == T * K, "\(tag): expected tensor shapes")

        // topk ids: identical (the goldens' logits are ≥ 0.05 apart: no ambiguity).
        for t in 0..<T {
            let got = (0..<K).map { Int(ref.topkIds[t * K + $0]) }
            let want = Array(expIds[(t * K)..<((t + 1) * K)])
            #expect(got == want, "\(tag): topk_ids differ at token \(t): reference \(got), golden \(want)")
            #expect(!ref.ambiguousTokens[t], "\(tag): token \(t) flagged ambiguous, but the golden's top-(K+1) logits are ≥ 0.05 apart")
        }

        // router logits: exact cases are exact dot products of bf16/f32-exact data (≤ 1e-12 rel);
        // fused-fp8 logits are bf16-rounded on both sides and must be bit-equal.
        var worstLogit = 0.0
        for i in 0..<(T * E) {
            let d = Swift.abs(ref.routerLogits[i] - expLogits[i])
            let rel = d / Swift.max(Swift.abs(expLogits[i]), 1e-300)
            worstLogit = Swift.max(worstLogit, rel)
            if fusedFP8 {
                #expect(ref.routerLogits[i] == expLogits[i], "\(tag): bf16 router logit at token \(i / E), expert \(i % E): \(ref.routerLogits[i]) vs \(expLogits[i])")
            } else {
                #expect(d <= 1e-12 * Swift.abs(expLogits[i]), "\(tag): router logit at token \(i / E), expert \(i % E): \(ref.routerLogits[i]) vs \(expLogits[i])")
            }
        }

        // shared gate: σ(ws·x) in float64 (exact cases, sigmoid via exp: ≤ 1e-14 rel) or
        // bf16(σ(bf16(ws·x))) on both sides (fused-fp8: bit-equal).
        for t in 0..<T where c.hasSharedExpert {
            if fusedFP8 {
                #expect(ref.sharedGate[t] == expGate[t], "\(tag): shared gate at token \(t): \(ref.sharedGate[t]) vs \(expGate[t])")
            } else {
                #expect(Swift.abs(ref.sharedGate[t] - expGate[t]) <= 1e-14 * expGate[t], "\(tag): shared gate at token \(t): \(ref.sharedGate[t]) vs \(expGate[t])")
            }
        }

        // Routing weights. HF does the softmax, top-k and renormalization in float32 (README:
        // "Recipes"), so its weights carry float32 error that the float64 reference does not:
        //   - logits cast to fp32: |δl| ≤ |l|·u, which exp turns into a relative error ≤ |l|·u
        //     (and the max-subtraction another ≤ (|l| + |l_max|)·u) per term;
        //   - exp: ≤ 2u; the sum over E terms: ≤ E·u; the division: u;
        //   - renormalization: a sum over K terms (K·u) and a division (u); the cast back is exact.
        // Errors of numerator and denominator add up to at most
        //   rel_w = (E + K + 8 + 4·max|l|)·u,  u = 2^-24,
        // (the constant 8 covers the exp, divisions and second-order terms). The fused-fp8 golden
        // softmax is float64, the reference rounds its weights to fp32 (recipe): rel 2^-24.
        let maxAbsLogit = expLogits.map(Swift.abs).max() ?? 0
        let relW = fusedFP8 ? 0x1p-24 : (Double(E + K + 8) + 4 * maxAbsLogit) * 0x1p-24
        var worstWeight = 0.0
        for i in 0..<(T * K) {
            let d = Swift.abs(ref.topkWeights[i] - expW[i])
            worstWeight = Swift.max(worstWeight, d / expW[i])
            #expect(d <= relW * expW[i], "\(tag): topk weight at token \(i / K), slot \(i % K): \(ref.topkWeights[i]) vs \(expW[i]) (rel \(d / expW[i]) > \(relW))")
        }

        // Output. Both sides compute y = Σ_s w_s·y_s + g·y_shared with the same y_s; only the
        // weights differ (by ≤ rel_w·w_s), so |Δ| ≤ rel_w·Σ_s |w_s·y_s| + float64 evaluation
        // error. Σ_s |w_s·y_s| is computed here from plain-loop per-slot expert outputs (`slotOutputs`,
        // exact-recipe semantics; for fused-fp8, whose activations are quantized, it is an estimate of
        // the same magnitude and a factor 2 absorbs the difference). The float64 evaluation error of
        // either side (dot products over ≤ 320 terms of O(1) values, README: HF output exact to
        // ~1e-15 relative) is allowed as 1e-12·(Σ_s |w_s·y_s| + |g·y_shared|).
        var worstRel = 0.0, worstRatio = 0.0, worstBoundRatio = 0.0, worstChain = 0.0
        var worstAt = (0, 0)
        let rowScale = (0..<T).map { t in (0..<H).map { Swift.abs(expOut[t * H + $0]) }.max() ?? 0 }
        for t in 0..<T {
            let ids = (0..<K).map { Int(ref.topkIds[t * K + $0]) } + (c.hasSharedExpert ? [E] : [])
            let ys = try slotOutputs(layer, x: x[(t * H)..<((t + 1) * H)], experts: ids)
            for h in 0..<H {
                var routed = 0.0
                for s in 0..<K { routed += Swift.abs(ref.topkWeights[t * K + s] * ys[s][h]) }
                let sharedAbs = c.hasSharedExpert ? Swift.abs(ref.sharedGate[t] * ys[K][h]) : 0
                let tol = (fusedFP8 ? 2 : 1) * relW * routed + 1e-12 * (routed + sharedAbs) + 1e-300
                let i = t * H + h
                if !fusedFP8 {
                    // Tighter chain, weight error removed: with each side's own weights,
                    // engine ≈ Σ w_ref·y_s + g·y_sh and golden ≈ Σ w_hf·y_s + g·y_sh to float64 accuracy.
                    var mine = 0.0, theirs = 0.0
                    for s in 0..<K {
                        mine += ref.topkWeights[t * K + s] * ys[s][h]
                        theirs += expW[t * K + s] * ys[s][h]
                    }
                    if c.hasSharedExpert { mine += ref.sharedGate[t] * ys[K][h]; theirs += expGate[t] * ys[K][h] }
                    let f64 = 1e-12 * (routed + sharedAbs) + 1e-300
                    worstChain = Swift.max(worstChain, Swift.abs(ref.output[i] - mine) / (routed + sharedAbs + 1e-300),
                                           Swift.abs(expOut[i] - theirs) / (routed + sharedAbs + 1e-300))
                    #expect(Swift.abs(ref.output[i] - mine) <= f64, "\(tag): engine output vs plain-loop Σ w·y at token \(t), column \(h): \(ref.output[i]) vs \(mine)")
                    #expect(Swift.abs(expOut[i] - theirs) <= f64, "\(tag): golden output vs plain-loop Σ w_hf·y at token \(t), column \(h): \(expOut[i]) vs \(theirs)")
                }
                let d = Swift.abs(ref.output[i] - expOut[i])
                let rel = d / Swift.max(rowScale[t], 1e-300)
                if rel > worstRel { worstRel = rel; worstAt = (t, h) }
                worstRatio = Swift.max(worstRatio, d / tol)
                #expect(d <= tol, "\(tag): output at token \(t), column \(h): reference \(ref.output[i]) vs golden \(expOut[i]) (|Δ| \(d) > tolerance \(tol))")
                if fusedFP8 {
                    // The golden is a correct float64 evaluation of the recipe: it must lie
                    // inside the reference's own bound.
                    let b = d / ref.bound[i]
                    worstBoundRatio = Swift.max(worstBoundRatio, b)
                    #expect(d <= ref.bound[i], "\(tag): golden output outside the reference bound at token \(t), column \(h): |Δ| \(d) > bound \(ref.bound[i])")
                }
            }
        }
        // fused-fp8 without the fp32 rounding of the routing weights is the golden's exact
        // arithmetic (float64 softmax, same quantization): agreement to float64 accuracy.
        var worstF64 = 0.0
        if fusedFP8 {
            var f64Weights = Recipe.fusedFP8
            f64Weights.name = "fused-fp8/f64-weights"
            f64Weights.routingWeights = .none
            let r64 = try runReference(layer, x, tokens: T, recipe: f64Weights, options: ReferenceOptions(fuseShared: false))
            for i in 0..<(T * H) {
                let d = Swift.abs(r64.output[i] - expOut[i]) / Swift.max(rowScale[i / H], 1e-300)
                worstF64 = Swift.max(worstF64, d)
                #expect(d <= 1e-12, "\(tag): fused-fp8 with float64 routing weights vs golden at token \(i / H), column \(i % H): \(r64.output[i]) vs \(expOut[i])")
            }
        }
        print("cross-check \(name): worst rel output diff \(worstRel) (token \(worstAt.0), column \(worstAt.1)), " +
              "|Δ|/tol \(worstRatio), worst rel logit diff \(worstLogit), worst rel weight diff \(worstWeight) (allowed \(relW))" +
              (fusedFP8 ? ", worst |Δ|/bound \(worstBoundRatio), float64-weight variant worst rel diff \(worstF64)"
                        : ", engine/golden vs plain-loop Σ w·y worst rel \(worstChain)"))
    }
}
