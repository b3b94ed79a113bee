import Foundation
import Testing
#if canImport(Glibc)
import Glibc
import MoECheckTestSupport
#endif

// A fake kernel library for testing KernelBridge on a machine without a GPU (STYLE: "a mocking
// switch so tests can inject failures without the real backend"). The C source below implements
// the whole ABI of Kernels/include/moe_kernels.h on the host — device memory is malloc, copies are
// memcpy, one device named "fake" — and is compiled at test time with the system's `cc`.
//
// Behaviour is switched at run time with the exported `fake_set_mode(const char*)` (or, before
// the first call, the environment variable FAKE_MOE_MODE):
//   "normal"        everything succeeds
//   "malloc_fails"  moe_malloc returns MOE_ERR_OUT_OF_MEMORY with a message
//   "wrong_abi"     moe_abi_version returns 99
//   "no_devices"    moe_device_count reports 0 devices
// moe_router always validates its problem the way a real library does: top_k > experts gives
// MOE_ERR_INVALID_ARGUMENT and "moe_router: top_k 9 > experts 8".
// Compile-time variants drop symbols: FAKE_NO_STAGE2 (no moe_stage2: a broken library) and
// FAKE_NO_FAULTS (no moe_fault_names / moe_set_fault: an ordinary, non-fault build).
// Counters `fake_malloc_count`, `fake_free_count`, `fake_live_count` let a test see that every
// DeviceBuffer is freed.

enum FakeKernelSource {
    static let c = #"""
    #include "moe_kernels.h"
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>

    static __thread char last_error[256];
    static char mode[64];
    static int mode_initialized;
    static long mallocs, frees, live;

    static const char* current_mode(void) {
        if (!mode_initialized) {
            const char* env = getenv("FAKE_MOE_MODE");
            snprintf(mode, sizeof mode, "%s", env ? env : "normal");
            mode_initialized = 1;
        }
        return mode;
    }
    static int mode_is(const char* m) { return strcmp(current_mode(), m) == 0; }
    static moe_status fail(moe_status s, const char* message) {
        snprintf(last_error, sizeof last_error, "%s", message);
        return s;
    }
    static moe_status ok(void) { last_error[0] = 0; return MOE_OK; }

    void fake_set_mode(const char* m) { snprintf(mode, sizeof mode, "%s", m ? m : "normal"); mode_initialized = 1; }
    long fake_malloc_count(void) { return mallocs; }
    long fake_free_count(void) { return frees; }
    long fake_live_count(void) { return live; }

    int32_t moe_abi_version(void) { return mode_is("wrong_abi") ? 99 : MOE_ABI_VERSION; }
    const char* moe_library_name(void) { return "fake"; }
    const char* moe_last_error(void) { return last_error; }

    moe_status moe_declared_recipe(int32_t weight_format, moe_recipe* out) {
        if (!out) return fail(MOE_ERR_INVALID_ARGUMENT, "moe_declared_recipe: out is NULL");
        if (weight_format < 0 || weight_format > 2) return fail(MOE_ERR_UNSUPPORTED, "moe_declared_recipe: unknown weight format");
        memset(out, 0, sizeof *out);
        out->router_logits = MOE_PREC_BF16;
        out->routing_weights = MOE_PREC_FP32;
        out->shared_gate = MOE_PREC_BF16;
        out->activation_fp8 = weight_format != 0;
        out->activation_scale = MOE_SCALE_MULTIPLY_RECIPROCAL;
        out->intermediate = weight_format != 0 ? MOE_INTER_FP8_GROUP128 : MOE_INTER_BF16;
        out->combine = MOE_PREC_FP32;
        out->output = MOE_PREC_BF16;
        return ok();
    }

    moe_status moe_device_count(int32_t* count) { *count = mode_is("no_devices") ? 0 : 1; return ok(); }
    moe_status moe_device_name(int32_t device, char* buffer, size_t capacity) {
        if (device != 0) return fail(MOE_ERR_INVALID_ARGUMENT, "moe_device_name: no such device");
        snprintf(buffer, capacity, "fake");
        return ok();
    }
    moe_status moe_set_device(int32_t device) {
        return device == 0 ? ok() : fail(MOE_ERR_INVALID_ARGUMENT, "moe_set_device: no such device");
    }
    moe_status moe_malloc(void** pointer, size_t bytes) {
        if (mode_is("malloc_fails")) {
            char m[128];
            snprintf(m, sizeof m, "fake device out of memory allocating %zu bytes", bytes);
            return fail(MOE_ERR_OUT_OF_MEMORY, m);
        }
        *pointer = malloc(bytes);
        if (!*pointer) return fail(MOE_ERR_OUT_OF_MEMORY, "host malloc failed");
        mallocs++; live++;
        return ok();
    }
    moe_status moe_free(void* pointer) {
        if (pointer) { free(pointer); frees++; live--; }
        return ok();
    }
    moe_status moe_copy_to_device(void* dst, const void* src, size_t bytes) { memcpy(dst, src, bytes); return ok(); }
    moe_status moe_copy_to_host(void* dst, const void* src, size_t bytes) { memcpy(dst, src, bytes); return ok(); }
    moe_status moe_memset(void* dst, int32_t value, size_t bytes) { memset(dst, value, bytes); return ok(); }
    moe_status moe_synchronize(void) { return ok(); }
    moe_status moe_timer_begin(void) { return ok(); }
    moe_status moe_timer_end(float* ms) { *ms = 1.5f; return ok(); }

    moe_status moe_workspace_size(const moe_problem* p, size_t* bytes) {
        *bytes = (size_t)(p->tokens * (p->top_k + p->fuse_shared) * p->intermediate * 4);
        return ok();
    }
    int32_t moe_align_block_size(void) { return 16; }

    moe_status moe_router(const moe_problem* p, const moe_weights* w, const void* x,
                          float* logits, int32_t* ids, float* weights, float* shared_gate) {
        (void)w; (void)x; (void)logits; (void)weights; (void)shared_gate;
        if (p->top_k < 1 || p->top_k > p->experts) {
            char m[128];
            snprintf(m, sizeof m, "moe_router: top_k %d > experts %d", (int)p->top_k, (int)p->experts);
            return fail(MOE_ERR_INVALID_ARGUMENT, m);
        }
        for (int64_t t = 0; t < p->tokens; t++)
            for (int32_t k = 0; k < p->top_k; k++) ids[t * p->top_k + k] = k;
        return ok();
    }
    moe_status moe_align(const moe_problem* p, const int32_t* ids, int32_t* sorted, int32_t* blocks, int32_t* padded) {
        (void)p; (void)ids; (void)sorted; (void)blocks; *padded = 0; return ok();
    }
    moe_status moe_stage1(const moe_problem* p, const moe_weights* w, const void* x, const int32_t* ids,
                          const int32_t* sorted, const int32_t* blocks, const int32_t* padded,
                          void* intermediate, void* workspace) {
        (void)p; (void)w; (void)x; (void)ids; (void)sorted; (void)blocks; (void)padded; (void)intermediate; (void)workspace;
        return ok();
    }
    #ifndef FAKE_NO_STAGE2
    moe_status moe_stage2(const moe_problem* p, const moe_weights* w, const void* intermediate, const int32_t* ids,
                          const float* weights, const int32_t* sorted, const int32_t* blocks, const int32_t* padded,
                          void* output, void* workspace) {
        (void)p; (void)w; (void)intermediate; (void)ids; (void)weights; (void)sorted; (void)blocks; (void)padded;
        (void)output; (void)workspace;
        return ok();
    }
    #endif
    moe_status moe_forward(const moe_problem* p, const moe_weights* w, const void* x, void* output, void* workspace) {
        (void)p; (void)w; (void)x; (void)output; (void)workspace;
        return fail(MOE_ERR_UNSUPPORTED, "moe_forward: the fake computes nothing");
    }
    #ifndef FAKE_NO_FAULTS
    static char fault[64];
    const char* moe_fault_names(void) { return " alpha, beta ,,gamma"; }
    moe_status moe_set_fault(const char* name) {
        if (!name || !*name) { fault[0] = 0; return ok(); }
        if (strcmp(name, "alpha") && strcmp(name, "beta") && strcmp(name, "gamma")) {
            char m[128];
            snprintf(m, sizeof m, "moe_set_fault: unknown fault '%s'", name);
            return fail(MOE_ERR_INVALID_ARGUMENT, m);
        }
        snprintf(fault, sizeof fault, "%s", name);
        return ok();
    }
    const char* fake_current_fault(void) { return fault; }
    #endif
    """#
}

/// Locating and running the C compiler.
enum Toolchain {
    static let includeDirectory = packagePath("Kernels/include")
    static let header = packagePath("Kernels/include/moe_kernels.h")

    /// `cc` on PATH, if any.
    static let cc: String? = {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        for dir in path.split(separator: ":") {
            let candidate = "\(dir)/cc"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }()

    static var hasCC: Bool { cc != nil }

    /// Runs `cc` with `arguments`; returns the exit status and everything it printed.
    static func runCC(_ arguments: [String]) throws -> (status: Int32, output: String) {
        guard let cc else { throw CompileFailure(message: "no cc on PATH") }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: cc)
        p.arguments = arguments
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("moecheck-cc-\(UUID().uuidString).log")
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
        defer { try? FileManager.default.removeItem(at: log) }
        let handle = try FileHandle(forWritingTo: log)
        p.standardOutput = handle
        p.standardError = handle
        try p.run()
        p.waitUntilExit()
        try? handle.close()
        let output = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        return (p.terminationStatus, output)
    }

    struct CompileFailure: Error, CustomStringConvertible {
        let message: String
        var description: String { message }
    }
}

/// The fake libraries, compiled once per test process into a temporary directory.
enum FakeLibraries {
    struct Built {
        let directory: URL
        /// The whole ABI, with fault injection.
        let full: String
        /// The whole ABI without moe_stage2.
        let noStage2: String
        /// The whole ABI without moe_fault_names / moe_set_fault.
        let noFaults: String
        /// A shared library that exports nothing of the ABI.
        let unrelated: String
    }

    static let built: Result<Built, Error> = Result {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("moecheck-fake-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let source = dir.appendingPathComponent("fake_moe.c")
        try FakeKernelSource.c.write(to: source, atomically: true, encoding: .utf8)
        let unrelatedSource = dir.appendingPathComponent("unrelated.c")
        try "int unrelated_function(void) { return 42; }\n".write(to: unrelatedSource, atomically: true, encoding: .utf8)
        func compile(_ src: URL, _ name: String, _ defines: [String]) throws -> String {
            let out = dir.appendingPathComponent(name).path
            let (status, log) = try Toolchain.runCC(["-shared", "-fPIC", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O1",
                                                     "-I", Toolchain.includeDirectory] + defines + ["-o", out, src.path])
            guard status == 0 else { throw Toolchain.CompileFailure(message: "cc failed building \(name) (status \(status)):\n\(log)") }
            return out
        }
        return Built(directory: dir,
                     full: try compile(source, "libfake_full.so", []),
                     noStage2: try compile(source, "libfake_no_stage2.so", ["-DFAKE_NO_STAGE2"]),
                     noFaults: try compile(source, "libfake_no_faults.so", ["-DFAKE_NO_FAULTS"]),
                     unrelated: try compile(unrelatedSource, "libunrelated.so", []))
    }

    static func require() throws -> Built { try requireSuccess(built, "building the fake kernel library") }
}

/// Test-side access to the fake's control functions, through its own dlopen handle (which also
/// keeps the library loaded, and its counters alive, while KernelLibrary instances come and go).
final class FakeControl {
    let handle: UnsafeMutableRawPointer
    typealias SetMode = @convention(c) (UnsafePointer<CChar>?) -> Void
    typealias Counter = @convention(c) () -> Int
    typealias Str = @convention(c) () -> UnsafePointer<CChar>?

    init(path: String) throws {
        guard let h = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            throw Toolchain.CompileFailure(message: "test could not dlopen \(path): \(dlerror().map { String(cString: $0) } ?? "?")")
        }
        handle = h
    }
    deinit { dlclose(handle) }

    private func symbol<T>(_ name: String, _: T.Type) -> T {
        guard let p = dlsym(handle, name) else { fatalError("fake library lacks \(name)") }
        return unsafeBitCast(p, to: T.self)
    }

    func setMode(_ mode: String) { mode.withCString { symbol("fake_set_mode", SetMode.self)($0) } }
    var mallocs: Int { symbol("fake_malloc_count", Counter.self)() }
    var frees: Int { symbol("fake_free_count", Counter.self)() }
    var live: Int { symbol("fake_live_count", Counter.self)() }
    var currentFault: String { symbol("fake_current_fault", Str.self)().map { String(cString: $0) } ?? "" }
}
