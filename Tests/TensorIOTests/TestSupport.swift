import Foundation
import Testing
import TensorIO
import MoECheckTestSupport

// Shared helpers of the TensorIO tests: scratch directories, raw safetensors bytes written by
// hand (never through SafetensorsWriter) and an error-text checker; the rest is in MoECheckTestSupport.

/// Raw safetensors bytes: an 8-byte little-endian length (or `headerLength` when given), the
/// header text verbatim, then `data`.
func rawSafetensors(header: String, data: [UInt8] = [], headerLength: UInt64? = nil) -> [UInt8] {
    let h = Array(header.utf8)
    var out: [UInt8] = []
    let n = headerLength ?? UInt64(h.count)
    for i in 0..<8 { out.append(UInt8(truncatingIfNeeded: n >> (8 * UInt64(i)))) }
    return out + h + data
}

func writeBytes(_ bytes: [UInt8], to url: URL) throws {
    try Data(bytes).write(to: url)
}

/// Runs `body`, which must throw a `TensorIOError` whose description contains every fragment
/// (`expectError` of the test-support target).
@discardableResult
func expectTensorIOError(_ label: String, mentions fragments: [String],
                         sourceLocation: SourceLocation = #_sourceLocation,
                         _ body: () throws -> Void) -> TensorIOError? {
    expectError(label, as: TensorIOError.self, mentions: fragments, sourceLocation: sourceLocation, body)
}

/// e4m3 decoded from its bit fields, written here independently of LowPrecision:
/// fn (bias 7, NaN 0x7F/0xFF, −0 = 0x80), fnuz (bias 8, NaN 0x80 only, no −0).
func referenceE4M3(_ code: UInt8, fnuz: Bool) -> Double {
    if fnuz && code == 0x80 { return .nan }
    if !fnuz && (code & 0x7F) == 0x7F { return .nan }
    let sign: Double = code & 0x80 != 0 ? -1 : 1
    let exponent = Int((code >> 3) & 0xF), mantissa = Double(code & 7)
    let bias = fnuz ? 8 : 7
    if exponent == 0 { return sign * mantissa * pow(2.0, Double(1 - bias - 3)) }
    return sign * (1 + mantissa / 8) * pow(2.0, Double(exponent - bias))
}

/// Bit pattern of a Float, for bf16 values that are exact in bf16.
func bf16Bits(exact x: Float) -> UInt16 {
    let u = x.bitPattern
    precondition(u & 0xFFFF == 0, "\(x) is not exact in bf16")
    return UInt16(u >> 16)
}
