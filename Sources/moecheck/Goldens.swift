import ArgumentParser
import Foundation
import MoEReference
import MoEVerify

struct Goldens: ParsableCommand {
    static let configuration = CommandConfiguration(
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
        if blas.blasThreads == nil && ProcessInfo.processInfo.environment["MOECHECK_BLAS_THREADS"] == nil { BLAS.setThreads(1) } else { blas.apply() }
        let cases: [GoldenCase]
        do { cases = try GoldenSuites.suite(suite) } catch { throw fail("moecheck goldens generate: \(error)") }
        do {
            let m = try MoEVerify.Goldens.generate(suite: cases, into: out, materializeLarge: materializeLarge) { e in
                let bytes = e.files.reduce(0) { $0 + $1.bytes }
                print("\(e.name): T=\(e.T) H=\(e.H) I=\(e.I) Is=\(e.Is) E=\(e.E) K=\(e.K) \(e.weight_dtype) \(e.layout) \(e.recipe) " +
                      "\(bytes) bytes\(e.spec_only ? " (spec-only)" : "")\(e.ambiguous_tokens > 0 ? ", \(e.ambiguous_tokens) ambiguous token(s)" : "")")
            }
            let total = m.cases.flatMap(\.files).reduce(0) { $0 + $1.bytes }
            print("goldens: \(m.cases.count) cases, \(total) bytes, OpenBLAS threads \(m.openblas_threads) -> \(out)/manifest.json")
        } catch {
            throw fail("moecheck goldens generate: \(error)")
        }
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

    @Option(help: "Only cases whose name contains this text.")
    var filter: String?

    @OptionGroup var blas: BLASOptions

    func run() throws {
        let m: GoldenManifest
        do { m = try GoldenManifest.load(dir) } catch { throw fail("moecheck goldens verify: \(error)") }
        if blas.blasThreads == nil && ProcessInfo.processInfo.environment["MOECHECK_BLAS_THREADS"] == nil {
            BLAS.setThreads(max(1, m.openblas_threads))
        } else { blas.apply() }
        var passed = 0, failed = 0, notBits = 0
        for e in m.cases where filter.map({ e.name.contains($0) }) ?? true {
            let r = MoEVerify.Goldens.verify(e, in: dir, requireBits: strictBits)
            print(r.line)
            if r.passed { passed += 1 } else { failed += 1 }
            if r.passed && !r.bitIdentical { notBits += 1 }
        }
        if notBits > 0 { print("note: \(notBits) case(s) not bit-identical but within their bounds (OpenBLAS threads \(BLAS.threads))") }
        print("\(passed) passed, \(failed) failed")
        if failed > 0 { throw ExitCode(1) }
    }
}
