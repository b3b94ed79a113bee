import Foundation
import MoEReference
import MoEVerify
import Testing
import TensorIO
import MoECheckTestSupport

// `moecheck fuzz`: the generator (determinism, shards, validity, cost caps), the float32
// self-check, fault finding with shrinking, and replay.

private let fuzzSmallLimits = FuzzLimits(maxTokens: 64, maxExperts: 16, maxHidden: 256, maxIntermediate: 128, maxCost: 1_500_000)

private func fuzzJSON(_ v: VerifyCase) -> String { FuzzReplay.json(v) }

/// Per-dimension sizes of a case (for "no bigger than" comparisons).
private func fuzzDims(_ v: VerifyCase) -> [String: Int] {
    let c = v.spec!.config
    return ["T": v.spec!.tokens, "E": c.experts, "K": c.topK, "H": c.hidden, "I": c.intermediate, "Is": c.sharedIntermediate, "split": v.splitK]
}

@Suite("fuzz generator", .tags(.fuzz))
struct FuzzGeneratorTests {
    @Test("same seed, same cases; another seed, other cases")
    func deterministic() {
        let a = FuzzGenerator(seed: 7, limits: .selfCheck).cases(count: 200).map(fuzzJSON)
        let b = FuzzGenerator(seed: 7, limits: .selfCheck).cases(count: 200).map(fuzzJSON)
        let c = FuzzGenerator(seed: 8, limits: .selfCheck).cases(count: 200).map(fuzzJSON)
        #expect(a == b)
        #expect(zip(a, c).filter { $0 == $1 }.isEmpty)
        // case i is the same whether generated alone or in a run
        #expect(fuzzJSON(FuzzGenerator(seed: 7, limits: .selfCheck).makeCase(index: 123)) == a[123])
    }

    @Test("shards partition the cases", arguments: [1, 2, 3, 7])
    func shards(n: Int) throws {
        let g = FuzzGenerator(seed: 3, limits: .device)
        let all = g.cases(count: 100).map(fuzzJSON)
        var union: [Int: String] = [:]
        for i in 0..<n {
            let shard = try FuzzShard(parsing: "\(i)/\(n)")
            var k = 0
            while shard.caseIndex(k) < 100 {
                let idx = shard.caseIndex(k)
                #expect(shard.owns(idx))
                #expect(union[idx] == nil, "case \(idx) in two shards")
                union[idx] = fuzzJSON(g.makeCase(index: idx))
                k += 1
            }
            #expect(g.cases(count: 100, shard: shard).count == k)
        }
        #expect(union.count == 100)
        #expect((0..<100).map { union[$0]! } == all)
    }

    @Test("catalogue shards partition the cases and balance the reference's work", arguments: [4, 8])
    func catalogueShards(n: Int) throws {
        let all = try CatalogueRun(suite: "all").cases()
        // bf16 cases judged by three kernels, the others by one
        let multiplicity = all.map { $0.spec?.format == .bf16 ? 3 : 1 }
        var seen: [String: Int] = [:]
        var loads: [Double] = []
        for i in 0..<n {
            let part = try FuzzShard(parsing: "\(i)/\(n)").part(of: all, multiplicity: multiplicity)
            for vc in part { seen[vc.name, default: 0] += 1 }
            loads.append(part.reduce(0) { $0 + FuzzCost.work($1) * ($1.spec?.format == .bf16 ? 3 : 1) })
        }
        #expect(seen.count == all.count && seen.values.allSatisfy { $0 == 1 }, "every case in exactly one shard")
        let total = loads.reduce(0, +), largest = all.map { FuzzCost.work($0) * ($0.spec?.format == .bf16 ? 3 : 1) }.max()!
        // greedy largest-first: no shard above the mean by more than the largest case
        #expect(loads.max()! <= total / Double(n) + largest, "loads \(loads)")
        // an unfused shared expert counts once, not in every slot: Qwen2-57B-TP4 at T 4096 is not a shard's whole share
        let q2 = try #require(all.first { $0.name == "qwen2-57b-a14b-tp4-bf16-T4096" })
        let q35 = try #require(all.first { $0.name == "qwen3.5-35b-a3b-tp1-bf16-T4096" })
        #expect(FuzzCost.work(q2) < 3 * FuzzCost.work(q35))
    }

    @Test("bad --shard values are rejected", arguments: ["1", "2/2", "-1/3", "a/b", "0/0", "1/2/3"])
    func badShard(s: String) {
        #expect(throws: VerifyError.self) { try FuzzShard(parsing: s) }
    }

    @Test("cases are valid, within the caps and the cost budget, and cover the space")
    func validAndCovering() throws {
        for limits in [FuzzLimits.device, .selfCheck, .cpuModel, fuzzSmallLimits] {
            let g = FuzzGenerator(seed: 11, limits: limits, allExperts: limits == .cpuModel)
            let cases = g.cases(count: 600)
            for v in cases {
                let c = v.spec!.config
                #expect(throws: Never.self) { try c.validate(file: "fuzz") }
                #expect(v.spec!.tokens >= 1 && v.spec!.tokens <= limits.maxTokens)
                #expect(c.experts <= limits.maxExperts && c.topK <= min(c.experts, 16))
                #expect(c.hidden <= limits.maxHidden && c.intermediate <= limits.maxIntermediate)
                #expect(!v.fuseShared || c.fusable)
                #expect(v.splitK >= 1 && v.splitK <= max(1, (c.hidden + 127) / 128))
                if v.spec!.format == .bf16 { #expect(v.splitK == 1 && v.spec!.scales == .counter) }
                #expect(FuzzCost.cost(v, allExperts: g.allExperts) <= limits.maxCost, "\(v)")
            }
            let formats = Set(cases.map { $0.spec!.format.rawValue })
            #expect(formats.count == 3)
            #expect(Set(cases.map(\.spec!.routing)).count == RoutingMode.allCases.count)
            #expect(Set(cases.map(\.spec!.inputs)).count == InputMode.allCases.count)
            #expect(cases.contains { $0.spec!.tokens == 1 })
            #expect(cases.contains { $0.spec!.tokens % 2 == 1 && $0.spec!.tokens > 1 })
            #expect(cases.contains { $0.spec!.config.hidden % 128 != 0 } && cases.contains { $0.spec!.config.hidden % 128 == 0 })
            #expect(cases.contains { $0.spec!.config.intermediate % 16 != 0 })
            #expect(cases.contains { $0.fuseShared } && cases.contains { $0.spec!.config.hasSharedExpert && !$0.spec!.config.fusable })
            #expect(cases.contains { !$0.spec!.config.hasSharedExpert })
            #expect(cases.contains { $0.spec!.config.renormalize } && cases.contains { !$0.spec!.config.renormalize })
            #expect(cases.contains { $0.splitK > 1 } && cases.contains { $0.spec!.scales == .spreadAcrossK })
        }
        // the device caps reach real sizes
        let big = FuzzGenerator(seed: 11, limits: .device).cases(count: 600)
        #expect(big.contains { $0.spec!.tokens >= 4095 })
        #expect(big.contains { $0.spec!.config.experts >= 256 })
        #expect(big.contains { $0.spec!.config.topK >= 8 })
    }

    @Test("replay JSON round-trips a case")
    func replayRoundTrip() throws {
        for v in FuzzGenerator(seed: 5, limits: .device).cases(count: 50) {
            let json = FuzzReplay.json(v)
            #expect(!json.contains("'") && !json.contains("\n"))
            #expect(fuzzJSON(try FuzzReplay.decode(json)) == json)
        }
        #expect(throws: VerifyError.self) { try FuzzReplay.decode("{not json") }
    }
}

@Suite("fuzz campaigns", .tags(.fuzz))
struct FuzzCampaignTests {
    @Test("the float32 reference stays inside the float64 oracle's bounds on 50 cases")
    func selfCheck() {
        let s = selfCheckCampaign(seed: 7, cases: 50)
        #expect(s.reports.count == 50 && s.reportsIncluded == "all")
        #expect(s.line.contains("50 passed, 0 failed"))
    }

    @Test("the unfaulted CPU model passes a small campaign")
    func cpuModelClean() throws {
        try cleanCPUModelCampaign(seed: 2, cases: 25)
    }

    @Test("a CPU fault model is found, shrunk to a smaller case that still fails, and replays",
          arguments: ["last_partial_m_tile_skipped", "shared_slot_dropped"])
    func findAndShrink(fault: String) throws {
        let kernel = try CPUModelKernel(fault: fault)
        let verifier = CaseVerifier(kernel: kernel)
        var campaign = FuzzCampaign(generator: FuzzGenerator(seed: 5, limits: fuzzSmallLimits, allExperts: true), verifier: verifier, maxCases: 40)
        campaign.maxShrinks = 1
        var steps = 0
        let s = campaign.run(reproducer: { "moecheck fuzz --cpu-model --fault \(fault) --replay '\(FuzzReplay.json($0))'" }) { ev in
            if case .shrinkStep = ev { steps += 1 }
        }
        #expect(s.failed > 0, "fault \(fault) not found in 40 cases")
        let res = try #require(s.shrunk.first)
        #expect(res.steps.count == steps)
        #expect(s.reproducers.count == 1 && s.reproducers[0].contains("--fault \(fault) --replay '"))
        #expect(!res.report.passed)
        #expect(failureSignature(res.report) == failureSignature(s.reports.first { $0.name == res.original.name }!))
        let a = fuzzDims(res.original), b = fuzzDims(res.minimal)
        for (k, v) in b { #expect(v <= a[k]!, "\(k) grew: \(a[k]!) → \(v)") }
        #expect(b.contains { $0.value < a[$0.key]! }, "nothing shrank: \(res.original) → \(res.minimal)")
        #expect(FuzzCost.cost(res.minimal, allExperts: true) <= FuzzCost.cost(res.original, allExperts: true))
        // replay of the printed JSON reproduces the failure, at the same stage
        let json = String(s.reproducers[0].split(separator: "'")[1])
        let replayed = verifier.verify(try FuzzReplay.decode(json))
        #expect(!replayed.passed)
        #expect(failureSignature(replayed) == failureSignature(res.report))
        // and the fault-free model passes the minimal case
        #expect(CaseVerifier(kernel: try CPUModelKernel()).verify(res.minimal).passed)
    }

    @Test("shrinking stays inside the kernel's contract: H, I, Is multiples of CONSTRAINTS' multiple_of, the shared expert fused, FORMATS")
    func shrinkInsideContract() throws {
        let config = MoEConfig(family: .qwen35Moe, hidden: 384, intermediate: 256, sharedIntermediate: 256, experts: 7, topK: 3)
        let vc = VerifyCase(name: "c", spec: SyntheticSpec(config: config, format: .fp8e4m3fnuz, tokens: 33, seed: 9), fuseShared: true)
        let free = Shrinker.candidates(vc)
        #expect(free.contains { $0.1.spec!.config.hidden % 128 != 0 })
        #expect(free.contains { !$0.1.fuseShared } && free.contains { $0.1.spec!.format == .bf16 })
        let bound = Shrinker.candidates(vc, multiple: 128, fusedSharedOnly: true, formats: [.fp8e4m3fn, .fp8e4m3fnuz])
        #expect(!bound.isEmpty)
        for (what, c) in bound {
            let k = c.spec!.config
            #expect(k.hidden % 128 == 0 && k.intermediate % 128 == 0 && k.sharedIntermediate % 128 == 0, "\(what)")
            #expect(c.fuseShared || k.sharedIntermediate == 0, "\(what)")
            #expect(c.spec!.format != .bf16, "\(what)")
        }
        #expect(bound.contains { $0.1.spec!.config.hidden == 128 } && bound.contains { $0.1.spec!.config.intermediate == 128 })
        #expect(bound.contains { $0.1.spec!.format == .fp8e4m3fn })
    }

    @Test("the shrinker keeps only failing candidates and respects its budget")
    func shrinkerBudget() throws {
        let verifier = CaseVerifier(kernel: try CPUModelKernel(fault: "shared_slot_dropped"))
        let config = MoEConfig(family: .qwen35Moe, hidden: 200, intermediate: 96, sharedIntermediate: 96, experts: 7, topK: 3)
        let vc = VerifyCase(name: "shrink-me", spec: SyntheticSpec(config: config, format: .fp8e4m3fn, tokens: 33, seed: 9, routing: .hotExperts,
                                                                  inputs: .outliers), splitK: 2)
        let r = verifier.verify(vc)
        #expect(!r.passed)
        let small = Shrinker(verifier: verifier, budget: 3).shrink(vc, report: r)
        #expect(small.attempts <= 3)
        let full = Shrinker(verifier: verifier).shrink(vc, report: r)
        #expect(!full.report.passed)
        #expect(full.minimal.spec!.tokens == 1 && full.minimal.spec!.config.experts == 1 && full.minimal.spec!.config.hidden == 1)
        #expect(full.minimal.fuseShared, "the fault needs the fused shared slot: \(full.minimal)")
        #expect(full.minimal.spec!.routing == .uniform && full.minimal.spec!.inputs == .normal && full.minimal.splitK == 1)
        // a passing case cannot shrink: every candidate passes
        let ok = CaseVerifier(kernel: try CPUModelKernel())
        #expect(Shrinker.candidates(vc).allSatisfy { $0.1.spec!.tokens <= vc.spec!.tokens })
        _ = ok
    }
}

@Suite("moecheck fuzz end to end", .tags(.fuzz, .endToEnd), .enabled(if: MoECheckTool.isAvailable, Comment(rawValue: MoECheckTool.missingReason)))
struct FuzzCLITests {
    @Test("--cpu-selfcheck passes and reports its case count; --json writes every report")
    func selfCheck() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("fuzz-cli-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let json = dir.appendingPathComponent("fuzz.json").path
        let run = try MoECheckTool.run(["fuzz", "--cpu-selfcheck", "--cases", "12", "--seed", "7", "--max-tokens", "64", "--max-hidden", "256", "--json", json])
        #expect(run.exitStatus == 0, "\(run)")
        #expect(run.stdout.contains("12 cases, 0 failures") && run.stdout.contains("12 passed, 0 failed"), "\(run)")
        #expect(!run.stderr.contains("\r"), "no progress line when stderr is not a terminal")
        let obj = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: json))) as? [String: Any]
        #expect((obj?["reports"] as? [Any])?.count == 12)
        #expect(obj?["casesRun"] as? Int == 12)
        // where the time went: printed, and in the JSON summing the cases' own times
        #expect(run.stdout.contains("cases/s; reference") && run.stdout.contains("judging"), "\(run)")
        let reports = (obj?["reports"] as? [[String: Any]]) ?? []
        let refSum = reports.reduce(0.0) { $0 + (($1["referenceSeconds"] as? Double) ?? 0) }
        let judged = reports.reduce(0.0) { $0 + (($1["judgeSeconds"] as? Double) ?? -1e9) }
        #expect(abs((obj?["referenceSeconds"] as? Double ?? -1) - refSum) < 1e-6, "summary reference time = Σ cases'")
        #expect(judged > 0, "every case reports its judging time")
    }

    @Test("a fault is shrunk and the printed command replays it (exit 1 both times)")
    func shrinkAndReplay() throws {
        let run = try MoECheckTool.run(["fuzz", "--cpu-model", "--fault", "shared_slot_dropped", "--cases", "6", "--seed", "5",
                                        "--max-tokens", "64", "--max-hidden", "256"])
        #expect(run.exitStatus == 1, "\(run)")
        let line = try #require(run.stdout.split(separator: "\n").first { $0.hasPrefix("reproduce: ") }, "\(run)")
        #expect(run.stdout.contains("minimal failing case"))
        let json = String(line.split(separator: "'")[1])
        let replay = try MoECheckTool.run(["fuzz", "--cpu-model", "--fault", "shared_slot_dropped", "--replay", json])
        #expect(replay.exitStatus == 1 && replay.stdout.contains("0 passed, 1 failed"), "\(replay)")
        let clean = try MoECheckTool.run(["fuzz", "--cpu-model", "--replay", json])
        #expect(clean.exitStatus == 0 && clean.stdout.contains("1 passed, 0 failed"), "\(clean)")
    }
}

/// The long fuzz tier (README "Tests"): the same checks as "fuzz campaigns" over many more cases.
@Suite("fuzz campaigns, long tier", .tags(.fuzz, .longTier), .enabled(if: TestTier.long, TestTier.longSkipReason))
struct FuzzLongTierTests {
    @Test("the float32 reference stays inside the float64 oracle's bounds on 1,000 cases")
    func selfCheckLong() {
        _ = selfCheckCampaign(seed: 11, cases: 1000)
    }

    @Test("the unfaulted CPU model passes 300 cases")
    func cpuModelCleanLong() throws {
        try cleanCPUModelCampaign(seed: 12, cases: 300)
    }
}

/// A `--cpu-selfcheck` campaign of `cases` small cases: every case runs and passes.
private func selfCheckCampaign(seed: UInt64, cases: Int, sourceLocation: SourceLocation = #_sourceLocation) -> FuzzSummary {
    let verifier = CaseVerifier(kernel: ReferenceSelfCheckKernel())
    let s = FuzzCampaign(generator: FuzzGenerator(seed: seed, limits: fuzzSmallLimits), verifier: verifier, maxCases: cases)
        .run(reproducer: { "moecheck fuzz --cpu-selfcheck --replay '\(FuzzReplay.json($0))'" })
    #expect(s.casesRun == cases, sourceLocation: sourceLocation)
    #expect(s.failed == 0, "\(s.reports.filter { !$0.passed }.map(\.line).joined(separator: "\n"))\n\(s.reproducers.joined(separator: "\n"))",
            sourceLocation: sourceLocation)
    return s
}

/// A campaign of the unfaulted CPU model kernel over `cases` small cases: every case passes.
private func cleanCPUModelCampaign(seed: UInt64, cases: Int, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let verifier = CaseVerifier(kernel: try CPUModelKernel())
    let s = FuzzCampaign(generator: FuzzGenerator(seed: seed, limits: fuzzSmallLimits, allExperts: true), verifier: verifier, maxCases: cases)
        .run(reproducer: { FuzzReplay.json($0) })
    #expect(s.failed == 0, "\(s.reports.filter { !$0.passed }.map(\.line).joined(separator: "\n"))", sourceLocation: sourceLocation)
}
