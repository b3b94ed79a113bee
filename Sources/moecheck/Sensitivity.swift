import ArgumentParser
import Foundation
import KernelBridge
import MoEReference
import MoEVerify
import TensorIO

struct SensitivityCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sensitivity",
        abstract: "Measure what a forward-only verdict can see: a kernel as it is, and with known defects applied to its output.",
        discussion: """
        Each case runs forward-only (the whole layer's output, no stage outputs; tokens whose routing a correct kernel \
        may choose either way are left out of each tier), once as the kernel computes it and once per mutation: \
        \(Mutation.allCases.map(\.rawValue).joined(separator: ", ")). A mutation adds the exact change of the layer's \
        reference under that defect to the kernel's output (rounded to bf16 again). Prints, per row, which tier flagged \
        it and the case's stated sensitivity. Exit 1 if the kernel as it is fails, or a mutation passes.
        """)

    @OptionGroup var kernel: KernelOptions

    @Option(help: "Model shapes, comma-separated.")
    var shapes: String = "qwen3.5-35b-a3b-tp1,qwen3.5-397b-a17b-tp8"

    @Option(help: "Weight formats, comma-separated (bf16, fp8fn, fp8fnuz).")
    var formats: String = "bf16,fp8fn"

    @Option(help: "Token counts, comma-separated.")
    var tokens: String = "1,64,333"

    @Option(help: "Mutations, comma-separated (default: all).")
    var mutations: String?

    @OptionGroup var report: JSONOutputOption

    @OptionGroup var blas: BLASOptions

    func validate() throws {
        try kernel.pythonAdapter.requireOneKernel("sensitivity", otherKernel: kernel.library.kernels != nil || kernel.cpuModel)
    }

    func run() throws {
        blas.apply()
        guard let selection = kernel.selection else {
            throw ToolFailure.noKernel(command: "sensitivity", what: "a kernel library with --kernels PATH (or MOECHECK_KERNELS), or --cpu-model")
        }
        let kernel = try failing("sensitivity") { try selection.open() }
        let fmts: [WeightFormat] = try formats.split(separator: ",").map { tag in
            switch tag {
            case "bf16": return .bf16
            case "fp8fn": return .fp8e4m3fn
            case "fp8fnuz": return .fp8e4m3fnuz
            default: throw ToolFailure.failed(command: "sensitivity", VerifyError.usage("unknown format '\(tag)' (bf16, fp8fn, fp8fnuz)"))
            }
        }
        let ts = try tokens.split(separator: ",").map { s -> Int in
            guard let t = Int(s), t >= 1 else { throw ToolFailure.failed(command: "sensitivity", VerifyError.usage("bad token count '\(s)'")) }
            return t
        }
        let ms: [Mutation] = try mutations.map { list in
            try list.split(separator: ",").map { name in
                guard let m = Mutation(rawValue: String(name)) else {
                    throw ToolFailure.failed(command: "sensitivity", VerifyError.usage("unknown mutation '\(name)' (known: \(Mutation.allCases.map(\.rawValue).joined(separator: ", ")))"))
                }
                return m
            }
        } ?? Mutation.allCases
        let cases = try failing("sensitivity") { try SensitivityStudy.cases(tokens: ts, shapes: shapes.split(separator: ",").map(String.init), formats: fmts) }
        print("sensitivity: \(kernel.name) on \(kernel.device), \(cases.count) cases × (1 + \(ms.count) mutations), forward-only")
        let start = Date()
        var bad = 0
        let rows = SensitivityStudy.run(kernel: kernel, cases: cases, mutations: ms) { row in
            let expectFlag = row.mutation != "none"
            let ok = row.error == nil && row.flagged == expectFlag
            if !ok { bad += 1 }
            var line = String(format: "%@ %-36@ %-22@ flagged by: %@", ok ? "ok  " : "BAD ", row.caseName, row.mutation, row.tier)
            if let e = row.error { line += " error: \(e)" }
            if row.mutation == "none", let s = row.sensitivity { line += "\n     " + s.line }
            print(line)
            fflush(stdout)
        }
        try report.write(rows)
        print(String(format: "sensitivity: %d rows, %d as expected, %d not, %.1f s", rows.count, rows.count - bad, bad, Date().timeIntervalSince(start)))
        if bad > 0 { throw ExitCode(1) }
    }
}
