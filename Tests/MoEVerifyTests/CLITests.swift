import Foundation
import MoEReference
import MoEVerify
import Testing
import TensorIO
import MoECheckTestSupport

// End to end: the built `moecheck` executable, its output and exit codes. Every failure prints
// the command line and what the tool said (ToolRun.description).

/// A directory holding the good case file, shared by the CLI tests.
private let workspace: Result<(dir: TemporaryDirectory, good: String), Error> = Result {
    let dir = try TemporaryDirectory("cli")
    let good = dir.path("good-case.safetensors")
    try CaseFiles.writeGood(to: good)
    return (dir, good)
}

private func goodCase() throws -> (dir: TemporaryDirectory, good: String) {
    switch workspace {
    case .success(let w): return w
    case .failure(let e):
        Issue.record("writing the good case file failed: \(e)")
        throw e
    }
}

/// Expects the run to end by exiting (never a signal) with `status` (or any non-zero with nil).
private func expectExit(_ run: ToolRun, _ status: Int32?, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(run.signal == nil, "ended by a signal (a crash):\n\(run)", sourceLocation: sourceLocation)
    if let status {
        #expect(run.exitStatus == status, "expected exit \(status):\n\(run)", sourceLocation: sourceLocation)
    } else {
        #expect(run.exitStatus != nil && run.exitStatus != 0, "expected a non-zero exit:\n\(run)", sourceLocation: sourceLocation)
    }
}

@Suite("moecheck end to end", .tags(.endToEnd), .enabled(if: MoECheckTool.isAvailable, Comment(rawValue: MoECheckTool.missingReason)))
struct CLITests {
    @Test("a stopped verify (SIGTERM, as from timeout) prints the summary of the runs that finished and exits 128 + 15")
    func stoppedVerifyPrintsSummary() throws {
        let dir = try TemporaryDirectory("stop")
        let out = dir.path("stdout")
        _ = FileManager.default.createFile(atPath: out, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: out))
        let p = Process()
        p.executableURL = URL(fileURLWithPath: MoECheckTool.executable!)
        // two cases of the 35B shape: tens of seconds on the CPU model, stopped long before
        let json = dir.path("stopped.json")
        p.arguments = ["verify", "--cpu-model", "--suite", "all", "--filter", "qwen3.5-35b-a3b-tp1-bf16-T1", "--no-cache", "--json", json]
        var env = ProcessInfo.processInfo.environment
        env["MOECHECK_BLAS_THREADS"] = "1"
        p.environment = env
        p.standardOutput = handle
        p.standardError = FileHandle.nullDevice
        try p.run()
        // the signal handler is in place once the header is out
        let deadline = Date().addingTimeInterval(60)
        while p.isRunning && Date() < deadline && !((try? String(contentsOfFile: out, encoding: .utf8)) ?? "").contains("verify: cpu-model") {
            usleep(50_000)
        }
        usleep(500_000)
        let stoppedEarly = p.isRunning
        p.terminate()
        p.waitUntilExit()
        try? handle.close()
        let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        try #require(stoppedEarly, "the run ended before it was stopped: \(text)")
        #expect(p.terminationReason == .exit && p.terminationStatus == 143, "\(p.terminationReason) \(p.terminationStatus): \(text)")
        #expect(text.contains("verify: stopped by signal 15 after"), "\(text)")
        #expect(text.contains("verify: peak memory of this process"), "\(text)")
        let lines = text.split(separator: "\n").map(String.init)
        #expect(lines.last?.range(of: #"^[0-9]+ passed, [0-9]+ failed"#, options: .regularExpression) != nil, "\(text)")
        #expect(lines.contains { $0.hasPrefix("verify: cpu-model on CPU") && $0.contains("cases/s") }, "\(text)")
        // the finished runs' reports (none finished this early: an empty list, still valid JSON)
        let written = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: json)))
        #expect(written is [Any], "\(written)")
    }

    @Test("inspect on a good case file prints family, H, I, E, K, fusable and exits 0")
    func inspectGood() throws {
        let w = try goodCase()
        let run = try MoECheckTool.run(["inspect", w.good])
        expectExit(run, 0)
        let c = CaseFiles.spec.config
        for line in ["file:        \(w.good)", "family:      \(c.family.rawValue)", "H (hidden):  \(c.hidden)", "I (expert):  \(c.intermediate)",
                     "E experts:   \(c.experts)", "K top-k:     \(c.topK)", "layout:      combined", "tokens:      \(CaseFiles.spec.tokens)",
                     "problems:    none"] {
            #expect(run.stdout.contains(line + "\n"), "missing '\(line)':\n\(run)")
        }
        #expect(run.stdout.contains("fusable:     yes (Is == I): shared expert rides as expert \(c.experts), top-k \(c.topK + 1)"), "\(run)")
    }

    @Test("a process re-run with a forced OpenBLAS core says so on stderr (the re-run itself needs a CPU OpenBLAS does not know)")
    func forcedOpenBLASCore() throws {
        let run = try MoECheckTool.run(["verify", "--cpu-model", "--suite", "smoke", "--filter", "smoke-q35-small-bf16-T1", "--no-cache"],
                                       environment: ["MOECHECK_BLAS_CORE_UPGRADED": "Prescott", "OPENBLAS_CORETYPE": "Haswell"])
        #expect(run.exitStatus == 0, "\(run.stderr)")
        #expect(run.stderr.contains("moecheck: OpenBLAS core Haswell (forced: the library took this CPU for Prescott)"), "\(run.stderr)")
    }

    @Test("inspect reports an unfusable shared expert")
    func inspectUnfusable() throws {
        let dir = try TemporaryDirectory("cli-unfusable")
        var spec = CaseFiles.spec
        spec.config = MoEConfig(family: .qwen2Moe, hidden: 128, intermediate: 32, sharedIntermediate: 96, experts: 4, topK: 2, renormalize: false)
        let path = dir.path("unfusable.safetensors")
        try SyntheticLayer(spec).writeCaseFile(to: path, layout: .perExpert)
        let run = try MoECheckTool.run(["inspect", path])
        expectExit(run, 0)
        #expect(run.stdout.contains("fusable:     no (Is 96 != I 32)") && run.stdout.contains("layout:      per-expert"), "\(run)")
    }

    @Test("inspect on a malformed file exits non-zero naming the file and the problem", arguments: CaseFiles.Malformation.allCases)
    func inspectMalformed(_ kind: CaseFiles.Malformation) throws {
        let w = try goodCase()
        let path = w.dir.path("broken-\(kind.rawValue).safetensors")
        try kind.write(from: w.good, to: path)
        let run = try MoECheckTool.run(["inspect", path])
        expectExit(run, nil)
        #expect(run.exitStatus != 0)
        #expect(run.output.contains(path), "\(kind): the message does not name the file:\n\(run)")
        let said = run.output.lowercased()
        for word in kind.expectedWords {
            #expect(said.contains(word), "\(kind): the message does not say '\(word)':\n\(run)")
        }
        #expect(!said.contains("fatal error") && !said.contains("stack dump"), "\(kind): \(run)")
    }

    @Test("reference --case F --output O writes the documented tensors and exits 0")
    func referenceWritesResult() throws {
        let w = try goodCase()
        let dir = try TemporaryDirectory("cli-ref")
        let out = dir.path("result.safetensors")
        let run = try MoECheckTool.run(["reference", "--case", w.good, "--output", out])
        expectExit(run, 0)
        #expect(run.stdout.contains("reference: \(CaseFiles.spec.tokens) tokens") && run.stdout.contains("recipe fused-bf16") && run.stdout.contains(out),
                "\(run)")
        let file = try SafetensorsFile(path: out)
        let c = CaseFiles.spec.config, T = CaseFiles.spec.tokens, S = c.topK + 1
        let expected: [String: [Int]] = [
            "output": [T, c.hidden], "bound": [T, c.hidden], "router_logits": [T, c.experts], "router_logit_bound": [T, c.experts],
            "topk_ids": [T, S], "topk_weights": [T, S], "topk_weight_bound": [T, S], "shared_gate": [T, 1], "shared_gate_bound": [T, 1],
            "ambiguous_tokens": [T],
        ]
        for (name, shape) in expected.sorted(by: { $0.key < $1.key }) {
            #expect(file.shape(of: name) == shape, "\(out): tensor \(name) has shape \(file.shape(of: name).map { "\($0)" } ?? "none"), expected \(shape)")
        }
        #expect(file.dtype(of: "topk_ids") == .i32)
        // fused: the last column of topk_ids is the shared slot E
        let ids = try file.tensor("topk_ids").bits(as: Int32.self)
        #expect((0..<T).allSatisfy { ids[$0 * S + c.topK] == Int32(c.experts) }, "shared slot ids: \(ids)")
        #expect(file.metadata["recipe"] == "fused-bf16" && file.metadata["case"] == "good-case.safetensors", "metadata: \(file.metadata)")
        let bound = try file.tensor("bound").doubles()
        #expect(bound.allSatisfy { $0.isFinite && $0 > 0 }, "every output element has a positive finite bound")
    }

    @Test("reference with an unknown recipe exits non-zero naming it and the known ones")
    func referenceUnknownRecipe() throws {
        let run = try referenceFailing(recipe: "no-such-recipe")
        #expect(run.output.contains("unknown recipe 'no-such-recipe'") && run.output.contains("fused-bf16"), "\(run)")
    }

    @Test("reference with fused-fp8 on BF16 weights exits non-zero with a clear message")
    func referenceFP8RecipeOnBF16() throws {
        let run = try referenceFailing(recipe: "fused-fp8")
        let said = run.output.lowercased()
        #expect(said.contains("fused-fp8") && said.contains("bf16") && said.contains("fp8"), "\(run)")
        #expect(run.output.contains(try goodCase().good), "the message names the case file:\n\(run)")
    }

    /// `moecheck reference` on the good case with `recipe`, which must fail (non-zero exit) and
    /// write no output file.
    private func referenceFailing(recipe: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> ToolRun {
        let dir = try TemporaryDirectory("cli-ref-\(recipe)")
        let out = dir.path("never.safetensors")
        let run = try MoECheckTool.run(["reference", "--case", try goodCase().good, "--output", out, "--recipe", recipe])
        expectExit(run, nil, sourceLocation: sourceLocation)
        #expect(!FileManager.default.fileExists(atPath: out), "no output is written on failure", sourceLocation: sourceLocation)
        return run
    }

    @Test("reference on a case without hidden_states exits non-zero saying it needs inputs")
    func referenceWithoutInputs() throws {
        let w = try goodCase()
        let dir = try TemporaryDirectory("cli-ref-noinputs")
        let file = try SafetensorsFile(path: w.good)
        let noInputs = dir.path("no-inputs.safetensors")
        try SafetensorsWriter.write(try file.names.filter { $0 != "hidden_states" }.map { ($0, try file.tensor($0)) }, metadata: file.metadata, to: noInputs)
        let run = try MoECheckTool.run(["reference", "--case", noInputs, "--output", dir.path("o.safetensors")])
        expectExit(run, nil)
        #expect(run.output.contains("hidden_states") && run.output.contains(noInputs), "\(run)")
    }

    @Test("without --blas-threads or MOECHECK_BLAS_THREADS, OpenBLAS gets the CPUs the process may use: 1 under taskset -c 0",
          .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/taskset"), "needs /usr/bin/taskset (util-linux)"))
    func defaultThreadsFollowAffinity() throws {
        let args = ["verify", "--cpu-model", "--suite", "smoke", "--filter", "smoke-q35-small-bf16-T1"]
        let pinned = try MoECheckTool.run(args, environment: ["MOECHECK_BLAS_THREADS": nil], launcher: ["/usr/bin/taskset", "-c", "0"])
        expectExit(pinned, 0)
        #expect(pinned.stdout.contains("OpenBLAS threads 1"), "\(pinned)")
        let free = try MoECheckTool.run(args, environment: ["MOECHECK_BLAS_THREADS": nil])
        expectExit(free, 0)
        #expect(free.stdout.contains("OpenBLAS threads \(BLAS.usableCPUs)"), "\(free)")
        let env = try MoECheckTool.run(args, environment: ["MOECHECK_BLAS_THREADS": "3"], launcher: ["/usr/bin/taskset", "-c", "0"])
        #expect(env.stdout.contains("OpenBLAS threads 3"), "MOECHECK_BLAS_THREADS still pins it: \(env)")
    }

    @Test("verify with no kernel library and no MOECHECK_KERNELS exits 0 and says the GPU comparison was skipped")
    func verifyWithoutKernels() throws {
        let run = try MoECheckTool.run(["verify", "--suite", "smoke"], environment: ["MOECHECK_KERNELS": nil])
        expectExit(run, 0)
        #expect(run.stdout.contains("GPU comparison skipped"), "\(run)")
    }

    @Test("verify --kernels with a missing library exits non-zero naming the path")
    func verifyMissingLibrary() throws {
        let path = "/nonexistent-\(UUID().uuidString.prefix(8))/libmoekernels.so"
        let run = try MoECheckTool.run(["verify", "--kernels", path, "--suite", "smoke"], environment: ["MOECHECK_KERNELS": nil])
        expectExit(run, nil)
        #expect(run.output.contains(path) && run.output.contains("no such file"), "\(run)")
        // the same through the environment variable
        let env = try MoECheckTool.run(["verify", "--suite", "smoke"], environment: ["MOECHECK_KERNELS": path])
        expectExit(env, nil)
        #expect(env.output.contains(path), "\(env)")
    }

    @Test("verify --cpu-model --suite smoke --filter T1 exits 0 and ends with 'N passed, 0 failed'")
    func verifyCPUModel() throws {
        let run = try MoECheckTool.run(["verify", "--cpu-model", "--suite", "smoke", "--filter", "T1"], timeout: 300)
        expectExit(run, 0)
        let expectedCount = Catalogue.smoke().filter { $0.name.contains("T1") }.count
        let last = run.stdout.split(separator: "\n").last.map(String.init) ?? ""
        #expect(last == "\(expectedCount) passed, 0 failed", "last line '\(last)':\n\(run)")
        let caseLines = run.stdout.split(separator: "\n").filter { $0.hasPrefix("PASS ") || $0.hasPrefix("FAIL ") }
        #expect(caseLines.count == expectedCount && caseLines.allSatisfy { $0.hasPrefix("PASS ") }, "\(run)")
    }

    @Test("verify --cpu-model --fault names the failing cases and exits 1")
    func verifyCPUFaultModel() throws {
        let run = try MoECheckTool.run(["verify", "--cpu-model", "--fault", "shared_slot_dropped", "--suite", "smoke", "--filter", "q35-small-bf16-T1"],
                                       timeout: 300)
        expectExit(run, 1)
        #expect(run.stdout.contains("FAIL smoke-q35-small-bf16-T1"), "\(run)")
        #expect(run.stdout.split(separator: "\n").last?.hasSuffix("failed") == true && !run.stdout.contains(" 0 failed"), "\(run)")
    }

    @Test("verify with an unknown suite or a filter matching nothing exits non-zero")
    func verifyUsageErrors() throws {
        let suite = try MoECheckTool.run(["verify", "--cpu-model", "--suite", "no-such-suite"])
        expectExit(suite, nil)
        #expect(suite.output.contains("unknown suite 'no-such-suite'"), "\(suite)")
        let filter = try MoECheckTool.run(["verify", "--cpu-model", "--suite", "smoke", "--filter", "matches-nothing"])
        expectExit(filter, nil)
        #expect(filter.output.contains("matches filter 'matches-nothing'"), "\(filter)")
    }

    @Test("faults --cpu-models exits 0: every harmful fault detected, benign ones accepted")
    func faultsCPUModels() throws {
        let run = try MoECheckTool.run(["faults", "--cpu-models"], timeout: 400)
        expectExit(run, 0)
        #expect(run.stdout.contains("faults: CPU fault models"), "\(run)")
        #expect(!run.stdout.contains("MISSED") && !run.stdout.contains("FALSE ALARM"), "\(run)")
        #expect(run.stdout.contains("0 false alarm(s), baseline passes"), "\(run)")
    }

    @Test("faults without a library or --cpu-models exits non-zero with a hint")
    func faultsUsage() throws {
        let run = try MoECheckTool.run(["faults"], environment: ["MOECHECK_KERNELS": nil])
        expectExit(run, nil)
        #expect(run.output.contains("--kernels") && run.output.contains("--cpu-models"), "\(run)")
    }

    @Test("--version prints the version; --help lists the subcommands")
    func versionAndHelp() throws {
        let v = try MoECheckTool.run(["--version"])
        expectExit(v, 0)
        #expect(v.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == moecheckVersion, "\(v)")
        let h = try MoECheckTool.run(["--help"])
        expectExit(h, 0)
        for sub in ["inspect", "reference", "verify", "faults"] { #expect(h.stdout.contains(sub), "help lacks \(sub):\n\(h)") }
    }
}
