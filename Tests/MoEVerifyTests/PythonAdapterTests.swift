import Foundation
import LowPrecision
import MoEReference
@testable import MoEVerify
import Testing
import TensorIO
import MoECheckTestSupport

// The Python adapter path without a GPU or torch: the NumPy adapters shipped in adapters/ as
// kernels, the helper-level mutants, and every bad-adapter fixture of Tests/Fixtures/python.

/// Whether python3 with numpy and ml_dtypes is here (the worker's only needs).
private let pythonReady: (ok: Bool, reason: String) = {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = ["python3", "-c", "import numpy, ml_dtypes"]
    p.standardOutput = FileHandle.nullDevice
    p.standardError = FileHandle.nullDevice
    do { try p.run(); p.waitUntilExit() } catch { return (false, "python3 not runnable: \(error)") }
    return p.terminationStatus == 0 ? (true, "") : (false, "python3 lacks numpy or ml_dtypes (pip install numpy ml_dtypes)")
}()

private func adapter(_ name: String) -> String { packagePath("adapters/\(name).py") }
private func fixture(_ name: String) -> String { packagePath("Tests/Fixtures/python/\(name).py") }

/// Small bf16 cases with a fusable shared expert, an unfused one, near ties and T = 1.
private let cases: [VerifyCase] = {
    let fused = MoEConfig(family: .qwen35Moe, hidden: 160, intermediate: 96, sharedIntermediate: 96, experts: 8, topK: 3)
    let wide = MoEConfig(family: .qwen2Moe, hidden: 128, intermediate: 64, sharedIntermediate: 160, experts: 6, topK: 2)
    return [
        VerifyCase(name: "py-fused-T9", spec: SyntheticSpec(config: fused, format: .bf16, tokens: 9, seed: 5)),
        VerifyCase(name: "py-unfusable-T5", spec: SyntheticSpec(config: wide, format: .bf16, tokens: 5, seed: 6)),
        VerifyCase(name: "py-near-ties-T8", spec: SyntheticSpec(config: fused, format: .bf16, tokens: 8, seed: 7, routing: .nearTies)),
        VerifyCase(name: "py-T1", spec: SyntheticSpec(config: fused, format: .bf16, tokens: 1, seed: 8)),
    ]
}()

@Suite("Python adapters (NumPy, no GPU)", .enabled(if: pythonReady.ok, Comment(rawValue: pythonReady.reason)))
struct PythonAdapterTests {
    @Test("numpy_fused_bf16 passes every stage it exposes: router judged, whole layer twice, overhead measured")
    func fusedAdapterPasses() throws {
        let k = try PythonKernel(adapter: adapter("numpy_fused_bf16"), caseTimeout: 60)
        #expect(k.hasRoute)
        #expect(try k.recipe(for: .bf16).name == "fused-bf16")
        let summary = CatalogueRun.run(cases, on: k)
        for r in summary.reports {
            #expect(r.passed, "\(r.line)")
            #expect(r.stages.map(\.stage) == ["router", "forward#1", "forward#2"], "\(r.name): \(r.stages.map(\.stage))")
            #expect(r.kernelOverhead?["worker_round_trip"] != nil, "\(r.name): no overhead measured")
        }
    }

    @Test("several kernels on the same cases: one reference per case for the adapters with the same recipe, none shared across recipes")
    func sharedReference() throws {
        let memo = ReferenceMemo()
        let kernels: [KernelUnderTest] = [try PythonKernel(adapter: adapter("numpy_fused_bf16"), caseTimeout: 60),
                                          try PythonKernel(adapter: adapter("numpy_fused_bf16"), caseTimeout: 60),
                                          try PythonKernel(adapter: adapter("numpy_exact"), caseTimeout: 60)]
        let verifiers = kernels.map { k -> CaseVerifier in var v = CaseVerifier(kernel: k); v.memo = memo; return v }
        for vc in cases {
            let reports = verifiers.map { $0.verify(vc) }
            for r in reports { #expect(r.passed, "\(r.line)") }
            #expect(reports[0].referenceSeconds > 0, "\(vc.name): the first kernel computes the reference")
            #expect(reports[1].referenceSeconds == 0, "\(vc.name): the second kernel of the same recipe reuses it")
            #expect(reports[2].referenceSeconds > 0, "\(vc.name): the exact recipe needs its own reference")
        }
        #expect(memo.hits == cases.count)
    }

    @Test("several kernels pipelined (the next case's references beside this case's runs) give the serial run's verdicts, one reference per key")
    func severalPipelined() throws {
        func strip(_ line: String) -> String {   // the timings differ
            line.replacingOccurrences(of: #"kernel [0-9.]+ ms, reference [0-9.]+ s"#, with: "", options: .regularExpression)
        }
        let verifiers = [CaseVerifier(kernel: try PythonKernel(adapter: adapter("numpy_fused_bf16"), caseTimeout: 60)),
                         CaseVerifier(kernel: try CPUModelKernel()),
                         CaseVerifier(kernel: try PythonKernel(adapter: adapter("numpy_exact"), caseTimeout: 60))]
        let runnable = cases.filter { $0.spec?.config.fusable == true }
        try #require(runnable.count >= 2)
        var keys: [String: [(kernel: Int, key: String)]] = [:]
        for vc in runnable { keys[vc.name] = verifiers.indices.map { ($0, verifiers[$0].memoKey(vc)) } }
        #expect(runnable.allSatisfy { keys[$0.name]![0].key == keys[$0.name]![1].key && keys[$0.name]![0].key != keys[$0.name]![2].key })
        var lines: [[String]] = [[], []]
        var sharedCounts: [Int] = []
        for (n, pipelined) in [false, true].enumerated() {
            var reused = 0
            sharedCounts.append(ReferencePipeline.runSeveral(runnable, keys: keys, verifiers: verifiers, pipelined: pipelined,
                                                             memoryBudget: 1 << 30) { i, r, _ in
                #expect(r.passed, "\(r.line)")
                if i == 1 && r.referenceSeconds == 0 { reused += 1 }
                lines[n].append("[\(i)] " + strip(r.line))
            })
            #expect(reused == runnable.count, "the CPU model reuses the adapter's reference on every case")
        }
        #expect(sharedCounts == [runnable.count, runnable.count])
        #expect(lines[0] == lines[1])
        #expect(lines[0].count == 3 * runnable.count)
    }

    @Test("a staged kernel and an adapter of the same recipe share a synthetic case's reference, with the verdicts it gets alone")
    func sharedAcrossKernelKinds() throws {
        let fusable = cases.filter { $0.spec?.config.fusable == true }
        try #require(!fusable.isEmpty)
        func strip(_ line: String) -> String {   // the timings differ
            line.replacingOccurrences(of: #"kernel [0-9.]+ ms, reference [0-9.]+ s"#, with: "", options: .regularExpression)
        }
        for vc in fusable {
            let alone = CaseVerifier(kernel: try CPUModelKernel()).verify(vc)
            let memo = ReferenceMemo()
            var adapterSide = CaseVerifier(kernel: try PythonKernel(adapter: adapter("numpy_fused_bf16"), caseTimeout: 60))
            adapterSide.memo = memo
            var modelSide = CaseVerifier(kernel: try CPUModelKernel())
            modelSide.memo = memo
            #expect(adapterSide.memoKey(vc) == modelSide.memoKey(vc), "\(vc.name)")
            let first = adapterSide.verify(vc), shared = modelSide.verify(vc)
            #expect(first.passed && shared.passed, "\(first.line) / \(shared.line)")
            #expect(shared.referenceSeconds == 0 && memo.hits == 1, "\(vc.name): the CPU model reuses the adapter's reference")
            #expect(strip(shared.line) == strip(alone.line), "\(vc.name): same verdict as with its own reference")
            #expect(shared.stages.map(\.passed) == alone.stages.map(\.passed))
        }
    }

    @Test("moecheck verify with two adapters and the CPU model judges each case for all three; fuzz refuses two kernels",
          .enabled(if: MoECheckTool.isAvailable, Comment(rawValue: MoECheckTool.missingReason)))
    func verifySeveralKernelsCLI() throws {
        let a = adapter("numpy_fused_bf16")
        let run = try MoECheckTool.run(["verify", "--python", a, "--python", a, "--cpu-model", "--suite", "smoke", "--filter", "q35-small-bf16-T33"])
        #expect(run.exitStatus == 0, "\(run)")
        #expect(run.stdout.contains("verify: 3 kernels"), "\(run)")
        for i in 1...3 { #expect(run.stdout.contains("[\(i)] PASS smoke-q35-small-bf16-T33"), "kernel \(i): \(run)") }
        #expect(run.stdout.contains("verify: 2 reference(s) shared between kernels"), "the two adapters and the CPU model (same recipe) share the reference: \(run)")
        #expect(run.stdout.hasSuffix("3 passed, 0 failed\n"), "\(run)")
        let fuzz = try MoECheckTool.run(["fuzz", "--python", a, "--cpu-model", "--cases", "1"])
        #expect(fuzz.exitStatus != 0 && fuzz.output.contains("not both"), "\(fuzz)")
    }

    @Test("numpy_exact (float64, exact recipe) passes a case file opened in place, and its route weights keep float64")
    func exactAdapterOnCaseFile() throws {
        try withScratchDirectory { dir in
            let path = dir.appendingPathComponent("user-layer.safetensors").path
            try CaseFiles.writeGood(to: path)
            let vc = try VerifyCase(file: path)
            let k = try PythonKernel(adapter: adapter("numpy_exact"), caseTimeout: 60)
            let r = CaseVerifier(kernel: k).verify(vc)
            #expect(r.passed, "\(r.line)")
            #expect(r.source == path)
            #expect(r.stages.first?.stage == "router")
        }
    }

    @Test("every helper-level mutant of numpy_fused_bf16 is detected; fnuz_as_fn changes nothing on bf16 cases")
    func mutantsDetected() throws {
        let k = try PythonKernel(adapter: adapter("numpy_fused_bf16"), caseTimeout: 60)
        let expected: Set = ["shared_slot_weight_zero", "shared_gate_no_sigmoid", "shared_gate_in_renorm", "no_renormalize",
                             "shared_slot_id_e_minus_1", "expert_down_x1p01", "drop_last_partial_block", "fnuz_as_fn"]
        #expect(Set(k.mutants) == expected, "MUTANTS: \(k.mutants)")
        let families = Array(cases.prefix(3))
        let m = try FaultMatrix.run(faults: k.mutants, families: families, makeKernel: { m in k.mutant = m; return k }, progress: { _ in })
        #expect(m.baselineFailures.isEmpty, "\(m.baselineFailures)")
        for f in k.mutants where f != "fnuz_as_fn" {
            #expect(!m.missed.contains(f), "\(f) missed:\n\(m.table)")
        }
        #expect(m.missed.contains("fnuz_as_fn"), "fnuz_as_fn cannot show on bf16 layers")
        #expect(families.allSatisfy { k.mutantAppliedOn["fnuz_as_fn"]?[$0.name] == false })
    }

    @Test("an adapter that fails to import, or has no forward, is an error naming the adapter and the problem")
    func importAndContract() {
        for (name, words) in [("import_error", ["import_error.py", "import"]), ("no_forward", ["no_forward.py", "forward"])] {
            do {
                _ = try PythonKernel(adapter: fixture(name), caseTimeout: 30)
                Issue.record("\(name): no error")
            } catch {
                let text = "\(error)"
                for w in words { #expect(text.contains(w), "\(name): '\(w)' not in: \(text)") }
            }
        }
        #expect(throws: PythonAdapterError.self) { _ = try PythonKernel(adapter: "/nonexistent/adapter.py") }
        #expect(throws: PythonAdapterError.self) { _ = try PythonKernel(adapter: adapter("numpy_exact"), python: "no-such-python-moecheck") }
    }

    @Test("an exception, a wrong shape or a non-float output fails the case with the case named; the next case still runs")
    func badResults() throws {
        for (name, words) in [("raises", ["boom from fixture", "py-T1", "Traceback"]), ("wrong_shape", ["shape", "py-T1"]), ("int_output", ["dtype", "py-T1"])] {
            let k = try PythonKernel(adapter: fixture(name), caseTimeout: 30)
            let r = CaseVerifier(kernel: k).verify(cases[3])
            #expect(!r.passed)
            let text = r.error ?? ""
            for w in words where w != "Traceback" || name == "raises" { #expect(text.contains(w), "\(name): '\(w)' not in: \(text)") }
            #expect(k.restarts == 0, "\(name): the worker should survive")
            let again = CaseVerifier(kernel: k).verify(cases[0])
            #expect(!again.passed && again.error != nil, "\(name): the second case runs and fails the same way")
        }
    }

    @Test("an adapter's Unsupported skips the case (not a failure) with its reason; a catalogue counts it apart")
    func unsupportedSkips() throws {
        let k = try PythonKernel(adapter: fixture("unsupported"), caseTimeout: 30)
        let v = CaseVerifier(kernel: k)
        let skipped = v.verify(cases[1])   // Is != I
        #expect(skipped.skipped?.contains("fusable layers only") == true, "\(skipped.line)")
        #expect(skipped.passed && skipped.error == nil && skipped.line.hasPrefix("SKIP py-unfusable-T5"))
        let ran = v.verify(cases[0])
        #expect(ran.passed && ran.skipped == nil, "\(ran.line)")
        let summary = CatalogueRunSummary(reports: [skipped, ran], seconds: 1)
        #expect(summary.countLine == "1 passed, 0 failed, 1 skipped")
    }

    @Test("out of GPU memory: the run is retried after a pause; still out of memory, the case is not judged (a skip saying so), not failed")
    func outOfMemory() throws {
        try withScratchDirectory { dir in
            let marker = dir.appendingPathComponent("oom-count").path
            setenv("MOECHECK_FIXTURE_MARKER", marker, 1)
            setenv("MOECHECK_FIXTURE_OOM_TIMES", "1", 1)
            setenv("MOECHECK_WORKER_OOM_WAIT", "3", 1)
            defer { unsetenv("MOECHECK_FIXTURE_OOM_TIMES"); unsetenv("MOECHECK_WORKER_OOM_WAIT") }
            let once = try PythonKernel(adapter: fixture("out_of_memory"), caseTimeout: 30)
            let retried = CaseVerifier(kernel: once).verify(cases[0])
            #expect(retried.passed && retried.skipped == nil && retried.error == nil, "\(retried.line)")
            #expect((try? String(contentsOfFile: marker, encoding: .utf8)) == "x", "one out-of-memory attempt, then the retry")
            unlink(marker)
            setenv("MOECHECK_FIXTURE_OOM_TIMES", "100", 1)
            setenv("MOECHECK_WORKER_OOM_WAIT", "0", 1)
            let always = try PythonKernel(adapter: fixture("out_of_memory"), caseTimeout: 30)
            let r = CaseVerifier(kernel: always).verify(cases[0])
            #expect(r.passed && r.error == nil, "\(r.line)")
            #expect(r.skipped?.hasPrefix("not judged: the adapter ran out of GPU memory") == true, "\(r.line)")
            #expect(r.skipped?.contains("Tried to allocate 2.00 GiB") == true, "\(r.line)")
            #expect(CatalogueRunSummary(reports: [r], seconds: 1).countLine == "0 passed, 0 failed, 1 skipped")
        }
    }

    @Test("adapters share one generated case file per layer; it goes when no adapter claims it")
    func sharedCaseFiles() throws {
        let store = SharedCaseFiles()
        store.retain(); store.retain()
        let a = try cases[0].openLayer(), b = try cases[1].openLayer()
        let (la, ca) = try store.location(of: a, replacing: nil)
        let (la2, ca2) = try store.location(of: a, replacing: nil)      // a second adapter, same case
        #expect(la.path == la2.path && ca == la.path && ca2 == la.path)
        let (lb, cb) = try store.location(of: b, replacing: ca)         // the first moves on
        #expect(lb.path != la.path && FileManager.default.fileExists(atPath: la.path), "still claimed by the second adapter")
        let (_, cb2) = try store.location(of: b, replacing: ca2)        // the second moves on
        #expect(!FileManager.default.fileExists(atPath: la.path) && FileManager.default.fileExists(atPath: lb.path))
        store.release(last: cb)
        #expect(FileManager.default.fileExists(atPath: lb.path))
        store.release(last: cb2)
        #expect(!FileManager.default.fileExists(atPath: (lb.path as NSString).deletingLastPathComponent), "the directory goes with the last adapter")
    }

    @Test("the worker's CPU thread pools follow this process's thread count (or MOECHECK_WORKER_THREADS); variables the user set are kept")
    func workerThreads() throws {
        #expect(PythonWorker.threadEnvironment([:], blasThreads: 2) ==
                ["MOECHECK_WORKER_THREADS": "2", "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"])
        #expect(PythonWorker.threadEnvironment(["OMP_NUM_THREADS": "7", "MOECHECK_WORKER_THREADS": "3"], blasThreads: 2) ==
                ["MOECHECK_WORKER_THREADS": "3", "OPENBLAS_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"])
        #expect(PythonWorker.threadEnvironment(["MOECHECK_WORKER_THREADS": "0"], blasThreads: 0)["OMP_NUM_THREADS"] == "1")
        let names: [String] = ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"]
        let kept: [(String, String?)] = names.map { n in (n, getenv(n).map { String(cString: $0) }) }
        for (k, _) in kept { unsetenv(k) }
        setenv("MOECHECK_FIXTURE_EXPECT_THREADS", "3", 1)
        setenv("MOECHECK_WORKER_THREADS", "3", 1)
        defer {
            unsetenv("MOECHECK_FIXTURE_EXPECT_THREADS"); unsetenv("MOECHECK_WORKER_THREADS")
            for (k, v) in kept { if let v { setenv(k, v, 1) } }
        }
        let k = try PythonKernel(adapter: fixture("threads"), caseTimeout: 30)
        let r = CaseVerifier(kernel: k).verify(cases[0])
        #expect(r.passed && r.error == nil, "\(r.line) \(r.error ?? "")")
    }

    @Test("NaN output is a failed case (non-finite counted), not an error")
    func nanOutput() throws {
        let k = try PythonKernel(adapter: fixture("nan_output"), caseTimeout: 30)
        let r = CaseVerifier(kernel: k).verify(cases[0])
        #expect(!r.passed)
        #expect(r.error == nil, "\(r.error ?? "")")
        #expect(r.stages.contains { ($0.verdict?.nonFinite ?? 0) > 0 }, "\(r.line)")
    }

    @Test("a worker that dies is reported and restarted, and the campaign goes on")
    func workerDies() throws {
        try withScratchDirectory { dir in
            let marker = dir.appendingPathComponent("died-once").path
            setenv("MOECHECK_FIXTURE_MARKER", marker, 1)
            let k = try PythonKernel(adapter: fixture("dies_once"), caseTimeout: 30)
            let first = CaseVerifier(kernel: k).verify(cases[3])
            #expect(!first.passed)
            #expect((first.error ?? "").contains("died"), "\(first.error ?? "")")
            #expect((first.error ?? "").contains("exit code 3"), "\(first.error ?? "")")
            let second = CaseVerifier(kernel: k).verify(cases[0])
            #expect(second.passed, "\(second.line)")
            #expect(k.restarts == 1)
        }
    }

    @Test("a worker that hangs is killed after --case-timeout and restarted")
    func workerHangs() throws {
        let k = try PythonKernel(adapter: fixture("hangs"), caseTimeout: 2)
        let start = Date()
        let r = CaseVerifier(kernel: k).verify(cases[3])
        #expect(Date().timeIntervalSince(start) < 20)
        #expect((r.error ?? "").contains("within 2 s"), "\(r.error ?? "")")
        _ = CaseVerifier(kernel: k).verify(cases[3])
        #expect(k.restarts == 1)
    }

    @Test("an adapter that prints to stdout (Python and C level) does not corrupt the channel")
    func printsToStdout() throws {
        let k = try PythonKernel(adapter: fixture("prints"), caseTimeout: 30)
        let r = CaseVerifier(kernel: k).verify(cases[0])
        #expect(r.passed, "\(r.line)")
    }

    @Test("an adapter's CONSTRAINTS: fuzz draws only layers inside them (none skipped); a malformed one fails at hello")
    func constraints() throws {
        let k = try PythonKernel(adapter: fixture("constrained"), caseTimeout: 30)
        #expect(k.shapeMultiple == 8 && k.fusedSharedOnly)
        var g = FuzzGenerator(seed: 4, limits: FuzzLimits(maxTokens: 16, maxExperts: 8, maxHidden: 256, maxIntermediate: 128, maxCost: 2_000_000))
        g.formats = k.formats; g.huggingFaceConfigsOnly = true
        g.shapeMultiple = k.shapeMultiple; g.fusedSharedOnly = k.fusedSharedOnly
        let drawn = g.cases(count: 200)
        for vc in drawn {
            let c = try #require(vc.spec).config
            #expect(c.hidden % 8 == 0 && c.intermediate % 8 == 0 && c.sharedIntermediate % 8 == 0, "\(vc.name): H \(c.hidden) I \(c.intermediate) Is \(c.sharedIntermediate)")
            #expect(c.sharedIntermediate == 0 || (c.fusable && vc.fuseShared), "\(vc.name): shared expert not fused")
        }
        // the same draws without the constraints would have been refused by this kernel
        var free = g
        free.shapeMultiple = 1; free.fusedSharedOnly = false
        #expect(free.cases(count: 200).contains { vc in let c = vc.spec!.config; return c.hidden % 8 != 0 || (c.sharedIntermediate > 0 && !vc.fuseShared) })
        let v = CaseVerifier(kernel: k)
        for vc in drawn.prefix(6) {
            let r = v.verify(vc)
            #expect(r.skipped == nil && r.passed, "\(r.line)")
        }
        do {
            _ = try PythonKernel(adapter: fixture("bad_constraints"), caseTimeout: 30)
            Issue.record("bad_constraints: no error")
        } catch {
            #expect("\(error)".contains("multiple_of"), "\(error)")
        }
    }

    @Test("an adapter's FORMATS: cases of other formats are left out of a run, and refused when given")
    func formats() throws {
        let k = try PythonKernel(adapter: adapter("numpy_fused_bf16"), caseTimeout: 30)
        #expect(k.formats == [.bf16])
        var fp8 = cases[0]
        fp8.spec?.format = .fp8e4m3fn
        let (run, skipped) = CaseSelection.runnable([cases[0], fp8], on: k)
        #expect(run.count == 1 && skipped.count == 1)
        let r = CaseVerifier(kernel: k).verify(fp8)
        #expect((r.error ?? "").contains("FORMATS"), "\(r.error ?? "")")
    }
}

@Suite("Recorded outputs and recipes as data")
struct RecordedOutputTests {
    @Test("judge: the reference's own rounded output passes; scaled by 1.01 it fails; a wrong shape names the tensor")
    func recorded() throws {
        try withScratchDirectory { dir in
            let casePath = dir.appendingPathComponent("case.safetensors").path
            try CaseFiles.writeGood(to: casePath)
            let vc = try VerifyCase(file: casePath)
            let layer = try vc.openLayer()
            let engine = try MoEReferenceEngine(layer: layer, recipe: .fusedBF16)
            let ref = try engine.run(inputs: try layer.inputs(), tokens: layer.tokens)
            let T = layer.tokens, H = layer.config.hidden
            func write(_ values: [Double], shape: [Int], name: String) throws -> String {
                let p = dir.appendingPathComponent(name).path
                try SafetensorsWriter.write([("output", Tensor(values, shape: shape, dtype: .bf16))], metadata: [:], to: p)
                return p
            }
            let rounded = ref.output.map { Double(BFloat16.round(Float($0))) }
            let good = try write(rounded, shape: [T, H], name: "good.safetensors")
            let ok = CaseVerifier(kernel: RecordedKernel(output: good, recipe: .fusedBF16)).verify(vc)
            #expect(ok.passed, "\(ok.line)")
            let scaled = try write(rounded.map { $0 * 1.01 }, shape: [T, H], name: "scaled.safetensors")
            let bad = CaseVerifier(kernel: RecordedKernel(output: scaled, recipe: .fusedBF16)).verify(vc)
            #expect(!bad.passed, "\(bad.line)")
            let wrong = try write(Array(rounded.prefix(H)), shape: [1, H], name: "wrong.safetensors")
            let w = CaseVerifier(kernel: RecordedKernel(output: wrong, recipe: .fusedBF16)).verify(vc)
            #expect((w.error ?? "").contains("wrong.safetensors") && (w.error ?? "").contains("output") && (w.error ?? "").contains("[\(T), \(H)]"), "\(w.error ?? "")")
        }
    }

    @Test("recipes from JSON: a name, overrides on a base, and errors naming a bad key or value")
    func recipeJSON() throws {
        #expect(try Recipe.fromJSON("\"hf-bf16\"", origin: "t") == .hfBF16)
        let r = try Recipe.fromJSON(#"{"base": "fused-fp8", "gateUp": "bf16", "scaleConvention": "divide", "weighted": "bf16-or-fp32"}"#, origin: "t")
        #expect(r.gateUp == .bf16 && r.scaleConvention == .divide && r.weighted == .bf16OrFP32 && r.activationFP8)
        #expect(r.name.hasPrefix("fused-fp8+"))
        for (text, word) in [(#"{"gateup": "bf16"}"#, "gateup"), (#"{"output": "fp16"}"#, "output"), (#""nope""#, "nope"), (#"{"base": "x"}"#, "x")] {
            #expect { try Recipe.fromJSON(text, origin: "adapter.py: RECIPE") } throws: { e in "\(e)".contains(word) && "\(e)".contains("adapter.py") }
        }
    }
}
