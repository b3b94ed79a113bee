import ArgumentParser
import Foundation
import KernelBridge
import MoEReference
import MoEVerify

struct Fuzz: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Random cases against a kernel, judged by the reference bounds; failures are shrunk to a minimal case with a one-line repro.",
        discussion: """
        Case i of seed S is a pure function of (S, i, the caps), the same on every machine and shard; --shard i/n runs the \
        indices with index % n == i. Cases cover T 1…8192 (skewed to small, odd and tile-edge counts), E 1…512, K 1…min(E,16), \
        H and I that are and are not multiples of 128/32/16, a shared expert (none, fusable, not fusable), renormalize on/off, \
        BF16 / FP8 e4m3fn / e4m3fnuz, split-K 1…ceil(H/128) (FP8), every routing and input mode and spread-across-K scales. \
        Each case's work T·(K+1)·3·I·H (+ weight generation, router) is capped (--max-cost), so CPU runs stay fast.

        A failing case is shrunk greedily (T, E, K, H, I, distributions, split-K, shared expert, format), keeping a candidate only \
        when it still fails at the same first failing stage, within --shrink-attempts verifications; the first failure of each \
        distinct failing stage is shrunk (at most 3). The minimal case is printed with a command that replays it (--replay JSON).

        --json FILE writes the summary, every case's report (failures only once a campaign passes \
        \(FuzzCampaign.allReportsLimit) cases: reportsIncluded says which), the shrink results and their reproducers. \
        Exit code 1 on any failure.

        Several cases are in flight (--in-flight, default the usable CPUs, at least 2): the next cases are generated and \
        their references computed concurrently (read from and written to the reference cache only with an explicit \
        --cache DIR: generated cases rarely repeat, and caching them writes gigabytes for nothing) while the kernel runs \
        one case at a time on its own thread, and each case is judged beside the next one's kernel; reports come in \
        order and are those of a serial run (--no-pipeline: one case after the other). Memory holds at most --in-flight \
        cases and at most --in-flight-memory (default a quarter of the physical memory) of their estimated footprint; \
        --seconds / --cases are checked when a case is generated (up to --in-flight cases early).
        """)

    @OptionGroup var kernel: KernelOptions

    @Flag(help: "Fuzz the float32 reference engine against the float64 oracle's bounds (must never fail).")
    var cpuSelfcheck = false

    @Option(help: "Run for this many seconds (no new case starts after it; shrinking may run past it).")
    var seconds: Double?

    @Option(help: "Run this many cases (of this shard). Default: 50 when --seconds is not given.")
    var cases: Int?

    @Option(help: "Campaign seed.")
    var seed: UInt64 = 1

    @Option(help: "Run shard i of n: case indices with index % n == i.")
    var shard: String = "0/1"

    @OptionGroup var report: JSONOutputOption

    @OptionGroup var caps: FuzzCapOptions

    @Option(help: "Verifications a shrink may spend.")
    var shrinkAttempts: Int = 150

    @Flag(help: "Do not shrink failures.")
    var noShrink = false

    @Option(help: "Run exactly this case (the JSON of a VerifyCase, as printed for a failure) and exit.")
    var replay: String?

    @OptionGroup var tier: TierOptions

    @OptionGroup var blas: BLASOptions

    @OptionGroup var references: ReferenceCacheOptions

    func validate() throws {
        if kernel.cpuModel && cpuSelfcheck { throw ValidationError("--cpu-model and --cpu-selfcheck exclude each other") }
        if kernel.fault != nil && cpuSelfcheck { throw ValidationError("--fault needs --cpu-model or --kernels") }
        if let cases, cases < 0 { throw ValidationError("--cases must be >= 0") }
        if let seconds, seconds < 0 { throw ValidationError("--seconds must be >= 0") }
        try kernel.pythonAdapter.requireOneKernel("fuzz", otherKernel: kernel.library.kernels != nil || kernel.cpuModel)
    }

    /// The kernel, its default limits, whether it uploads every expert, and the replay command prefix.
    func makeKernel() throws -> (KernelUnderTest, FuzzLimits, Bool, String) {
        if cpuSelfcheck { return (ReferenceSelfCheckKernel(), .selfCheck, false, "moecheck fuzz --cpu-selfcheck") }
        guard let selection = kernel.selection else {
            throw ToolFailure.noKernel(command: "fuzz", what: "a kernel library (--kernels PATH or MOECHECK_KERNELS), --cpu-model or --cpu-selfcheck")
        }
        let faultArgument = kernel.fault.map { " --fault \($0)" } ?? ""
        switch selection {
        case let .python(adapter, python, timeout, _):
            let k = try failing("fuzz") { try selection.open() }
            var command = "moecheck fuzz --python \(adapter)" + (python.map { " --python-exe \($0)" } ?? "")
            if timeout != 120 { command += " --case-timeout \(timeout)" }
            return (k, .device, true, command)
        case let .library(path, device, _):
            let k = try failing("fuzz") { try selection.open() }
            return (k, .device, true, "moecheck fuzz --kernels \(path)" + faultArgument + (device != 0 ? " --device \(device)" : ""))
        default:
            return (try selection.open(), .cpuModel, true, "moecheck fuzz --cpu-model" + faultArgument)
        }
    }

    func run() throws {
        blas.apply()
        let (kernel, base, allExperts, command) = try makeKernel()
        var verifier = CaseVerifier(kernel: kernel, rigorousOnly: tier.rigorousOnly)
        // generated cases are new: the cache only on request (measured: 1.7 GB written in a 40 s selfcheck, 0 hits)
        let cache = references.cache == nil ? nil : references.open("fuzz")
        verifier.cache = cache
        if let replay {
            let vc = try FuzzReplay.decode(replay)
            print("fuzz: replay on \(kernel.name) (\(kernel.device)): \(vc)")
            let r = verifier.verify(vc)
            print(r.line)
            print("\(r.passed ? 1 : 0) passed, \(r.passed ? 0 : 1) failed")
            if !r.passed { throw ExitCode(1) }
            return
        }
        let sh: FuzzShard
        sh = try failing("fuzz") { try FuzzShard(parsing: shard) }
        let lim = base.capped(maxTokens: caps.maxTokens, maxExperts: caps.maxExperts, maxHidden: caps.maxHidden, maxCost: caps.maxCost)
        var generator = FuzzGenerator(seed: seed, limits: lim, allExperts: allExperts)
        if let py = kernel as? PythonKernel {
            generator.formats = py.formats; generator.huggingFaceConfigsOnly = true
            generator.shapeMultiple = py.shapeMultiple; generator.fusedSharedOnly = py.fusedSharedOnly
        }
        var campaign = FuzzCampaign(generator: generator, verifier: verifier, shard: sh,
                                    maxCases: cases ?? (seconds == nil ? 50 : nil), seconds: seconds)
        campaign.shrinkBudget = shrinkAttempts
        campaign.pipelined = !references.noPipeline
        campaign.inFlight = references.depth
        campaign.memoryBudget = references.memoryBudget
        if noShrink { campaign.maxShrinks = 0 }
        let budget = seconds.map { String(format: "%.0f s", $0) } ?? "\(campaign.maxCases ?? 0) cases"
        print("fuzz: \(kernel.name) on \(kernel.device), seed \(seed), shard \(sh), \(budget), caps T≤\(lim.maxTokens) E≤\(lim.maxExperts) " +
              "H≤\(lim.maxHidden) I≤\(lim.maxIntermediate) cost≤\(lim.maxCost), OpenBLAS threads \(BLAS.threads)")
        fflush(stdout)
        let tty = stderrIsTerminal
        var progressShown = false
        func clearProgress() {
            if progressShown { FileHandle.standardError.write("\r\u{1B}[K".data(using: .utf8)!); progressShown = false }
        }
        let summary = campaign.run(reproducer: { vc in "\(command) --replay '\(FuzzReplay.json(vc))'" }) { ev in
            switch ev {
            case let .caseDone(index, r, run, failed, elapsed):
                if !r.passed {
                    clearProgress()
                    print("case \(index): \(r.spec.map { "\($0)" } ?? r.source ?? r.name)\(r.splitK > 1 ? " split_k=\(r.splitK)" : "")\(r.fused ? " fused" : "")")
                    print(r.line)
                    fflush(stdout)
                }
                if tty, let spec = r.spec {
                    let s = String(format: "\rfuzz: %d cases, %d failed, %.1f s | case %d: T=%d E=%d K=%d H=%d I=%d %@\u{1B}[K", run, failed, elapsed,
                                   index, spec.tokens, spec.config.experts, spec.config.topK, spec.config.hidden,
                                   spec.config.intermediate, spec.format.rawValue)
                    FileHandle.standardError.write(s.data(using: .utf8)!)
                    progressShown = true
                }
            case let .shrinkStep(step):
                clearProgress()
                print("  shrink: \(step.change)")
                fflush(stdout)
            case let .shrunk(res):
                clearProgress()
                print("minimal failing case (\(res.steps.count) steps, \(res.attempts) attempts): \(res.minimal)")
                print(res.report.line)
                print("reproduce: \(command) --replay '\(FuzzReplay.json(res.minimal))'")
                fflush(stdout)
            }
        }
        clearProgress()
        try report.write(summary, escapingSlashes: false)
        print(summary.line)
        print(summary.timeSplit)
        if let cache { print("fuzz: " + cache.counters.line(directory: cache.root.path)) }
        print("\(summary.passed) passed, \(summary.failed) failed")
        if summary.failed > 0 { throw ExitCode(1) }
    }
}

/// The caps on generated fuzz cases (`FuzzLimits.capped`).
struct FuzzCapOptions: ParsableArguments {
    @Option(help: "Cap on T (default 8192; 512 with --cpu-model).")
    var maxTokens: Int?

    @Option(help: "Cap on E (default 512; 64 with --cpu-model).")
    var maxExperts: Int?

    @Option(help: "Cap on one case's work T·(K+1)·3·I·H + weights + router (default 3e9 GPU, 4e7 --cpu-selfcheck, 6e6 --cpu-model; scaled by the caps given).")
    var maxCost: Double?

    @Option(help: "Cap on H (default 4096; 2048 --cpu-selfcheck; 1024 --cpu-model). I is capped at min(H cap, its default).")
    var maxHidden: Int?
}
