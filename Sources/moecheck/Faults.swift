import ArgumentParser
import Foundation
import KernelBridge
import MoEReference
import MoEVerify

struct Faults: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Prove the suite catches known bugs: run every injected fault of a fault build against a few case families.",
        discussion: """
        Harmful faults must be detected by at least one family; benign variants (names starting with benign_) and the \
        unfaulted baseline must pass every family. The recipe's shared gate is relaxed to "bf16 or fp32" here because one \
        benign variant keeps it in fp32. Exit 1 if a harmful fault is missed, a benign one is flagged, or the baseline fails.
        """)

    @Option(help: "A FAULTS=1 kernel library (libmoekernels_faults.so).")
    var kernels: String?

    @Flag(help: "Use the CPU fault models instead of a GPU library (runs anywhere).")
    var cpuModels = false

    @Flag(help: "Use model-sized case families (H=2048, E=256) instead of small ones.")
    var large = false

    @Option(help: "Write the matrix as JSON.")
    var json: String?

    @OptionGroup var blas: BLASOptions

    func run() throws {
        blas.apply()
        let families = FaultMatrix.families(large: large)
        let faults: [String]
        let make: (String?) throws -> KernelUnderTest
        let label: String
        if cpuModels {
            faults = CPUModelKernel.harmfulFaults + CPUModelKernel.benignVariants
            make = { try CPUModelKernel(fault: $0) }
            label = "CPU fault models"
        } else {
            guard let path = kernels ?? KernelLibrary.environmentPath else {
                throw fail("faults: give a fault build with --kernels PATH (make -C Kernels PLATFORM=nvidia FAULTS=1), or --cpu-models")
            }
            let kernel = try openDeviceKernel(path, command: "faults")
            let lib = kernel.library
            faults = lib.faultNames
            guard !faults.isEmpty else { throw fail("faults: \(path) injects no faults (build it with FAULTS=1)") }
            make = { f in try lib.setFault(f); return kernel }
            label = "\(lib.libraryName) on \(kernel.device)"
        }
        print("faults: \(label), \(faults.count) faults × \(families.count) families")
        let start = Date()
        let m = try FaultMatrix.run(faults: faults, families: families, makeKernel: make) { line in
            if stderrIsTerminal { note(line) }
        }
        print(m.table, terminator: "")
        for c in m.cells where c.flagged && !FaultMatrix.isBenign(c.fault) {
            print("  \(c.fault) on \(c.family): \(c.evidence.prefix(160))")
        }
        for b in m.baselineFailures { print("baseline failure: \(b)") }
        if let json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            try enc.encode(m).write(to: URL(fileURLWithPath: json))
        }
        let harmful = faults.filter { !FaultMatrix.isBenign($0) }
        let benign = faults.filter { FaultMatrix.isBenign($0) }
        print(String(format: "faults: %d/%d harmful detected, %d/%d benign accepted, %d false alarm(s), baseline %@, %.1f s",
                     harmful.count - m.missed.count, harmful.count, benign.count - Set(m.falseAlarms.map(\.fault)).count, benign.count,
                     m.falseAlarms.count, m.baselineFailures.isEmpty ? "passes" : "FAILS", Date().timeIntervalSince(start)))
        if !m.passed { throw ExitCode(1) }
    }
}
