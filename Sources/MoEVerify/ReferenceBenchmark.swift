import Foundation
import MoEReference
import TensorIO

/// The reference benchmark behind `moecheck bench`: Qwen3.5 layer shapes timed in child
/// processes (float64 with and without bounds, float32) against a grouped NumPy float64
/// implementation (scripts/bench_numpy.py) of the same math on the same case files.
///
/// Every measurement runs in a child process (the moecheck binary with `--worker`, or python3),
/// so each one's peak RSS is its own and generating the case files does not count. Swift and
/// NumPy runs alternate round by round, so both see the same machine load; times are medians over
/// rounds. Each child runs the layer once untimed before it times anything (both sides alike).
public enum ReferenceBenchmark {
    /// One benchmarked layer: a model shape in one weight format.
    public struct Shape: Sendable, Equatable {
        public let model: String
        public let config: MoEConfig
        public let format: WeightFormat
    }

    /// A failure of the benchmark: a bad request or a child process that failed.
    public enum Failure: Error, CustomStringConvertible, Equatable {
        case tensorParallelMustDivide1024
        case unknownModel(String)
        case unknownFormat(String)
        case badTokenCount(String)
        case nothingToRun
        case missingNumPyScript(String)
        case childFailed(command: String, status: Int32, output: String)
        case workerTokensOutOfRange(Int, available: Int)
        case caseFile(String)

        public var description: String {
            let prefix = "moecheck bench: "
            switch self {
            case .tensorParallelMustDivide1024: return prefix + "--tp must divide 1024"
            case .unknownModel(let m): return prefix + "unknown model '\(m)' (known: 35b, 397b)"
            case .unknownFormat(let f): return prefix + "unknown format '\(f)' (known: bf16, fp8)"
            case .badTokenCount(let s): return prefix + "bad token count '\(s)'"
            case .nothingToRun: return prefix + "need token counts and --repeat >= 1"
            case .missingNumPyScript(let p):
                return prefix + "NumPy script not found at \(p) (run from the repository root or pass --numpy-script)"
            case let .childFailed(command, status, output): return prefix + "\(command) failed (status \(status)): \(output)"
            case let .workerTokensOutOfRange(t, n): return prefix + "--worker-tokens \(t) outside 1...\(n)"
            case .caseFile(let why): return prefix + why
            }
        }
    }

    /// The shapes of comma-separated `models` (35b, 397b) × `formats` (bf16, fp8); 397b is the
    /// per-GPU shard at tensor parallelism `tp` (I and Is divided by it).
    public static func shapes(models: String, formats: String, tp: Int) throws -> [Shape] {
        var out: [Shape] = []
        for m in list(models) {
            let cfg: MoEConfig
            let label: String
            switch m {
            case "35b":
                cfg = MoEConfig(family: .qwen35Moe, hidden: 2048, intermediate: 512, sharedIntermediate: 512, experts: 256, topK: 8)
                label = "35B-A3B"
            case "397b":
                guard tp >= 1, 1024 % tp == 0 else { throw Failure.tensorParallelMustDivide1024 }
                cfg = MoEConfig(family: .qwen35Moe, hidden: 4096, intermediate: 1024 / tp, sharedIntermediate: 1024 / tp, experts: 512, topK: 10)
                label = tp == 1 ? "397B-A17B" : "397B-A17B/TP\(tp)"
            default: throw Failure.unknownModel(m)
            }
            for f in list(formats) {
                switch f {
                case "bf16": out.append(Shape(model: label, config: cfg, format: .bf16))
                case "fp8": out.append(Shape(model: label, config: cfg, format: .fp8e4m3fn))
                default: throw Failure.unknownFormat(f)
                }
            }
        }
        return out
    }

    /// Comma-separated token counts, each >= 1.
    public static func tokenCounts(_ text: String) throws -> [Int] {
        try text.split(separator: ",").map { s -> Int in
            guard let t = Int(s.trimmingCharacters(in: .whitespaces)), t >= 1 else { throw Failure.badTokenCount(String(s)) }
            return t
        }
    }

    static func list(_ text: String) -> [String] {
        text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces).lowercased() }
    }

    /// The median (mean of the middle two for an even count), nil for no samples.
    public static func median(_ samples: [Double]?) -> Double? {
        guard let s = samples, !s.isEmpty else { return nil }
        let o = s.sorted()
        return o.count % 2 == 1 ? o[o.count / 2] : (o[o.count / 2 - 1] + o[o.count / 2]) / 2
    }

    /// One table row: medians of every measurement of one shape at one T.
    public struct Row: Codable, Sendable {
        public var model: String, format: String, tokens: Int
        public var caseBytes: Int
        public var swiftLoad: Double, f64Bounds: Double, f64: Double, f32: Double
        public var swiftPeakRSSMB: Double
        public var numpyLoad: Double?, numpyCompute: Double?, numpyPeakRSSMB: Double?, maxRelDiff: Double?
        public var samples: [String: [Double]]
    }

    /// The `--json` file.
    public struct Report: Codable, Sendable {
        public var threads: Int; public var rounds: Int; public var numpyBLAS: String; public var fastGEMM: String; public var host: String
        public var rows: [Row]
        /// The verify-throughput row (nil where it was not measured).
        public var verify: VerifyThroughput? = nil

        public init(threads: Int, rounds: Int, numpyBLAS: String, fastGEMM: String, host: String, rows: [Row]) {
            self.threads = threads; self.rounds = rounds; self.numpyBLAS = numpyBLAS; self.fastGEMM = fastGEMM; self.host = host; self.rows = rows
        }
    }

    /// Throughput of `verify --cpu-model --suite SUITE` (pipelined, as the command runs it):
    /// once with an empty reference cache (cold) and once with the cache that run filled (warm).
    public struct VerifyThroughput: Codable, Sendable {
        public var suite: String
        public var cases: Int
        public var coldSeconds: Double, warmSeconds: Double
        public var failed: Int
        public var coldCasesPerSecond: Double { Double(cases) / Swift.max(coldSeconds, 1e-9) }
        public var warmCasesPerSecond: Double { Double(cases) / Swift.max(warmSeconds, 1e-9) }

        /// The row printed under the reference table.
        public var line: String {
            String(format: "verify throughput (verify --cpu-model --suite %@, %d cases, pipelined): cold cache %.1f cases/s (%.2f s), warm cache %.1f cases/s (%.2f s, %.2f× the cold time)%@",
                   suite, cases, coldCasesPerSecond, coldSeconds, warmCasesPerSecond, warmSeconds, warmSeconds / Swift.max(coldSeconds, 1e-9),
                   failed > 0 ? ", \(failed) case(s) FAILED" : "")
        }
    }

    /// Measures `VerifyThroughput` in this process, with a fresh reference cache under
    /// `scratch` that is removed afterwards.
    public static func verifyThroughput(suite: String, scratch: String) throws -> VerifyThroughput {
        let cases = try CatalogueRun(suite: suite).cases()
        let directory = (scratch as NSString).appendingPathComponent("verify-throughput-\(getpid())")
        try? FileManager.default.removeItem(atPath: directory)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        guard let cache = ReferenceCache.open(directory: directory, warn: { _ in }) else {
            throw VerifyError.failed("bench: cannot create a reference cache in \(directory)")
        }
        let kernel = try CPUModelKernel()
        let cold = CatalogueRun.run(cases, on: kernel, cache: cache)
        let warm = CatalogueRun.run(cases, on: kernel, cache: cache)
        return VerifyThroughput(suite: suite, cases: cases.count, coldSeconds: cold.seconds, warmSeconds: warm.seconds,
                                failed: cold.failed + warm.failed)
    }

    /// The case file of `shape` with `tokens` rows in `directory`, written once (through a
    /// `.partial` file) and reused; returns its path.
    public static func caseFile(_ shape: Shape, tokens: Int, in directory: String, note: (String) -> Void) throws -> String {
        let c = shape.config
        let spec = SyntheticSpec(config: c, format: shape.format, tokens: tokens, seed: 20_260_301)
        let name = "bench_\(c.hidden)_\(c.intermediate)_\(c.experts)_\(c.topK)_\(shape.format.rawValue)_t\(tokens).case.safetensors"
        let path = (directory as NSString).appendingPathComponent(name)
        if !FileManager.default.fileExists(atPath: path) {
            note("bench: writing \(path) (\(spec))")
            let tmp = path + ".partial"
            try SyntheticLayer(spec).writeCaseFile(to: tmp, layout: .combined, metadata: ["moecheck_bench": "1"])
            try FileManager.default.moveItem(atPath: tmp, toPath: path)
        }
        return path
    }

    /// `v` with 4 decimals below 0.01, else 3.
    public static func seconds(_ v: Double) -> String { v < 0.01 ? String(format: "%.4f", v) : String(format: "%.3f", v) }

    /// The Markdown table of `rows` with its heading lines.
    public static func table(_ rows: [Row], threads: Int, numpyBLAS: String) -> String {
        let fmt = seconds
        let np = rows.contains { $0.numpyCompute != nil }
        var header = ["model", "weights", "T", "case MB", "f64+bounds s", "f64 s", "f32 s"]
        if np { header += ["numpy f64 s", "f64+b/np", "f64/np", "np/f32", "max rel diff"] }
        header += ["load s (swift" + (np ? "/np)" : ")"), "peak RSS MB (swift" + (np ? "/np)" : ")")]
        var lines = ["| " + header.joined(separator: " | ") + " |", "|" + header.map { _ in "---|" }.joined()]
        for r in rows {
            var cells = [r.model, r.format, "\(r.tokens)", String(format: "%.0f", Double(r.caseBytes) / 1e6),
                         fmt(r.f64Bounds), fmt(r.f64), fmt(r.f32)]
            if let n = r.numpyCompute {
                cells += [fmt(n), String(format: "%.2f", r.f64Bounds / n), String(format: "%.2f", r.f64 / n),
                          String(format: "%.2f×", n / r.f32), r.maxRelDiff.map { String(format: "%.1e", $0) } ?? "-"]
            } else if np {
                cells += ["-", "-", "-", "-", "-"]
            }
            cells.append(fmt(r.swiftLoad) + (r.numpyLoad.map { " / " + fmt($0) } ?? ""))
            cells.append(String(format: "%.0f", r.swiftPeakRSSMB) + (r.numpyPeakRSSMB.map { String(format: " / %.0f", $0) } ?? ""))
            lines.append("| " + cells.joined(separator: " | ") + " |")
        }
        let heading = "OpenBLAS threads: \(threads) (both sides)" + (numpyBLAS.isEmpty ? "" : "; NumPy BLAS: \(numpyBLAS)")
            + "; float32 mode's fused bf16 GEMM: \(FastGEMM.name)"
        return "\n" + heading + "\n" + lines.joined(separator: "\n")
    }

    /// Runs a child process and parses the last line of its stdout as a JSON object.
    public static func runJSON(_ exe: String, _ args: [String]) throws -> [String: Any] {
        let p = Process()
        if exe.contains("/") { p.executableURL = URL(fileURLWithPath: exe); p.arguments = args }
        else { p.executableURL = URL(fileURLWithPath: "/usr/bin/env"); p.arguments = [exe] + args }
        let pipe = Pipe()
        p.standardOutput = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard p.terminationStatus == 0,
              let last = text.split(separator: "\n").last,
              let o = try? JSONSerialization.jsonObject(with: Data(last.utf8)) as? [String: Any] else {
            throw Failure.childFailed(command: "\(exe) \(args.joined(separator: " "))", status: p.terminationStatus, output: String(text.suffix(400)))
        }
        return o
    }

    /// One measurement process: loads the case file, runs the layer once untimed (as the NumPy
    /// script's `--warmup 1`), then times float64 with bounds, float64, float32 on the default
    /// recipe of its weights; `dump` receives the `exact` recipe's output (raw float64) for the
    /// NumPy comparison. Returns the JSON object the parent reads.
    public static func measure(caseFile path: String, tokens T: Int, dump: String?) throws -> [String: Any] {
        let t0 = Date()
        let c: MoECaseFile
        do { c = try MoECaseFile(path: path) } catch { throw Failure.caseFile("\(error)") }
        guard T >= 1, T <= c.tokens else { throw Failure.workerTokensOutOfRange(T, available: c.tokens) }
        let x = Array(try c.inputs().prefix(T * c.config.hidden))
        let load = Date().timeIntervalSince(t0)
        let recipe = Recipe.default(for: c.weightFormat)
        func time(_ r: Recipe, _ o: ReferenceOptions) throws -> (Double, ReferenceResult) {
            let engine = try MoEReferenceEngine(layer: c, recipe: r, options: o)
            let s = Date()
            let result = try engine.run(inputs: x, tokens: T)
            return (Date().timeIntervalSince(s), result)
        }
        _ = try time(recipe, ReferenceOptions(computeBounds: false))
        let (tb, _) = try time(recipe, ReferenceOptions(computeBounds: true))
        let (tn, _) = try time(recipe, ReferenceOptions(computeBounds: false))
        let (tf, _) = try time(recipe, ReferenceOptions(computeBounds: false, float32: true))
        if let dump {
            let (_, exact) = try time(.exact, ReferenceOptions(computeBounds: false))
            try exact.output.withUnsafeBytes { Data($0) }.write(to: URL(fileURLWithPath: dump))
        }
        return ["load": load, "f64Bounds": tb, "f64": tn, "f32": tf, "peakRSSMB": peakRSSMB(), "threads": BLAS.threads]
    }

    /// VmHWM of this process in MB (/proc/self/status).
    public static func peakRSSMB() -> Double {
        guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
              let line = s.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
              let kb = Double(line.split(separator: " ").dropFirst().first ?? "") else { return 0 }
        return kb / 1024
    }
}

extension ReferenceBenchmark {
    /// What to measure: shapes × token counts, rounds, and the NumPy side.
    public struct Plan: Sendable {
        public var shapes: [Shape]
        public var tokens: [Int]
        public var rounds: Int
        public var cacheDirectory: String
        /// The NumPy baseline script and interpreter; nil: Swift only.
        public var numpy: (script: String, python: String)?
        /// This binary (run with `bench --worker` for each Swift measurement).
        public var executable: String

        public init(shapes: [Shape], tokens: [Int], rounds: Int, cacheDirectory: String, numpy: (script: String, python: String)?, executable: String) {
            self.shapes = shapes; self.tokens = tokens; self.rounds = rounds
            self.cacheDirectory = cacheDirectory; self.numpy = numpy; self.executable = executable
        }

        /// Checks the plan, creates the cache directory.
        public func prepare() throws {
            guard !tokens.isEmpty, rounds >= 1 else { throw Failure.nothingToRun }
            try FileManager.default.createDirectory(atPath: cacheDirectory, withIntermediateDirectories: true)
            if let numpy, !FileManager.default.fileExists(atPath: numpy.script) { throw Failure.missingNumPyScript(numpy.script) }
        }

        /// Every row, in shape-then-T order; `note` gets progress lines. Returns the rows and the
        /// BLAS NumPy reported.
        public func run(note: (String) -> Void) throws -> (rows: [Row], numpyBLAS: String) {
            var rows: [Row] = []
            var numpyBLAS = ""
            for shape in shapes {
                let path = try caseFile(shape, tokens: tokens.max()!, in: cacheDirectory, note: note)
                let size = (try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0
                for t in tokens {
                    let row = try measureRow(shape, path: path, bytes: size, tokens: t, numpyBLAS: &numpyBLAS)
                    rows.append(row)
                    note("bench: \(row.model) \(row.format) T=\(t): f64+bounds \(seconds(row.f64Bounds)) s, f64 \(seconds(row.f64)) s, f32 \(seconds(row.f32)) s" +
                         (row.numpyCompute.map { ", numpy \(seconds($0)) s" } ?? ""))
                }
            }
            return (rows, numpyBLAS)
        }

        /// `rounds` alternating Swift / NumPy measurements of one shape at one T, as medians.
        func measureRow(_ shape: Shape, path: String, bytes: Int, tokens t: Int, numpyBLAS: inout String) throws -> Row {
            let threads = BLAS.threads
            var samples: [String: [Double]] = [:]
            var rss = 0.0, npRSS = 0.0
            var maxRel: Double? = nil
            for round in 0..<rounds {
                let dump = round == 0 && numpy != nil ? (cacheDirectory as NSString).appendingPathComponent("out_\(getpid()).f64") : nil
                var args = ["bench", "--worker", path, "--worker-tokens", "\(t)", "--blas-threads", "\(threads)"]
                if let dump { args += ["--worker-dump", dump] }
                let w = try runJSON(executable, args)
                for k in ["load", "f64Bounds", "f64", "f32"] { samples[k, default: []].append(w[k] as? Double ?? .nan) }
                rss = Swift.max(rss, w["peakRSSMB"] as? Double ?? 0)
                if let numpy {
                    var pargs = [numpy.script, path, "--threads", "\(threads)", "--tokens", "\(t)", "--warmup", "1"]
                    if let dump { pargs += ["--compare", dump] }
                    let p = try runJSON(numpy.python, pargs)
                    samples["numpyLoad", default: []].append(p["load_s"] as? Double ?? .nan)
                    samples["numpy", default: []].append((p["compute_s"] as? [Double])?.first ?? .nan)
                    npRSS = Swift.max(npRSS, p["peak_rss_mb"] as? Double ?? 0)
                    if let d = p["max_rel_diff"] as? Double { maxRel = d }
                    numpyBLAS = p["blas"] as? String ?? ""
                }
                if let dump { try? FileManager.default.removeItem(atPath: dump) }
            }
            let med = { (k: String) in median(samples[k]) }
            return Row(model: shape.model, format: shape.format == .bf16 ? "BF16" : "FP8", tokens: t, caseBytes: bytes,
                       swiftLoad: med("load")!, f64Bounds: med("f64Bounds")!, f64: med("f64")!, f32: med("f32")!,
                       swiftPeakRSSMB: rss, numpyLoad: med("numpyLoad"), numpyCompute: med("numpy"),
                       numpyPeakRSSMB: numpy != nil ? npRSS : nil, maxRelDiff: maxRel, samples: samples)
        }
    }
}
