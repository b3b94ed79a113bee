import Foundation
import KernelBridge
import MoEVerify
import Testing
import MoECheckTestSupport

// The GPU suite: the same library calls as `moecheck verify`, on a real kernel library. It runs
// when MOECHECK_KERNELS names a library that loads and sees a GPU; otherwise it is skipped with
// the reason (CI has no GPU: the GPU results are produced with `moecheck verify` on a GPU machine,
// see README "What was measured").

/// Why the GPU suite cannot run here, or nil when it can.
let gpuUnavailableReason: String? = {
    guard let path = KernelLibrary.environmentPath else {
        return "no GPU kernel library: set MOECHECK_KERNELS=Kernels/build/nvidia/libmoekernels.so (or amd) on a GPU machine"
    }
    do {
        let lib = try KernelLibrary(path: path)
        if try lib.deviceCount() == 0 { return "\(path) loads but sees no GPU device" }
        return nil
    } catch {
        return "\(path) cannot be used: \(error)"
    }
}()

@Suite("GPU kernels against the reference", .tags(.gpu), .enabled(if: gpuUnavailableReason == nil, Comment(rawValue: gpuUnavailableReason ?? "")))
struct GPUTests {
    static let cases = Catalogue.smoke() + Catalogue.splitK()

    @Test("every smoke and split-K case passes on the GPU", arguments: cases)
    func gpuCase(_ vc: VerifyCase) throws {
        let lib = try KernelLibrary(path: KernelLibrary.environmentPath!)
        let kernel = try DeviceKernel(library: lib)
        let report = CaseVerifier(kernel: kernel).verify(vc)
        #expect(report.passed, "\(vc) on \(kernel.device):\n\(report.line)")
    }
}
