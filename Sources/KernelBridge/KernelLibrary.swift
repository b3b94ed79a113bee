import CMoEKernelABI
import Foundation
#if canImport(Glibc)
import Glibc
#endif

public typealias MoEProblem = moe_problem
public typealias MoEWeights = moe_weights
public typealias MoERecipeDeclaration = moe_recipe

/// A failure at the kernel boundary: which function, the status, and the library's own message.
public struct KernelError: Error, CustomStringConvertible, Sendable {
    public let function: String
    /// The raw `moe_status`, or `KernelError.bridgeStatus` for a failure of the bridge itself.
    public let status: Int32
    public let message: String

    /// The status of a failure in the bridge itself (dlopen, dlsym, ABI version), not a call.
    public static let bridgeStatus: Int32 = -1

    /// The named status, when `status` is one of the header's.
    public var kernelStatus: KernelLibrary.Status? { KernelLibrary.Status(rawValue: status) }

    public var description: String {
        let statusName: String
        if let named = kernelStatus, named != .ok { statusName = named.description }
        else if status == Self.bridgeStatus { statusName = "bridge" }
        else { statusName = "status \(status)" }
        return "\(function) failed (\(statusName)): \(message.isEmpty ? "(the library gave no message)" : message)"
    }
}

/// A kernel library implementing `Kernels/include/moe_kernels.h`, loaded with `dlopen`.
///
/// Swift never includes HIP or CUDA headers: any library exporting the ABI — ours built with
/// hipcc or nvcc, a third party's wrapper, or a fake built by a test — loads the same way. The
/// handle is closed when the last reference goes away. Every call goes through exactly one
/// wrapper below, which turns a non-zero status into a thrown `KernelError` carrying
/// `moe_last_error()`.
public final class KernelLibrary: @unchecked Sendable {
    public let path: String
    private let handle: UnsafeMutableRawPointer

    typealias FnI32 = @convention(c) () -> Int32
    typealias FnStr = @convention(c) () -> UnsafePointer<CChar>?
    typealias FnRecipe = @convention(c) (Int32, UnsafeMutablePointer<moe_recipe>?) -> Int32
    typealias FnCount = @convention(c) (UnsafeMutablePointer<Int32>?) -> Int32
    typealias FnName = @convention(c) (Int32, UnsafeMutablePointer<CChar>?, Int) -> Int32
    typealias FnSetDevice = @convention(c) (Int32) -> Int32
    typealias FnMalloc = @convention(c) (UnsafeMutablePointer<UnsafeMutableRawPointer?>?, Int) -> Int32
    typealias FnFree = @convention(c) (UnsafeMutableRawPointer?) -> Int32
    typealias FnCopyTo = @convention(c) (UnsafeMutableRawPointer?, UnsafeRawPointer?, Int) -> Int32
    typealias FnCopyFrom = @convention(c) (UnsafeMutableRawPointer?, UnsafeRawPointer?, Int) -> Int32
    typealias FnMemset = @convention(c) (UnsafeMutableRawPointer?, Int32, Int) -> Int32
    typealias FnVoid = @convention(c) () -> Int32
    typealias FnTimerEnd = @convention(c) (UnsafeMutablePointer<Float>?) -> Int32
    typealias FnWorkspace = @convention(c) (UnsafePointer<moe_problem>?, UnsafeMutablePointer<Int>?) -> Int32
    typealias FnRouter = @convention(c) (UnsafePointer<moe_problem>?, UnsafePointer<moe_weights>?, UnsafeRawPointer?,
                                         UnsafeMutablePointer<Float>?, UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Float>?,
                                         UnsafeMutablePointer<Float>?) -> Int32
    typealias FnAlign = @convention(c) (UnsafePointer<moe_problem>?, UnsafePointer<Int32>?, UnsafeMutablePointer<Int32>?,
                                        UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Int32>?) -> Int32
    typealias FnStage1 = @convention(c) (UnsafePointer<moe_problem>?, UnsafePointer<moe_weights>?, UnsafeRawPointer?,
                                         UnsafePointer<Int32>?, UnsafePointer<Int32>?, UnsafePointer<Int32>?, UnsafePointer<Int32>?,
                                         UnsafeMutableRawPointer?, UnsafeMutableRawPointer?) -> Int32
    typealias FnStage2 = @convention(c) (UnsafePointer<moe_problem>?, UnsafePointer<moe_weights>?, UnsafeRawPointer?,
                                         UnsafePointer<Int32>?, UnsafePointer<Float>?, UnsafePointer<Int32>?, UnsafePointer<Int32>?,
                                         UnsafePointer<Int32>?, UnsafeMutableRawPointer?, UnsafeMutableRawPointer?) -> Int32
    typealias FnForward = @convention(c) (UnsafePointer<moe_problem>?, UnsafePointer<moe_weights>?, UnsafeRawPointer?,
                                          UnsafeMutableRawPointer?, UnsafeMutableRawPointer?) -> Int32
    typealias FnFill = @convention(c) (UnsafeMutableRawPointer?, Int32, Int64, UInt64, UInt64, Int64, Int32) -> Int32
    typealias FnSetFault = @convention(c) (UnsafePointer<CChar>?) -> Int32

    private let fnAbiVersion: FnI32
    private let fnLibraryName: FnStr
    private let fnRecipe: FnRecipe
    private let fnLastError: FnStr
    private let fnDeviceCount: FnCount
    private let fnDeviceName: FnName
    private let fnSetDevice: FnSetDevice
    private let fnMalloc: FnMalloc
    private let fnFree: FnFree
    private let fnCopyToDevice: FnCopyTo
    private let fnCopyToHost: FnCopyFrom
    private let fnMemset: FnMemset
    private let fnSynchronize: FnVoid
    private let fnTimerBegin: FnVoid
    private let fnTimerEnd: FnTimerEnd
    private let fnWorkspace: FnWorkspace
    private let fnBlockSize: FnI32
    private let fnRouter: FnRouter
    private let fnAlign: FnAlign
    private let fnStage1: FnStage1
    private let fnStage2: FnStage2
    private let fnForward: FnForward
    private let fnFill: FnFill?
    private let fnFaultNames: FnStr?
    private let fnSetFault: FnSetFault?

    /// The library named by `MOECHECK_KERNELS`, if set.
    public static var environmentPath: String? {
        ProcessInfo.processInfo.environment["MOECHECK_KERNELS"].flatMap { $0.isEmpty ? nil : $0 }
    }

    public init(path: String) throws {
        self.path = path
        guard FileManager.default.fileExists(atPath: path) else {
            throw KernelError(function: "dlopen", status: KernelError.bridgeStatus, message: "\(path): no such file (build it with `make -C Kernels PLATFORM=nvidia|amd`)")
        }
        guard let h = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            let why = dlerror().map { String(cString: $0) } ?? "unknown error"
            throw KernelError(function: "dlopen", status: KernelError.bridgeStatus, message: why)
        }
        handle = h
        func sym<T>(_ name: String, _: T.Type) throws -> T {
            guard let p = dlsym(h, name) else {
                throw KernelError(function: "dlsym", status: KernelError.bridgeStatus, message: "\(path) does not export '\(name)' (not a MoECheck kernel library, or an older ABI)")
            }
            return unsafeBitCast(p, to: T.self)
        }
        func optionalSym<T>(_ name: String, _: T.Type) -> T? {
            dlsym(h, name).map { unsafeBitCast($0, to: T.self) }
        }
        do {
            fnAbiVersion = try sym("moe_abi_version", FnI32.self)
            let v = fnAbiVersion()
            guard v == KernelLibrary.abiVersion else {
                throw KernelError(function: "moe_abi_version", status: KernelError.bridgeStatus, message: "library ABI version \(v), MoECheck speaks \(MOE_ABI_VERSION)")
            }
            fnLibraryName = try sym("moe_library_name", FnStr.self)
            fnRecipe = try sym("moe_declared_recipe", FnRecipe.self)
            fnLastError = try sym("moe_last_error", FnStr.self)
            fnDeviceCount = try sym("moe_device_count", FnCount.self)
            fnDeviceName = try sym("moe_device_name", FnName.self)
            fnSetDevice = try sym("moe_set_device", FnSetDevice.self)
            fnMalloc = try sym("moe_malloc", FnMalloc.self)
            fnFree = try sym("moe_free", FnFree.self)
            fnCopyToDevice = try sym("moe_copy_to_device", FnCopyTo.self)
            fnCopyToHost = try sym("moe_copy_to_host", FnCopyFrom.self)
            fnMemset = try sym("moe_memset", FnMemset.self)
            fnSynchronize = try sym("moe_synchronize", FnVoid.self)
            fnTimerBegin = try sym("moe_timer_begin", FnVoid.self)
            fnTimerEnd = try sym("moe_timer_end", FnTimerEnd.self)
            fnWorkspace = try sym("moe_workspace_size", FnWorkspace.self)
            fnBlockSize = try sym("moe_align_block_size", FnI32.self)
            fnRouter = try sym("moe_router", FnRouter.self)
            fnAlign = try sym("moe_align", FnAlign.self)
            fnStage1 = try sym("moe_stage1", FnStage1.self)
            fnStage2 = try sym("moe_stage2", FnStage2.self)
            fnForward = try sym("moe_forward", FnForward.self)
            fnFill = optionalSym("moe_fill_counter", FnFill.self)
            fnFaultNames = optionalSym("moe_fault_names", FnStr.self)
            fnSetFault = optionalSym("moe_set_fault", FnSetFault.self)
        } catch {
            dlclose(h)
            throw error
        }
    }

    deinit { dlclose(handle) }

    // MARK: the one wrapper per call

    private func check(_ function: String, _ status: Int32) throws {
        guard status == KernelLibrary.Status.ok.rawValue else {
            let msg = fnLastError().map { String(cString: $0) } ?? ""
            throw KernelError(function: function, status: status, message: msg)
        }
    }

    public var abiVersion: Int { Int(fnAbiVersion()) }
    public var libraryName: String { fnLibraryName().map { String(cString: $0) } ?? "(unnamed)" }

    public func declaredRecipe(weightFormat: Int32) throws -> moe_recipe {
        var r = moe_recipe()
        try check("moe_declared_recipe", fnRecipe(weightFormat, &r))
        return r
    }

    public func deviceCount() throws -> Int {
        var n: Int32 = 0
        try check("moe_device_count", fnDeviceCount(&n))
        return Int(n)
    }

    public func deviceName(_ device: Int) throws -> String {
        var buf = [CChar](repeating: 0, count: 256)
        try check("moe_device_name", fnDeviceName(Int32(device), &buf, buf.count))
        return String(cString: buf)
    }

    public func setDevice(_ device: Int) throws { try check("moe_set_device", fnSetDevice(Int32(device))) }

    public func allocate(_ bytes: Int) throws -> DeviceBuffer {
        var p: UnsafeMutableRawPointer? = nil
        try check("moe_malloc(\(bytes) bytes)", fnMalloc(&p, Swift.max(bytes, 1)))
        guard let p else { throw KernelError(function: "moe_malloc", status: KernelError.bridgeStatus, message: "returned success and a NULL pointer") }
        return DeviceBuffer(library: self, pointer: p, bytes: bytes)
    }

    func free(_ p: UnsafeMutableRawPointer) { _ = fnFree(p) }

    public func copy(toDevice dst: DeviceBuffer, from src: UnsafeRawBufferPointer) throws {
        precondition(src.count <= dst.bytes, "copy of \(src.count) bytes into a \(dst.bytes)-byte buffer")
        guard src.count > 0 else { return }
        try check("moe_copy_to_device", fnCopyToDevice(dst.pointer, src.baseAddress, src.count))
    }

    /// Copies `dst.count` bytes from `src`, starting `byteOffset` bytes into it.
    public func copy(toHost dst: UnsafeMutableRawBufferPointer, from src: DeviceBuffer, byteOffset: Int = 0) throws {
        precondition(byteOffset >= 0 && byteOffset + dst.count <= src.bytes)
        guard dst.count > 0 else { return }
        try check("moe_copy_to_host", fnCopyToHost(dst.baseAddress, src.pointer + byteOffset, dst.count))
    }

    public func memset(_ dst: DeviceBuffer, byte: UInt8) throws {
        try check("moe_memset", fnMemset(dst.pointer, Int32(byte), dst.bytes))
    }

    public func synchronize() throws { try check("moe_synchronize", fnSynchronize()) }
    public func timerBegin() throws { try check("moe_timer_begin", fnTimerBegin()) }
    public func timerEnd() throws -> Double {
        var ms: Float = 0
        try check("moe_timer_end", fnTimerEnd(&ms))
        return Double(ms)
    }

    public func workspaceSize(_ problem: moe_problem) throws -> Int {
        var p = problem, n = 0
        try check("moe_workspace_size", fnWorkspace(&p, &n))
        return n
    }

    public var alignBlockSize: Int { Int(fnBlockSize()) }

    public func router(_ problem: moe_problem, _ weights: moe_weights, x: DeviceBuffer, logits: DeviceBuffer, ids: DeviceBuffer,
                       topkWeights: DeviceBuffer, sharedGate: DeviceBuffer?) throws {
        var p = problem, w = weights
        try check("moe_router", fnRouter(&p, &w, x.pointer, logits.typed(Float.self), ids.typed(Int32.self), topkWeights.typed(Float.self),
                                         sharedGate?.typed(Float.self)))
    }

    public func align(_ problem: moe_problem, ids: DeviceBuffer, sortedPairs: DeviceBuffer, blockExperts: DeviceBuffer, paddedCount: DeviceBuffer) throws {
        var p = problem
        try check("moe_align", fnAlign(&p, ids.typed(Int32.self), sortedPairs.typed(Int32.self), blockExperts.typed(Int32.self), paddedCount.typed(Int32.self)))
    }

    public func stage1(_ problem: moe_problem, _ weights: moe_weights, x: DeviceBuffer, ids: DeviceBuffer, sortedPairs: DeviceBuffer,
                       blockExperts: DeviceBuffer, paddedCount: DeviceBuffer, intermediate: DeviceBuffer, workspace: DeviceBuffer) throws {
        var p = problem, w = weights
        try check("moe_stage1", fnStage1(&p, &w, x.pointer, ids.typed(Int32.self), sortedPairs.typed(Int32.self), blockExperts.typed(Int32.self),
                                         paddedCount.typed(Int32.self), intermediate.pointer, workspace.pointer))
    }

    public func stage2(_ problem: moe_problem, _ weights: moe_weights, intermediate: DeviceBuffer, ids: DeviceBuffer, topkWeights: DeviceBuffer,
                       sortedPairs: DeviceBuffer, blockExperts: DeviceBuffer, paddedCount: DeviceBuffer, output: DeviceBuffer, workspace: DeviceBuffer) throws {
        var p = problem, w = weights
        try check("moe_stage2", fnStage2(&p, &w, intermediate.pointer, ids.typed(Int32.self), topkWeights.typed(Float.self), sortedPairs.typed(Int32.self),
                                         blockExperts.typed(Int32.self), paddedCount.typed(Int32.self), output.pointer, workspace.pointer))
    }

    public func forward(_ problem: moe_problem, _ weights: moe_weights, x: DeviceBuffer, output: DeviceBuffer, workspace: DeviceBuffer) throws {
        var p = problem, w = weights
        try check("moe_forward", fnForward(&p, &w, x.pointer, output.pointer, workspace.pointer))
    }

    /// Whether the library can generate counter-based test data on the device.
    public var canFillCounter: Bool { fnFill != nil }

    public func fillCounter(_ dst: DeviceBuffer, kind: Int32, count: Int, seed: UInt64, stream: UInt64, offset: Int, param: Int32) throws {
        guard let fnFill else { throw KernelError(function: "moe_fill_counter", status: Status.unsupported.rawValue, message: "not exported by \(path)") }
        try check("moe_fill_counter", fnFill(dst.pointer, kind, Int64(count), seed, stream, Int64(offset), param))
    }

    /// Names of the faults this build can inject (empty for a build without fault injection).
    public var faultNames: [String] {
        guard let f = fnFaultNames, let s = f() else { return [] }
        return String(cString: s).split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    public func setFault(_ name: String?) throws {
        guard let fnSetFault else { throw KernelError(function: "moe_set_fault", status: Status.unsupported.rawValue, message: "not exported by \(path)") }
        try check("moe_set_fault(\(name ?? "none"))", name.map { n in n.withCString { fnSetFault($0) } } ?? fnSetFault(nil))
    }
}

/// Device memory owned by Swift: freed through the library when the last reference goes away.
public final class DeviceBuffer: @unchecked Sendable {
    public let library: KernelLibrary
    public let pointer: UnsafeMutableRawPointer
    public let bytes: Int

    init(library: KernelLibrary, pointer: UnsafeMutableRawPointer, bytes: Int) {
        self.library = library
        self.pointer = pointer
        self.bytes = bytes
    }

    deinit { library.free(pointer) }

    func typed<T>(_: T.Type) -> UnsafeMutablePointer<T> { pointer.assumingMemoryBound(to: T.self) }

    /// Uploads an array.
    public func upload<T>(_ values: [T]) throws {
        try values.withUnsafeBytes { try library.copy(toDevice: self, from: $0) }
    }

    /// Downloads `count` elements of `T`, starting `offset` elements into the buffer.
    public func download<T>(_: T.Type, count: Int, offset: Int = 0) throws -> [T] {
        let stride = MemoryLayout<T>.stride
        precondition(offset >= 0 && (offset + count) * stride <= bytes)
        guard count > 0 else { return [] }
        return try [T](unsafeUninitializedCapacity: count) { buf, n in
            try library.copy(toHost: UnsafeMutableRawBufferPointer(buf), from: self, byteOffset: offset * stride)
            n = count
        }
    }
}
