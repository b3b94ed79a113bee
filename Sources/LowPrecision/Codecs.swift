/// bfloat16 bit-pattern codec.
///
/// Encoding from `Float` rounds to nearest, ties to even (`(u + 0x7FFF + ((u >> 16) & 1)) >> 16`),
/// overflows to ±infinity, and maps every NaN to the canonical quiet NaN `0x7FC0`.
/// Decoding is exact (a bf16 value is the upper half of a binary32).
public enum BFloat16 {
    public static let canonicalNaN: UInt16 = 0x7FC0

    /// bf16 bits nearest to `x` (RNE), canonical NaN.
    @inlinable @inline(__always)
    public static func bits(_ x: Float) -> UInt16 {
        let u = x.bitPattern
        if (u & 0x7FFF_FFFF) > 0x7F80_0000 { return canonicalNaN }
        return UInt16(truncatingIfNeeded: (u &+ 0x7FFF &+ ((u >> 16) & 1)) >> 16)
    }

    /// bf16 bits nearest to `x` (RNE, no double rounding through binary32), canonical NaN.
    @inlinable
    public static func bits(_ x: Double) -> UInt16 {
        let r = SmallFloatFormat.bfloat16.round(x)
        if r.isNaN { return canonicalNaN }
        return UInt16(truncatingIfNeeded: Float(r).bitPattern >> 16)
    }

    /// The value of bf16 `bits`, exactly.
    @inlinable @inline(__always)
    public static func float(_ bits: UInt16) -> Float {
        Float(bitPattern: UInt32(bits) << 16)
    }

    /// Rounds to the nearest bf16 value, returned as `Float`.
    @inlinable @inline(__always)
    public static func round(_ x: Float) -> Float { float(bits(x)) }

    /// Encodes a buffer (the hot loop: no allocation, vectorizable).
    @inlinable
    public static func encode(_ source: UnsafeBufferPointer<Float>, into destination: UnsafeMutableBufferPointer<UInt16>) {
        precondition(destination.count >= source.count)
        for i in 0..<source.count { destination[i] = bits(source[i]) }
    }

    /// Decodes a buffer exactly.
    @inlinable
    public static func decode(_ source: UnsafeBufferPointer<UInt16>, into destination: UnsafeMutableBufferPointer<Float>) {
        precondition(destination.count >= source.count)
        for i in 0..<source.count { destination[i] = float(source[i]) }
    }
}

/// IEEE binary16 codec through the generic rounding (used for safetensors F16 and to model
/// kernels that round split-K partial sums to fp16).
public enum Float16Codec {
    @inlinable
    public static func value(_ bits: UInt16) -> Double {
        let sign: Double = (bits & 0x8000) != 0 ? -1 : 1
        let exponent = Int((bits >> 10) & 0x1F)
        let mantissa = Double(bits & 0x3FF)
        if exponent == 0x1F { return mantissa == 0 ? sign * .infinity : .nan }
        if exponent == 0 { return sign * mantissa * 0x1p-24 }
        return sign * (1 + mantissa / 1024) * Double(sign: .plus, exponent: exponent - 15, significand: 1)
    }

    /// binary16 bits nearest to `x` (RNE); NaN → 0x7E00.
    @inlinable
    public static func bits(_ x: Double) -> UInt16 {
        let r = SmallFloatFormat.float16.round(x)
        if r.isNaN { return 0x7E00 }
        let sign: UInt16 = r.sign == .minus ? 0x8000 : 0
        let a = Swift.abs(r)
        if a.isInfinite { return sign | 0x7C00 }
        if a == 0 { return sign }
        if a < 0x1p-14 { return sign | UInt16(a * 0x1p24) }
        let e = Int(a.exponent)
        let m = UInt16((a / Double(sign: .plus, exponent: e, significand: 1) - 1) * 1024)
        return sign | UInt16(e + 15) << 10 | m
    }
}

/// FP8 E4M3 codecs for both variants.
///
/// - e4m3fn (OCP): bias 7, max 448 (0x7E), NaN 0x7F/0xFF, −0 = 0x80, no infinities.
/// - e4m3fnuz (MI300): bias 8, max 240 (0x7F), NaN = 0x80 only, no −0, no infinities.
///   For every code except 0x7F, 0x80, 0xFF, fnuz value = fn value / 2.
///
/// Encoding rounds to nearest even. Non-saturating (the `torch`/`ml_dtypes` cast) turns values
/// past the largest finite one into NaN; saturating (what quantizers do after clamping) clamps
/// to ±max. NaN encodes to 0x7F (fn) or 0x80 (fnuz). In fnuz a negative value that rounds to
/// zero encodes as 0x00, never 0x80.
public struct FP8Codec: Sendable {
    public let format: SmallFloatFormat
    /// Decoded value of every code, as Float (exact).
    public let table: [Float]

    public static let e4m3fn = FP8Codec(format: .e4m3fn)
    public static let e4m3fnuz = FP8Codec(format: .e4m3fnuz)

    public static func codec(for format: SmallFloatFormat) -> FP8Codec {
        switch format {
        case .e4m3fn: return .e4m3fn
        case .e4m3fnuz: return .e4m3fnuz
        default: preconditionFailure("FP8Codec: \(format) is not an fp8 format")
        }
    }

    private init(format: SmallFloatFormat) {
        self.format = format
        let bias = format == .e4m3fn ? 7 : 8
        var t = [Float](repeating: 0, count: 256)
        for code in 0..<256 {
            let negative = code & 0x80 != 0
            let e = (code >> 3) & 0xF
            let m = Float(code & 0x7)
            var v: Float
            if format == .e4m3fn && (code & 0x7F) == 0x7F {
                v = .nan
            } else if format == .e4m3fnuz && code == 0x80 {
                v = .nan
            } else if e == 0 {
                v = m / 8 * Float(sign: .plus, exponent: 1 - bias, significand: 1)
            } else {
                v = (1 + m / 8) * Float(sign: .plus, exponent: e - bias, significand: 1)
            }
            if negative && !v.isNaN { v = -v }
            t[code] = v
        }
        table = t
    }

    /// FP8_MAX of the format (448 or 240).
    public var maximum: Double { format.greatestFiniteMagnitude }

    /// The binary32 bits of e4m3 `code`, computed without a table or a branch so that loops over
    /// codes vectorize (a 256-entry table lookup is a gather per element): normal codes move
    /// their exponent and mantissa bits into place and rebias the exponent by 127 − bias;
    /// subnormal codes (exponent 0) are `m · 2^(1−bias−3)`, an exact int-to-float conversion and
    /// scaling; the NaN codes give the quiet NaN. Equal to `value(code).bitPattern` for every
    /// non-NaN code (tested for all 256 codes of both formats).
    @inlinable @inline(__always)
    public static func bits(e4m3 code: UInt8, fnuz: Bool) -> UInt32 {
        let x = UInt32(code)
        let mag = x & 0x7F
        let sign = (x & 0x80) << 24
        let rebias: UInt32 = fnuz ? 119 : 120
        let normal = (mag << 20) &+ (rebias << 23)
        let subnormal = (Float(mag & 0x7) * (fnuz ? 0x1p-10 : 0x1p-9)).bitPattern
        let v = sign | (mag >> 3 == 0 ? subnormal : normal)
        let isNaN = fnuz ? x == 0x80 : mag == 0x7F
        return isNaN ? 0x7FC0_0000 : v
    }

    /// The value of `code`, exactly (NaN for the format's NaN codes).
    @inlinable @inline(__always)
    public func value(_ code: UInt8) -> Float { table[Int(code)] }

    /// The code nearest to `x` (RNE), with the overflow rule of `saturating`.
    @inlinable
    public func code(_ x: Double, saturating: Bool = false) -> UInt8 {
        let r = format.round(x, saturating: saturating)
        let nanCode: UInt8 = format == .e4m3fn ? 0x7F : 0x80
        if r.isNaN { return nanCode }
        let bias = format == .e4m3fn ? 7 : 8
        let sign: UInt8 = r.sign == .minus ? 0x80 : 0
        let a = Swift.abs(r)
        // fnuz has no −0 (0x80 is its NaN): a zero result is always 0x00 there.
        if a == 0 { return format == .e4m3fnuz ? 0 : sign }
        let minNormal = Double(sign: .plus, exponent: 1 - bias, significand: 1)
        if a < minNormal {
            // subnormal: a = m/8 * 2^(1-bias)
            return sign | UInt8(a / minNormal * 8)
        }
        let e = Int(a.exponent)
        let m = UInt8((a / Double(sign: .plus, exponent: e, significand: 1) - 1) * 8)
        return sign | UInt8(e + bias) << 3 | m
    }

    @inlinable
    public func code(_ x: Float, saturating: Bool = false) -> UInt8 { code(Double(x), saturating: saturating) }

    /// Rounds to the nearest value of the format (saturating or not), as Double.
    @inlinable
    public func round(_ x: Double, saturating: Bool = false) -> Double { format.round(x, saturating: saturating) }
}

/// fn → fnuz normalization as MI300 deployments do it (sglang `normalize_e4m3fn_to_e4m3fnuz`):
/// the byte 0x80 (fn −0) becomes 0x00, every other byte is reinterpreted unchanged — which halves
/// its value — and the block scales are doubled, so `code × scale` is unchanged for every finite
/// code. fn NaN codes 0x7F/0xFF reinterpret to fnuz 240/−240: callers must reject NaN first.
public enum FP8Normalization {
    @inlinable
    public static func fnToFnuz(code: UInt8) -> UInt8 { code == 0x80 ? 0x00 : code }

    @inlinable
    public static func fnToFnuz(scale: Float) -> Float { scale * 2 }

    public static func fnToFnuz(codes: inout [UInt8], scales: inout [Float]) {
        for i in codes.indices { codes[i] = fnToFnuz(code: codes[i]) }
        for i in scales.indices { scales[i] = fnToFnuz(scale: scales[i]) }
    }
}
