import LowPrecision
import Testing
import MoECheckTestSupport

/// The two fp8 formats with their reference definitions.
let fp8Formats: [(SmallFloatFormat, ReferenceFormat)] = [(.e4m3fn, .e4m3fn), (.e4m3fnuz, .e4m3fnuz)]

/// Every (format, convention) combination a GroupQuantizer can be built with.
let groupQuantizerCases: [(SmallFloatFormat, ScaleConvention)] =
    [SmallFloatFormat.e4m3fn, .e4m3fnuz].flatMap { f in ScaleConvention.allCases.map { (f, $0) } }

func referenceFormat(_ format: SmallFloatFormat) -> ReferenceFormat {
    format == .e4m3fn ? .e4m3fn : .e4m3fnuz
}

/// Largest error allowed for an element `x` quantized with `scale` to the fp8 value `q`:
/// half an fp8 ulp (of the scaled value's binade) times the scale, plus `relativeSlack · |x|` for the
/// binary32 rounding of `x / scale` (or `x · fp32(1/scale)`) before the fp8 rounding.
func quantizationErrorBound(x: Float, scale: Float, q: Double, format: ReferenceFormat, relativeSlack: Double) -> Double {
    let exactScaled = Double(x) / Double(scale)
    let halfUlp = 0.5 * Swift.max(format.ulp(of: exactScaled), format.ulp(of: q))
    return halfUlp * Double(scale) + Swift.abs(Double(x)) * relativeSlack
}

/// Binary32 scale for `amax` as each convention defines it, written independently of the quantizer.
func expectedGroupScale(amax: Float, maximum: Double, convention: ScaleConvention) -> Float {
    let a = Swift.max(amax, Float(1e-10))
    switch convention {
    case .divide: return a / Float(maximum)
    case .multiplyReciprocal: return a * (1 / Float(maximum))
    }
}

/// Runs `GroupQuantizer.quantize(row:codes:scales:)` on an array.
func quantizeRow(_ quantizer: GroupQuantizer, _ row: [Float]) -> (codes: [UInt8], scales: [Float]) {
    var codes = [UInt8](repeating: 0xAA, count: row.count)
    var scales = [Float](repeating: -1, count: quantizer.groupCount(row.count))
    row.withUnsafeBufferPointer { r in
        codes.withUnsafeMutableBufferPointer { c in
            scales.withUnsafeMutableBufferPointer { s in quantizer.quantize(row: r, codes: c, scales: s) }
        }
    }
    return (codes, scales)
}

@Suite("GroupQuantizer (dynamic per-token 1×128 fp8)")
struct GroupQuantizerTests {
    @Test("Error ≤ half an fp8 ulp × scale; the short last group gets its own scale", arguments: groupQuantizerCases)
    func errorWithinHalfUlp(format: SmallFloatFormat, convention: ScaleConvention) {
        let reference = referenceFormat(format)
        let quantizer = GroupQuantizer(format: format, convention: convention)
        var rng = SeededGenerator(seed: 0xF8_0128)
        // 3 full groups and a 37-element tail, each group at its own magnitude; the tail is small so
        // a scale leaking from a previous group would show.
        let length = 3 * 128 + 37
        let magnitudes: [Float] = [1e-3, 10, 1000, 0.5]
        let row: [Float] = (0..<length).map { i in
            Float.random(in: -1...1, using: &rng) * magnitudes[i / 128]
        }
        let (codes, scales) = quantizeRow(quantizer, row)
        #expect(quantizer.groupCount(length) == 4 && scales.count == 4, "\(format) \(convention): 421 values → 4 groups")
        let fake = quantizer.fakeQuantize(row: row)
        let slack = convention == .divide ? 0x1p-23 : 0x1p-21
        var log = FailureLog("GroupQuantizer \(format) \(convention.rawValue)")
        for g in 0..<4 {
            let range = (g * 128)..<Swift.min(g * 128 + 128, length)
            let amax = row[range].map { Swift.abs($0) }.max()!
            let expectedScale = expectedGroupScale(amax: amax, maximum: reference.greatestFiniteMagnitude, convention: convention)
            log.check(scales[g] == expectedScale, "group \(g) (\(range)): scale \(scales[g]), want \(expectedScale)")
            for i in range {
                let q = reference.value(UInt32(codes[i]))
                log.check(q.isFinite, "group \(g) element \(i): x \(row[i]) gave the NaN code \(codes[i])")
                let err = Swift.abs(q * Double(scales[g]) - Double(row[i]))
                let bound = quantizationErrorBound(x: row[i], scale: scales[g], q: q, format: reference, relativeSlack: slack)
                log.check(err <= bound, "group \(g) element \(i): x \(row[i]) → code \(codes[i]) × \(scales[g]), error \(err) > \(bound)")
                log.check(fake[i] == q * Double(scales[g]), "element \(i): fakeQuantize \(fake[i]) != code × scale")
                if Swift.abs(row[i]) == amax {
                    log.check(Swift.abs(q) == reference.greatestFiniteMagnitude,
                              "group \(g) element \(i): the group maximum \(row[i]) should map to ±MAX, got \(q)")
                }
            }
        }
        log.finish()
    }

    @Test("An all-zero group uses amax 1e-10 and codes 0", arguments: groupQuantizerCases)
    func allZeroGroup(format: SmallFloatFormat, convention: ScaleConvention) {
        let reference = referenceFormat(format)
        let quantizer = GroupQuantizer(format: format, convention: convention)
        var row = (0..<300).map { Float($0 % 17) - 8 }
        for i in 128..<256 { row[i] = 0 }
        let (codes, scales) = quantizeRow(quantizer, row)
        let floorScale = expectedGroupScale(amax: 1e-10, maximum: reference.greatestFiniteMagnitude, convention: convention)
        #expect(scales[1] == floorScale, "\(format) \(convention.rawValue): zero group scale \(scales[1]), want 1e-10/MAX = \(floorScale)")
        #expect(quantizer.scale(amax: 0) == floorScale, "\(format) \(convention.rawValue): scale(amax: 0)")
        #expect(quantizer.scale(amax: 1e-12) == floorScale, "\(format) \(convention.rawValue): amax below 1e-10 is raised to 1e-10")
        #expect(codes[128..<256].allSatisfy { $0 == 0x00 }, "\(format) \(convention.rawValue): zero group codes")
        #expect(scales[0] != floorScale && scales[2] != floorScale, "neighbouring groups keep their own scales")
        // A row that is entirely zero: every group at the floor, no NaN from 0/0.
        let (zeroCodes, zeroScales) = quantizeRow(quantizer, [Float](repeating: 0, count: 200))
        #expect(zeroScales == [floorScale, floorScale] && zeroCodes.allSatisfy { $0 == 0 }, "\(format) \(convention.rawValue): all-zero row")
    }

    @Test("The two conventions' scales differ by at most one Float ulp", arguments: fp8Formats.map(\.0))
    func conventionsDifferByAtMostOneUlp(format: SmallFloatFormat) {
        let divide = GroupQuantizer(format: format, convention: .divide)
        let reciprocal = GroupQuantizer(format: format, convention: .multiplyReciprocal)
        var rng = SeededGenerator(seed: 0xA11CE)
        var log = FailureLog("\(format) divide vs multiply-reciprocal")
        var differing = 0
        for _ in 0..<100_000 {
            let amax = Float.random(in: 1..<2, using: &rng) * Float(powerOfTwo(Int.random(in: -30...30, using: &rng)))
            let a = divide.scale(amax: amax), b = reciprocal.scale(amax: amax)
            if a != b { differing += 1 }
            log.check(Swift.abs(a - b) <= a.ulp, "amax \(amax): divide \(a), multiply-reciprocal \(b) differ by more than one ulp")
        }
        log.finish()
        // FACTS §3 says they do differ sometimes; if they never did, this test would prove nothing.
        #expect(differing > 0, "\(format): expected some amax where the conventions disagree")
    }

    @Test("Values on the fp8 grid (q × scale) round-trip to the same codes", arguments: groupQuantizerCases)
    func gridValuesRoundTrip(format: SmallFloatFormat, convention: ScaleConvention) {
        let reference = referenceFormat(format)
        let quantizer = GroupQuantizer(format: format, convention: convention)
        let finiteCodes = (0...255).map { UInt8($0) }.filter { reference.value(UInt32($0)).isFinite }
        let maxCode = UInt8(reference.positiveFiniteCodes.last!)
        var rng = SeededGenerator(seed: 0x6E1D)
        var log = FailureLog("grid round trip \(format) \(convention.rawValue)")
        for trial in 0..<200 {
            // Power-of-two scales make q × scale exact; other scales round it to Float, which cannot
            // move it across an fp8 midpoint.
            let powerOfTwoScale = trial % 2 == 0
            let baseScale: Float = powerOfTwoScale
                ? Float(powerOfTwo(Int.random(in: -20...10, using: &rng)))
                : Float.random(in: 1e-4...10, using: &rng)
            var codes = (0..<128).map { _ in finiteCodes.randomElement(using: &rng)! }
            codes[Int.random(in: 0..<128, using: &rng)] = Bool.random(using: &rng) ? maxCode : maxCode | 0x80
            let row = codes.map { Float(reference.value(UInt32($0))) * baseScale }
            let (back, scales) = quantizeRow(quantizer, row)
            for i in 0..<128 {
                // fn 0x80 (−0) and 0x00 both decode to zero; compare values, then signs of zero.
                let want = reference.value(UInt32(codes[i])), got = reference.value(UInt32(back[i]))
                log.check(sameValue(got, want),
                          "trial \(trial) scale \(baseScale) element \(i): code 0x\(String(codes[i], radix: 16)) came back as 0x\(String(back[i], radix: 16)) (group scale \(scales[0]))")
            }
            if powerOfTwoScale && convention == .divide {
                log.check(scales[0] == baseScale, "trial \(trial): divide scale \(scales[0]) should be exactly \(baseScale)")
                let fake = quantizer.fakeQuantize(row: row)
                log.check(zip(fake, row).allSatisfy { $0 == Double($1) }, "trial \(trial): dequantized grid values are not exact")
            }
        }
        log.finish()
    }

    @Test("Group sizes other than 128 split rows the same way", arguments: [1, 32, 100])
    func otherGroupSizes(groupSize: Int) {
        let quantizer = GroupQuantizer(format: .e4m3fn, convention: .divide, groupSize: groupSize)
        let row = (0..<250).map { Float($0) - 125 }
        let (_, scales) = quantizeRow(quantizer, row)
        #expect(scales.count == (250 + groupSize - 1) / groupSize, "group size \(groupSize): scale count \(scales.count)")
        for g in scales.indices {
            let amax = row[(g * groupSize)..<Swift.min(250, (g + 1) * groupSize)].map { Swift.abs($0) }.max()!
            #expect(scales[g] == Swift.max(amax, 1e-10) / 448, "group size \(groupSize) group \(g): scale \(scales[g])")
        }
    }
}

@Suite("BlockQuantizer (static 128×128 weight tiles)")
struct BlockQuantizerTests {
    static let shapes: [(Int, Int)] = [(200, 300), (128, 128), (129, 257), (1, 1), (127, 1), (256, 130)]

    @Test("Tail tiles, scale shape and error ≤ half an fp8 ulp × tile scale", arguments: fp8Formats.map(\.0), shapes)
    func tilesAndError(format: SmallFloatFormat, shape: (Int, Int)) {
        let (rows, columns) = shape
        let reference = referenceFormat(format)
        let quantizer = BlockQuantizer(format: format)
        let (sr, sc) = quantizer.scaleShape(rows: rows, columns: columns)
        #expect(sr == (rows + 127) / 128 && sc == (columns + 127) / 128, "\(format) \(rows)x\(columns): scale shape \(sr)x\(sc)")
        var rng = SeededGenerator(seed: UInt64(rows * 1000 + columns))
        // Each tile at its own magnitude, so a wrong tile extent shows up as a wrong scale.
        var weights = [Float](repeating: 0, count: rows * columns)
        for r in 0..<rows {
            for c in 0..<columns {
                let tile = (r / 128) * sc + c / 128
                weights[r * columns + c] = Float.random(in: -1...1, using: &rng) * Float(powerOfTwo(3 * tile - 6))
            }
        }
        let (codes, scales) = quantizer.quantize(weights, rows: rows, columns: columns)
        #expect(codes.count == rows * columns && scales.count == sr * sc, "\(format) \(rows)x\(columns): output sizes")
        var out = [Double](repeating: .nan, count: rows * columns)
        codes.withUnsafeBufferPointer { c in
            scales.withUnsafeBufferPointer { s in
                out.withUnsafeMutableBufferPointer { o in quantizer.dequantize(codes: c, scales: s, rows: rows, columns: columns, into: o) }
            }
        }
        var log = FailureLog("BlockQuantizer \(format) \(rows)x\(columns)")
        for br in 0..<sr {
            for bc in 0..<sc {
                var amax: Float = 0
                for r in (br * 128)..<Swift.min(rows, br * 128 + 128) {
                    for c in (bc * 128)..<Swift.min(columns, bc * 128 + 128) { amax = Swift.max(amax, Swift.abs(weights[r * columns + c])) }
                }
                let want: Float = amax > 0 ? amax / Float(reference.greatestFiniteMagnitude) : 1
                log.check(scales[br * sc + bc] == want, "tile (\(br), \(bc)): scale \(scales[br * sc + bc]), want \(want)")
            }
        }
        for r in 0..<rows {
            for c in 0..<columns {
                let i = r * columns + c
                let s = scales[(r / 128) * sc + c / 128]
                let q = reference.value(UInt32(codes[i]))
                log.check(q.isFinite, "(\(r), \(c)): weight \(weights[i]) gave NaN code \(codes[i])")
                log.check(out[i] == q * Double(s), "(\(r), \(c)): dequantize \(out[i]) != code × scale \(q * Double(s))")
                let err = Swift.abs(out[i] - Double(weights[i]))
                let bound = quantizationErrorBound(x: weights[i], scale: s, q: q, format: reference, relativeSlack: 0x1p-23)
                log.check(err <= bound, "(\(r), \(c)): weight \(weights[i]) → \(out[i]), error \(err) > \(bound) (tile scale \(s))")
            }
        }
        log.finish()
    }

    @Test("An all-zero tile gets scale 1 and zero codes; its neighbours are unaffected", arguments: fp8Formats.map(\.0))
    func allZeroTile(format: SmallFloatFormat) {
        let quantizer = BlockQuantizer(format: format)
        let rows = 200, columns = 300
        var weights = (0..<(rows * columns)).map { Float(($0 % 11) - 5) * 0.01 }
        // Zero the tail tile (1, 2): rows 128..<200, columns 256..<300.
        for r in 128..<200 { for c in 256..<300 { weights[r * columns + c] = 0 } }
        let (codes, scales) = quantizer.quantize(weights, rows: rows, columns: columns)
        #expect(scales[1 * 3 + 2] == 1, "\(format): all-zero tile scale \(scales[5])")
        let tileMax = Swift.abs(Float(-5) * 0.01)
        #expect(scales[0] == tileMax / Float(quantizer.codec.maximum), "\(format): tile (0,0) scale \(scales[0])")
        var zeroCodes = true
        for r in 128..<200 { for c in 256..<300 where codes[r * columns + c] != 0 { zeroCodes = false } }
        #expect(zeroCodes, "\(format): all-zero tile must give code 0x00 everywhere")
    }

    @Test("Tiles too small for a binary32 scale never produce NaN codes", arguments: fp8Formats.map(\.0), [Float(0x1p-146), 0x1p-139, 0x1p-133])
    func tinyTileHasNoNaN(format: SmallFloatFormat, amax: Float) {
        let reference = referenceFormat(format)
        let quantizer = BlockQuantizer(format: format)
        // One tiny weight among zeros: amax / MAX underflows to 0 (2^-146) or is a subnormal (2^-139, 2^-133).
        var weights = [Float](repeating: 0, count: 4 * 4)
        weights[5] = amax
        weights[6] = -amax / 3
        let (codes, scales) = quantizer.quantize(weights, rows: 4, columns: 4)
        #expect(scales[0] > 0 && scales[0].isFinite, "\(format) amax \(amax): tile scale \(scales[0]) must be positive and finite")
        // A subnormal scale carries only a few bits, so amax / scale can land well past MAX and
        // saturate: allow the clamping error amax − MAX·scale on top of the half-ulp bound.
        let clampError = Swift.max(0, Double(amax) - reference.greatestFiniteMagnitude * Double(scales[0]))
        for (i, code) in codes.enumerated() {
            let q = reference.value(UInt32(code))
            #expect(q.isFinite, "\(format) amax \(amax): weight \(weights[i]) gave NaN code 0x\(String(code, radix: 16))")
            let bound = clampError
                + quantizationErrorBound(x: weights[i], scale: scales[0], q: q, format: reference, relativeSlack: 0x1p-23)
            #expect(Swift.abs(q * Double(scales[0]) - Double(weights[i])) <= bound,
                    "\(format) amax \(amax): weight \(weights[i]) → code 0x\(String(code, radix: 16)) × \(scales[0])")
        }
    }

    @Test("Saturation: a value equal to the tile maximum maps to ±MAX exactly", arguments: fp8Formats.map(\.0))
    func tileMaximumMapsToMax(format: SmallFloatFormat) {
        let quantizer = BlockQuantizer(format: format)
        let weights: [Float] = [0.1, -3.3, 1.7, 2.9]
        let (codes, _) = quantizer.quantize(weights, rows: 2, columns: 2)
        #expect(Double(quantizer.codec.value(codes[1])) == -quantizer.codec.maximum, "\(format): -3.3 should map to -MAX, got code \(codes[1])")
    }
}
