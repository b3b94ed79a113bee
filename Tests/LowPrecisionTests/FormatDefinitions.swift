import LowPrecision
import Testing
import MoECheckTestSupport

// Test support for the LowPrecision suites.
//
// `ReferenceFormat` decodes codes straight from the format definitions in FACTS §3
// (sign × 2^(e−bias) × (1 + m/2^mbits), subnormals, and each format's inf/NaN/−0 rules).
// It never calls the codecs under test, so the suites compare two independent implementations.

/// 2^k as a `Double` (exact for every k these formats need).
func powerOfTwo(_ k: Int) -> Double { Double(sign: .plus, exponent: k, significand: 1) }

/// A sign–exponent–mantissa format described only by its field widths, bias and special-value rule.
struct ReferenceFormat: Sendable, CustomStringConvertible {
    /// How the format spends codes on non-finite values and signed zero.
    enum SpecialValues: Sendable {
        /// IEEE 754: exponent all ones is ±infinity (mantissa 0) or NaN; −0 exists.
        case ieee
        /// OCP "fn": no infinities; S.1111.111 is NaN; −0 exists.
        case finiteNegativeZero
        /// "fnuz": no infinities; the negative-zero code (sign bit alone) is the only NaN.
        case finiteUnsignedZero
    }

    let name: String
    let exponentBits: Int
    let mantissaBits: Int
    let bias: Int
    let specials: SpecialValues

    var description: String { name }
    var codeCount: Int { 1 << (1 + exponentBits + mantissaBits) }
    var signBit: UInt32 { 1 << UInt32(exponentBits + mantissaBits) }
    var hexDigits: Int { codeCount > 256 ? 4 : 2 }

    static let bfloat16 = ReferenceFormat(name: "bf16", exponentBits: 8, mantissaBits: 7, bias: 127, specials: .ieee)
    static let float16 = ReferenceFormat(name: "fp16", exponentBits: 5, mantissaBits: 10, bias: 15, specials: .ieee)
    static let e4m3fn = ReferenceFormat(name: "e4m3fn", exponentBits: 4, mantissaBits: 3, bias: 7,
                                        specials: .finiteNegativeZero)
    static let e4m3fnuz = ReferenceFormat(name: "e4m3fnuz", exponentBits: 4, mantissaBits: 3, bias: 8,
                                          specials: .finiteUnsignedZero)

    /// The value of `code` by the format definition (NaN for NaN codes, ±infinity where defined).
    func value(_ code: UInt32) -> Double {
        precondition(Int(code) < codeCount, "\(name): code \(code) out of range")
        let negative = code & signBit != 0
        let exponentField = Int((code >> UInt32(mantissaBits)) & UInt32((1 << exponentBits) - 1))
        let mantissaField = Int(code & UInt32((1 << mantissaBits) - 1))
        let exponentAllOnes = exponentField == (1 << exponentBits) - 1
        let mantissaAllOnes = mantissaField == (1 << mantissaBits) - 1
        switch specials {
        case .ieee:
            if exponentAllOnes { return mantissaField == 0 ? (negative ? -.infinity : .infinity) : .nan }
        case .finiteNegativeZero:
            if exponentAllOnes && mantissaAllOnes { return .nan }
        case .finiteUnsignedZero:
            if code == signBit { return .nan }
        }
        let fraction = Double(mantissaField) / powerOfTwo(mantissaBits)
        let magnitude = exponentField == 0
            ? fraction * powerOfTwo(1 - bias)                       // subnormal: 0.m × 2^(1−bias)
            : (1 + fraction) * powerOfTwo(exponentField - bias)     // normal:    1.m × 2^(e−bias)
        return negative ? -magnitude : magnitude
    }

    /// Codes of the non-negative finite values in increasing order: 0, 1, 2, … up to the largest
    /// finite positive code (sign–magnitude formats order their positive codes by value).
    var positiveFiniteCodes: [UInt32] {
        var codes: [UInt32] = []
        var code: UInt32 = 0
        while code < signBit && value(code).isFinite { codes.append(code); code += 1 }
        return codes
    }

    /// The code of −value(`code`) for a positive-side code (fnuz has no −0: zero stays 0x00).
    func negated(_ code: UInt32) -> UInt32 {
        if code == 0 && specials == .finiteUnsignedZero { return 0 }
        return code | signBit
    }

    var greatestFiniteMagnitude: Double { value(positiveFiniteCodes.last!) }
    var smallestSubnormal: Double { powerOfTwo(1 - bias - mantissaBits) }

    /// Spacing of the format's values in the binade of `x` (subnormal spacing below the normals).
    func ulp(of x: Double) -> Double {
        let a = Swift.abs(x)
        let binade = a == 0 ? 1 - bias : Swift.max(Int(a.exponent), 1 - bias)
        return powerOfTwo(binade - mantissaBits)
    }

    func hex(_ code: UInt32) -> String {
        let digits = String(code, radix: 16, uppercase: true)
        return "0x" + String(repeating: "0", count: Swift.max(0, hexDigits - digits.count)) + digits
    }
}

/// A codec of the LowPrecision module paired with the reference definition of its format.
enum FormatUnderTest: String, CaseIterable, Sendable, CustomStringConvertible {
    case bfloat16 = "bf16"
    case float16 = "fp16"
    case e4m3fn
    case e4m3fnuz

    var description: String { rawValue }

    var reference: ReferenceFormat {
        switch self {
        case .bfloat16: return .bfloat16
        case .float16: return .float16
        case .e4m3fn: return .e4m3fn
        case .e4m3fnuz: return .e4m3fnuz
        }
    }

    /// Decodes with the codec under test.
    func decode(_ code: UInt32) -> Double {
        switch self {
        case .bfloat16: return Double(BFloat16.float(UInt16(code)))
        case .float16: return Float16Codec.value(UInt16(code))
        case .e4m3fn: return Double(FP8Codec.e4m3fn.value(UInt8(code)))
        case .e4m3fnuz: return Double(FP8Codec.e4m3fnuz.value(UInt8(code)))
        }
    }
}

/// One encoding entry point of the module, seen as Double → code.
struct EncoderUnderTest: Sendable, CustomStringConvertible {
    let name: String
    let format: FormatUnderTest
    /// The entry point takes `Float`: probes must be `Float` values (they are converted exactly).
    let takesFloat: Bool
    let encode: @Sendable (Double) -> UInt32

    var description: String { name }

    static let all: [EncoderUnderTest] = [
        EncoderUnderTest(name: "BFloat16.bits(Double)", format: .bfloat16, takesFloat: false) {
            UInt32(BFloat16.bits($0))
        },
        EncoderUnderTest(name: "BFloat16.bits(Float)", format: .bfloat16, takesFloat: true) {
            UInt32(BFloat16.bits(Float($0)))
        },
        EncoderUnderTest(name: "Float16Codec.bits(Double)", format: .float16, takesFloat: false) {
            UInt32(Float16Codec.bits($0))
        },
    ] + fp8Encoders(.e4m3fn, .e4m3fn) + fp8Encoders(.e4m3fnuz, .e4m3fnuz)

    /// The three fp8 entry points of `codec`: code(Double), code(Double, saturating), code(Float).
    static func fp8Encoders(_ codec: FP8Codec, _ format: FormatUnderTest) -> [EncoderUnderTest] {
        [EncoderUnderTest(name: "\(format).code(Double)", format: format, takesFloat: false) { UInt32(codec.code($0)) },
         EncoderUnderTest(name: "\(format).code(Double, saturating)", format: format, takesFloat: false) { UInt32(codec.code($0, saturating: true)) },
         EncoderUnderTest(name: "\(format).code(Float)", format: format, takesFloat: true) { UInt32(codec.code(Float($0))) }]
    }
}
