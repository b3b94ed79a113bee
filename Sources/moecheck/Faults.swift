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
        benign variant keeps it in fp32. Exit 1 if a harmful fault is missed, a benign one is flagged, or the baseline fails. \
        With --python the adapter's helper-level mutants run instead, on the families its FORMATS take plus bf16 and fp8 \
        T = 256 families with hot experts (the scaled expert of expert_down_x1p01 then serves many tokens).
        """)

    @OptionGroup var library: KernelLibraryOption

    @OptionGroup var pythonAdapter: PythonAdapterOptions

    @Flag(help: "Use the CPU fault models instead of a GPU library (runs anywhere).")
    var cpuModels = false

    @Flag(help: "Use model-sized case families (H=2048, E=256) instead of small ones.")
    var large = false

    @OptionGroup var report: JSONOutputOption

    @OptionGroup var tier: TierOptions

    @OptionGroup var blas: BLASOptions

    func validate() throws {
        try pythonAdapter.requireOneKernel("faults", otherKernel: library.kernels != nil || cpuModels)
    }

    func run() throws {
        blas.apply()
        var families = FaultMatrix.families(large: large)
        var faults: [String]
        let make: (String?) throws -> KernelUnderTest
        let label: String
        var python: PythonKernel? = nil
        if let selection = pythonAdapter.selection {
            let k = try failing("faults") { try selection.open() }
            guard let py = k as? PythonKernel else { throw ToolFailure.noKernel(command: "faults", what: "a Python adapter") }
            faults = py.mutants
            guard !faults.isEmpty else {
                throw ToolFailure.failed(command: "faults", VerifyError.usage("\(py.adapterPath) lists no MUTANTS: build it from moecheck_adapter's blocks and list the helper-level mutants it supports (docs/python-adapters.md)"))
            }
            families = CaseSelection.runnable(families + FaultMatrix.pythonFamilies(large: large), on: py).run
            make = { m in py.mutant = m; return py }
            label = "\(py.name) on \(py.device) (helper-level mutants)"
            python = py
        } else if cpuModels {
            faults = CPUModelKernel.harmfulFaults + CPUModelKernel.benignVariants
            make = { try CPUModelKernel(fault: $0) }
            label = "CPU fault models"
        } else {
            guard let path = library.path else {
                throw ToolFailure.noKernel(command: "faults", what: "a fault build with --kernels PATH (make -C Kernels PLATFORM=nvidia FAULTS=1), or --cpu-models")
            }
            let kernel = try failing("faults") { try DeviceKernel.open(path: path) }
            let lib = kernel.library
            faults = lib.faultNames
            guard !faults.isEmpty else { throw ToolFailure.noFaults(path: path) }
            make = { f in try lib.setFault(f); return kernel }
            label = "\(lib.libraryName) on \(kernel.device)"
        }
        print("faults: \(label), \(faults.count) faults × \(families.count) families")
        let start = Date()
        var m = try FaultMatrix.run(faults: faults, families: families, makeKernel: make, rigorousOnly: tier.rigorousOnly) { line in
            if stderrIsTerminal { note(line) }
        }
        if let python {
            // a mutant that changed nothing on any case (fnuz_as_fn on fn layers) is not applicable here
            let notApplicable = faults.filter { f in !m.cells.contains { $0.fault == f && $0.flagged } && !families.contains { python.mutantAppliedOn[f]?[$0.name] ?? false } }
            if !notApplicable.isEmpty {
                print("faults: not applicable to these cases (the mutant changed nothing): \(notApplicable.joined(separator: ", "))")
                m = m.removing(notApplicable)
                faults = m.faults
            }
        }
        print(m.table, terminator: "")
        for c in m.cells where c.flagged && !FaultMatrix.isBenign(c.fault) {
            print("  \(c.fault) on \(c.family) [\(c.data), \(c.tier)]: \(c.evidence.prefix(160))")
        }
        for b in m.baselineFailures { print("baseline failure: \(b)") }
        try report.write(m.rows)
        print(m.summaryLine(faults: faults, seconds: Date().timeIntervalSince(start)))
        if !m.passed { throw ExitCode(1) }
    }
}
