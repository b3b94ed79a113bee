import ArgumentParser
import Foundation
import MoEReference
import MoEVerify

/// `moecheck bench`: the options of `ReferenceBenchmark` (MoEVerify), which holds the logic.
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

        Then the verify-throughput row: `verify --cpu-model --suite smoke` (--verify-suite) in this process, pipelined, \
        once with an empty reference cache and once with the cache that run filled (cases/s of each). \
        --verify-only measures that row alone.
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

    @Option(help: "The suite of the verify-throughput row (verify --cpu-model on it, cold and warm reference cache).")
    var verifySuite: String = "smoke"

    @Flag(help: "Measure the verify-throughput row only (no reference table).")
    var verifyOnly = false

    @OptionGroup var report: JSONOutputOption

    @OptionGroup var blas: BLASOptions

    // Internal: one measurement process.
    @Option(help: .hidden) var worker: String?
    @Option(help: .hidden) var workerTokens: Int = 1
    @Option(help: .hidden) var workerDump: String?

    func run() throws {
        blas.apply(fallback: 2) // benchmarks compare at a fixed, printed thread count
        if let worker {
            let o = try ReferenceBenchmark.measure(caseFile: worker, tokens: workerTokens, dump: workerDump)
            print(String(decoding: try JSONSerialization.data(withJSONObject: o, options: [.sortedKeys]), as: UTF8.self))
            return
        }
        let executable = CommandLine.arguments[0].contains("/") ? URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL.path
                                                                : Bundle.main.executablePath ?? CommandLine.arguments[0]
        if verifyOnly {
            let v = try failing("bench") { try ReferenceBenchmark.verifyThroughput(suite: verifySuite, scratch: NSTemporaryDirectory()) }
            print("moecheck bench: OpenBLAS threads \(BLAS.threads)")
            print(v.line)
            try report.write(v)
            return
        }
        let plan = ReferenceBenchmark.Plan(
            shapes: try ReferenceBenchmark.shapes(models: models, formats: formats, tp: tp),
            tokens: try ReferenceBenchmark.tokenCounts(tokens), rounds: `repeat`,
            cacheDirectory: cacheDir ?? (NSTemporaryDirectory() + "moecheck-bench"),
            numpy: numpy ? (numpyScript, python) : nil, executable: executable)
        try plan.prepare()
        let threads = BLAS.threads
        print("moecheck bench: OpenBLAS threads \(threads) (Swift and NumPy), \(`repeat`) round(s), medians; cache \(plan.cacheDirectory)")
        let (rows, numpyBLAS) = try plan.run(note: note)
        print(ReferenceBenchmark.table(rows, threads: threads, numpyBLAS: numpyBLAS))
        let verify = try failing("bench") { try ReferenceBenchmark.verifyThroughput(suite: verifySuite, scratch: NSTemporaryDirectory()) }
        print(verify.line)
        if let json = report.json {
            var r = ReferenceBenchmark.Report(threads: threads, rounds: `repeat`, numpyBLAS: numpyBLAS, fastGEMM: FastGEMM.name,
                                              host: ProcessInfo.processInfo.hostName, rows: rows)
            r.verify = verify
            try report.write(r)
            print("wrote \(json)")
        }
    }
}
