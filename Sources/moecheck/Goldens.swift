import ArgumentParser
import Foundation
import MoEReference
import MoEVerify

struct GoldensCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "goldens",
        abstract: "Golden tensors: generate a set of case files with expected reference outputs, or verify a set.",
        discussion: "See Goldens/README.md for the file schema and how to check a kernel against them.",
        subcommands: [GoldensGenerate.self, GoldensVerify.self])
}

struct GoldensGenerate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate",
        abstract: "Write case files, expected files and manifest.json for a golden suite.",
        discussion: "Suites: \(GoldenSuites.names.joined(separator: ", ")). The committed Goldens/ set is the default suite with --blas-threads 1.")

    @Option(help: "Output directory.")
    var out: String

    @Option(help: "Golden suite.")
    var suite: String = "default"

    @Flag(help: "Also keep the (large) case files of spec-only cases (e.g. the real Qwen3.5-35B-A3B shape: 0.75 GiB).")
    var materializeLarge = false

    @OptionGroup var blas: BLASOptions

    func run() throws {
        blas.apply(fallback: 1)
        let m = try failing("moecheck goldens generate") {
            try Goldens.generate(suite: try GoldenSuites.suite(suite), into: out, materializeLarge: materializeLarge) { e in
                print(e.summaryLine)
            }
        }
        let total = m.cases.flatMap(\.files).reduce(0) { $0 + $1.bytes }
        print("goldens: \(m.cases.count) cases, \(total) bytes, OpenBLAS threads \(m.openblas_threads) -> \(out)/manifest.json")
    }
}

struct GoldensVerify: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Re-run the reference on every case of DIR/manifest.json and compare with the stored expected tensors and hashes.",
        discussion: """
        Checks every file's sha256 and size against the manifest, then re-runs the reference (with the manifest's OpenBLAS \
        thread count unless --blas-threads is given) and compares output, bound, router_logits, topk_ids, topk_weights, \
        shared_gate and their bounds bit for bit. Without --strict-bits a value that differs in its bits but lies inside its \
        stored bound is accepted (another CPU's BLAS kernels may sum in another order) and reported as "within bound". \
        Exit 1 on any failure.
        """)

    @Argument(help: "Directory with manifest.json.")
    var dir: String

    @Flag(help: "Fail on any bit difference.")
    var strictBits = false

    @OptionGroup var cases: CaseFilterOption

    @OptionGroup var blas: BLASOptions

    func run() throws {
        let m = try failing("moecheck goldens verify") { try GoldenManifest.load(dir) }
        blas.apply(fallback: m.openblas_threads)
        let reports = Goldens.verify(m, in: dir, filter: cases.filter, requireBits: strictBits) { print($0.line) }
        let passed = reports.filter(\.passed).count, failed = reports.count - passed
        let notBits = reports.filter { $0.passed && !$0.bitIdentical }.count
        if notBits > 0 { print("note: \(notBits) case(s) not bit-identical but within their bounds (OpenBLAS threads \(BLAS.threads))") }
        print("\(passed) passed, \(failed) failed")
        if failed > 0 { throw ExitCode(1) }
    }
}
