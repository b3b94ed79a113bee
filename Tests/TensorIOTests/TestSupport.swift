import Foundation
import Testing
import TensorIO

// Shared helpers of the TensorIO tests: scratch directories, raw safetensors bytes written by
// hand (never through SafetensorsWriter), a seeded generator and an error-text checker.

/// A fresh directory under the system temp directory, removed after `body`.
func withScratchDirectory<R>(_ label: String = #function, _ body: (URL) throws -> R) throws -> R {
    let safe = label.filter { $0.isLetter || $0.isNumber }
    let dir = FileManager.default.temporaryDirectory
        .appendingPathComponent("tensorio-\(safe.prefix(40))-\(UUID().uuidString)", isDirectory: true)
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: dir) }
    return try body(dir)
}

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

/// Runs `body`, which must throw a `TensorIOError` whose description contains every fragment.
/// Failures name `label` and quote the error text.
@discardableResult
func expectTensorIOError(_ label: String, mentions fragments: [String],
                         sourceLocation: SourceLocation = #_sourceLocation,
                         _ body: () throws -> Void) -> TensorIOError? {
    do {
        try body()
        Issue.record("\(label): expected a TensorIOError, but nothing was thrown", sourceLocation: sourceLocation)
        return nil
    } catch let error as TensorIOError {
        for fragment in fragments where !error.description.contains(fragment) {
            Issue.record("\(label): error text does not mention \"\(fragment)\": \(error.description)", sourceLocation: sourceLocation)
        }
        return error
    } catch {
        Issue.record("\(label): expected a TensorIOError, got \(type(of: error)): \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

/// SplitMix64: a small seeded generator, so every case is repeatable from its seed.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
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

/// The resident set size of this process in bytes (/proc/self/statm, field 2).
func residentBytes() -> Int? {
    guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return nil }
    let fields = text.split(separator: " ")
    guard fields.count > 1, let pages = Int(fields[1]) else { return nil }
    return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
}
