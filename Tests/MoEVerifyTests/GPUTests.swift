import Foundation
import KernelBridge
import MoEVerify
import Testing
import MoECheckTestSupport

// The GPU suite: the same library calls as `moecheck verify`, on a real kernel library. It runs
// when MOECHECK_KERNELS names a library, or — with no variable — when this machine has a GPU and
// its compiler: `GPUKernelBuild` then builds Kernels/ (nvcc or hipcc, the GPU's own architecture,
// the matrix-core IMPL, FAULTS=1) once per test process. Otherwise it is skipped with the reason
// (CI has no GPU: the GPU results are produced with `moecheck verify` on a GPU machine, see
// README "What was measured").

/// Why the GPU suite cannot run here, or nil when it can.
let gpuUnavailableReason: String? = {
    let located: GPUKernelBuild.Located
    switch GPUKernelBuild.located {
    case .failure(let reason): return reason.description
    case .success(let l): located = l
    }
    do {
        let lib = try KernelLibrary(path: located.library)
        if try lib.deviceCount() == 0 { return "\(located.library) (\(located.origin)) loads but sees no GPU device" }
        return nil
    } catch {
        return "\(located.library) (\(located.origin)) cannot be used: \(error)"
    }
}()

private var gpuLibraryPath: String {
    get throws { try GPUKernelBuild.located.get().library }
}

@Suite("GPU kernels against the reference", .tags(.gpu), .enabled(if: gpuUnavailableReason == nil, Comment(rawValue: gpuUnavailableReason ?? "")))
struct GPUTests {
    static let cases = Catalogue.smoke() + Catalogue.splitK()

    @Test("every smoke and split-K case passes on the GPU", arguments: cases)
    func gpuCase(_ vc: VerifyCase) throws {
        let lib = try KernelLibrary(path: try gpuLibraryPath)
        let kernel = try DeviceKernel(library: lib)
        let report = CaseVerifier(kernel: kernel).verify(vc)
        #expect(report.passed, "\(vc) on \(kernel.device):\n\(report.line)")
    }
}

/// Why the GPU fault matrix cannot run here (no GPU suite, or no FAULTS=1 library), or nil.
let gpuFaultsUnavailableReason: String? = {
    if let r = gpuUnavailableReason { return r }
    guard case .success(let l) = GPUKernelBuild.located, let faults = l.faultLibrary else {
        return "no FAULTS=1 library next to MOECHECK_KERNELS (build with `make -C Kernels FAULTS=1`)"
    }
    return FileManager.default.fileExists(atPath: faults) ? nil : "\(faults) does not exist"
}()

@Suite("GPU fault build: every harmful fault detected, benign ones accepted (small families)", .tags(.gpu),
       .enabled(if: gpuFaultsUnavailableReason == nil, Comment(rawValue: gpuFaultsUnavailableReason ?? "")))
struct GPUFaultTests {
    @Test("the fault matrix of the FAULTS=1 library passes (what `moecheck faults` runs)")
    func faultMatrix() throws {
        let path = try #require(try GPUKernelBuild.located.get().faultLibrary)
        let kernel = try DeviceKernel.open(path: path)
        let lib = kernel.library
        let faults = lib.faultNames
        #expect(!faults.isEmpty, "\(path) is a FAULTS=1 build but names no faults")
        let m = try FaultMatrix.run(faults: faults, families: FaultMatrix.families(large: false),
                                    makeKernel: { f in try lib.setFault(f); return kernel }, progress: { _ in })
        #expect(m.baselineFailures.isEmpty, "baseline failures:\n\(m.baselineFailures.joined(separator: "\n"))")
        #expect(m.missed.isEmpty, "missed harmful faults \(m.missed):\n\(m.table)")
        #expect(m.falseAlarms.isEmpty, "benign variants flagged: \(m.falseAlarms.map(\.fault)):\n\(m.table)")
    }
}
