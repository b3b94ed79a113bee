/// The narrow binary floating-point formats that fused MoE kernels round to.
///
/// Every format here is described by four numbers — significand bits (with the implicit bit),
/// the exponent of the smallest normal value, the largest finite value and what happens past
/// it — so a single rounding routine serves all of them. Values are carried in `Double`,
/// which holds every value of every format exactly.
public enum SmallFloatFormat: String, CaseIterable, Sendable, CustomStringConvertible {
    /// bfloat16: 8 significand bits, bias 127, IEEE infinities and NaN.
    case bfloat16
    /// IEEE binary16: 11 significand bits, bias 15.
    case float16
    /// IEEE binary32, for modelling single-precision rounding points.
    case float32
    /// OCP FP8 E4M3 ("e4m3fn"): 4 significand bits, bias 7, max 448, no infinities,
    /// NaN = 0x7F / 0xFF, signed zero.
    case e4m3fn
    /// FP8 E4M3 FNUZ (AMD MI300, gfx942): 4 significand bits, bias 8, max 240, no infinities,
    /// no negative zero, the only NaN is 0x80.
    case e4m3fnuz

    public var description: String { rawValue }

    /// Significand bits including the implicit leading bit.
    public var significandBits: Int {
        switch self {
        case .bfloat16: return 8
        case .float16: return 11
        case .float32: return 24
        case .e4m3fn, .e4m3fnuz: return 4
        }
    }

    /// Exponent of the smallest normal number (values below are subnormal, spaced evenly).
    public var minimumNormalExponent: Int {
        switch self {
        case .bfloat16, .float32: return -126
        case .float16: return -14
        case .e4m3fn: return -6
        case .e4m3fnuz: return -7
        }
    }

    /// Largest finite magnitude.
    public var greatestFiniteMagnitude: Double {
        switch self {
        case .bfloat16: return Double(Float(bitPattern: 0x7F7F_0000))
        case .float16: return 65504
        case .float32: return Double(Float.greatestFiniteMagnitude)
        case .e4m3fn: return 448
        case .e4m3fnuz: return 240
        }
    }

    /// Whether the format has infinities (otherwise overflow gives NaN unless saturating).
    public var hasInfinity: Bool {
        switch self {
        case .bfloat16, .float16, .float32: return true
        case .e4m3fn, .e4m3fnuz: return false
        }
    }

    /// Whether the format distinguishes −0 from +0.
    public var hasNegativeZero: Bool { self != .e4m3fnuz }

    /// Spacing of representable values around `x` (the unit in the last place of `|x|`).
    @inlinable
    public func ulp(of x: Double) -> Double {
        // the exponent from the bits (`Double.exponent` and `Double(sign:exponent:significand:)`
        // are slow): zero and subnormal doubles lie below every format's smallest normal; ±inf
        // and NaN give +inf, as the general formula does
        let biased = Int((x.bitPattern >> 52) & 0x7FF)
        if biased == 0x7FF { return .infinity }
        let e = biased == 0 ? minimumNormalExponent : Swift.max(biased - 1023, minimumNormalExponent)
        return Self.powerOfTwo(e - (significandBits - 1))
    }

    /// 2^k for k in −1022…1023 (every quantum and scale of these formats).
    @inlinable @inline(__always)
    static func powerOfTwo(_ k: Int) -> Double { Double(bitPattern: UInt64(k + 1023) << 52) }

    /// Rounds `x` to the nearest value of this format, ties to even.
    ///
    /// - Overflow: with `saturating`, magnitudes above the largest finite value clamp to it;
    ///   otherwise a result past the largest finite value becomes ±infinity where the format has
    ///   infinities and NaN where it has none (this matches `torch`/`ml_dtypes` casts, which are
    ///   non-saturating: e4m3fn(480) = NaN, e4m3fn(460) = 448).
    /// - NaN stays NaN; ±infinity saturates to ±max or stays infinite/NaN likewise.
    /// - Zero: e4m3fnuz has no −0, so −0 and negative values that round to zero give +0.
    @inlinable
    public func round(_ x: Double, saturating: Bool = false) -> Double {
        if x.isNaN { return .nan }
        let maxFinite = greatestFiniteMagnitude
        if x.isInfinite {
            if saturating { return x < 0 ? -maxFinite : maxFinite }
            return hasInfinity ? x : .nan
        }
        if x == 0 { return hasNegativeZero ? x : 0 }
        let a = Swift.abs(x)
        // a is finite and non-zero: its exponent from the bits (subnormal doubles lie below every
        // format's smallest normal)
        let biased = Int(a.bitPattern >> 52)
        let e = biased == 0 ? minimumNormalExponent : Swift.max(biased - 1023, minimumNormalExponent)
        let quantumExponent = e - (significandBits - 1)   // −149…1020
        // Scaling by a power of two is exact for every exponent in these formats' range.
        var r = (a * Self.powerOfTwo(-quantumExponent)).rounded(.toNearestOrEven)
        r = r * Self.powerOfTwo(quantumExponent)
        if r > maxFinite {
            if saturating { r = maxFinite } else { return hasInfinity ? (x < 0 ? -.infinity : .infinity) : .nan }
        }
        if r == 0 && !hasNegativeZero { return 0 }
        return x < 0 ? -r : r
    }

    /// The two neighbours of the interval `[lo, hi]` after rounding: every value a correct
    /// computation that lands in `[lo, hi]` can round to lies in `[round(lo), round(hi)]`,
    /// because rounding is monotone.
    @inlinable
    public func roundedRange(_ lo: Double, _ hi: Double, saturating: Bool = false) -> (Double, Double) {
        (round(lo, saturating: saturating), round(hi, saturating: saturating))
    }
}
