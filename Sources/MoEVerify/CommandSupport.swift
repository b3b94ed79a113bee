import Foundation
import KernelBridge
import MoEReference
import TensorIO

// The logic behind `moecheck verify`, `fuzz` and `faults` that is not argument parsing: which
// kernel to run, running a case suite, fuzz caps, the fault-matrix summary and JSON reports.
// The executable maps its options onto these; tests call them directly.

/// The kernel a command runs.
public enum KernelSelection: Sendable, Equatable {
    /// The CPU model of the kernel recipe, optionally with a CPU fault model.
    case cpuModel(fault: String?)
    /// The float32 reference engine judged by the float64 oracle (`fuzz --cpu-selfcheck`).
    case referenceSelfCheck
    /// A kernel library implementing `Kernels/include/moe_kernels.h` on GPU `device`, optionally
    /// with a fault of a FAULTS=1 build selected.
    case library(path: String, device: Int, fault: String?)
    /// A Python adapter run by a worker in `python` (nil: `$MOECHECK_PYTHON` or python3).
    case python(adapter: String, python: String?, caseTimeout: Double, echo: Bool)

    /// Opens the kernel.
    public func open() throws -> KernelUnderTest {
        switch self {
        case let .cpuModel(fault): return try CPUModelKernel(fault: fault)
        case .referenceSelfCheck: return ReferenceSelfCheckKernel()
        case let .library(path, device, fault): return try DeviceKernel.open(path: path, device: device, fault: fault)
        case let .python(adapter, python, timeout, echo): return try PythonKernel(adapter: adapter, python: python, caseTimeout: timeout, echoStderr: echo)
        }
    }
}

/// The cases a command runs: case files given with `--case` (files or directories of them), else
/// a named suite.
public enum CaseSelection {
    /// Case files: each path a file, or a directory whose `*.safetensors` case files with
    /// `hidden_states` are taken (other files there are skipped, and counted).
    public static func files(_ paths: [String], prefix: String? = nil) throws -> (cases: [VerifyCase], skipped: [String]) {
        var cases: [VerifyCase] = [], skipped: [String] = []
        let fm = FileManager.default
        for p in paths {
            var isDir: ObjCBool = false
            guard fm.fileExists(atPath: p, isDirectory: &isDir) else { throw VerifyError.usage("--case \(p): no such file or directory") }
            if isDir.boolValue {
                let names = try fm.contentsOfDirectory(atPath: p).filter { $0.hasSuffix(".safetensors") }.sorted()
                for n in names {
                    let full = (p as NSString).appendingPathComponent(n)
                    do { cases.append(try VerifyCase(file: full, prefix: prefix)) } catch { skipped.append("\(full): \(error)") }
                }
            } else {
                cases.append(try VerifyCase(file: p, prefix: prefix))
            }
        }
        guard !cases.isEmpty else { throw VerifyError.usage("--case \(paths.joined(separator: " ")): no case file with hidden_states found") }
        return (cases, skipped)
    }

    /// The cases a kernel can take: a Python adapter's FORMATS; the rest are returned as skipped.
    public static func runnable(_ cases: [VerifyCase], on kernel: KernelUnderTest) -> (run: [VerifyCase], skipped: [VerifyCase]) {
        guard let py = kernel as? PythonKernel else { return (cases, []) }
        var run: [VerifyCase] = [], skipped: [VerifyCase] = []
        for vc in cases {
            let format: WeightFormat?
            switch vc.source {
            case let .synthetic(spec): format = spec.format
            case .file: format = (try? vc.openLayer())?.weightFormat
            }
            if let format, !py.formats.contains(format) { skipped.append(vc) } else { run.append(vc) }
        }
        return (run, skipped)
    }
}

extension DeviceKernel {
    /// Loads the kernel library at `path`, selects GPU `device` and, for a fault build, `fault`.
    public static func open(path: String, device: Int = 0, fault: String? = nil) throws -> DeviceKernel {
        let kernel = try DeviceKernel(library: try KernelLibrary(path: path), device: device)
        if let fault { try kernel.library.setFault(fault) }
        return kernel
    }
}

/// Named catalogue cases run on one kernel: `moecheck verify`, callable from tests.
public struct CatalogueRun: Sendable {
    public var suite: String
    public var filter: String?

    public init(suite: String, filter: String? = nil) {
        self.suite = suite
        self.filter = filter
    }

    /// The suite's cases whose name contains the filter; throws when none does.
    public func cases() throws -> [VerifyCase] {
        var cases = try Catalogue.suite(suite)
        if let filter { cases = cases.filter { $0.name.contains(filter) } }
        guard !cases.isEmpty else { throw VerifyError.noMatchingCases(suite: suite, filter: filter) }
        return cases
    }

    /// Verifies `cases` in order on `kernel`, calling `each` after every case. `cache`: read and
    /// write references there; `pipelined`: up to `inFlight` cases in flight (`ReferencePipeline`:
    /// references computed ahead and concurrently, judging beside the next kernel), else each
    /// case's reference just before its kernel and its verdict after it.
    public static func run(_ cases: [VerifyCase], on kernel: KernelUnderTest, rigorousOnly: Bool = false, recipe: Recipe? = nil,
                           cache: ReferenceCache? = nil, pipelined: Bool = true, inFlight: Int = ReferencePipeline.defaultDepth,
                           memoryBudget: Int = ReferencePipeline.defaultMemoryBudget,
                           each: (CaseReport) -> Void = { _ in }) -> CatalogueRunSummary {
        var verifier = CaseVerifier(kernel: kernel, adjustRecipe: recipe.map { r in { _ in r } }, rigorousOnly: rigorousOnly)
        verifier.cache = cache
        let start = Date()
        var reports: [CaseReport] = []
        if pipelined {
            ReferencePipeline(verifier: verifier, depth: inFlight, memoryBudget: memoryBudget).run(cases) { _, r in
                each(r)
                reports.append(r)
            }
        } else {
            for vc in cases {
                let r = verifier.verify(vc)
                each(r)
                reports.append(r)
            }
        }
        return CatalogueRunSummary(reports: reports, seconds: Date().timeIntervalSince(start), pipelined: pipelined)
    }
}

/// The reports of a catalogue run.
public struct CatalogueRunSummary: Sendable {
    public var reports: [CaseReport]
    public var seconds: Double
    /// Whether references were computed one case ahead, beside the kernel.
    public var pipelined: Bool
    public init(reports: [CaseReport], seconds: Double, pipelined: Bool = false) {
        self.reports = reports; self.seconds = seconds; self.pipelined = pipelined
    }
    public var failed: Int { reports.filter { !$0.passed }.count }
    /// Cases the kernel or its recipe declared outside its contract (`CaseReport.skipped`).
    public var skipped: Int { reports.filter { $0.skipped != nil }.count }
    public var passed: Int { reports.count - failed - skipped }
    /// `"N passed, M failed"` (`, K skipped` where some were), the last line of every command.
    public var countLine: String { "\(passed) passed, \(failed) failed" + (skipped > 0 ? ", \(skipped) skipped" : "") }

    /// Where the time went: reference, kernel, judging, waiting (pipelined), and the rest of the
    /// kernel's case (a Python worker's transfers), with cases/s.
    public var timeSplit: String {
        let reference = reports.reduce(0) { $0 + $1.referenceSeconds }
        let kernel = reports.reduce(0) { $0 + $1.kernelMilliseconds } / 1000
        let overheads = reports.compactMap(\.kernelOverhead)
        let judging = reports.reduce(0) { $0 + ($1.judgeSeconds ?? 0) }
        var s = String(format: " (%.2f cases/s; reference %.1f s, kernel %.2f s, judging %.1f s", Double(reports.count) / Swift.max(seconds, 1e-9),
                       reference, kernel, judging)
        s += TimeSplit.pipelineNote(reports, pipelined: pipelined)
        if !overheads.isEmpty {
            let perCase = overheads.map { ($0["worker_round_trip"] ?? 0) + ($0["read_outputs"] ?? 0) }.sorted()
            let write = overheads.reduce(0) { $0 + ($1["write_case"] ?? 0) }
            s += String(format: ", adapter overhead median %.1f ms/case excluding case writes (%.1f s in all)", 1000 * perCase[perCase.count / 2], write)
            let bytes = overheads.reduce(0) { $0 + ($1["case_bytes"] ?? 0) }
            let extra = overheads.reduce(0) { $0 + ($1["first_forward_extra"] ?? 0) }
            if bytes > 0 && extra > 0 {
                s += String(format: "; case files %.1f MB in all, into the adapter's framework at %.2f GB/s (first forward minus second)", bytes / 1e6, bytes / extra / 1e9)
            }
        }
        return s + ")"
    }
}

/// Pieces of `verify`'s and `fuzz`'s time split.
enum TimeSplit {
    /// `", waiting for the reference X s (pipelined: …), N of M references cached"`, or "" for
    /// a serial run without a cache.
    static func pipelineNote(_ reports: [CaseReport], pipelined: Bool) -> String {
        var s = ""
        if pipelined {
            let waiting = reports.reduce(0) { $0 + ($1.waitSeconds ?? 0) }
            s += String(format: ", waiting for the reference %.1f s (pipelined: references and judging ran beside the kernel)", waiting)
        }
        let cached = reports.filter { $0.referenceCached == true }.count
        if reports.contains(where: { $0.referenceCached != nil }) { s += ", \(cached) of \(reports.count) references from the cache" }
        return s
    }
}

extension FuzzLimits {
    /// These limits with the caps a user gave. `maxHidden` also caps I (never above its default).
    /// Without `maxCost`, caps below the defaults shrink the cost budget in proportion
    /// (`√(T cap)·(H cap)·√(E cap)` relative to the defaults), never below 1/64 of it.
    public func capped(maxTokens: Int? = nil, maxExperts: Int? = nil, maxHidden: Int? = nil, maxCost: Double? = nil) -> FuzzLimits {
        var l = self
        if let maxTokens { l.maxTokens = Swift.max(1, maxTokens) }
        if let maxExperts { l.maxExperts = Swift.max(1, maxExperts) }
        if let maxHidden { l.maxHidden = Swift.max(1, maxHidden); l.maxIntermediate = Swift.min(self.maxIntermediate, l.maxHidden) }
        if let maxCost { l.maxCost = Swift.max(1, Int(Swift.min(maxCost, 9e18))) }
        else {
            var f = 1.0
            f *= Swift.min(1, Double(l.maxTokens) / Double(self.maxTokens)).squareRoot()
            f *= Swift.min(1, Double(l.maxHidden) / Double(self.maxHidden))
            f *= Swift.min(1, Double(l.maxExperts) / Double(self.maxExperts)).squareRoot()
            l.maxCost = Swift.max(self.maxCost / 64, Int(Double(self.maxCost) * f))
        }
        return l
    }
}

extension FaultMatrix {
    /// The closing line of `moecheck faults`: harmful detected, benign accepted, false alarms,
    /// baseline, seconds.
    public func summaryLine(faults: [String], seconds: Double) -> String {
        let harmful = faults.filter { !Self.isBenign($0) }
        let benign = faults.filter { Self.isBenign($0) }
        return String(format: "faults: %d/%d harmful detected, %d/%d benign accepted, %d false alarm(s), baseline %@, %.1f s",
                      harmful.count - missed.count, harmful.count, benign.count - Set(falseAlarms.map(\.fault)).count, benign.count,
                      falseAlarms.count, baselineFailures.isEmpty ? "passes" : "FAILS", seconds)
    }
}

/// JSON report files (`--json`): pretty-printed, sorted keys, non-finite numbers as strings.
public enum JSONReport {
    /// The encoder every `--json` output uses; `escapingSlashes: false` keeps `/` readable.
    public static func encoder(escapingSlashes: Bool = true) -> JSONEncoder {
        let enc = JSONEncoder()
        enc.outputFormatting = escapingSlashes ? [.prettyPrinted, .sortedKeys] : [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        enc.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return enc
    }

    public static func write<T: Encodable>(_ value: T, to path: String, escapingSlashes: Bool = true) throws {
        try encoder(escapingSlashes: escapingSlashes).encode(value).write(to: URL(fileURLWithPath: path))
    }
}

/// This process's peak resident memory (getrusage), for the last lines of long runs: several
/// campaign shards share a host, and a shard that is killed for memory says nothing itself.
public enum PeakMemory {
    public static var bytes: Int {
        var u = rusage()
        guard getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &u) == 0 else { return 0 }
        return Int(u.ru_maxrss) * 1024   // kilobytes on Linux
    }
    public static var line: String { String(format: "peak memory of this process %.2f GiB", Double(bytes) / Double(1 << 30)) }
}
