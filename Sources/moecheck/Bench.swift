import ArgumentParser
import Foundation
import MoEReference
import TensorIO

/// `moecheck bench`: times the reference on Qwen3.5 layer shapes against a grouped NumPy float64
/// implementation (scripts/bench_numpy.py) of the same math on the same case files.
///
/// Every measurement runs in a child process (this binary with `--worker`, or python3), so each
/// one's peak RSS is its own and generating the case files does not count. Swift and NumPy runs
/// alternate round by round, so both see the same machine load; times are medians over rounds.
/// Each child runs the layer once untimed before it times anything (both sides alike).
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmark the reference (float64 with/without bounds, float32) against NumPy float64 on Qwen3.5 MoE shapes.",
        discussion: """
        Shapes: 35b = Qwen3.5-35B-A3B (H=2048, I=512, Is=512, E=256, K=8); 397b = Qwen3.5-397B-A17B at \
        tensor parallelism --tp (default 8: H=4096, I=Is=1024/8=128, E=512, K=10 — the per-GPU shard, \
        ~1.6 GB in BF16; the unsharded layer is 12.9 GB). One case file per (model, format) holds the \
        largest T; smaller T use its first rows (the generator is counter-based, so this equals a \
        case generated with that T). Files are cached in --cache-dir. The timed float64 modes use \
        the format's default recipe (fused-bf16 / fused-fp8); agreement with NumPy is checked on \
        the `exact` recipe (the same math as NumPy).
        """)

    @Option(help: "Models: 35b, 397b (comma-separated).")
    var models: String = "35b,397b"

    @Option(help: "Token counts T (comma-separated).")
    var tokens: String = "1,64,1024"

    @Option(help: "Weight formats: bf16, fp8 (comma-separated).")
    var formats: String = "bf16,fp8"

    @Option(help: "Rounds per shape; the table shows medians.")
    var `repeat`: Int = 3

    @Flag(help: "Also run scripts/bench_numpy.py (python3 with numpy) and report ratios.")
    var numpy = false

    @Option(help: "Tensor parallelism dividing I and Is of the 397b shape.")
    var tp: Int = 8

    @Option(help: "Where case files are cached (default: $TMPDIR/moecheck-bench).")
    var cacheDir: String?

    @Option(help: "The NumPy baseline script.")
    var numpyScript: String = "scripts/bench_numpy.py"

    @Option(help: "Python interpreter for --numpy.")
    var python: String = "python3"

    @Option(help: "Write all measurements as JSON.")
    var json: String?

    @OptionGroup var blas: BLASOptions

    // Internal: one measurement process.
    @Option(help: .hidden) var worker: String?
    @Option(help: .hidden) var workerTokens: Int = 1
    @Option(help: .hidden) var workerDump: String?

    func run() throws {
        blas.apply()
        if let worker { return try runWorker(worker) }
        try runBench()
    }

    // MARK: shapes

    struct Shape {
        let model: String
        let config: MoEConfig
        let format: WeightFormat
    }

    func shapes() throws -> [Shape] {
        var out: [Shape] = []
        for m in models.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces).lowercased() }) {
            let cfg: MoEConfig
            let label: String
            switch m {
            case "35b":
                cfg = MoEConfig(family: .qwen35Moe, hidden: 2048, intermediate: 512, sharedIntermediate: 512, experts: 256, topK: 8)
                label = "35B-A3B"
            case "397b":
                guard tp >= 1, 1024 % tp == 0 else { throw fail("moecheck bench: --tp must divide 1024") }
                cfg = MoEConfig(family: .qwen35Moe, hidden: 4096, intermediate: 1024 / tp, sharedIntermediate: 1024 / tp, experts: 512, topK: 10)
                label = tp == 1 ? "397B-A17B" : "397B-A17B/TP\(tp)"
            default: throw fail("moecheck bench: unknown model '\(m)' (known: 35b, 397b)")
            }
            for f in formats.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces).lowercased() }) {
                switch f {
                case "bf16": out.append(Shape(model: label, config: cfg, format: .bf16))
                case "fp8": out.append(Shape(model: label, config: cfg, format: .fp8e4m3fn))
                default: throw fail("moecheck bench: unknown format '\(f)' (known: bf16, fp8)")
                }
            }
        }
        return out
    }

    // MARK: driver

    struct Row: Codable {
        var model: String, format: String, tokens: Int
        var caseBytes: Int
        var swiftLoad: Double, f64Bounds: Double, f64: Double, f32: Double
        var swiftPeakRSSMB: Double
        var numpyLoad: Double?, numpyCompute: Double?, numpyPeakRSSMB: Double?, maxRelDiff: Double?
        var samples: [String: [Double]]
    }

    func runBench() throws {
        let ts = try tokens.split(separator: ",").map { s -> Int in
            guard let t = Int(s.trimmingCharacters(in: .whitespaces)), t >= 1 else { throw fail("moecheck bench: bad token count '\(s)'") }
            return t
        }
        guard !ts.isEmpty, `repeat` >= 1 else { throw fail("moecheck bench: need token counts and --repeat >= 1") }
        let dir = cacheDir ?? (NSTemporaryDirectory() + "moecheck-bench")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        if numpy && !FileManager.default.fileExists(atPath: numpyScript) {
            throw fail("moecheck bench: NumPy script not found at \(numpyScript) (run from the repository root or pass --numpy-script)")
        }
        let threads = BLAS.threads
        let self_ = CommandLine.arguments[0].contains("/") ? URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL.path
                                                          : Bundle.main.executablePath ?? CommandLine.arguments[0]
        print("moecheck bench: OpenBLAS threads \(threads) (Swift and NumPy), \(`repeat`) round(s), medians; cache \(dir)")
        var rows: [Row] = []
        var numpyBLAS = ""
        for shape in try shapes() {
            let maxT = ts.max()!
            let c = shape.config
            let spec = SyntheticSpec(config: c, format: shape.format, tokens: maxT, seed: 20_260_301)
            let name = "bench_\(c.hidden)_\(c.intermediate)_\(c.experts)_\(c.topK)_\(shape.format.rawValue)_t\(maxT).case.safetensors"
            let path = (dir as NSString).appendingPathComponent(name)
            if !FileManager.default.fileExists(atPath: path) {
                note("bench: writing \(path) (\(spec))")
                let tmp = path + ".partial"
                try SyntheticLayer(spec).writeCaseFile(to: tmp, layout: .combined, metadata: ["moecheck_bench": "1"])
                try FileManager.default.moveItem(atPath: tmp, toPath: path)
            }
            let size = (try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0
            for t in ts {
                var samples: [String: [Double]] = [:]
                var rss = 0.0, npRSS = 0.0
                var maxRel: Double? = nil
                for round in 0..<`repeat` {
                    let dump = round == 0 && numpy ? (dir as NSString).appendingPathComponent("out_\(getpid()).f64") : nil
                    var args = ["bench", "--worker", path, "--worker-tokens", "\(t)", "--blas-threads", "\(threads)"]
                    if let dump { args += ["--worker-dump", dump] }
                    let w = try runJSON(self_, args)
                    for k in ["load", "f64Bounds", "f64", "f32"] { samples[k, default: []].append(w[k] as? Double ?? .nan) }
                    rss = Swift.max(rss, w["peakRSSMB"] as? Double ?? 0)
                    if numpy {
                        var pargs = [numpyScript, path, "--threads", "\(threads)", "--tokens", "\(t)", "--warmup", "1"]
                        if let dump { pargs += ["--compare", dump] }
                        let p = try runJSON(python, pargs)
                        samples["numpyLoad", default: []].append(p["load_s"] as? Double ?? .nan)
                        samples["numpy", default: []].append((p["compute_s"] as? [Double])?.first ?? .nan)
                        npRSS = Swift.max(npRSS, p["peak_rss_mb"] as? Double ?? 0)
                        if let d = p["max_rel_diff"] as? Double { maxRel = d }
                        numpyBLAS = p["blas"] as? String ?? ""
                    }
                    if let dump { try? FileManager.default.removeItem(atPath: dump) }
                }
                func med(_ k: String) -> Double? {
                    guard let s = samples[k], !s.isEmpty else { return nil }
                    let o = s.sorted()
                    return o.count % 2 == 1 ? o[o.count / 2] : (o[o.count / 2 - 1] + o[o.count / 2]) / 2
                }
                let row = Row(model: shape.model, format: shape.format == .bf16 ? "BF16" : "FP8", tokens: t, caseBytes: size,
                              swiftLoad: med("load")!, f64Bounds: med("f64Bounds")!, f64: med("f64")!, f32: med("f32")!,
                              swiftPeakRSSMB: rss, numpyLoad: med("numpyLoad"), numpyCompute: med("numpy"),
                              numpyPeakRSSMB: numpy ? npRSS : nil, maxRelDiff: maxRel, samples: samples)
                rows.append(row)
                note("bench: \(row.model) \(row.format) T=\(t): f64+bounds \(fmt(row.f64Bounds)) s, f64 \(fmt(row.f64)) s, f32 \(fmt(row.f32)) s" +
                     (row.numpyCompute.map { ", numpy \(fmt($0)) s" } ?? ""))
            }
        }
        printTable(rows, threads: threads, numpyBLAS: numpyBLAS)
        if let json {
            struct Report: Codable { var threads: Int; var rounds: Int; var numpyBLAS: String; var fastGEMM: String; var host: String; var rows: [Row] }
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            let data = try enc.encode(Report(threads: threads, rounds: `repeat`, numpyBLAS: numpyBLAS, fastGEMM: FastGEMM.name,
                                             host: ProcessInfo.processInfo.hostName, rows: rows))
            try data.write(to: URL(fileURLWithPath: json))
            print("wrote \(json)")
        }
    }

    func fmt(_ v: Double) -> String { v < 0.01 ? String(format: "%.4f", v) : String(format: "%.3f", v) }

    func printTable(_ rows: [Row], threads: Int, numpyBLAS: String) {
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
        print("")
        print("OpenBLAS threads: \(threads) (both sides)" + (numpyBLAS.isEmpty ? "" : "; NumPy BLAS: \(numpyBLAS)")
              + "; float32 mode's fused bf16 GEMM: \(FastGEMM.name)")
        print(lines.joined(separator: "\n"))
    }

    /// Runs a child process and parses the last line of its stdout as a JSON object.
    func runJSON(_ exe: String, _ args: [String]) throws -> [String: Any] {
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
            throw fail("moecheck bench: \(exe) \(args.joined(separator: " ")) failed (status \(p.terminationStatus)): \(text.suffix(400))")
        }
        return o
    }

    // MARK: worker

    func runWorker(_ path: String) throws {
        let t0 = Date()
        let c: MoECaseFile
        do { c = try MoECaseFile(path: path) } catch { throw fail("moecheck bench: \(error)") }
        let T = workerTokens
        guard T >= 1, T <= c.tokens else { throw fail("moecheck bench: --worker-tokens \(T) outside 1...\(c.tokens)") }
        let x = Array(try c.inputs().prefix(T * c.config.hidden))
        let load = Date().timeIntervalSince(t0)
        let recipe: Recipe = c.weightFormat.fp8 != nil ? .fusedFP8 : .fusedBF16
        func time(_ r: Recipe, _ o: ReferenceOptions) throws -> (Double, ReferenceResult) {
            let engine = try MoEReferenceEngine(layer: c, recipe: r, options: o)
            let s = Date()
            let result = try engine.run(inputs: x, tokens: T)
            return (Date().timeIntervalSince(s), result)
        }
        // One untimed run first, as the NumPy script does (--warmup 1): both sides are then timed
        // with the case file's pages mapped and thread pools started, whichever mode runs first.
        _ = try time(recipe, ReferenceOptions(computeBounds: false))
        let (tb, _) = try time(recipe, ReferenceOptions(computeBounds: true))
        let (tn, _) = try time(recipe, ReferenceOptions(computeBounds: false))
        let (tf, _) = try time(recipe, ReferenceOptions(computeBounds: false, float32: true))
        if let dump = workerDump {
            let (_, exact) = try time(.exact, ReferenceOptions(computeBounds: false))
            try exact.output.withUnsafeBytes { Data($0) }.write(to: URL(fileURLWithPath: dump))
        }
        let o: [String: Any] = ["load": load, "f64Bounds": tb, "f64": tn, "f32": tf, "peakRSSMB": peakRSSMB(), "threads": BLAS.threads]
        print(String(decoding: try JSONSerialization.data(withJSONObject: o, options: [.sortedKeys]), as: UTF8.self))
    }

    /// VmHWM of this process in MB (/proc/self/status).
    func peakRSSMB() -> Double {
        guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
              let line = s.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
              let kb = Double(line.split(separator: " ").dropFirst().first ?? "") else { return 0 }
        return kb / 1024
    }
}
