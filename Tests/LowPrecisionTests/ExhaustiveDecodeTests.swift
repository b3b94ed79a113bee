import LowPrecision
import Testing
import MoECheckTestSupport

@Suite("Exhaustive decode against the format definitions", .tags(.exhaustive))
struct ExhaustiveDecodeTests {
    @Test("Every code decodes to the value its format definition gives", arguments: FormatUnderTest.allCases)
    func everyCodeMatchesDefinition(format: FormatUnderTest) {
        let reference = format.reference
        var log = FailureLog("\(format) decode")
        for code in 0..<UInt32(reference.codeCount) {
            let expected = reference.value(code)
            let actual = format.decode(code)
            log.check(sameValue(actual, expected),
                      "code \(reference.hex(code)) decodes to \(actual), definition gives \(expected)")
        }
        log.finish()
        #expect(log.checks == reference.codeCount, "\(format): checked \(log.checks) codes, want \(reference.codeCount)")
    }

    @Test("The reference definition reproduces the FACTS §3 table", arguments: FormatUnderTest.allCases)
    func referenceMatchesFactsTable(format: FormatUnderTest) {
        let r = format.reference
        switch format {
        case .bfloat16:
            #expect(r.greatestFiniteMagnitude == Double(Float(bitPattern: 0x7F7F_0000)), "bf16 max")
            #expect(r.value(0x0080) == powerOfTwo(-126), "bf16 min normal")
            #expect(r.value(0x0001) == powerOfTwo(-133), "bf16 min subnormal")
            #expect(r.value(0x7F80) == .infinity && r.value(0xFF80) == -.infinity, "bf16 infinities")
            #expect(r.value(0x7FC0).isNaN && r.value(0x7F81).isNaN && r.value(0xFFFF).isNaN, "bf16 NaNs")
        case .float16:
            #expect(r.greatestFiniteMagnitude == 65504, "fp16 max")
            #expect(r.value(0x0400) == powerOfTwo(-14), "fp16 min normal")
            #expect(r.value(0x0001) == powerOfTwo(-24), "fp16 min subnormal")
            #expect(r.value(0x7C00) == .infinity, "fp16 inf")
        case .e4m3fn:
            #expect(r.value(0x7E) == 448 && r.greatestFiniteMagnitude == 448, "e4m3fn max 448 = 0x7E")
            #expect(r.value(0x08) == powerOfTwo(-6), "e4m3fn min normal")
            #expect(r.value(0x01) == powerOfTwo(-9), "e4m3fn min subnormal")
            #expect(r.value(0x7F).isNaN && r.value(0xFF).isNaN, "e4m3fn NaN 0x7F, 0xFF")
            #expect(r.value(0x80) == 0 && r.value(0x80).sign == .minus, "e4m3fn 0x80 = -0")
            #expect((0..<256).filter { r.value(UInt32($0)).isNaN } == [0x7F, 0xFF], "e4m3fn has exactly two NaNs")
        case .e4m3fnuz:
            #expect(r.value(0x7F) == 240 && r.greatestFiniteMagnitude == 240, "e4m3fnuz max 240 = 0x7F")
            #expect(r.value(0x08) == powerOfTwo(-7), "e4m3fnuz min normal")
            #expect(r.value(0x01) == powerOfTwo(-10), "e4m3fnuz min subnormal")
            #expect((0..<256).filter { r.value(UInt32($0)).isNaN } == [0x80], "e4m3fnuz NaN is 0x80 only")
            #expect(!(0..<256).contains { r.value(UInt32($0)) == 0 && r.value(UInt32($0)).sign == .minus },
                    "e4m3fnuz has no -0")
        }
        #expect((0..<r.codeCount).allSatisfy { !r.value(UInt32($0)).isInfinite } == (r.specials != .ieee),
                "\(format): only IEEE formats have infinities")
    }

    @Test("fnuz value is half the fn value for every code but 0x7F, 0x80, 0xFF")
    func fnuzIsHalfOfFn() {
        var log = FailureLog("e4m3fnuz vs e4m3fn")
        for code in UInt8.min...UInt8.max where ![0x7F, 0x80, 0xFF].contains(code) {
            let fn = FP8Codec.e4m3fn.value(code), fnuz = FP8Codec.e4m3fnuz.value(code)
            log.check(fnuz == fn / 2, "code \(code): fnuz \(fnuz) != fn \(fn) / 2")
        }
        log.finish()
    }

    #if !(os(macOS) && arch(x86_64))
    @Test("The fp16 reference agrees with Swift's native Float16 on all 65,536 codes")
    func float16ReferenceAgreesWithNativeFloat16() {
        var log = FailureLog("fp16 reference vs Float16")
        for code in 0...UInt32(UInt16.max) {
            let native = Double(Float16(bitPattern: UInt16(code)))
            let reference = ReferenceFormat.float16.value(code)
            log.check(sameValue(native, reference), "code \(ReferenceFormat.float16.hex(code)): Float16 \(native), reference \(reference)")
        }
        log.finish()
    }
    #endif

    @Test("The fp8 decode tables are exact Float copies of the definition", arguments: [FormatUnderTest.e4m3fn, .e4m3fnuz])
    func fp8TableHasEveryCode(format: FormatUnderTest) {
        let codec = format == .e4m3fn ? FP8Codec.e4m3fn : FP8Codec.e4m3fnuz
        #expect(codec.table.count == 256, "\(format) table size")
        #expect(codec.maximum == format.reference.greatestFiniteMagnitude, "\(format) maximum")
    }
}
