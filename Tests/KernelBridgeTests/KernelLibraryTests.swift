import CMoEKernelABI
import Foundation
@testable import KernelBridge
import Testing
import MoECheckTestSupport

// KernelBridge without a GPU: every test loads a fake library (FakeKernelLibrary.swift) built
// with the system's cc. The suite is serialized because the fake's mode and counters are
// process-global.

private func problem(tokens: Int64 = 2, hidden: Int64 = 8, intermediate: Int64 = 4, experts: Int32 = 8, topK: Int32 = 2) -> MoEProblem {
    MoEProblem(tokens: tokens, hidden: hidden, intermediate: intermediate, experts: experts, top_k: topK, renormalize: 1,
               fuse_shared: 0, weight_format: 0, split_k: 1)
}

/// The error a load attempt threw, or a recorded issue naming `what` if it loaded.
private func loadError(_ path: String, _ what: String) -> KernelError? {
    do {
        _ = try KernelLibrary(path: path)
        Issue.record("\(what): KernelLibrary(path: \(path)) loaded, expected an error")
        return nil
    } catch let e as KernelError {
        return e
    } catch {
        Issue.record("\(what): threw \(type(of: error)) \(error), expected a KernelError")
        return nil
    }
}

@Suite("KernelBridge through a fake kernel library (no GPU)", .serialized,
       .enabled(if: Toolchain.hasCC, "no C compiler (cc) on PATH: the fake kernel library cannot be built"))
struct KernelLibraryTests {
    @Test("loading reports the library's name, ABI version and device")
    func loadsAndIdentifies() throws {
        let fake = try FakeLibraries.require()
        let lib = try KernelLibrary(path: fake.full)
        #expect(lib.path == fake.full)
        #expect(lib.libraryName == "fake")
        #expect(lib.abiVersion == Int(MOE_ABI_VERSION))
        #expect(try lib.deviceCount() == 1)
        #expect(try lib.deviceName(0) == "fake")
        try lib.setDevice(0)
        #expect(lib.alignBlockSize == 16)
        #expect(try lib.workspaceSize(problem()) == 2 * 2 * 4 * 4)
        try lib.timerBegin()
        #expect(try lib.timerEnd() == 1.5)
        try lib.synchronize()
        #expect(!lib.canFillCounter, "the fake exports no moe_fill_counter")
        let bf16 = try lib.declaredRecipe(weightFormat: 0)
        #expect(bf16.router_logits == 1 && bf16.activation_fp8 == 0 && bf16.intermediate == 0)
        let fp8 = try lib.declaredRecipe(weightFormat: 1)
        #expect(fp8.activation_fp8 == 1 && fp8.activation_scale == 1 && fp8.intermediate == 1)
    }

    @Test("a failing call throws KernelError with the function, the status name and the library's message")
    func errorsCarryFunctionStatusAndMessage() throws {
        let fake = try FakeLibraries.require()
        let control = try FakeControl(path: fake.full)
        let lib = try KernelLibrary(path: fake.full)

        // moe_router validates the problem: top_k 9 > experts 8
        let x = try lib.allocate(64), logits = try lib.allocate(64), ids = try lib.allocate(128), w = try lib.allocate(128)
        let weights = MoEWeights(w13: nil, w2: nil, w13_scale: nil, w2_scale: nil, router: nil, shared_gate: nil)
        do {
            try lib.router(problem(topK: 9), weights, x: x, logits: logits, ids: ids, topkWeights: w, sharedGate: nil)
            Issue.record("moe_router with top_k 9 > experts 8 succeeded")
        } catch let e as KernelError {
            #expect(e.function == "moe_router")
            #expect(e.status == 1 && e.kernelStatus == .invalidArgument)
            #expect(e.message == "moe_router: top_k 9 > experts 8")
            #expect(e.description == "moe_router failed (invalid argument): moe_router: top_k 9 > experts 8")
        }
        // a valid router call succeeds afterwards: the error does not stick
        try lib.router(problem(), weights, x: x, logits: logits, ids: ids, topkWeights: w, sharedGate: nil)
        #expect(try ids.download(Int32.self, count: 4) == [0, 1, 0, 1])

        // moe_malloc failing with a message
        control.setMode("malloc_fails")
        defer { control.setMode("normal") }
        do {
            _ = try lib.allocate(1024)
            Issue.record("moe_malloc in mode malloc_fails succeeded")
        } catch let e as KernelError {
            #expect(e.function.hasPrefix("moe_malloc"), "function: \(e.function)")
            #expect(e.status == 4 && e.kernelStatus == .outOfMemory)
            let d = e.description
            #expect(d.contains("moe_malloc") && d.contains("out of memory") && d.contains("fake device out of memory allocating 1024 bytes"),
                    "description: \(d)")
        }
        control.setMode("normal")

        // a library error without a message says so
        do {
            try lib.forward(problem(), weights, x: x, output: x, workspace: x)
            Issue.record("moe_forward of the fake succeeded")
        } catch let e as KernelError {
            #expect(e.description == "moe_forward failed (unsupported): moe_forward: the fake computes nothing")
        }
        let silent = KernelError(function: "moe_synchronize", status: 2, message: "")
        #expect(silent.description == "moe_synchronize failed (device error): (the library gave no message)")
        #expect(KernelError(function: "f", status: 42, message: "m").description == "f failed (status 42): m")
    }

    @Test("a nonexistent path is a clear error, not a crash")
    func nonexistentPath() throws {
        let path = "/nonexistent/dir/libmoekernels-\(UUID().uuidString).so"
        guard let e = loadError(path, "nonexistent path") else { return }
        #expect(e.function == "dlopen")
        #expect(e.description.contains(path) && e.description.contains("no such file"), "description: \(e.description)")
    }

    @Test("a file that is not a shared library is a clear error")
    func notALibrary() throws {
        let fake = try FakeLibraries.require()
        let path = fake.directory.appendingPathComponent("not-a-library.so").path
        try "this is text, not ELF\n".write(toFile: path, atomically: true, encoding: .utf8)
        guard let e = loadError(path, "text file") else { return }
        #expect(e.function == "dlopen")
        #expect(e.description.contains(path), "dlerror should name the file: \(e.description)")
    }

    @Test("a shared library without the ABI names the first missing symbol")
    func unrelatedLibrary() throws {
        let fake = try FakeLibraries.require()
        guard let e = loadError(fake.unrelated, "unrelated library") else { return }
        #expect(e.function == "dlsym")
        #expect(e.description.contains("does not export 'moe_abi_version'") && e.description.contains(fake.unrelated),
                "description: \(e.description)")
    }

    @Test("a library missing moe_stage2 is rejected naming the symbol")
    func missingSymbol() throws {
        let fake = try FakeLibraries.require()
        guard let e = loadError(fake.noStage2, "library without moe_stage2") else { return }
        #expect(e.function == "dlsym")
        #expect(e.description.contains("'moe_stage2'") && e.description.contains(fake.noStage2), "description: \(e.description)")
        // the failed load closed its handle cleanly; the complete library still loads
        #expect(try KernelLibrary(path: fake.full).libraryName == "fake")
    }

    @Test("a library speaking another ABI version is rejected with both versions")
    func wrongABIVersion() throws {
        let fake = try FakeLibraries.require()
        let control = try FakeControl(path: fake.full)
        control.setMode("wrong_abi")
        defer { control.setMode("normal") }
        guard let e = loadError(fake.full, "wrong ABI version") else { return }
        #expect(e.function == "moe_abi_version")
        #expect(e.description.contains("library ABI version 99") && e.description.contains("speaks \(MOE_ABI_VERSION)"),
                "description: \(e.description)")
    }

    @Test("DeviceBuffer: upload, memset and download round-trip")
    func bufferRoundTrip() throws {
        let fake = try FakeLibraries.require()
        let lib = try KernelLibrary(path: fake.full)
        let values: [Float] = (0..<1000).map { Float($0) * 0.25 - 17 }
        let b = try lib.allocate(values.count * 4)
        #expect(b.bytes == 4000)
        try b.upload(values)
        #expect(try b.download(Float.self, count: values.count) == values)
        #expect(try b.download(Float.self, count: 3) == Array(values.prefix(3)))
        try lib.memset(b, byte: 0xD5)
        #expect(try b.download(UInt8.self, count: 4000).allSatisfy { $0 == 0xD5 })
        let ints: [Int32] = [-1, 0, 1, .max, .min]
        let c = try lib.allocate(ints.count * 4)
        try c.upload(ints)
        #expect(try c.download(Int32.self, count: ints.count) == ints)
        // a zero-byte buffer is allocated (as 1 byte) and copies of nothing are no-ops
        let empty = try lib.allocate(0)
        #expect(empty.bytes == 0)
        try empty.upload([UInt8]())
        #expect(try empty.download(UInt8.self, count: 0) == [])
    }

    @Test("every DeviceBuffer is freed when it goes out of scope")
    func buffersAreFreed() throws {
        let fake = try FakeLibraries.require()
        let control = try FakeControl(path: fake.full)
        let lib = try KernelLibrary(path: fake.full)
        let mallocsBefore = control.mallocs, freesBefore = control.frees, liveBefore = control.live
        func useBuffers() throws {
            var buffers: [DeviceBuffer] = []
            for i in 1...10 { buffers.append(try lib.allocate(i * 100)) }
            try buffers[3].upload([UInt8](repeating: 7, count: 400))
            #expect(control.live == liveBefore + 10)
        }
        try useBuffers()
        #expect(control.mallocs == mallocsBefore + 10)
        #expect(control.frees == freesBefore + 10, "buffers leaked: \(control.mallocs - mallocsBefore) allocated, \(control.frees - freesBefore) freed")
        #expect(control.live == liveBefore)

        // a buffer keeps its library alive: freed through it after the caller's last reference
        var orphan: DeviceBuffer? = try KernelLibrary(path: fake.full).allocate(64)
        #expect(control.live == liveBefore + 1)
        #expect(orphan?.library.libraryName == "fake")
        orphan = nil
        #expect(control.live == liveBefore)
    }

    @Test("a library without fault injection: faultNames is empty and setFault is unsupported")
    func noFaultInjection() throws {
        let fake = try FakeLibraries.require()
        let lib = try KernelLibrary(path: fake.noFaults)
        #expect(lib.faultNames == [])
        do {
            try lib.setFault("alpha")
            Issue.record("setFault on a library without moe_set_fault succeeded")
        } catch let e as KernelError {
            #expect(e.function == "moe_set_fault")
            #expect(e.status == 3 && e.kernelStatus == .unsupported)
            #expect(e.description.contains("unsupported") && e.description.contains("not exported by \(fake.noFaults)"), "description: \(e.description)")
        }
        do {
            try lib.fillCounter(lib.allocate(16), kind: 0, count: 8, seed: 1, stream: 2, offset: 0, param: 3)
            Issue.record("fillCounter on a library without moe_fill_counter succeeded")
        } catch let e as KernelError {
            #expect(e.function == "moe_fill_counter" && e.status == 3)
        }
    }

    @Test("a fault build: names are split and trimmed, setFault passes the name through")
    func faultInjection() throws {
        let fake = try FakeLibraries.require()
        let control = try FakeControl(path: fake.full)
        let lib = try KernelLibrary(path: fake.full)
        #expect(lib.faultNames == ["alpha", "beta", "gamma"])
        try lib.setFault("beta")
        #expect(control.currentFault == "beta")
        try lib.setFault(nil)
        #expect(control.currentFault == "")
        do {
            try lib.setFault("delta")
            Issue.record("setFault(delta) succeeded")
        } catch let e as KernelError {
            #expect(e.function == "moe_set_fault(delta)")
            #expect(e.description.contains("unknown fault 'delta'"), "description: \(e.description)")
        }
    }

    @Test("MOECHECK_KERNELS: an empty value counts as unset")
    func environmentPath() {
        // Only reads: the variable is whatever the test environment has.
        let env = ProcessInfo.processInfo.environment["MOECHECK_KERNELS"]
        if let env, !env.isEmpty { #expect(KernelLibrary.environmentPath == env) } else { #expect(KernelLibrary.environmentPath == nil) }
    }
}

@Suite("The C ABI header")
struct HeaderTests {
    @Test("moe_kernels.h compiles as strict C99 (-std=c99 -pedantic -Wall -Wextra -Werror)",
          .enabled(if: Toolchain.hasCC, "no C compiler (cc) on PATH"))
    func headerIsC99() throws {
        let (status, log) = try Toolchain.runCC(["-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-x", "c", Toolchain.header])
        #expect(status == 0, "cc -std=c99 -pedantic rejected \(Toolchain.header):\n\(log)")
    }

    @Test("moe_kernels.h has an include guard, ABI version 1 and 64-bit sizes",
          .enabled(if: Toolchain.hasCC, "no C compiler (cc) on PATH"))
    func headerIncludeGuard() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("moecheck-hdr-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("twice.c")
        try """
        #include "moe_kernels.h"
        #include "moe_kernels.h"
        typedef char abi_version_is_1[MOE_ABI_VERSION == 1 ? 1 : -1];
        typedef char problem_sizes_are_64_bit[sizeof(((moe_problem*)0)->tokens) == 8 ? 1 : -1];
        int main(void) { moe_recipe r; r.output = MOE_PREC_BF16; return r.output - 1; }
        """.write(to: src, atomically: true, encoding: .utf8)
        let (status, log) = try Toolchain.runCC(["-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
                                                  "-I", Toolchain.includeDirectory, src.path])
        #expect(status == 0, "including moe_kernels.h twice failed:\n\(log)")
    }
}

@Suite("Named ABI constants")
struct NamedConstantTests {
    @Test("every named Swift enum has the value of the moe_kernels.h constant it mirrors")
    func enumsMirrorTheHeader() {
        let status: [(KernelLibrary.Status, moe_status)] = [(.ok, MOE_OK), (.invalidArgument, MOE_ERR_INVALID_ARGUMENT),
            (.deviceError, MOE_ERR_DEVICE), (.unsupported, MOE_ERR_UNSUPPORTED), (.outOfMemory, MOE_ERR_OUT_OF_MEMORY)]
        for (named, c) in status { #expect(named.rawValue == Int32(c.rawValue), "\(named)") }
        #expect(status.count == KernelLibrary.Status.allCases.count)
        let formats: [(KernelLibrary.WeightFormatCode, moe_weight_format)] = [(.bf16, MOE_WEIGHTS_BF16),
            (.fp8e4m3fn, MOE_WEIGHTS_FP8_E4M3FN), (.fp8e4m3fnuz, MOE_WEIGHTS_FP8_E4M3FNUZ)]
        for (named, c) in formats { #expect(named.rawValue == Int32(c.rawValue), "\(named)") }
        #expect(formats.count == KernelLibrary.WeightFormatCode.allCases.count)
        #expect(KernelLibrary.DeclaredRecipe.Precision.fp32.rawValue == Int32(MOE_PREC_FP32.rawValue))
        #expect(KernelLibrary.DeclaredRecipe.Precision.bf16.rawValue == Int32(MOE_PREC_BF16.rawValue))
        #expect(KernelLibrary.DeclaredRecipe.ScaleConvention.divide.rawValue == Int32(MOE_SCALE_DIVIDE.rawValue))
        #expect(KernelLibrary.DeclaredRecipe.ScaleConvention.multiplyReciprocal.rawValue == Int32(MOE_SCALE_MULTIPLY_RECIPROCAL.rawValue))
        #expect(KernelLibrary.DeclaredRecipe.Intermediate.bf16.rawValue == Int32(MOE_INTER_BF16.rawValue))
        #expect(KernelLibrary.DeclaredRecipe.Intermediate.fp8Group128.rawValue == Int32(MOE_INTER_FP8_GROUP128.rawValue))
        #expect(KernelLibrary.FillKind.bf16Int.rawValue == Int32(MOE_FILL_BF16_INT.rawValue))
        #expect(KernelLibrary.FillKind.fp8Code.rawValue == Int32(MOE_FILL_FP8_CODE.rawValue))
        #expect(KernelLibrary.FillKind.f32Pow2.rawValue == Int32(MOE_FILL_F32_POW2.rawValue))
        #expect(KernelLibrary.abiVersion == MOE_ABI_VERSION)
    }

    @Test("KernelFault lists the fault build's names in its order (k_fault_names in Kernels/src/moe_api.hip)")
    func faultNamesMirrorTheFaultBuild() throws {
        let source = try String(contentsOfFile: packagePath("Kernels/src/moe_api.hip"), encoding: .utf8)
        let start = try #require(source.range(of: "k_fault_names[MOE_FAULT_COUNT] = {"), "k_fault_names not found")
        let end = try #require(source.range(of: "};", range: start.upperBound..<source.endIndex))
        let names = source[start.upperBound..<end.lowerBound].split(separator: "\n")
            .map { $0.trimmingCharacters(in: .whitespaces) }
            .filter { $0.hasPrefix("\"") }
            .map { String($0.dropFirst().prefix { $0 != "\"" }) }
            .filter { !$0.isEmpty }
        #expect(names == KernelFault.allCases.map(\.rawValue))
        #expect(KernelFault.harmful.count == 16 && KernelFault.benign.count == 3)
        #expect(KernelFault.benign.allSatisfy { KernelFault.isBenign($0.rawValue) })
    }
}
