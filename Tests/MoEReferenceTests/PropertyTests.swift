import Foundation
import LowPrecision
import MoEReference
import Testing
import TensorIO
import MoECheckTestSupport

// Seeded properties of the reference over generated layers (small shapes; see `testShapes`).

func label(_ spec: SyntheticSpec, _ recipe: Recipe) -> String { "[\(spec), recipe \(recipe.name)]" }

@Suite("Reference properties", .tags(.fuzz))
struct PropertyTests {
    @Test("fused and unfused runs give the same output; the fused topk ends in (E, g)")
    func fusedEqualsUnfused() throws {
        for spec in testSpecs(20, seed: 11, formats: [.bf16, .fp8e4m3fn, .fp8e4m3fnuz]) {
            let layer = try SyntheticLayer(spec)
            let x = layer.inputs(), T = spec.tokens, c = spec.config, K = c.topK, E = c.experts, H = c.hidden
            for recipe in spec.format == .bf16 ? [Recipe.exact, .fusedBF16, .hfBF16] : [.fusedFP8, .w8a16] {
                let tag = label(spec, recipe)
                let fused = try runReference(layer, x, tokens: T, recipe: recipe, options: ReferenceOptions(fuseShared: true))
                let unfused = try runReference(layer, x, tokens: T, recipe: recipe, options: ReferenceOptions(fuseShared: false))
                #expect(unfused.slots == K && !unfused.sharedFused, "\(tag): unfused has \(unfused.slots) columns")
                #expect(fused.slots == K + (c.fusable ? 1 : 0), "\(tag): fused has \(fused.slots) columns (a shared expert with Is != I never fuses)")
                for i in 0..<(T * H) where fused.output[i] != unfused.output[i] || fused.bound[i] != unfused.bound[i] {
                    Issue.record("\(tag): fused/unfused differ at token \(i / H), column \(i % H): \(fused.output[i]) vs \(unfused.output[i]), bounds \(fused.bound[i]) vs \(unfused.bound[i])")
                    break
                }
                let S = fused.slots
                for t in 0..<T {
                    for s in 0..<K {
                        #expect(fused.topkIds[t * S + s] == unfused.topkIds[t * K + s] && fused.topkWeights[t * S + s] == unfused.topkWeights[t * K + s],
                                "\(tag): routed column \(s) of token \(t) differs between fused and unfused")
                        #expect(Int(unfused.topkIds[t * K + s]) < E, "\(tag): routed id \(unfused.topkIds[t * K + s]) ≥ E at token \(t), column \(s)")
                    }
                    if c.fusable {
                        #expect(fused.topkIds[t * S + K] == Int32(E), "\(tag): token \(t) last column id \(fused.topkIds[t * S + K]), expected \(E)")
                        #expect(fused.topkWeights[t * S + K] == fused.sharedGate[t] && fused.sharedGate[t] > 0,
                                "\(tag): token \(t) last column weight \(fused.topkWeights[t * S + K]) != g \(fused.sharedGate[t])")
                    }
                }
            }
        }
    }

    @Test("permuting tokens permutes the outputs")
    func tokenPermutation() throws {
        var rng = SeededGenerator(seed: 23)
        for spec in testSpecs(16, seed: 23, formats: [.bf16, .fp8e4m3fn]) where spec.tokens > 1 {
            let layer = try SyntheticLayer(spec)
            let x = layer.inputs(), T = spec.tokens, H = spec.config.hidden
            let perm = rng.permutation(T) // new row i = old row perm[i]
            var xp = [Double](repeating: 0, count: T * H)
            for i in 0..<T { for h in 0..<H { xp[i * H + h] = x[perm[i] * H + h] } }
            for recipe in spec.format == .bf16 ? [Recipe.exact, .fusedBF16] : [.fusedFP8] {
                let tag = label(spec, recipe) + " perm \(perm)"
                let a = try runReference(layer, x, tokens: T, recipe: recipe)
                let b = try runReference(layer, xp, tokens: T, recipe: recipe)
                let S = a.slots
                for i in 0..<T {
                    let o = perm[i]
                    #expect(Array(b.topkIds[(i * S)..<((i + 1) * S)]) == Array(a.topkIds[(o * S)..<((o + 1) * S)]), "\(tag): ids of new token \(i) (old \(o))")
                    #expect(Array(b.topkWeights[(i * S)..<((i + 1) * S)]) == Array(a.topkWeights[(o * S)..<((o + 1) * S)]), "\(tag): weights of new token \(i) (old \(o))")
                    for h in 0..<H {
                        let va = a.output[o * H + h], vb = b.output[i * H + h]
                        // Same rows, same expert, same k order: only BLAS row blocking could
                        // reorder a float64 sum, and each run lies within its own rigorous bound
                        // (γ over float64 for `exact`) of the same exact value.
                        let tol = recipe == .exact ? a.bound[o * H + h] + b.bound[i * H + h] : a.bound[o * H + h]
                        if Swift.abs(va - vb) > tol {
                            Issue.record("\(tag): token \(o) → \(i), column \(h): \(va) vs \(vb)")
                            break
                        }
                    }
                }
            }
        }
    }

    @Test("relabeling experts maps the ids and keeps the output")
    func expertRelabeling() throws {
        var rng = SeededGenerator(seed: 37)
        for spec in testSpecs(20, seed: 37, formats: [.bf16, .fp8e4m3fnuz]) {
            let layer = try SyntheticLayer(spec)
            let x = layer.inputs(), T = spec.tokens, c = spec.config, H = c.hidden, E = c.experts
            let perm = rng.permutation(E) // base expert e → new id perm[e]
            let edited = EditedLayer(layer)
            edited.relabel(perm)
            for recipe in spec.format == .bf16 ? [Recipe.exact, .fusedBF16] : [.fusedFP8] {
                let tag = label(spec, recipe) + " relabel \(perm)"
                let a = try runReference(layer, x, tokens: T, recipe: recipe)
                let b = try runReference(edited, x, tokens: T, recipe: recipe)
                let S = a.slots
                for t in 0..<T {
                    // Ties between equal logits break toward the lower id, which relabeling may
                    // change: only compare tokens without exact ties at the K-th place.
                    let sorted = (0..<E).map { a.routerLogits[t * E + $0] }.sorted(by: >)
                    if c.topK < E && sorted[c.topK - 1] == sorted[c.topK] { continue }
                    // equal weights may swap column order: compare ids as sets, weights by id
                    let setA = Set((0..<S).map { s -> String in
                        let ia = Int(a.topkIds[t * S + s]); return "\(ia == E ? E : perm[ia])" })
                    let setB = Set((0..<S).map { "\(b.topkIds[t * S + $0])" })
                    #expect(setA == setB, "\(tag): token \(t): mapped ids \(setA.sorted()) vs relabeled run \(setB.sorted())")
                    for s in 0..<S {
                        let ia = Int(a.topkIds[t * S + s])
                        let mapped = Int32(ia == E ? E : perm[ia])
                        if let sb = (0..<S).first(where: { b.topkIds[t * S + $0] == mapped }) {
                            let wa = a.topkWeights[t * S + s], wb = b.topkWeights[t * S + sb]
                            #expect(Swift.abs(wa - wb) <= 1e-12 * wa, "\(tag): token \(t) expert \(ia)→\(mapped): weight \(wa) vs \(wb)")
                        }
                    }
                    for h in 0..<H {
                        let va = a.output[t * H + h], vb = b.output[t * H + h]
                        // float64 combine order and softmax denominator order change with the
                        // labels (~1e-16); with bf16 rounding points that can flip a rounding, which
                        // the bound covers.
                        let tol = recipe == .exact ? 1e-12 * Swift.max(Swift.abs(va), 1e-12) : a.bound[t * H + h]
                        if Swift.abs(va - vb) > tol {
                            Issue.record("\(tag): token \(t), column \(h): \(va) vs \(vb) (tol \(tol))")
                            break
                        }
                    }
                }
            }
        }
    }

    @Test("a shared gate of 0 removes exactly the shared contribution")
    func sharedGateZero() throws {
        // hot-experts routing pins input channel 0 to 1, so ws = (−8192, 0, …) gives ws·x = −8192
        // for every token (exact in bf16) and σ = 0 exactly in float64.
        for spec in testSpecs(8, seed: 41, formats: [.bf16, .fp8e4m3fn], routing: .hotExperts) {
            let layer = try SyntheticLayer(spec)
            let x = layer.inputs(), T = spec.tokens, c = spec.config, H = c.hidden
            let closed = EditedLayer(layer)
            var ws = [Double](repeating: 0, count: H)
            ws[0] = -8192
            closed.sharedGateOverride = ws
            let none = EditedLayer(layer)
            none.config.sharedIntermediate = 0
            for recipe in spec.format == .bf16 ? [Recipe.exact, .fusedBF16, .hfBF16] : [.fusedFP8] {
                let tag = label(spec, recipe)
                let a = try runReference(closed, x, tokens: T, recipe: recipe)
                let b = try runReference(none, x, tokens: T, recipe: recipe)
                let full = try runReference(layer, x, tokens: T, recipe: recipe)
                #expect(a.sharedGate.allSatisfy { $0 == 0 }, "\(tag): shared gate not 0: \(a.sharedGate)")
                #expect(!b.sharedFused && b.slots == c.topK, "\(tag): a layer without shared expert must not fuse")
                var differs = 0
                for i in 0..<(T * H) {
                    if a.output[i] != b.output[i] {
                        Issue.record("\(tag): gate 0 vs no shared expert at token \(i / H), column \(i % H): \(a.output[i]) vs \(b.output[i])")
                        break
                    }
                    if full.output[i] != b.output[i] { differs += 1 }
                }
                #expect(differs > 0, "\(tag): the shared expert contributes nothing in the unedited layer")
            }
        }
    }

    @Test("routing weights: renormalized sum to 1, otherwise equal the softmax probabilities")
    func routingWeights() throws {
        for spec in testSpecs(10, seed: 53, formats: [.bf16], routing: .uniform) + testSpecs(5, seed: 54, routing: .hotExperts) {
            let layer = try SyntheticLayer(spec)
            let x = layer.inputs(), T = spec.tokens, c = spec.config, E = c.experts, K = c.topK
            for renormalize in [true, false] {
                let edited = EditedLayer(layer)
                edited.config.renormalize = renormalize
                for recipe in [Recipe.exact, .fusedBF16] {
                    let tag = label(spec, recipe) + " renormalize=\(renormalize)"
                    let r = try runReference(edited, x, tokens: T, recipe: recipe, options: ReferenceOptions(fuseShared: true))
                    let S = r.slots
                    // fp32 routing weights: each rounded once (2^-24 relative)
                    let tol = recipe == .exact ? 1e-12 : Double(K + 1) * 0x1p-24
                    for t in 0..<T {
                        let ids = (0..<K).map { Int(r.topkIds[t * S + $0]) }
                        let w = (0..<K).map { r.topkWeights[t * S + $0] }
                        #expect(ids.allSatisfy { $0 >= 0 && $0 < E }, "\(tag): token \(t): routed ids \(ids) include the shared slot or are out of range")
                        #expect(Set(ids).count == K, "\(tag): token \(t): duplicate ids \(ids)")
                        #expect(zip(w, w.dropFirst()).allSatisfy { $0 >= $1 }, "\(tag): token \(t): weights not descending \(w)")
                        let row = (0..<E).map { r.routerLogits[t * E + $0] }
                        let m = row.max()!
                        let denom = row.reduce(0) { $0 + exp($1 - m) }
                        let p = ids.map { exp(row[$0] - m) / denom }
                        let ps = p.reduce(0, +)
                        if renormalize {
                            let sum = w.reduce(0, +)
                            #expect(Swift.abs(sum - 1) <= tol, "\(tag): token \(t): routed weights sum to \(sum)")
                            for s in 0..<K { #expect(Swift.abs(w[s] - p[s] / ps) <= tol * p[s] / ps, "\(tag): token \(t), column \(s): \(w[s]) vs \(p[s] / ps)") }
                        } else {
                            for s in 0..<K { #expect(Swift.abs(w[s] - p[s]) <= tol * p[s], "\(tag): token \(t), column \(s): weight \(w[s]) vs softmax \(p[s])") }
                        }
                        // the shared slot is never part of the renormalization; a shared expert that
                        // cannot fuse (Is != I) is never reported as slot E
                        #expect(S == K + (c.fusable ? 1 : 0), "\(tag): \(S) routing columns, expected K\(c.fusable ? " + 1" : "")")
                        if c.fusable {
                            #expect(r.topkIds[t * S + K] == Int32(E), "\(tag): token \(t): last column not the shared expert")
                            var d = 0.0
                            let ws = try layer.sharedGateWeight()!
                            for h in 0..<c.hidden { d += x[t * c.hidden + h] * ws[h] }
                            let g = recipe == .exact ? 1 / (1 + exp(-d)) : SmallFloatFormat.bfloat16.round(1 / (1 + exp(-SmallFloatFormat.bfloat16.round(d))))
                            #expect(Swift.abs(r.topkWeights[t * S + K] - g) <= 1e-14 * g, "\(tag): token \(t): shared weight \(r.topkWeights[t * S + K]) vs σ = \(g)")
                        }
                    }
                }
            }
        }
    }

    @Test("all-negative router logits still pick the largest logits")
    func allNegativeLogits() throws {
        for spec in testSpecs(20, seed: 61, formats: [.bf16, .fp8e4m3fn], routing: .allNegative) {
            let layer = try SyntheticLayer(spec)
            let x = layer.inputs(), T = spec.tokens, c = spec.config, E = c.experts, K = c.topK
            for recipe in spec.format == .bf16 ? [Recipe.exact, .fusedBF16] : [.fusedFP8] {
                let tag = label(spec, recipe)
                let r = try runReference(layer, x, tokens: T, recipe: recipe, options: ReferenceOptions(fuseShared: false))
                #expect(r.routerLogits.allSatisfy { $0 < 0 }, "\(tag): not all logits negative (max \(r.routerLogits.max()!))")
                for t in 0..<T {
                    let row = (0..<E).map { r.routerLogits[t * E + $0] }
                    let want = (0..<E).sorted { row[$0] != row[$1] ? row[$0] > row[$1] : $0 < $1 }.prefix(K)
                    let got = (0..<K).map { Int(r.topkIds[t * K + $0]) }
                    #expect(Set(got) == Set(want), "\(tag): token \(t): picked \(got), largest logits are \(Array(want)) (logits \(row))")
                    let w = (0..<K).map { r.topkWeights[t * K + $0] }
                    #expect(w.allSatisfy { $0 > 0 && $0 <= 1 && $0.isFinite }, "\(tag): token \(t): weights \(w)")
                    if c.renormalize { #expect(Swift.abs(w.reduce(0, +) - 1) <= Double(K + 1) * 0x1p-24, "\(tag): token \(t): weights sum \(w.reduce(0, +))") }
                    for i in 0..<c.hidden where !r.output[t * c.hidden + i].isFinite {
                        Issue.record("\(tag): non-finite output at token \(t), column \(i)"); break
                    }
                }
            }
        }
    }

    @Test("an independent scalar implementation agrees with the engine's fused-bf16 output")
    func scalarFusedBF16() throws {
        var specs = testSpecs(20, seed: 71, formats: [.bf16])
        specs += testSpecs(3, seed: 72, formats: [.bf16], routing: .allNegative, inputs: .outliers)
        var worstAll = 0.0
        for spec in specs {
            let layer = try SyntheticLayer(spec)
            let x = layer.inputs(), T = spec.tokens, c = spec.config, H = c.hidden, K = c.topK
            let tag = label(spec, .fusedBF16)
            let ref = try runReference(layer, x, tokens: T, recipe: .fusedBF16, options: ReferenceOptions(fuseShared: false))
            let s = try ScalarFused.run(layer, x, tokens: T, recipe: .fusedBF16)
            var worst = 0.0
            for t in 0..<T {
                #expect((0..<K).map { Int(ref.topkIds[t * K + $0]) } == s.ids[t], "\(tag): token \(t): ids \(s.ids[t]) (scalar) vs engine")
                #expect((0..<K).map { ref.topkWeights[t * K + $0] } == s.weights[t], "\(tag): token \(t): weights \(s.weights[t]) (scalar) vs engine")
                #expect(ref.sharedGate[t] == s.sharedGate[t], "\(tag): token \(t): shared gate \(s.sharedGate[t]) (scalar) vs \(ref.sharedGate[t])")
                for h in 0..<H {
                    let i = t * H + h
                    let d = Swift.abs(ref.output[i] - s.output[i])
                    worst = Swift.max(worst, d / Swift.max(s.absSum[i], 1e-300))
                    if d > 1e-12 * s.absSum[i] {
                        Issue.record("\(tag): token \(t), column \(h): engine \(ref.output[i]) vs scalar \(s.output[i]) (scale \(s.absSum[i]))")
                        break
                    }
                }
            }
            worstAll = Swift.max(worstAll, worst)
        }
        print("scalar fused-bf16 vs engine: worst |Δ| / Σ|w·y| = \(worstAll) over \(specs.count) specs")
    }

    @Test("the scalar fused-fp8 implementation lies inside the reference bound")
    func scalarFusedFP8() throws {
        var specs = testSpecs(12, seed: 73, formats: [.fp8e4m3fn, .fp8e4m3fnuz])
        specs += testSpecs(3, seed: 74, formats: [.fp8e4m3fn], inputs: .large, scales: .spreadAcrossK)
        for spec in specs {
            let layer = try SyntheticLayer(spec)
            let x = layer.inputs(), T = spec.tokens
            let ref = try runReference(layer, x, tokens: T, recipe: .fusedFP8, options: ReferenceOptions(fuseShared: false))
            let s = try ScalarFused.run(layer, x, tokens: T, recipe: .fusedFP8)
            let check = checkBound(s.output, ref)
            #expect(check.violations == 0, "\(label(spec, .fusedFP8)): scalar fused-fp8 outside the bound: \(check)")
        }
    }

    @Test("float32 mode stays inside the float64 oracle's bound")
    func float32Mode() throws {
        var specs = testSpecs(16, seed: 83, formats: [.bf16, .fp8e4m3fn, .bf16, .fp8e4m3fnuz])
        specs += testSpecs(4, seed: 84, formats: [.bf16, .fp8e4m3fn], inputs: .outliers, scales: .spreadAcrossK)
        for spec in specs {
            let layer = try SyntheticLayer(spec)
            let x = layer.inputs(), T = spec.tokens
            for recipe in spec.format == .bf16 ? [Recipe.fusedBF16] : [.fusedFP8, .fusedBF16] {
                let oracle = try runReference(layer, x, tokens: T, recipe: recipe)
                let fast = try runReference(layer, x, tokens: T, recipe: recipe, options: ReferenceOptions(computeBounds: false, float32: true))
                #expect(fast.topkIds == oracle.topkIds, "\(label(spec, recipe)): float32 mode routes differently")
                let check = checkBound(fast.output, oracle)
                #expect(check.violations == 0, "\(label(spec, recipe)): float32 mode outside the oracle bound: \(check)")
            }
        }
    }

    @Test("ambiguity: near ties flag tokens, wide gaps rarely, exact ties always")
    func ambiguity() throws {
        var nearTieCount = 0, nearTieTokens = 0
        for spec in testSpecs(16, seed: 91, routing: .nearTies) {
            let layer = try SyntheticLayer(spec)
            let r = try runReference(layer, layer.inputs(), tokens: spec.tokens, recipe: .fusedBF16)
            nearTieCount += r.ambiguousTokens.filter { $0 }.count
            nearTieTokens += spec.tokens
        }
        #expect(nearTieCount > 0, "near-ties routing produced no ambiguous token in \(nearTieTokens) tokens (fused-bf16)")

        var uniformCount = 0, uniformTokens = 0, exactCount = 0
        for spec in testSpecs(20, seed: 92, routing: .uniform) {
            let layer = try SyntheticLayer(spec)
            let r = try runReference(layer, layer.inputs(), tokens: spec.tokens, recipe: .fusedBF16)
            let e = try runReference(layer, layer.inputs(), tokens: spec.tokens, recipe: .exact)
            uniformCount += r.ambiguousTokens.filter { $0 }.count
            exactCount += e.ambiguousTokens.filter { $0 }.count
            uniformTokens += spec.tokens
        }
        #expect(exactCount == 0, "uniform routing, exact recipe: \(exactCount) of \(uniformTokens) tokens ambiguous")
        #expect(Double(uniformCount) <= 0.15 * Double(uniformTokens), "uniform routing, fused-bf16: \(uniformCount) of \(uniformTokens) tokens ambiguous")
        print("ambiguity: near-ties \(nearTieCount)/\(nearTieTokens) tokens, uniform fused-bf16 \(uniformCount)/\(uniformTokens), uniform exact \(exactCount)/\(uniformTokens)")

        // Exact ties: router rows duplicated in pairs (2j+1 = 2j) make the K-th and (K+1)-th
        // logits equal whenever K is odd; ties must be flagged and broken toward the lower id.
        let tieShapes = [
            MoEConfig(family: .qwen35Moe, hidden: 72, intermediate: 40, sharedIntermediate: 40, experts: 6, topK: 1),
            MoEConfig(family: .qwen3Next, hidden: 136, intermediate: 24, sharedIntermediate: 24, experts: 8, topK: 3),
        ]
        var tiedTokens = 0
        for spec in testSpecs(6, seed: 93, shapes: tieShapes) {
            let layer = try SyntheticLayer(spec)
            let c = spec.config, E = c.experts, K = c.topK, H = c.hidden, T = spec.tokens
            let edited = EditedLayer(layer)
            var wg = try layer.routerWeight()
            for e in stride(from: 1, to: E, by: 2) { for h in 0..<H { wg[e * H + h] = wg[(e - 1) * H + h] } }
            edited.routerOverride = wg
            for recipe in [Recipe.exact, .fusedBF16] {
                let tag = label(spec, recipe) + " paired router rows"
                let r = try runReference(edited, layer.inputs(), tokens: T, recipe: recipe, options: ReferenceOptions(fuseShared: false))
                for t in 0..<T {
                    let row = (0..<E).map { r.routerLogits[t * E + $0] }
                    let sorted = row.sorted(by: >)
                    let chosen = Set((0..<K).map { Int(r.topkIds[t * K + $0]) })
                    if sorted[K - 1] == sorted[K] {
                        tiedTokens += 1
                        #expect(r.ambiguousTokens[t], "\(tag): token \(t): K-th and (K+1)-th logits equal (\(sorted[K])) but not flagged ambiguous")
                    }
                    for a in chosen { for b in 0..<E where !chosen.contains(b) && row[a] == row[b] {
                        #expect(a < b, "\(tag): token \(t): tie between \(a) (chosen) and \(b) broken toward the higher id")
                    } }
                }
            }
        }
        #expect(tiedTokens > 0, "paired router rows produced no exact tie at the K-th place")
    }

    @Test("the result file round-trips through SafetensorsFile")
    func resultFileRoundTrip() throws {
        for (n, spec) in testSpecs(4, seed: 101, formats: [.bf16, .fp8e4m3fn]).enumerated() {
            let layer = try SyntheticLayer(spec)
            let recipe: Recipe = spec.format == .bf16 ? .fusedBF16 : .fusedFP8
            let tag = label(spec, recipe)
            let r = try runReference(layer, layer.inputs(), tokens: spec.tokens, recipe: recipe,
                                     options: ReferenceOptions(keepIntermediate: n % 2 == 0, fuseShared: n % 2 == 0))
            let path = scratchFile("result-\(n).safetensors")
            defer { try? FileManager.default.removeItem(atPath: path) }
            try r.write(to: path, extra: ["case": "test-\(n)"])
            let f = try SafetensorsFile(path: path)
            #expect(f.metadata["recipe"] == recipe.name && f.metadata["case"] == "test-\(n)", "\(tag): metadata \(f.metadata)")
            #expect(f.metadata["shared_fused"] == (r.sharedFused ? "true" : "false"), "\(tag): shared_fused metadata")
            let T = spec.tokens, H = spec.config.hidden, E = spec.config.experts
            func same(_ name: String, _ values: [Double], _ shape: [Int], _ dtype: DType) throws {
                let t = try f.tensor(name)
                #expect(t.dtype == dtype && t.shape == shape, "\(tag): \(name) is \(t.dtype) \(t.shape), expected \(dtype) \(shape)")
                let got = t.doubles()
                if let i = (0..<Swift.min(got.count, values.count)).first(where: { got[$0] != values[$0] && !(got[$0].isNaN && values[$0].isNaN) }) {
                    Issue.record("\(tag): \(name)[\(i)] read back \(got[i]), wrote \(values[i])")
                }
            }
            try same("output", r.output, [T, H], .f64)
            try same("bound", r.bound, [T, H], .f64)
            try same("router_logits", r.routerLogits, [T, E], .f64)
            try same("router_logit_bound", r.routerLogitBound, [T, E], .f64)
            try same("topk_ids", r.topkIds.map(Double.init), [T, r.slots], .i32)
            #expect(try f.tensor("topk_ids").bits(as: Int32.self) == r.topkIds, "\(tag): topk_ids bits")
            try same("topk_weights", r.topkWeights, [T, r.slots], .f64)
            try same("topk_weight_bound", r.topkWeightBound, [T, r.slots], .f64)
            try same("shared_gate", r.sharedGate, [T, 1], .f64)
            try same("shared_gate_bound", r.sharedGateBound, [T, 1], .f64)
            try same("ambiguous_tokens", r.ambiguousTokens.map { $0 ? 1 : 0 }, [T], .u8)
            if let inter = r.intermediate {
                try same("intermediate", inter, [T, r.slots, r.intermediateWidth], .f64)
            } else {
                #expect(!f.contains("intermediate"), "\(tag): intermediate written without keepIntermediate")
            }
        }
    }
}
