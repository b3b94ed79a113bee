import Foundation
import MoEReference
@testable import MoEVerify
import Testing
import TensorIO
import MoECheckTestSupport

// The verifier with the CPU model of the kernel recipe: a correct model passes, the align and
// router checks flag what they must, and a failing report names the stage and the worst element.

/// The smoke suite: small shapes (H ≤ 320, E ≤ 8), every format, routing mode and input mode —
/// well under a second each on the CPU model.
let smallSmokeCases: [VerifyCase] = Catalogue.smoke().filter { $0.spec!.config.hidden <= 512 && $0.spec!.tokens <= 64 }

@Suite("CaseVerifier with the CPU model kernel")
struct VerifierTests {
    @Test("the library's declared recipes (Kernels/src/moe_api.hip) are fused-bf16 and fused-fp8 but for the name: a catalogue judging it beside the torch compositions computes one reference per case")
    func declaredRecipesAreTheDefaults() {
        // moe_declared_recipe: router bf16, routing weights fp32, shared gate bf16, scale multiply-reciprocal, combine fp32, output bf16
        for fp8 in [false, true] {
            var declared = Recipe.declared(router: 1, routingWeights: 0, sharedGate: 1, activationFP8: fp8 ? 1 : 0, activationScale: 1,
                                           intermediate: fp8 ? 1 : 0, combine: 0, output: 1, libraryName: "moecheck-kernels")
            var standard = fp8 ? Recipe.fusedFP8 : Recipe.fusedBF16
            #expect(declared.name.hasPrefix("declared by"))
            declared.name = ""
            standard.name = ""
            #expect(declared == standard, "fp8 \(fp8): \(declared) vs \(standard)")
        }
    }

    @Test("a correct CPU model passes every small smoke case", arguments: smallSmokeCases)
    func smokeCasePasses(_ vc: VerifyCase) throws {
        let report = CaseVerifier(kernel: try CPUModelKernel()).verify(vc)
        #expect(report.error == nil, "\(vc): \(report.error ?? "")")
        #expect(report.passed, "\(vc) failed:\n\(report.line)")
        #expect(report.stages.map(\.stage) == ["router", "align", "stage1", "stage2", "forward#1", "forward#2"], "\(vc)")
        #expect(report.runsIdentical, "\(vc): the model's two whole-layer runs differ")
        #expect(report.name == vc.name && report.line.hasPrefix("PASS \(vc.name):"), "\(vc): \(report.line)")
    }

    @Test("the smoke catalogue covers every format, routing mode and input mode")
    func smokeCoverage() {
        let smoke = Catalogue.smoke()
        #expect(Set(smoke.map(\.spec!.format)) == [.bf16, .fp8e4m3fn, .fp8e4m3fnuz])
        #expect(Set(smoke.map(\.spec!.routing)) == Set(RoutingMode.allCases))
        #expect(Set(smoke.map(\.spec!.inputs)) == Set(InputMode.allCases))
        #expect(smoke.contains { !$0.fuseShared && $0.spec!.config.hasSharedExpert }, "an unfusable case runs the shared expert unfused")
        #expect(Set(smoke.map(\.name)).count == smoke.count, "case names are unique")
    }

    @Test("a harmful fault makes the report name the failing stage and the worst element")
    func reportNamesStageAndWorstElement() throws {
        let vc = try #require(Catalogue.smoke().first { $0.name == "smoke-q35-small-fp8fn-T17" })
        // wrong_kblock_scale: stage 1 uses the next K block's activation scale
        let r1 = CaseVerifier(kernel: try CPUModelKernel(fault: "wrong_kblock_scale")).verify(vc)
        #expect(!r1.passed, "wrong_kblock_scale passed \(vc)")
        let s1 = try #require(r1.stages.first { $0.stage == "stage1" }, "\(vc): no stage1 report")
        #expect(!s1.passed, "\(vc): stage1 passed under wrong_kblock_scale:\n\(r1.line)")
        #expect(s1.worst.range(of: #"^token \d+, slot \d+ \(expert \d+\), column \d+: kernel .*, reference .* ± "#, options: .regularExpression) != nil,
                "\(vc): stage1 worst location: \(s1.worst)")
        #expect(r1.line.hasPrefix("FAIL \(vc.name):") && r1.line.contains("stage1 FAIL") && r1.line.contains("stage1: worst at token "),
                "\(vc): \(r1.line)")
        #expect(r1.stages.first { $0.stage == "router" }?.passed == true, "\(vc): the router is not at fault")
        #expect(r1.stages.first { $0.stage == "align" }?.passed == true, "\(vc): the align stage is not at fault")

        // padding_expert_zero: padded rows add pair 0's output into token 0 (stage 2 and the layer)
        let bf = try #require(Catalogue.smoke().first { $0.name == "smoke-q35-small-bf16-T17" })
        let r2 = CaseVerifier(kernel: try CPUModelKernel(fault: "padding_expert_zero")).verify(bf)
        let s2 = try #require(r2.stages.first { $0.stage == "stage2" })
        #expect(!s2.passed && r2.stages.first { $0.stage == "stage1" }?.passed == true, "\(bf):\n\(r2.line)")
        #expect(s2.worst.hasPrefix("token 0 (experts "), "\(bf): the damage is in token 0, worst reported at \(s2.worst)")
        #expect(s2.worst.contains("column "), "\(bf): \(s2.worst)")
        #expect(r2.line.contains("stage2: worst at token 0 (experts "), "\(bf): \(r2.line)")

        // renormalize_ignored: a router fault, reported on the router stage with the weights
        let r3 = CaseVerifier(kernel: try CPUModelKernel(fault: "renormalize_ignored")).verify(bf)
        let router = try #require(r3.stages.first { $0.stage == "router" })
        #expect(!router.passed && router.problems.contains { $0.contains("routing weights outside their bound") && $0.contains("worst: token ") },
                "\(bf): router problems \(router.problems)")
    }

    @Test("a case that cannot fuse but asks to is an error naming the case, not a crash")
    func unfusableFusedIsAnError() throws {
        let base = try #require(Catalogue.smoke().first { $0.name.hasPrefix("smoke-unfusable-bf16-T1") })
        let vc = VerifyCase(name: "forced-fusion", spec: base.spec!, fuseShared: true)
        let r = CaseVerifier(kernel: try CPUModelKernel()).verify(vc)
        #expect(!r.passed)
        #expect(r.error?.contains("cannot fuse") == true, "error: \(r.error ?? "none")")
        #expect(r.line.hasPrefix("FAIL forced-fusion: "), "\(r.line)")
    }

    @Test("an unknown fault name is refused with the list of known ones")
    func unknownFault() {
        #expect(throws: VerifyError.self) { try CPUModelKernel(fault: "no_such_fault") }
        do {
            _ = try CPUModelKernel(fault: "no_such_fault")
        } catch {
            #expect("\(error)".contains("unknown fault 'no_such_fault'") && "\(error)".contains("renormalize_ignored"), "\(error)")
        }
    }
}

// MARK: - align checks

/// A correct align output for `ids` (`[T, S]`): pairs grouped by ascending expert, each run
/// padded with the sentinel to a block multiple, block experts −1 past the end.
private func correctAlign(ids: [Int32], tokens T: Int, slots S: Int, experts E: Int, block: Int)
    -> (sorted: [Int32], blockExperts: [Int32], padded: Int) {
    var capacity = T * S + (E + 1) * (block - 1)
    capacity = (capacity + block - 1) / block * block
    let sentinel = Int32(T * S)
    var sorted = [Int32](repeating: sentinel, count: capacity), blocks = [Int32](repeating: -1, count: capacity / block)
    var cursor = 0
    for e in 0..<E {
        let pairs = (0..<(T * S)).filter { ids[$0] == Int32(e) }
        guard !pairs.isEmpty else { continue }
        let padded = (pairs.count + block - 1) / block * block
        for (i, p) in pairs.enumerated() { sorted[cursor + i] = Int32(p) }
        for b in (cursor / block)..<((cursor + padded) / block) { blocks[b] = Int32(e) }
        cursor += padded
    }
    return (sorted, blocks, cursor)
}

@Suite("checkAlign: the align stage's output is checked pair by pair")
struct AlignCheckTests {
    // T = 5 tokens, K = 2 routed + shared slot id 4 (E = 4 routed), block 4
    static let T = 5, S = 3, E = 5, block = 4
    static let ids: [Int32] = [0, 2, 4,  1, 2, 4,  0, 3, 4,  2, 3, 4,  0, 1, 4]

    func check(_ sorted: [Int32], _ blocks: [Int32], _ padded: Int) -> [String] {
        checkAlign(ids: Self.ids, tokens: Self.T, slots: Self.S, experts: Self.E, block: Self.block, sorted: sorted, blockExperts: blocks, padded: padded)
    }

    @Test("a correct layout has no problems")
    func correctLayout() {
        let a = correctAlign(ids: Self.ids, tokens: Self.T, slots: Self.S, experts: Self.E, block: Self.block)
        #expect(check(a.sorted, a.blockExperts, a.padded) == [])
        // pairs of an expert in any order within its run are fine too
        var shuffled = a.sorted
        shuffled.swapAt(0, 1)
        #expect(check(shuffled, a.blockExperts, a.padded) == [])
    }

    @Test("a missing pair is flagged by token and slot")
    func missingPair() {
        let a = correctAlign(ids: Self.ids, tokens: Self.T, slots: Self.S, experts: Self.E, block: Self.block)
        var sorted = a.sorted
        let i = sorted.firstIndex(of: 7)!   // pair 7 = token 2, slot 1 (expert 3)
        sorted[i] = Int32(Self.T * Self.S)  // replaced by the sentinel
        let problems = check(sorted, a.blockExperts, a.padded)
        #expect(problems.contains("pair 7 (token 2, slot 1) appears 0 times"), "\(problems)")
    }

    @Test("a duplicated pair is flagged")
    func duplicatedPair() {
        let a = correctAlign(ids: Self.ids, tokens: Self.T, slots: Self.S, experts: Self.E, block: Self.block)
        var sorted = a.sorted
        // expert 0 holds pairs 0, 6, 12 and one sentinel: write pair 6 into the padding slot
        #expect(Array(sorted[0..<4]) == [0, 6, 12, 15])
        sorted[3] = 6
        let problems = check(sorted, a.blockExperts, a.padded)
        #expect(problems.contains("pair 6 (token 2, slot 0) appears 2 times"), "\(problems)")
        #expect(!problems.contains { $0.contains("sits in block") }, "the duplicate is in its own expert's block: \(problems)")
    }

    @Test("a block labelled with the wrong expert is flagged for every pair in it")
    func wrongBlockExpert() {
        let a = correctAlign(ids: Self.ids, tokens: Self.T, slots: Self.S, experts: Self.E, block: Self.block)
        var blocks = a.blockExperts
        blocks[0] = 1   // expert 0's block claims expert 1
        let problems = check(a.sorted, blocks, a.padded)
        #expect(problems.contains("pair 0 (token 0, slot 0, expert 0) sits in block 0 of expert 1"), "\(problems)")
        #expect(problems.filter { $0.contains("sits in block 0 of expert 1") }.count == 3, "\(problems)")
    }

    @Test("an unused block not marked −1 is flagged")
    func unusedBlockNotMinusOne() {
        let a = correctAlign(ids: Self.ids, tokens: Self.T, slots: Self.S, experts: Self.E, block: Self.block)
        var blocks = a.blockExperts
        let firstUnused = a.padded / Self.block
        #expect(firstUnused < blocks.count, "the capacity leaves unused blocks")
        blocks[firstUnused] = 0
        let problems = check(a.sorted, blocks, a.padded)
        #expect(problems == ["unused block \(firstUnused) has expert id 0 instead of -1"], "\(problems)")
        // left as the 0xD5 poison the harness fills it with
        blocks[firstUnused] = Int32(bitPattern: 0xD5D5_D5D5)
        #expect(check(a.sorted, blocks, a.padded).first?.hasPrefix("unused block \(firstUnused) has expert id") == true)
    }

    @Test("a padded count that is not a block multiple, or exceeds the capacity, is flagged")
    func badPaddedCount() {
        let a = correctAlign(ids: Self.ids, tokens: Self.T, slots: Self.S, experts: Self.E, block: Self.block)
        for bad in [a.padded - 1, a.sorted.count + Self.block, -Self.block] {
            let problems = check(a.sorted, a.blockExperts, bad)
            #expect(problems.count == 1 && problems[0].contains("padded_count \(bad)"), "padded \(bad): \(problems)")
        }
    }

    @Test("blocks out of ascending expert order are flagged, though every pair sits in its expert's block")
    func blocksOutOfOrder() {
        let a = correctAlign(ids: Self.ids, tokens: Self.T, slots: Self.S, experts: Self.E, block: Self.block)
        #expect(Array(a.blockExperts.prefix(7)) == [0, 1, 2, 3, 4, 4, -1])
        // swap expert 0's and expert 1's blocks, entries and labels together
        var sorted = a.sorted, blocks = a.blockExperts
        for i in 0..<Self.block { sorted.swapAt(i, Self.block + i) }
        blocks.swapAt(0, 1)
        let problems = check(sorted, blocks, a.padded)
        #expect(problems == ["block 1 has expert 0 after block 0 of expert 1: blocks must come in ascending expert id"], "\(problems)")
    }

    @Test("padding that does not end its expert's run, or a block of padding only, is flagged")
    func paddingPlacement() {
        let a = correctAlign(ids: Self.ids, tokens: Self.T, slots: Self.S, experts: Self.E, block: Self.block)
        let sentinel = Int32(Self.T * Self.S)
        // block 0 = expert 0's pairs 0, 6, 12 and one sentinel: move the sentinel forward
        #expect(Array(a.sorted[0..<4]) == [0, 6, 12, sentinel])
        var early = a.sorted
        early[1] = sentinel; early[3] = 6
        var problems = check(early, a.blockExperts, a.padded)
        #expect(problems == ["block 0 of expert 0 has a pair after the sentinel padding at entry 1: padding must end the expert's run"], "\(problems)")
        // the shared expert (id 4) spans blocks 4 and 5: a sentinel in block 4 while its run goes on
        var middle = a.sorted
        #expect(middle[21] == sentinel && middle[19] != sentinel)
        middle.swapAt(19, 21)
        problems = check(middle, a.blockExperts, a.padded)
        #expect(problems == ["block 4 of expert 4 is padded but expert 4's run continues in block 5: padding must end the run"], "\(problems)")
        // an extra block of padding only, labelled expert 2, after expert 2's block
        let extra = Array(a.sorted[0..<12]) + [Int32](repeating: sentinel, count: Self.block) + Array(a.sorted[12..<(a.sorted.count - Self.block)])
        var blocks = a.blockExperts
        blocks.insert(2, at: 3)
        blocks.removeLast()
        problems = check(extra, blocks, a.padded + Self.block)
        #expect(problems == ["block 2 of expert 2 is padded but expert 2's run continues in block 3: padding must end the run",
                             "block 3 of expert 2 holds only padding: an expert's run is padded to the next block multiple, no further"], "\(problems)")
    }

    @Test("an entry that is neither a pair nor the sentinel is flagged")
    func garbageEntry() {
        let a = correctAlign(ids: Self.ids, tokens: Self.T, slots: Self.S, experts: Self.E, block: Self.block)
        var sorted = a.sorted
        sorted[3] = -7
        let problems = check(sorted, a.blockExperts, a.padded)
        #expect(problems.contains("sorted entry 3 = -7 is neither a pair index nor the sentinel 15"), "\(problems)")
    }
}

// MARK: - router plausibility

@Suite("CaseVerifier.plausible: which top-K choices a correct kernel may make")
struct RouterPlausibilityTests {
    /// One token, E = 5: experts 1 and 2 tie exactly for second place; 4 is clearly smallest.
    static let logits: [Double] = [3.0, 2.0, 2.0, 1.5, -4.0]
    static let zero = [Double](repeating: 0, count: 5)

    func plausible(_ chosen: [Int], logits: [Double] = logits, bound: [Double] = zero, tolerance: Double = 0) -> Bool {
        CaseVerifier.plausible(chosen: chosen, logits: logits, bound: bound, tolerance: tolerance, token: 0, experts: 5)
    }

    @Test("an exact tie may be broken either way", arguments: [[0, 1], [0, 2], [1, 0], [2, 0]])
    func exactTieEitherWay(_ chosen: [Int]) {
        #expect(plausible(chosen), "choice \(chosen) of logits \(Self.logits)")
    }

    @Test("choosing a clearly smaller logit is rejected", arguments: [[0, 3], [0, 4], [1, 2], [3, 4]])
    func clearlySmallerRejected(_ chosen: [Int]) {
        #expect(!plausible(chosen), "choice \(chosen) of logits \(Self.logits) leaves out a larger one")
    }

    @Test("a near tie is plausible only within the logit bounds and tolerance")
    func nearTieNeedsTheBound() {
        let l: [Double] = [3.0, 2.0, 1.99, 1.5, -4.0]
        #expect(!plausible([0, 2], logits: l), "gap 0.01 with no bound")
        #expect(plausible([0, 2], logits: l, bound: [0, 0.006, 0.006, 0, 0]), "gap 0.01 within bounds 0.006 + 0.006")
        #expect(!plausible([0, 2], logits: l, bound: [0, 0.004, 0.004, 0, 0]), "gap 0.01 outside bounds 0.004 + 0.004")
        #expect(plausible([0, 2], logits: l, tolerance: 0.006), "gap 0.01 within tolerance 2 × 0.006")
        #expect(!plausible([0, 2], logits: l, tolerance: 0.004), "gap 0.01 outside tolerance 2 × 0.004")
    }

    @Test("duplicate or out-of-range ids are never plausible", arguments: [[0, 0], [0, 5], [-1, 0]])
    func malformedChoice(_ chosen: [Int]) {
        #expect(!plausible(chosen), "choice \(chosen)")
    }

    @Test("the token index selects its own row")
    func secondToken() {
        let two: [Double] = [9, 9, 9, 9, 9] + Self.logits
        let zeros = [Double](repeating: 0, count: 10)
        #expect(CaseVerifier.plausible(chosen: [0, 1], logits: two, bound: zeros, tolerance: 0, token: 1, experts: 5))
        #expect(!CaseVerifier.plausible(chosen: [3, 4], logits: two, bound: zeros, tolerance: 0, token: 1, experts: 5))
    }
}

@Suite("Router judge")
struct RouterJudgeTests {
    /// Regression (H200 fuzz, HF eager adapter): once 20 problems were listed the token loop
    /// stopped, and a case that also had a token to teacher-force reran the reference with a
    /// partial override ("routing override has the wrong shape") instead of judging the case.
    @Test("more than 20 router problems: every token still enters the override, the forced rerun works, the list is capped")
    func manyProblemsAndAForcedToken() throws {
        // at H = 2048 many router logits may round either way: find a token (past the 20th) where
        // another choice than the reference's is possible
        let c = MoEConfig(family: .qwen35Moe, hidden: 2048, intermediate: 16, sharedIntermediate: 16, experts: 8, topK: 2)
        var found: (SyntheticSpec, MoEReferenceEngine, [Double], ReferenceResult, Int, [Int])? = nil
        for seed in UInt64(1)...12 where found == nil {
            let spec = SyntheticSpec(config: c, format: .bf16, tokens: 64, seed: seed, routing: .nearTies)
            let layer = try SyntheticLayer(spec)
            let x = try layer.kernelInputs()
            let engine = try MoEReferenceEngine(layer: layer, recipe: .fusedBF16,
                                                options: ReferenceOptions(keepIntermediate: false, fuseShared: true, keepContributions: true))
            let ref = try engine.run(inputs: x, tokens: spec.tokens)
            let E = c.experts, K = c.topK, S = ref.slots
            for t in (21..<spec.tokens).reversed() where found == nil && ref.ambiguousTokens[t] {
                let chosen = (0..<K).map { Int(ref.topkIds[t * S + $0]) }
                for out in 0..<K {
                    for e in 0..<E where !chosen.contains(e) && found == nil {
                        var alt = chosen
                        alt[out] = e
                        if CaseVerifier.plausible(chosen: alt, logits: ref.routerLogits, bound: ref.routerLogitBound,
                                                  tolerance: ref.routerTolerance[t], token: t, experts: E) {
                            found = (spec, engine, x, ref, t, alt)
                        }
                    }
                }
            }
        }
        let (spec, engine, x, ref, forcedToken, alt) = try #require(found, "a near-ties case at H = 2048 has a token with another possible choice")
        let T = spec.tokens, E = c.experts, K = c.topK, S = ref.slots
        var ids = ref.topkIds, weights = ref.topkWeights
        for (s, e) in alt.enumerated() { ids[forcedToken * S + s] = Int32(e) }
        for t in 0..<T { ids[t * S + K] = Int32(E - 1) } // a wrong shared slot id at every token: T problems
        for t in 0..<T { weights[t * S + K] = ref.sharedGate[t] }
        let verifier = CaseVerifier(kernel: try CPUModelKernel())
        let run = KernelRouting(logits: nil, ids: ids, weights: weights, slots: S)
        let judged = try verifier.judgeRouter(run, ref: ref) { try engine.run(inputs: x, tokens: T, routing: $0) }
        #expect(!judged.report.passed)
        #expect(judged.forced >= 1)
        #expect(judged.report.problems.count == 21, "20 listed and one line counting the rest")
        #expect(judged.report.problems.last?.contains("more token problem") == true, "\(judged.report.problems.last ?? "")")
        let rerunChoice = Set((0..<K).map { Int(judged.forcedRef.topkIds[forcedToken * S + $0]) })
        #expect(rerunChoice == Set(alt), "the rerun followed the forced choice")
    }

    @Test("the teacher-forced rerun of a case reruns only its forced tokens: the others keep the reference's bits")
    func partialRerun() throws {
        let verifier = CaseVerifier(kernel: try CPUModelKernel())
        let p = try verifier.prepare(try smokeCase("smoke-inputs-large-bf16"))
        let ref = p.reference.reference, routing = try #require(p.run.routing)
        let judged = try verifier.judgeRouter(routing, ref: ref, rerun: p.rerun)
        #expect(judged.report.passed && judged.forced > 0, "the case no longer teacher-forces: pick another for this test")
        let T = ref.tokens, H = ref.hidden, K = ref.topK, S = ref.slots
        let forcedRef = judged.forcedRef, st = try #require(ref.statistics), fst = try #require(forcedRef.statistics)
        var changed = 0
        for t in 0..<T {
            let kernelSet = Set((0..<K).map { routing.ids[t * routing.slots + $0] }), refSet = Set((0..<K).map { ref.topkIds[t * S + $0] })
            #expect(Set((0..<K).map { forcedRef.topkIds[t * S + $0] }) == kernelSet, "token \(t): the rerun follows the kernel's choice")
            if kernelSet != refSet { changed += 1; continue }
            let rows = (t * H)..<((t + 1) * H)
            #expect(bitDifferences(Array(forcedRef.output[rows]), Array(ref.output[rows])).isEmpty
                    && bitDifferences(Array(forcedRef.bound[rows]), Array(ref.bound[rows])).isEmpty
                    && bitDifferences(Array(fst.elementVariance[rows]), Array(st.elementVariance[rows])).isEmpty
                    && bitDifferences(Array(forcedRef.topkWeights[(t * S)..<((t + 1) * S)]), Array(ref.topkWeights[(t * S)..<((t + 1) * S)])).isEmpty,
                    "token \(t), not forced, has other bits than the reference")
        }
        #expect(changed == judged.forced)
    }
}
