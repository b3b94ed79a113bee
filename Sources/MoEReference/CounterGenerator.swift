import LowPrecision

/// Test data as a pure function of (seed, stream, index), in integer arithmetic only, so the
/// host and a GPU (`moe_fill_counter` in `Kernels/include/moe_kernels.h`) make identical bits and
/// a huge layer need never be materialized on the host (DESIGN §7). No `log`/`exp`/`cos`:
/// libm and a device math library would disagree.
public struct CounterGenerator: Sendable {
    public let seed: UInt64

    public init(seed: UInt64) { self.seed = seed }

    /// SplitMix64's output function (`SplitMix64.mix` in LowPrecision: one implementation).
    @inlinable @inline(__always)
    public static func mix64(_ x: UInt64) -> UInt64 { SplitMix64.mix(x) }

    /// Stream id of a tensor name (FNV-1a 64), so each tensor has its own sequence.
    public static func stream(_ name: String) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for b in name.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01B3 }
        return h
    }

    @inlinable @inline(__always)
    public func key(_ stream: UInt64) -> UInt64 { Self.mix64(seed ^ (stream &* 0xD1B5_4A32_D192_ED03)) }

    @inlinable @inline(__always)
    public static func z(key: UInt64, _ n: UInt64) -> UInt64 { mix64(key &+ n) }

    /// `MOE_FILL_BF16_INT`: bf16 bits of `m · 2^-param`, `m = (z>>32) % 255 − 127` (exact).
    @inlinable @inline(__always)
    public static func bf16Int(_ z: UInt64, param: Int) -> UInt16 {
        let m = Int((z >> 32) % 255) - 127
        let v = Float(m) * Float(sign: .plus, exponent: -param, significand: 1)
        return UInt16(truncatingIfNeeded: v.bitPattern >> 16)
    }

    /// `MOE_FILL_FP8_CODE`: sign, exponent field 4...8, random mantissa; never NaN or 0x80.
    @inlinable @inline(__always)
    public static func fp8Code(_ z: UInt64) -> UInt8 {
        UInt8(truncatingIfNeeded: (z >> 63) << 7 | (4 + (z >> 32) % 5) << 3 | (z >> 40) & 7)
    }

    /// `MOE_FILL_F32_POW2`: `2^-(param + (z>>32) % 4)`.
    @inlinable @inline(__always)
    public static func pow2Scale(_ z: UInt64, param: Int) -> Float {
        Float(sign: .plus, exponent: -(param + Int((z >> 32) % 4)), significand: 1)
    }

    public func fillBF16(_ out: UnsafeMutablePointer<UInt16>, count: Int, stream: UInt64, offset: Int, param: Int) {
        let k = key(stream)
        for i in 0..<count { out[i] = Self.bf16Int(Self.z(key: k, UInt64(offset + i)), param: param) }
    }

    public func fillFP8(_ out: UnsafeMutablePointer<UInt8>, count: Int, stream: UInt64, offset: Int) {
        let k = key(stream)
        for i in 0..<count { out[i] = Self.fp8Code(Self.z(key: k, UInt64(offset + i))) }
    }

    public func fillScales(_ out: UnsafeMutablePointer<Float>, count: Int, stream: UInt64, offset: Int, param: Int) {
        let k = key(stream)
        for i in 0..<count { out[i] = Self.pow2Scale(Self.z(key: k, UInt64(offset + i)), param: param) }
    }
}
