import Foundation
import Testing
import TensorIO
import MoECheckTestSupport

/// `Tensor.decode` reports whether every stored value it decoded is finite, read from the stored
/// bits in the decoding pass (the float32 reference's hot path relies on it to reject NaN/Inf
/// weights without a second scan). Expected answers come from each format's definition of a
/// non-finite code, not from the decoder.
@Suite("Decode finiteness flag")
struct DecodeFinitenessTests {
    /// Non-finite by the format definition: an all-ones exponent (IEEE-style formats), the
    /// S.1111.111 codes (e4m3fn), the single 0x80 code (e4m3fnuz).
    static func nonFinite(_ dtype: DType, _ bits: UInt64) -> Bool {
        switch dtype {
        case .f64: return (bits >> 52) & 0x7FF == 0x7FF
        case .f32: return (bits >> 23) & 0xFF == 0xFF
        case .f16: return (bits >> 10) & 0x1F == 0x1F
        case .bf16: return (bits >> 7) & 0xFF == 0xFF
        case .f8e4m3fn: return bits & 0x7F == 0x7F
        case .f8e4m3fnuz: return bits == 0x80
        default: return false
        }
    }

    /// Every code of the 1- and 2-byte formats; for f32/f64 every exponent with edge mantissas and signs.
    static func codes(_ dtype: DType) -> [UInt64] {
        switch dtype {
        case .f8e4m3fn, .f8e4m3fnuz: return (0..<256).map(UInt64.init)
        case .bf16, .f16: return (0..<65536).map(UInt64.init)
        case .f32:
            return (0..<256).flatMap { e in [0, 1, 0x40_0000, 0x7F_FFFF].flatMap { m in [0, 1].map { s in UInt64(s << 31 | e << 23 | m) } } }
        case .f64:
            return (0..<2048).flatMap { e in [0, 1, 0x8_0000_0000_0000, 0xF_FFFF_FFFF_FFFF].flatMap { m in [UInt64(0), 1].map { s in s << 63 | UInt64(e) << 52 | UInt64(m) } } }
        default: return []
        }
    }

    static func tensor(_ dtype: DType, _ codes: [UInt64]) -> Tensor {
        switch dtype.byteSize {
        case 1: return Tensor(bits: codes.map { UInt8($0) }, shape: [codes.count], dtype: dtype)
        case 2: return Tensor(bits: codes.map { UInt16($0) }, shape: [codes.count], dtype: dtype)
        case 4: return Tensor(bits: codes.map { UInt32($0) }, shape: [codes.count], dtype: dtype)
        default: return Tensor(bits: codes, shape: [codes.count], dtype: dtype)
        }
    }

    static func flags(_ t: Tensor, _ range: Range<Int>) -> (double: Bool, float: Bool) {
        var d = [Double](repeating: 0, count: Swift.max(range.count, 1))
        var f = [Float](repeating: 0, count: Swift.max(range.count, 1))
        let a = d.withUnsafeMutableBufferPointer { t.decode(range, into: $0.baseAddress!) }
        let b = f.withUnsafeMutableBufferPointer { t.decode(range, into: $0.baseAddress!) }
        return (a, b)
    }

    static let floatTypes: [DType] = [.f64, .f32, .f16, .bf16, .f8e4m3fn, .f8e4m3fnuz]

    @Test("each code alone: the flag matches the format's definition", arguments: floatTypes)
    func eachCode(_ dtype: DType) {
        let codes = Self.codes(dtype)
        let t = Self.tensor(dtype, codes)
        var wrong: [String] = []
        for (i, c) in codes.enumerated() {
            let expected = !Self.nonFinite(dtype, c)
            let (d, f) = Self.flags(t, i..<(i + 1))
            if d != expected || f != expected { wrong.append(String(c, radix: 16)) }
        }
        #expect(wrong.isEmpty, "\(dtype): wrong finiteness flag for codes 0x\(wrong.prefix(8).joined(separator: ", 0x")) (\(wrong.count) in all)")
        let anyBad = codes.contains { Self.nonFinite(dtype, $0) }
        let whole = Self.flags(t, 0..<codes.count)
        #expect(whole.double == !anyBad && whole.float == !anyBad, "\(dtype): flag over all \(codes.count) codes is \(whole), expected \(!anyBad)")
    }

    @Test("one non-finite value at every position of a 70-element run (vector bodies and tails)", arguments: floatTypes)
    func everyPosition(_ dtype: DType) {
        let codes = Self.codes(dtype)
        let finite = codes.filter { !Self.nonFinite(dtype, $0) && $0 != 0 }
        let bad = codes.filter { Self.nonFinite(dtype, $0) }
        let n = 70
        var missed: [Int] = []
        for p in 0..<n {
            var run = (0..<n).map { finite[($0 * 37) % finite.count] }
            run[p] = bad[p % bad.count]
            let t = Self.tensor(dtype, run)
            let (d, f) = Self.flags(t, 0..<n)
            if d || f { missed.append(p) }
            // a range that stops short of (or starts after) the bad value is finite
            if p > 0 { let (d2, f2) = Self.flags(t, 0..<p); if !d2 || !f2 { missed.append(-p) } }
            if p < n - 1 { let (d3, f3) = Self.flags(t, (p + 1)..<n); if !d3 || !f3 { missed.append(-1000 - p) } }
        }
        #expect(missed.isEmpty, "\(dtype): wrong flag at positions \(missed) (negative: a finite sub-range was flagged)")
    }

    @Test("integer dtypes are always finite")
    func integers() {
        let t = Tensor(int32: [Int32.min, -1, 0, 1, Int32.max], shape: [5])
        let (d, f) = Self.flags(t, 0..<5)
        #expect(d && f, "i32 decode reported a non-finite value")
    }
}
