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
        """)

    @OptionGroup var kernel: KernelOptions

    @Option(help: "Case suite.")
    var suite: String = "catalogue"

    @OptionGroup var cases: CaseFilterOption

    @OptionGroup var report: JSONOutputOption

    @Flag(help: "Upload host-generated weights even when the library can generate them on the device.")
    var hostWeights = false

    @OptionGroup var tier: TierOptions

    @OptionGroup var blas: BLASOptions

    func run() throws {
        blas.apply()
        guard let selection = kernel.selection else {
            print("verify: no kernel library given (--kernels PATH or MOECHECK_KERNELS): GPU comparison skipped.")
            print("verify: build one with `make -C Kernels PLATFORM=nvidia` (or PLATFORM=amd) and pass --kernels Kernels/build/nvidia/libmoekernels.so")
            return
        }
        let k = try failing("verify") { try selection.open() }
        if hostWeights, let device = k as? DeviceKernel { device.generateOnDevice = false }
        let selected = try failing("verify") { try CatalogueRun(suite: suite, filter: cases.filter).cases() }
        print("verify: \(k.name) on \(k.device), suite \(suite), \(selected.count) cases, OpenBLAS threads \(BLAS.threads)")
        let summary = CatalogueRun.run(selected, on: k, rigorousOnly: tier.rigorousOnly) { r in
            print(r.line)
            fflush(stdout)
        }
        try report.write(summary.reports)
        print(String(format: "verify: %@ on %@, %.1f s", k.name, k.device, summary.seconds))
        print(summary.countLine)
        if summary.failed > 0 { throw ExitCode(1) }
    }
}
