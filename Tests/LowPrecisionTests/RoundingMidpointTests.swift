import LowPrecision
import Testing
import MoECheckTestSupport

/// Adjacent finite values (a, b) of a format with |a| < |b|, both signs, as codes.
///
/// On the negative side of fnuz the pair next to zero is (0x00, 0x81): there is no −0.
func adjacentPairs(_ format: ReferenceFormat) -> [(a: UInt32, b: UInt32)] {
    let positive = format.positiveFiniteCodes
    var pairs: [(a: UInt32, b: UInt32)] = []
    pairs.reserveCapacity(2 * positive.count)
    for i in 0..<(positive.count - 1) {
        pairs.append((positive[i], positive[i + 1]))
        pairs.append((format.negated(positive[i]), format.negated(positive[i + 1])))
    }
    return pairs
}

@Suite("Round to nearest even at every midpoint", .tags(.exhaustive))
struct RoundingMidpointTests {
    @Test("Exact midpoints round to the even code; one ulp (Double or Float) either side rounds to the nearer",
          arguments: EncoderUnderTest.all)
    func midpointsRoundToEven(encoder: EncoderUnderTest) {
        let format = encoder.format.reference
        var log = FailureLog("\(encoder) midpoints")
        for (a, b) in adjacentPairs(format) {
            let va = format.value(a), vb = format.value(b)
            let midpoint = (va + vb) / 2  // exact: both have at most 11 significant bits
            let even = a & 1 == 0 ? a : b
            // Probes just off the midpoint, in the precision the entry point takes.
            let towardA: Double, towardB: Double
            if encoder.takesFloat {
                let m = Float(midpoint)
                log.check(Double(m) == midpoint, "midpoint \(midpoint) of \(format.hex(a))/\(format.hex(b)) is not a Float")
                towardA = Double(va < vb ? m.nextDown : m.nextUp)
                towardB = Double(va < vb ? m.nextUp : m.nextDown)
            } else {
                towardA = va < vb ? midpoint.nextDown : midpoint.nextUp
                towardB = va < vb ? midpoint.nextUp : midpoint.nextDown
            }
            let atMid = encoder.encode(midpoint)
            log.check(atMid == even,
                      "midpoint \(midpoint) of \(format.hex(a)) (\(va)) and \(format.hex(b)) (\(vb)) gave \(format.hex(atMid)), want even \(format.hex(even))")
            let nearA = encoder.encode(towardA)
            log.check(nearA == a, "\(towardA) (just inside \(va)'s half) gave \(format.hex(nearA)), want \(format.hex(a))")
            let nearB = encoder.encode(towardB)
            log.check(nearB == b, "\(towardB) (just inside \(vb)'s half) gave \(format.hex(nearB)), want \(format.hex(b))")
        }
        log.finish()
    }

    @Test("Every value round-trips code → value → code (infinities and −0 included)", arguments: EncoderUnderTest.all)
    func everyValueRoundTrips(encoder: EncoderUnderTest) {
        let format = encoder.format.reference
        var log = FailureLog("\(encoder) round trip")
        for code in 0..<UInt32(format.codeCount) {
            let v = format.value(code)
            if v.isNaN { continue }
            let back = encoder.encode(v)
            log.check(back == code, "code \(format.hex(code)) = \(v) encodes back to \(format.hex(back))")
        }
        log.finish()
    }

    @Test("BFloat16.bits(Double) rounds once: a Double just past a bf16 midpoint that Float rounds onto the midpoint")
    func bfloat16DoubleAvoidsDoubleRounding() {
        // The textbook case: 1 + 2^-8 is halfway between 1 (0x3F80) and 1 + 2^-7 (0x3F81).
        let x = (1 + powerOfTwo(-8)).nextUp
        #expect(Double(Float(x)) == 1 + powerOfTwo(-8), "Float(\(x)) should land exactly on the midpoint")
        #expect(BFloat16.bits(Float(x)) == 0x3F80, "through Float the tie goes to the even code 0x3F80")
        #expect(BFloat16.bits(x) == 0x3F81, "bits(Double \(x)) must give 0x3F81, it is above the midpoint")

        // The same trap next to every pair whose tie goes to the lower-magnitude code.
        let format = ReferenceFormat.bfloat16
        var log = FailureLog("bf16 double rounding")
        var trapsSeen = 0
        for (a, b) in adjacentPairs(format) where a & 1 == 0 {
            let va = format.value(a), vb = format.value(b)
            let midpoint = (va + vb) / 2
            let beyond = va < vb ? midpoint.nextUp : midpoint.nextDown
            guard Double(Float(beyond)) == midpoint else { continue }
            trapsSeen += 1
            let single = BFloat16.bits(beyond)
            log.check(UInt32(single) == b,
                      "Double \(beyond) just past the midpoint of \(format.hex(a))/\(format.hex(b)) gave \(format.hex(UInt32(single))), want \(format.hex(b))")
        }
        log.finish()
        #expect(trapsSeen > 30_000, "expected a double-rounding trap at nearly every even pair, saw \(trapsSeen)")
    }

    @Test("SmallFloatFormat.round agrees with the reference grid at midpoints", arguments: [
        (SmallFloatFormat.bfloat16, ReferenceFormat.bfloat16), (.float16, .float16), (.e4m3fn, .e4m3fn), (.e4m3fnuz, .e4m3fnuz),
    ])
    func genericRoundAtMidpoints(format: SmallFloatFormat, reference: ReferenceFormat) {
        var log = FailureLog("SmallFloatFormat.\(format).round")
        for (a, b) in adjacentPairs(reference) {
            let va = reference.value(a), vb = reference.value(b)
            let midpoint = (va + vb) / 2
            let even = reference.value(a & 1 == 0 ? a : b)
            let r = format.round(midpoint)
            log.check(sameValue(r, even), "round(\(midpoint)) = \(r), want \(even)")
            let u = format.ulp(of: va)
            log.check(u == reference.ulp(of: va), "ulp(of: \(va)) = \(u), want \(reference.ulp(of: va))")
        }
        log.finish()
    }
}
