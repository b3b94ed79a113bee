import Foundation
import LowPrecision

/// Element types of safetensors files that MoECheck reads and writes.
public enum DType: String, CaseIterable, Sendable, Codable, CustomStringConvertible {
    case f64 = "F64", f32 = "F32", f16 = "F16", bf16 = "BF16"
    case i64 = "I64", i32 = "I32", u8 = "U8"
    /// OCP e4m3fn (safetensors `F8_E4M3`).
    case f8e4m3fn = "F8_E4M3"
    /// AMD e4m3fnuz (safetensors ≥ 0.8.0 `F8_E4M3FNUZ`).
    case f8e4m3fnuz = "F8_E4M3FNUZ"

    public var description: String { rawValue }

    public var byteSize: Int {
        switch self {
        case .f64, .i64: return 8
        case .f32, .i32: return 4
        case .f16, .bf16: return 2
        case .u8, .f8e4m3fn, .f8e4m3fnuz: return 1
        }
    }

    public var isFloatingPoint: Bool {
        switch self {
        case .i64, .i32, .u8: return false
        default: return true
        }
    }

    /// The fp8 format of an fp8 dtype.
    public var fp8Format: SmallFloatFormat? {
        switch self {
        case .f8e4m3fn: return .e4m3fn
        case .f8e4m3fnuz: return .e4m3fnuz
        default: return nil
        }
    }
}

/// An error reading or writing tensors: which file, which tensor, what is wrong.
public struct TensorIOError: Error, CustomStringConvertible, Sendable {
    public let file: String
    public let tensor: String?
    public let problem: String

    public init(file: String, tensor: String? = nil, _ problem: String) {
        self.file = file
        self.tensor = tensor
        self.problem = problem
    }

    public var description: String {
        if let tensor { return "\(file): tensor '\(tensor)': \(problem)" }
        return "\(file): \(problem)"
    }
}

/// Bytes that a tensor views: a region of a memory-mapped file or an owned allocation.
public final class ByteStorage: @unchecked Sendable {
    public let base: UnsafeRawPointer
    public let count: Int
    private let release: () -> Void

    init(base: UnsafeRawPointer, count: Int, release: @escaping () -> Void) {
        self.base = base
        self.count = count
        self.release = release
    }

    /// Copies `bytes` into a new owned allocation.
    public convenience init(copying bytes: UnsafeRawBufferPointer) {
        let p = UnsafeMutableRawPointer.allocate(byteCount: Swift.max(bytes.count, 1), alignment: 64)
        if bytes.count > 0 { p.copyMemory(from: bytes.baseAddress!, byteCount: bytes.count) }
        self.init(base: UnsafeRawPointer(p), count: bytes.count, release: { p.deallocate() })
    }

    /// A zeroed owned allocation that `fill` writes once.
    public convenience init(count: Int, fill: (UnsafeMutableRawBufferPointer) -> Void) {
        let p = UnsafeMutableRawPointer.allocate(byteCount: Swift.max(count, 1), alignment: 64)
        p.initializeMemory(as: UInt8.self, repeating: 0, count: Swift.max(count, 1))
        fill(UnsafeMutableRawBufferPointer(start: p, count: count))
        self.init(base: UnsafeRawPointer(p), count: count, release: { p.deallocate() })
    }

    deinit { release() }
}

/// A dense row-major tensor of one `DType`, viewing bytes it keeps alive.
public struct Tensor: @unchecked Sendable {
    public let dtype: DType
    public let shape: [Int]
    public let storage: ByteStorage
    public let byteOffset: Int

    public init(dtype: DType, shape: [Int], storage: ByteStorage, byteOffset: Int = 0) {
        precondition(byteOffset + shape.reduce(1, *) * dtype.byteSize <= storage.count, "Tensor: view past its storage")
        self.dtype = dtype
        self.shape = shape
        self.storage = storage
        self.byteOffset = byteOffset
    }

    public var elementCount: Int { shape.reduce(1, *) }
    public var byteCount: Int { elementCount * dtype.byteSize }
    public var rawBytes: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: storage.base + byteOffset, count: byteCount)
    }

    // MARK: making tensors

    /// Encodes `values` into `dtype` (floating types round to nearest even; fp8 non-saturating,
    /// integer types require integral values).
    public init(_ values: [Double], shape: [Int], dtype: DType) {
        precondition(values.count == shape.reduce(1, *), "Tensor: \(values.count) values for shape \(shape)")
        let storage = ByteStorage(count: values.count * dtype.byteSize) { raw in
            Tensor.encode(values, dtype: dtype, into: raw)
        }
        self.init(dtype: dtype, shape: shape, storage: storage)
    }

    public init(_ values: [Float], shape: [Int], dtype: DType) {
        self.init(values.map(Double.init), shape: shape, dtype: dtype)
    }

    public init(int32 values: [Int32], shape: [Int]) {
        self.init(values.map(Double.init), shape: shape, dtype: .i32)
    }

    /// Wraps raw codes (e.g. fp8 bytes or bf16 bit patterns) without conversion.
    public init<T>(bits: [T], shape: [Int], dtype: DType) {
        precondition(MemoryLayout<T>.stride == dtype.byteSize && bits.count == shape.reduce(1, *),
                     "Tensor(bits:): element size or count does not match \(dtype) \(shape)")
        let storage = bits.withUnsafeBytes { ByteStorage(copying: $0) }
        self.init(dtype: dtype, shape: shape, storage: storage)
    }

    static func encode(_ values: [Double], dtype: DType, into raw: UnsafeMutableRawBufferPointer) {
        switch dtype {
        case .f64: for (i, v) in values.enumerated() { raw.storeBytes(of: v, toByteOffset: i * 8, as: Double.self) }
        case .f32: for (i, v) in values.enumerated() { raw.storeBytes(of: Float(v), toByteOffset: i * 4, as: Float.self) }
        case .f16: for (i, v) in values.enumerated() { raw.storeBytes(of: Float16Codec.bits(v), toByteOffset: i * 2, as: UInt16.self) }
        case .bf16: for (i, v) in values.enumerated() { raw.storeBytes(of: BFloat16.bits(v), toByteOffset: i * 2, as: UInt16.self) }
        case .i64: for (i, v) in values.enumerated() { raw.storeBytes(of: Int64(v), toByteOffset: i * 8, as: Int64.self) }
        case .i32: for (i, v) in values.enumerated() { raw.storeBytes(of: Int32(v), toByteOffset: i * 4, as: Int32.self) }
        case .u8: for (i, v) in values.enumerated() { raw[i] = UInt8(v) }
        case .f8e4m3fn: for (i, v) in values.enumerated() { raw[i] = FP8Codec.e4m3fn.code(v) }
        case .f8e4m3fnuz: for (i, v) in values.enumerated() { raw[i] = FP8Codec.e4m3fnuz.code(v) }
        }
    }

    // MARK: reading values

    /// Decodes elements `range` (flat indices) exactly into `Double`; returns whether every
    /// stored value in the range is finite.
    @discardableResult
    public func decode(_ range: Range<Int>, into out: UnsafeMutablePointer<Double>) -> Bool { decodeAny(range, into: out) }

    /// Decodes elements `range` into `Float` (exact for every dtype but F64, I64 and I32);
    /// returns whether every stored value in the range is finite.
    @discardableResult
    public func decode(_ range: Range<Int>, into out: UnsafeMutablePointer<Float>) -> Bool { decodeAny(range, into: out) }

    /// Decodes elements `range` into `out` and returns whether every decoded element is finite.
    /// Finiteness is read from the stored bits in the same pass (an OR of `(exponent & mask) +
    /// lowest-exponent-bit`, whose top bit is set only for an all-ones exponent: no branch, so
    /// the loops vectorize). Integer dtypes are always finite.
    @_specialize(where T == Double)
    @_specialize(where T == Float)
    @discardableResult
    func decodeAny<T: BinaryFloatingPoint>(_ range: Range<Int>, into out: UnsafeMutablePointer<T>) -> Bool {
        precondition(range.lowerBound >= 0 && range.upperBound <= elementCount)
        let base = storage.base + byteOffset
        let n = range.count, s = range.lowerBound
        switch dtype {
        case .f64:
            let p = base.assumingMemoryBound(to: Double.self) + s
            let b = base.assumingMemoryBound(to: UInt64.self) + s
            var acc: UInt64 = 0
            for i in 0..<n { out[i] = T(p[i]); acc |= (b[i] & 0x7FF0_0000_0000_0000) &+ 0x0010_0000_0000_0000 }
            return acc & 0x8000_0000_0000_0000 == 0
        case .f32:
            let p = base.assumingMemoryBound(to: Float.self) + s
            let b = base.assumingMemoryBound(to: UInt32.self) + s
            var acc: UInt32 = 0
            for i in 0..<n { out[i] = T(p[i]); acc |= (b[i] & 0x7F80_0000) &+ 0x0080_0000 }
            return acc & 0x8000_0000 == 0
        case .f16:
            let p = base.assumingMemoryBound(to: UInt16.self) + s
            var acc: UInt16 = 0
            for i in 0..<n { out[i] = T(Float16Codec.value(p[i])); acc |= (p[i] & 0x7C00) &+ 0x0400 }
            return acc & 0x8000 == 0
        case .bf16:
            let p = base.assumingMemoryBound(to: UInt16.self) + s
            var acc: UInt16 = 0
            if T.self == Float.self {   // the hot path of the float32 mode: a shift, vectorized
                let o = UnsafeMutableRawPointer(out).assumingMemoryBound(to: Float.self)
                for i in 0..<n { o[i] = Float(bitPattern: UInt32(p[i]) << 16); acc |= (p[i] & 0x7F80) &+ 0x0080 }
            } else {
                for i in 0..<n { out[i] = T(Float(bitPattern: UInt32(p[i]) << 16)); acc |= (p[i] & 0x7F80) &+ 0x0080 }
            }
            return acc & 0x8000 == 0
        case .i64:
            let p = base.assumingMemoryBound(to: Int64.self) + s
            for i in 0..<n { out[i] = T(p[i]) }
            return true
        case .i32:
            let p = base.assumingMemoryBound(to: Int32.self) + s
            for i in 0..<n { out[i] = T(p[i]) }
            return true
        case .u8:
            let p = base.assumingMemoryBound(to: UInt8.self) + s
            for i in 0..<n { out[i] = T(p[i]) }
            return true
        case .f8e4m3fn, .f8e4m3fnuz:
            // one group with scale 1 (an exact multiplication): the same loop as the scaled decode
            var one: T = 1
            return decodeScaledFP8(range, group: Swift.max(n, 1), scales: &one, into: out)
        }
    }

    /// fp8 elements `range` times a scale per run of `group` elements (`scales[j]` for the j-th
    /// run from `range.lowerBound`), in one pass: `T(code value) · T(scale)`, the same bits as
    /// decoding and then scaling. Returns whether every code is finite (not a NaN code).
    @_specialize(where T == Double)
    @_specialize(where T == Float)
    func decodeScaledFP8<T: BinaryFloatingPoint>(_ range: Range<Int>, group: Int, scales: UnsafePointer<T>, into out: UnsafeMutablePointer<T>) -> Bool {
        precondition(range.lowerBound >= 0 && range.upperBound <= elementCount && dtype.fp8Format != nil && group > 0)
        let p = (storage.base + byteOffset).assumingMemoryBound(to: UInt8.self) + range.lowerBound
        let fnuz = dtype == .f8e4m3fnuz
        // e4m3 has no infinity; its NaN codes are 0x7F/0xFF (fn) and 0x80 (fnuz).
        var acc: UInt8 = 0
        var c0 = 0, j = 0
        while c0 < range.count {
            let c1 = Swift.min(range.count, c0 + group)
            let sc = scales[j]
            if fnuz {
                for i in c0..<c1 { out[i] = T(Float(bitPattern: FP8Codec.bits(e4m3: p[i], fnuz: true))) * sc; acc |= p[i] == 0x80 ? 0x80 : 0 }
            } else {
                for i in c0..<c1 { out[i] = T(Float(bitPattern: FP8Codec.bits(e4m3: p[i], fnuz: false))) * sc; acc |= (p[i] & 0x7F) &+ 1 }
            }
            c0 = c1
            j += 1
        }
        return acc & 0x80 == 0
    }

    /// All elements as `Double`, exactly.
    public func doubles() -> [Double] {
        [Double](unsafeUninitializedCapacity: elementCount) { buf, count in
            if elementCount > 0 { decode(0..<elementCount, into: buf.baseAddress!) }
            count = elementCount
        }
    }

    public func floats() -> [Float] { doubles().map(Float.init) }

    /// Raw bytes copied out as an array of `T` (bit patterns, codes, integers).
    public func bits<T>(as: T.Type) -> [T] {
        precondition(MemoryLayout<T>.stride == dtype.byteSize)
        return [T](unsafeUninitializedCapacity: elementCount) { buf, count in
            UnsafeMutableRawBufferPointer(buf).copyMemory(from: rawBytes)
            count = elementCount
        }
    }

    /// The first NaN or infinite element (flat index and value), if any.
    public func firstNonFinite() -> (index: Int, value: Double)? {
        guard dtype.isFloatingPoint else { return nil }
        let chunk = 1 << 16
        var buffer = [Double](repeating: 0, count: Swift.min(chunk, Swift.max(elementCount, 1)))
        var start = 0
        while start < elementCount {
            let end = Swift.min(start + chunk, elementCount)
            let found: Int? = buffer.withUnsafeMutableBufferPointer { b in
                decode(start..<end, into: b.baseAddress!)
                for i in 0..<(end - start) where !b[i].isFinite { return i }
                return nil
            }
            if let found { return (start + found, buffer[found]) }
            start = end
        }
        return nil
    }

    /// Multi-index of a flat index, for error messages.
    public func position(of flat: Int) -> [Int] {
        var rest = flat
        var out = [Int](repeating: 0, count: shape.count)
        for d in stride(from: shape.count - 1, through: 0, by: -1) where shape[d] > 0 {
            out[d] = rest % shape[d]
            rest /= shape[d]
        }
        return out
    }
}
