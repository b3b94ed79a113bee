import Testing
import LowPrecision
import MoECheckTestSupport

/// The branch-free e4m3 → binary32 decode used on the hot paths equals the table for every code.
@Suite("FP8Codec.bits(e4m3:fnuz:)")
struct FP8BitsTests {
    @Test("all 256 codes of e4m3fn and e4m3fnuz match the decode table (NaN codes give NaN)", arguments: [false, true])
    func everyCode(_ fnuz: Bool) {
        let codec = fnuz ? FP8Codec.e4m3fnuz : FP8Codec.e4m3fn
        var wrong: [String] = []
        for code in 0..<256 {
            let expected = codec.value(UInt8(code))
            let got = Float(bitPattern: FP8Codec.bits(e4m3: UInt8(code), fnuz: fnuz))
            let same = expected.isNaN ? got.isNaN : got.bitPattern == expected.bitPattern
            if !same { wrong.append("0x\(String(code, radix: 16)): \(got) vs \(expected)") }
        }
        #expect(wrong.isEmpty, "\(fnuz ? "e4m3fnuz" : "e4m3fn"): \(wrong.count) codes differ: \(wrong.prefix(6))")
    }
}
