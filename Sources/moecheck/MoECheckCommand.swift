import ArgumentParser
import Foundation
import KernelBridge
import MoEReference
import MoEVerify
import TensorIO

@main
struct MoECheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "moecheck",
        abstract: "Prove fused Mixture-of-Experts kernels correct against a float64 reference with rigorous per-element bounds.",
        version: moecheckVersion,
        subcommands: [Inspect.self, Reference.self, Goldens.self, Verify.self, Fuzz.self, Faults.self, Sensitivity.self, Bench.self]
    )
}

/// Options every numeric command shares.
struct BLASOptions: ParsableArguments {
    @Option(name: .customLong("blas-threads"), help: "OpenBLAS threads (recorded in outputs). Default: MOECHECK_BLAS_THREADS or 2.")
    var blasThreads: Int?

    func apply() {
        let env = ProcessInfo.processInfo.environment["MOECHECK_BLAS_THREADS"].flatMap(Int.init)
        BLAS.setThreads(max(1, blasThreads ?? env ?? 2))
    }
}

/// A failure that the tool reports as one line on stderr with a non-zero exit.
struct ToolFailure: Error, CustomStringConvertible {
    let description: String
    init(_ s: String) { description = s }
}

func fail(_ message: String) -> ToolFailure { ToolFailure(message) }

/// Prints to stderr.
func note(_ s: String) {
    FileHandle.standardError.write((s + "\n").data(using: .utf8)!)
}

/// Whether stderr is a terminal (progress lines only then).
let stderrIsTerminal = isatty(2) == 1

/// Loads a kernel library, selects the GPU and, for a fault build, a fault; errors become one
/// line naming the command.
func openDeviceKernel(_ path: String, device: Int = 0, fault: String? = nil, command: String) throws -> DeviceKernel {
    do {
        let kernel = try DeviceKernel(library: try KernelLibrary(path: path), device: device)
        if let fault { try kernel.library.setFault(fault) }
        return kernel
    } catch {
        throw fail("\(command): \(error)")
    }
}
