import ArgumentParser
import Foundation
import KernelBridge
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
        """)

    @Option(help: "Kernel library (.so) implementing Kernels/include/moe_kernels.h. Default: $MOECHECK_KERNELS.")
    var kernels: String?

    @Option(help: "Case suite.")
    var suite: String = "catalogue"

    @Option(help: "Only cases whose name contains this text.")
    var filter: String?

    @Option(help: "Write the per-case reports as JSON.")
    var json: String?

    @Option(help: "GPU index.")
    var device: Int = 0

    @Option(help: "Select a fault of a FAULTS=1 build before running (for demonstrations; `moecheck faults` runs the matrix).")
    var fault: String?

    @Flag(help: "Run the CPU model of the kernel recipe instead of a GPU library (no GPU needed; with --fault, a CPU fault model).")
    var cpuModel = false

    @Flag(help: "Upload host-generated weights even when the library can generate them on the device.")
    var hostWeights = false

    @OptionGroup var blas: BLASOptions

    func run() throws {
        blas.apply()
        if cpuModel {
            let k = try CPUModelKernel(fault: fault)
            try runCases(kernel: k)
            return
        }
        let explicit = kernels ?? KernelLibrary.environmentPath
        guard let path = explicit else {
            print("verify: no kernel library given (--kernels PATH or MOECHECK_KERNELS): GPU comparison skipped.")
            print("verify: build one with `make -C Kernels PLATFORM=nvidia` (or PLATFORM=amd) and pass --kernels Kernels/build/nvidia/libmoekernels.so")
            return
        }
        let kernel = try openDeviceKernel(path, device: device, fault: fault, command: "verify")
        if hostWeights { kernel.generateOnDevice = false }
        try runCases(kernel: kernel)
    }

    func runCases(kernel: KernelUnderTest) throws {
        var cases = try Catalogue.suite(suite)
        if let filter { cases = cases.filter { $0.name.contains(filter) } }
        guard !cases.isEmpty else { throw fail("verify: no case of suite '\(suite)' matches filter '\(filter ?? "")'") }
        print("verify: \(kernel.name) on \(kernel.device), suite \(suite), \(cases.count) cases, OpenBLAS threads \(BLAS.threads)")
        let verifier = CaseVerifier(kernel: kernel)
        var reports: [CaseReport] = []
        let start = Date()
        for vc in cases {
            let r = verifier.verify(vc)
            print(r.line)
            fflush(stdout)
            reports.append(r)
        }
        let failed = reports.filter { !$0.passed }.count
        if let json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            enc.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
            try enc.encode(reports).write(to: URL(fileURLWithPath: json))
        }
        print(String(format: "verify: %@ on %@, %.1f s", kernel.name, kernel.device, Date().timeIntervalSince(start)))
        print("\(reports.count - failed) passed, \(failed) failed")
        if failed > 0 { throw ExitCode(1) }
    }
}
