import ArgumentParser
import Foundation
import MoEReference
import MoEVerify

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a kernel library's stages and whole layer on the case catalogue and judge them against the reference bounds.",
        discussion: """
        Every case: router (logits, ids, weights, shared slot), align (every pair once, padding), stage 1 and stage 2 \
        (teacher-forced with the reference's routing), and the whole layer twice on buffers poisoned with NaN and 0xD5. \
        Suites: \(Catalogue.suites.joined(separator: ", ")). Exit code 1 on any failure. Without a kernel library the GPU \
        comparison is skipped (exit 0), unless one was asked for with --kernels or MOECHECK_KERNELS.

        References come from the reference cache when it holds them (--cache, default $XDG_CACHE_HOME/moecheck or \
        ~/.cache/moecheck; --no-cache) and are computed ahead of the kernel, several cases concurrently (--in-flight, \
        default the usable CPUs, at least 2; memory: at most that many cases and --in-flight-memory of their estimated \
        footprint), while the kernel runs one case at a time and each case is judged beside the next one's kernel \
        (--no-pipeline: one case after the other). Reports come in the cases' order, identical to a serial run. The \
        last lines give cases/s, where the time went (reference, kernel, judging, waiting for the reference) and the \
        cache's hits and misses.
        """)

    @OptionGroup var kernel: KernelOptions

    @Option(help: "Case suite.")
    var suite: String = "catalogue"

    @Option(name: .customLong("case"), help: ArgumentHelp("A case file with hidden_states (a user's checkpoint layer, a golden), or a directory of them; repeatable. Replaces --suite.", valueName: "FILE|DIR"))
    var caseFiles: [String] = []

    @OptionGroup var layerPrefix: LayerPrefixOption

    @OptionGroup var recipe: RecipeOptions

    @OptionGroup var cases: CaseFilterOption

    @Option(help: "Run shard i of n of the selected cases, the n shards balanced by work (parallel processes on one host: together they run every case once).")
    var shard: String = "0/1"

    @OptionGroup var report: JSONOutputOption

    @Flag(help: "Upload host-generated weights even when the library can generate them on the device.")
    var hostWeights = false

    @OptionGroup var tier: TierOptions

    @OptionGroup var references: ReferenceCacheOptions

    @OptionGroup var blas: BLASOptions

    func run() throws {
        blas.apply()
        guard let selection = kernel.selection else {
            print("verify: no kernel given (--kernels PATH, MOECHECK_KERNELS, --python ADAPTER.py or --cpu-model): GPU comparison skipped.")
            print("verify: build one with `make -C Kernels PLATFORM=nvidia` (or PLATFORM=amd) and pass --kernels Kernels/build/nvidia/libmoekernels.so")
            return
        }
        // several kernels: every --python adapter, plus the library (--kernels) or CPU model given with them
        var all = kernel.pythonAdapter.selections
        if !all.isEmpty {
            if kernel.cpuModel { all.append(.cpuModel(fault: kernel.fault)) }
            else if let path = kernel.library.kernels { all.append(.library(path: path, device: kernel.device, fault: kernel.fault)) }
        }
        if all.isEmpty { all = [selection] }
        var opened: [KernelUnderTest] = []
        for s in all { opened.append(try failing("verify") { try s.open() }) }
        for case let device as DeviceKernel in opened where hostWeights { device.generateOnDevice = false }
        let k = opened[0]
        let forced = try failing("verify") { try recipe.resolved() }
        var selected: [VerifyCase]
        var source = "suite \(suite)"
        if caseFiles.isEmpty {
            selected = try failing("verify") { try CatalogueRun(suite: suite, filter: cases.filter).cases() }
        } else {
            let found = try failing("verify") { try CaseSelection.files(caseFiles, prefix: layerPrefix.prefix) }
            for s in found.skipped { note("verify: skipped \(s)") }
            selected = found.cases.filter { cases.filter.map($0.name.contains) ?? true }
            source = "\(selected.count) case file(s)"
        }
        let sh = try failing("verify") { try FuzzShard(parsing: shard) }
        if opened.count > 1 {
            try runSeveral(opened, selected, shard: sh, source: source, recipe: forced)
            return
        }
        var (runnable, skipped) = CaseSelection.runnable(selected, on: k)
        if sh.count > 1 {
            runnable = sh.part(of: runnable)
            source += ", shard \(sh) (balanced by work)"
        }
        if !skipped.isEmpty, let py = k as? PythonKernel {
            print("verify: \(skipped.count) case(s) skipped: the adapter takes \(py.formats.map(\.rawValue).joined(separator: ", ")) weights (FORMATS)")
        }
        var about = "\(k.name) on \(k.device), \(source), \(runnable.count) cases, OpenBLAS threads \(BLAS.threads)"
        if let py = k as? PythonKernel { about += "; \(py.libraryVersions)\(py.hasRoute ? "" : "; no route(): whole layer judged forward-only")" }
        if let forced { about += "; recipe \(forced.name) (given)" }
        let cache = references.open("verify")
        about += "; " + (cache.map { "reference cache \($0.root.path)" } ?? "no reference cache")
        print("verify: " + about)
        fflush(stdout)
        let progress = StopSummary(kernels: ["\(k.name) on \(k.device)"], pipelined: !references.noPipeline)
        progress.writeReports = { [report] in try report.write($0) }
        let summary = CatalogueRun.run(runnable, on: k, rigorousOnly: tier.rigorousOnly, recipe: forced, cache: cache,
                                       pipelined: !references.noPipeline, inFlight: references.depth,
                                       memoryBudget: references.memoryBudget) { r in
            progress.record(kernel: 0, r, line: r.line)
        }
        try report.write(summary.reports)
        print(String(format: "verify: %@ on %@, %.1f s", k.name, k.device, summary.seconds) + summary.timeSplit)
        if let cache { print("verify: " + cache.counters.line(directory: cache.root.path)) }
        print("verify: " + PeakMemory.line)
        if let py = k as? PythonKernel, py.restarts > 0 { print("verify: the adapter's worker was restarted \(py.restarts) time(s)") }
        print(summary.countLine)
        if summary.failed > 0 { throw ExitCode(1) }
    }

    /// Several kernels on the same cases: each case's reference is computed once and shared by
    /// the kernels whose memo key (recipe, fusion, inputs) matches — a C ABI library and an
    /// adapter of the same recipe too, on synthetic cases — and the next case's references are
    /// computed beside this case's kernel runs; per-kernel summaries at the end.
    func runSeveral(_ kernels: [KernelUnderTest], _ selected: [VerifyCase], shard sh: FuzzShard, source: String, recipe forced: Recipe?) throws {
        let cache = references.open("verify")
        let verifiers = kernels.map { k -> CaseVerifier in
            var v = CaseVerifier(kernel: k, adjustRecipe: forced.map { r in { _ in r } }, rigorousOnly: tier.rigorousOnly)
            v.cache = cache
            return v
        }
        // which kernels take each case (FORMATS) and the reference each needs, once: for the
        // shards' balance and for the order of the runs
        let taken = kernels.map { Set(CaseSelection.runnable(selected, on: $0).run.map(\.name)) }
        var source = source
        // only the cases some kernel takes: a shard of fp8 cases is idle under bf16-only adapters
        var cases = selected.filter { vc in taken.contains { $0.contains(vc.name) } }
        if selected.count > cases.count { source += ", \(selected.count - cases.count) case(s) no kernel takes left out" }
        var keys: [String: [(kernel: Int, key: String)]] = [:]
        for vc in cases { keys[vc.name] = kernels.indices.filter { taken[$0].contains(vc.name) }.map { ($0, verifiers[$0].memoKey(vc)) } }
        if sh.count > 1 {
            // a case weighs its work times the references it needs (kernels of one recipe share one)
            cases = sh.part(of: cases, multiplicity: cases.map { vc in Set(keys[vc.name]!.map(\.key)).count })
            source += ", shard \(sh) (balanced by work)"
        }
        print("verify: \(kernels.count) kernels, \(source), \(cases.count) cases, OpenBLAS threads \(BLAS.threads)")
        for (i, k) in kernels.enumerated() {
            var about = "  [\(i + 1)] \(k.name): \(cases.filter { taken[i].contains($0.name) }.count) cases"
            if let py = k as? PythonKernel { about += "; \(py.libraryVersions)\(py.hasRoute ? "" : "; no route(): forward-only")" }
            print(about)
        }
        fflush(stdout)
        let progress = StopSummary(kernels: kernels.map { "\($0.name) on \($0.device)" }, pipelined: !references.noPipeline)
        progress.writeReports = { [report] in try report.write($0) }
        let shared = ReferencePipeline.runSeveral(cases, keys: keys, verifiers: verifiers, pipelined: !references.noPipeline,
                                                  memoryBudget: references.memoryBudget) { i, r, secs in
            progress.record(kernel: i, r, seconds: secs, line: "[\(i + 1)] " + r.line)
        }
        let reports = progress.reportsByKernel
        try report.write(reports.flatMap { $0 })
        for line in progress.kernelLines() { print(line) }
        print("verify: \(shared) reference(s) shared between kernels" + (references.noPipeline ? "" : "; the next case's references computed beside the kernels"))
        if let cache { print("verify: " + cache.counters.line(directory: cache.root.path)) }
        print("verify: " + PeakMemory.line)
        let all = CatalogueRunSummary(reports: reports.flatMap { $0 }, seconds: 0)   // its count line only
        print(all.countLine)
        if all.failed > 0 { throw ExitCode(1) }
    }
}

