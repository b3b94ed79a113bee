import Testing
import LowPrecision
import MoECheckTestSupport

/// `SmallFloatFormat.round` and `ulp(of:)` take the exponent from the bits; they must give the
/// bits of the general formula (`Double.exponent`, `Double(sign:exponent:significand:)`) for every
/// input: random bit patterns (subnormal, huge, inf, NaN included), values near each format's
/// grid, and the special values.
struct BitExponentTests {
    static func ulpGeneral(_ f: SmallFloatFormat, _ x: Double) -> Double {
        let a = Swift.abs(x)
        let e = a == 0 ? f.minimumNormalExponent : Swift.max(Int(a.exponent), f.minimumNormalExponent)
        return Double(sign: .plus, exponent: e - (f.significandBits - 1), significand: 1)
    }

    static func roundGeneral(_ f: SmallFloatFormat, _ x: Double, saturating: Bool) -> Double {
        if x.isNaN { return .nan }
        let maxFinite = f.greatestFiniteMagnitude
        if x.isInfinite {
            if saturating { return x < 0 ? -maxFinite : maxFinite }
            return f.hasInfinity ? x : .nan
        }
        if x == 0 { return f.hasNegativeZero ? x : 0 }
        let a = Swift.abs(x)
        let e = Swift.max(Int(a.exponent), f.minimumNormalExponent)
        let q = e - (f.significandBits - 1)
        var r = (a * Double(sign: .plus, exponent: -q, significand: 1)).rounded(.toNearestOrEven)
        r = r * Double(sign: .plus, exponent: q, significand: 1)
        if r > maxFinite {
            if saturating { r = maxFinite } else { return f.hasInfinity ? (x < 0 ? -.infinity : .infinity) : .nan }
        }
        if r == 0 && !f.hasNegativeZero { return 0 }
        return x < 0 ? -r : r
    }

    static func same(_ a: Double, _ b: Double) -> Bool { a.bitPattern == b.bitPattern || (a.isNaN && b.isNaN) }

    @Test("round and ulp from the bits equal the general formula", arguments: SmallFloatFormat.allCases)
    func agrees(_ f: SmallFloatFormat) {
        var rng = SplitMix64(seed: 0x5EED_0000 &+ UInt64(f.significandBits))
        var values: [Double] = [0, -0.0, .infinity, -.infinity, .nan, .leastNonzeroMagnitude, .leastNormalMagnitude,
                                .greatestFiniteMagnitude, -.greatestFiniteMagnitude, f.greatestFiniteMagnitude, 0x1p-126, 0x1p-149, 0x1p-1022]
        for _ in 0..<200_000 {
            values.append(Double(bitPattern: rng.next()))   // any bits
            // near the format's grid: a random exponent in its range ± a few, a random significand
            let e = Int(rng.next() % 300) - 160
            let m = 1 + Double(rng.next() >> 11) * 0x1p-53
            values.append((rng.next() & 1 == 0 ? 1 : -1) * m * Double(sign: .plus, exponent: e, significand: 1))
        }
        var bad = 0
        for x in values {
            if !Self.same(f.ulp(of: x), Self.ulpGeneral(f, x)) { bad += 1 }
            for s in [false, true] where !Self.same(f.round(x, saturating: s), Self.roundGeneral(f, x, saturating: s)) { bad += 1 }
        }
        #expect(bad == 0, "\(bad) values differ from the general formula for \(f)")
    }
}
