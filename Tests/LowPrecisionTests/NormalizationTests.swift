import LowPrecision
import Testing
import MoECheckTestSupport

@Suite("fn → fnuz normalization")
struct NormalizationTests {
    /// Scales whose products with every fp8 value stay normal in binary32 (no underflow, no overflow),
    /// so the comparison in Float is exact.
    static let scales: [Float] = [1, 0.5, 2, 1 / 448, 1 / 240, 3.0e-3, 7, 0.1, 1.0e-5, 0x1p-20, 12345.678, 1.0e30]

    @Test("code × scale is unchanged for every non-NaN fn code", arguments: scales)
    func productIsPreserved(scale: Float) {
        var log = FailureLog("fnToFnuz scale \(scale)")
        let fnuzScale = FP8Normalization.fnToFnuz(scale: scale)
        for code in UInt8.min...UInt8.max where code != 0x7F && code != 0xFF {
            let fnuzCode = FP8Normalization.fnToFnuz(code: code)
            let before = FP8Codec.e4m3fn.value(code) * scale
            let after = FP8Codec.e4m3fnuz.value(fnuzCode) * fnuzScale
            log.check(after == before && !after.isNaN,
                      "fn code 0x\(String(code, radix: 16)) → fnuz 0x\(String(fnuzCode, radix: 16)): \(after) != \(before)")
            // The same identity, exactly in Double (no rounding at all).
            let exactBefore = Double(FP8Codec.e4m3fn.value(code)) * Double(scale)
            let exactAfter = Double(FP8Codec.e4m3fnuz.value(fnuzCode)) * Double(fnuzScale)
            log.check(exactAfter == exactBefore, "fn code 0x\(String(code, radix: 16)) in Double: \(exactAfter) != \(exactBefore)")
        }
        log.finish()
    }

    @Test("fn −0 (0x80) becomes fnuz 0x00; every other byte is reinterpreted unchanged")
    func negativeZeroBecomesZero() {
        #expect(FP8Normalization.fnToFnuz(code: 0x80) == 0x00, "0x80 must not survive: it is NaN in fnuz")
        for code in UInt8.min...UInt8.max where code != 0x80 {
            #expect(FP8Normalization.fnToFnuz(code: code) == code, "code 0x\(String(code, radix: 16)) changed")
        }
        #expect(FP8Normalization.fnToFnuz(scale: 0.75) == 1.5, "fnToFnuz(scale: 0.75) must double the scale")
    }

    @Test("The in-place array form matches the scalar forms")
    func arrayFormMatchesScalar() {
        var codes = (0...255).map { UInt8($0) }.filter { $0 != 0x7F && $0 != 0xFF }
        var scales: [Float] = [0.25, 1, 3.5e-4]
        let originalCodes = codes, originalScales = scales
        FP8Normalization.fnToFnuz(codes: &codes, scales: &scales)
        #expect(codes == originalCodes.map { FP8Normalization.fnToFnuz(code: $0) }, "fnToFnuz(codes:scales:) codes differ from fnToFnuz(code:)")
        #expect(scales == originalScales.map { $0 * 2 }, "fnToFnuz(codes:scales:) must double every scale of \(originalScales)")
        #expect(!codes.contains(0x80), "no fnuz NaN may appear after normalizing finite fn codes")
    }

    /// fn NaN codes are NOT handled by the normalization: 0x7F/0xFF reinterpret to the finite fnuz
    /// values ±240, silently turning NaN into a number. Callers must reject (or count) fn NaN codes
    /// before normalizing; this test pins that documented hazard so a change to it is deliberate.
    @Test("fn NaN codes become finite ±240: callers must reject NaN before normalizing")
    func nanCodesMustBeRejectedFirst() {
        #expect(FP8Codec.e4m3fn.value(0x7F).isNaN && FP8Codec.e4m3fn.value(0xFF).isNaN, "e4m3fn 0x7F/0xFF are NaN")
        #expect(FP8Codec.e4m3fnuz.value(FP8Normalization.fnToFnuz(code: 0x7F)) == 240, "fn NaN 0x7F reinterprets as fnuz 240")
        #expect(FP8Codec.e4m3fnuz.value(FP8Normalization.fnToFnuz(code: 0xFF)) == -240, "fn NaN 0xFF reinterprets as fnuz -240")
    }
}
