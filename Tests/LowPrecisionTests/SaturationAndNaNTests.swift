import LowPrecision
import Testing
import MoECheckTestSupport

/// One edge case: an input, the entry point and the code FACTS §3 / torch / ml_dtypes give.
struct EdgeCase: Sendable, CustomTestStringConvertible {
    let input: Double
    let saturating: Bool
    let expected: UInt8
    var testDescription: String {
        "\(input)\(saturating ? " saturating" : "") → 0x\(String(expected, radix: 16, uppercase: true))"
    }
}

@Suite("Saturation, overflow and NaN edges")
struct SaturationAndNaNTests {
    static let e4m3fnCases: [EdgeCase] = [
        EdgeCase(input: 448, saturating: false, expected: 0x7E),
        EdgeCase(input: -448, saturating: false, expected: 0xFE),
        EdgeCase(input: 460, saturating: false, expected: 0x7E),            // torch: e4m3fn(460) = 448
        EdgeCase(input: 464, saturating: false, expected: 0x7E),            // midpoint 448|480, tie to even 0x7E
        EdgeCase(input: -464, saturating: false, expected: 0xFE),
        EdgeCase(input: 464.0000001, saturating: false, expected: 0x7F),    // past the midpoint: NaN
        EdgeCase(input: 464.0.nextUp, saturating: false, expected: 0x7F),
        EdgeCase(input: 464.0000001, saturating: true, expected: 0x7E),
        EdgeCase(input: -464.0000001, saturating: true, expected: 0xFE),
        EdgeCase(input: 480, saturating: false, expected: 0x7F),            // torch: e4m3fn(480) = NaN
        EdgeCase(input: -480, saturating: false, expected: 0x7F),
        EdgeCase(input: 480, saturating: true, expected: 0x7E),
        EdgeCase(input: 1e30, saturating: false, expected: 0x7F),
        EdgeCase(input: .infinity, saturating: false, expected: 0x7F),
        EdgeCase(input: -.infinity, saturating: false, expected: 0x7F),
        EdgeCase(input: .infinity, saturating: true, expected: 0x7E),
        EdgeCase(input: -.infinity, saturating: true, expected: 0xFE),
        EdgeCase(input: .nan, saturating: false, expected: 0x7F),
        EdgeCase(input: .nan, saturating: true, expected: 0x7F),
        EdgeCase(input: -.nan, saturating: false, expected: 0x7F),
        EdgeCase(input: 0x1p-9, saturating: false, expected: 0x01),          // smallest subnormal
        EdgeCase(input: 0x1p-10, saturating: false, expected: 0x00),         // half of it: tie to even 0
        EdgeCase(input: 0x1p-10.nextUp, saturating: false, expected: 0x01),
        EdgeCase(input: -0x1p-10, saturating: false, expected: 0x80),        // fn keeps −0
        EdgeCase(input: -0.0, saturating: false, expected: 0x80),
    ]

    static let e4m3fnuzCases: [EdgeCase] = [
        EdgeCase(input: 240, saturating: false, expected: 0x7F),
        EdgeCase(input: -240, saturating: false, expected: 0xFF),
        EdgeCase(input: 247.99, saturating: false, expected: 0x7F),
        EdgeCase(input: 248, saturating: false, expected: 0x80),            // midpoint 240|256 ties to 256: NaN
        EdgeCase(input: -248, saturating: false, expected: 0x80),
        EdgeCase(input: 248, saturating: true, expected: 0x7F),
        EdgeCase(input: -248, saturating: true, expected: 0xFF),
        EdgeCase(input: 1e30, saturating: true, expected: 0x7F),
        EdgeCase(input: .infinity, saturating: false, expected: 0x80),
        EdgeCase(input: .infinity, saturating: true, expected: 0x7F),
        EdgeCase(input: -.infinity, saturating: true, expected: 0xFF),
        EdgeCase(input: .nan, saturating: false, expected: 0x80),
        EdgeCase(input: .nan, saturating: true, expected: 0x80),
        EdgeCase(input: 0x1p-10, saturating: false, expected: 0x01),         // smallest subnormal
        // Negative values that round to zero must give 0x00: 0x80 is NaN in fnuz
        // (onnxruntime PR #18473 bug class).
        EdgeCase(input: -0.0, saturating: false, expected: 0x00),
        EdgeCase(input: -0.0, saturating: true, expected: 0x00),
        EdgeCase(input: -0x1p-11, saturating: false, expected: 0x00),        // tie between 0 and -2^-10
        EdgeCase(input: -0x1p-11, saturating: true, expected: 0x00),
        EdgeCase(input: -0x1p-12, saturating: false, expected: 0x00),
        EdgeCase(input: -1e-30, saturating: false, expected: 0x00),
        EdgeCase(input: -Double.leastNonzeroMagnitude, saturating: true, expected: 0x00),
        EdgeCase(input: -0x1p-11.nextUp, saturating: false, expected: 0x81),  // just past the tie: -2^-10
    ]

    @Test("e4m3fn edges (Double and Float entry points)", arguments: e4m3fnCases)
    func e4m3fnEdges(edge: EdgeCase) { Self.check(edge, on: .e4m3fn, named: "e4m3fn") }

    @Test("e4m3fnuz edges (Double and Float entry points)", arguments: e4m3fnuzCases)
    func e4m3fnuzEdges(edge: EdgeCase) { Self.check(edge, on: .e4m3fnuz, named: "e4m3fnuz") }

    /// The code of `edge.input` through the Double entry point, and through the Float one where
    /// the input is exact in Float (or NaN).
    static func check(_ edge: EdgeCase, on codec: FP8Codec, named name: String, sourceLocation: SourceLocation = #_sourceLocation) {
        let code = codec.code(edge.input, saturating: edge.saturating)
        #expect(code == edge.expected, "\(name).code(\(edge.input), saturating: \(edge.saturating)) = \(code)", sourceLocation: sourceLocation)
        let f = Float(edge.input)
        if Double(f) == edge.input || edge.input.isNaN {
            let fromFloat = codec.code(f, saturating: edge.saturating)
            #expect(fromFloat == edge.expected, "\(name).code(Float \(f), saturating: \(edge.saturating)) = \(fromFloat)", sourceLocation: sourceLocation)
        }
    }

    @Test("e4m3fnuz never produces 0x80 from a non-NaN input", arguments: [false, true])
    func e4m3fnuzNeverEmitsNaNCodeForNumbers(saturating: Bool) {
        var log = FailureLog("e4m3fnuz saturating: \(saturating)")
        var rng = SeededGenerator(seed: 0x5EED_F8)
        // Sweep the whole range around zero on a fine grid plus random magnitudes.
        var inputs: [Double] = (0...4096).map { -Double($0) * 0x1p-20 }
        for _ in 0..<20_000 { inputs.append(-Double.random(in: 0..<1, using: &rng) * powerOfTwo(Int.random(in: -40...7, using: &rng))) }
        for x in inputs {
            let code = FP8Codec.e4m3fnuz.code(x, saturating: saturating)
            log.check(code != 0x80, "input \(x) encoded to the NaN code 0x80")
            if FP8Codec.e4m3fnuz.round(x, saturating: saturating) == 0 {
                log.check(code == 0x00, "input \(x) rounds to zero but encoded to 0x\(String(code, radix: 16))")
                let r = FP8Codec.e4m3fnuz.round(x, saturating: saturating)
                log.check(r.sign == .plus, "round(\(x)) = -0 in a format without -0")
            }
        }
        log.finish()
    }

    @Test("bf16 overflow, NaN canonicalisation and the subnormal floor")
    func bfloat16Edges() {
        let maxBF16 = Float(bitPattern: 0x7F7F_0000)
        let overflowMidpoint = Double(maxBF16) + powerOfTwo(127 - 8)   // max + half ulp: ties to 0x7F80 (inf)
        #expect(BFloat16.bits(maxBF16) == 0x7F7F, "bf16 max")
        #expect(BFloat16.bits(Float.greatestFiniteMagnitude) == 0x7F80, "Float max overflows bf16 to +inf")
        #expect(BFloat16.bits(-Float.greatestFiniteMagnitude) == 0xFF80, "-Float max overflows bf16 to -inf")
        #expect(BFloat16.bits(Float(overflowMidpoint)) == 0x7F80, "max + half ulp ties to even = +inf (Float)")
        #expect(BFloat16.bits(overflowMidpoint) == 0x7F80, "max + half ulp ties to even = +inf (Double)")
        #expect(BFloat16.bits(overflowMidpoint.nextDown) == 0x7F7F, "just below max + half ulp stays max (Double)")
        #expect(BFloat16.bits(Float(overflowMidpoint).nextDown) == 0x7F7F, "just below max + half ulp stays max (Float)")
        #expect(BFloat16.bits(1e300) == 0x7F80 && BFloat16.bits(-1e300) == 0xFF80, "huge Doubles overflow to ±inf")
        #expect(BFloat16.bits(Float.infinity) == 0x7F80 && BFloat16.bits(-Float.infinity) == 0xFF80, "±inf (Float)")
        #expect(BFloat16.bits(Double.infinity) == 0x7F80 && BFloat16.bits(-Double.infinity) == 0xFF80, "±inf (Double)")

        // Every NaN, including payloads only in the low 16 bits (the naive rounding formula would turn
        // 0x7F800001 into +inf) and negative NaNs, becomes 0x7FC0.
        let floatNaNs: [UInt32] = [0x7FC0_0000, 0xFFC0_0000, 0x7F80_0001, 0xFF80_0001, 0x7F80_8000, 0x7FFF_FFFF,
                                   0xFFFF_FFFF, 0x7FA0_0000, 0x7F80_7FFF]
        for bits in floatNaNs {
            let code = BFloat16.bits(Float(bitPattern: bits))
            #expect(code == 0x7FC0, "Float NaN 0x\(String(bits, radix: 16)) gave 0x\(String(code, radix: 16))")
        }
        for nan in [Double.nan, -Double.nan, Double.signalingNaN, Double(bitPattern: 0x7FF0_0000_0000_0001)] {
            #expect(BFloat16.bits(nan) == 0x7FC0, "Double NaN \(nan.bitPattern) gave \(BFloat16.bits(nan))")
        }
        #expect(BFloat16.canonicalNaN == 0x7FC0, "bf16 canonical NaN is 0x7FC0")
        #expect(BFloat16.round(.nan).isNaN, "round(NaN)")

        // Subnormal floor: 2^-133 is the smallest subnormal, half of it ties to +0 (even), below gives 0.
        let tiny = powerOfTwo(-133)
        let cases: [(Double, UInt16)] = [
            (tiny, 0x0001), (-tiny, 0x8001), (tiny / 2, 0x0000), (-tiny / 2, 0x8000),
            ((tiny / 2).nextUp, 0x0001), ((tiny / 2).nextDown, 0x0000), (tiny / 3, 0x0000), (-tiny / 3, 0x8000),
            (tiny * 1.5, 0x0002), (powerOfTwo(-126), 0x0080), (powerOfTwo(-140), 0x0000), (1e-300, 0x0000),
        ]
        for (x, expected) in cases {
            let fromDouble = BFloat16.bits(x)
            #expect(fromDouble == expected, "bf16 bits(Double \(x)) = 0x\(String(fromDouble, radix: 16))")
            if Double(Float(x)) == x {
                let fromFloat = BFloat16.bits(Float(x))
                #expect(fromFloat == expected, "bf16 bits(Float \(x)) = 0x\(String(fromFloat, radix: 16))")
            }
        }
    }

    @Test("fp16 overflow at 65520, NaN and subnormal floor")
    func float16Edges() {
        let cases: [(Double, UInt16)] = [
            (65504, 0x7BFF), (-65504, 0xFBFF), (65519.99, 0x7BFF), (65520, 0x7C00), (-65520, 0xFC00),
            (70000, 0x7C00), (.infinity, 0x7C00), (-.infinity, 0xFC00), (powerOfTwo(-24), 0x0001),
            (powerOfTwo(-25), 0x0000), (powerOfTwo(-25).nextUp, 0x0001), (-powerOfTwo(-25), 0x8000),
            (-0.0, 0x8000), (powerOfTwo(-14), 0x0400), (1, 0x3C00), (-2, 0xC000),
        ]
        for (x, expected) in cases {
            let code = Float16Codec.bits(x)
            #expect(code == expected, "fp16 bits(\(x)) = 0x\(String(code, radix: 16)), want 0x\(String(expected, radix: 16))")
        }
        #expect(Float16Codec.bits(.nan) == 0x7E00 && Float16Codec.bits(-.nan) == 0x7E00, "fp16 NaN → 0x7E00")
    }

    @Test("Generic rounding saturates or overflows per format", arguments: SmallFloatFormat.allCases)
    func genericOverflow(format: SmallFloatFormat) {
        let m = format.greatestFiniteMagnitude
        let past = m * 1.5
        #expect(format.round(past, saturating: true) == m, "\(format) saturating round(\(past))")
        #expect(format.round(-past, saturating: true) == -m, "\(format) saturating round(\(-past))")
        let overflowed = format.round(past)
        if format.hasInfinity {
            #expect(overflowed == .infinity, "\(format) round(\(past)) should be +inf")
        } else {
            #expect(overflowed.isNaN, "\(format) round(\(past)) should be NaN (no infinities)")
        }
        #expect(format.round(.nan, saturating: true).isNaN, "\(format) NaN stays NaN even saturating")
    }
}
