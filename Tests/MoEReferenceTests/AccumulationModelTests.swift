import Foundation
import LowPrecision
import MoEReference
import Testing
import TensorIO
import MoECheckTestSupport

// The statistical tier's accumulation noise (StatisticalModel.accumulationSigma; docs/error-bounds.md,
// "Accumulation noise"): fp32 sums simulated in the orders the model allows stay within its σ, its σ
// is far below the Higham–Mary proxy √n·u·Σ|t| on random-sign data, an order it does not allow can
// exceed it (so the assumption is load-bearing), and the float32 range statistics are what they claim.

@Suite("Accumulation model")
struct AccumulationModelTests {
    /// bf16 × bf16 products (exact in fp32), random signs, a spread of magnitudes.
    static func terms(_ n: Int, _ rng: inout SeededGenerator, bias: Double = 0) -> [Float] {
        func normal() -> Double {
            let a = Double.random(in: Double.ulpOfOne..<1, using: &rng), b = Double.random(in: 0..<1, using: &rng)
            return (-2 * log(a)).squareRoot() * cos(2 * .pi * b)
        }
        return (0..<n).map { _ in BFloat16.round(Float(normal() + bias)) * BFloat16.round(Float(normal() * 0.02)) }
    }

    static func exactSum(_ t: [Float]) -> Double { t.reduce(0.0) { $0 + Double($1) } }   // products are 16-bit: float64 is exact here

    /// fp32 sums in the kernel orders the model allows.
    enum Order: CaseIterable { case sequential, reversedBlocks, pairwise, splitKAtomics, tiled64 }

    static func fp32Sum(_ t: [Float], _ order: Order, _ rng: inout SeededGenerator) -> Float {
        switch order {
        case .sequential:
            return t.reduce(Float(0), +)
        case .reversedBlocks:
            // 32-blocks each summed from zero in order, the block partials added last block first
            var acc: Float = 0
            for b in stride(from: (t.count - 1) / 32, through: 0, by: -1) {
                acc += t[(b * 32)..<Swift.min(t.count, (b + 1) * 32)].reduce(Float(0), +)
            }
            return acc
        case .pairwise:
            func pw(_ s: ArraySlice<Float>) -> Float { s.count <= 2 ? s.reduce(Float(0), +) : pw(s.prefix(s.count / 2)) + pw(s.suffix(s.count - s.count / 2)) }
            return pw(t[...])
        case .splitKAtomics:
            // 5 contiguous pieces on 32-boundaries, each summed in order, added into 0 in a random order
            let blocks = (t.count + 31) / 32
            var cuts = Set<Int>([0, blocks])
            while cuts.count < Swift.min(6, blocks + 1) { cuts.insert(rng.int(blocks + 1)) }
            let c = cuts.sorted()
            var partials: [Float] = []
            for j in 0..<(c.count - 1) { partials.append(t[(c[j] * 32)..<Swift.min(t.count, c[j + 1] * 32)].reduce(Float(0), +)) }
            var acc: Float = 0
            for j in rng.permutation(partials.count) { acc += partials[j] }
            return acc
        case .tiled64:
            // an mma-like tile: 64 terms summed pairwise into a block value, added to the running sum
            var acc: Float = 0
            var k = 0
            while k < t.count {
                var v = Array(t[k..<Swift.min(t.count, k + 64)])
                while v.count > 1 { v = stride(from: 0, to: v.count, by: 2).map { $0 + 1 < v.count ? v[$0] + v[$0 + 1] : v[$0] } }
                acc += v[0]
                k += 64
            }
            return acc
        }
    }

    static func sigmas(_ t: [Float]) -> (new: Double, old: Double) {
        let n = t.count
        let rs = StatisticalModel.rangeStats(count: n) { Double(t[$0]) }
        let abs = t.reduce(0.0) { $0 + Double(Swift.abs($1)) }
        let new = StatisticalModel.accumulationSigma(terms: n, length: n, unitRoundoff: 0x1p-24, absSum: abs, range: rs.range, split: rs.split,
                                                     order: .contiguous)
        let old = StatisticalModel.accumulationSigma(terms: n, length: n, unitRoundoff: 0x1p-24, absSum: abs, range: rs.range, split: rs.split,
                                                     order: .any)
        return (new, old)
    }

    @Test("fp32 sums in every allowed order stay within the model's σ: mean square ≤ σ², none beyond 6σ")
    func simulatedSumsWithinSigma() {
        var rng = SeededGenerator(seed: 11)
        var log = FailureLog("simulated fp32 sums")
        for n in [100, 512, 2048, 4096] {
            for order in Order.allCases {
                var ms = 0.0, worst = 0.0
                let samples = n >= 2048 ? 150 : 400
                for _ in 0..<samples {
                    let t = Self.terms(n, &rng)
                    let err = Double(Self.fp32Sum(t, order, &rng)) - Self.exactSum(t)
                    let s = Self.sigmas(t).new
                    ms += (err / s) * (err / s)
                    worst = Swift.max(worst, Swift.abs(err) / s)
                }
                ms /= Double(samples)
                // sub-Gaussian with proxy σ²: E[e²] ≤ σ², P(|e| > 6σ) ≤ 2e^-18 per sum
                log.check(ms <= 1, "n=\(n) \(order): mean square of err/σ = \(ms) > 1")
                log.check(worst <= 6, "n=\(n) \(order): an error of \(worst)σ")
            }
        }
        log.finish()
    }

    @Test("on random-sign data the model's σ is well below √n·u·Σ|t|, and never above it")
    func tighterThanHighamMary() {
        var rng = SeededGenerator(seed: 12)
        for (n, factor) in [(512, 4.0), (2048, 8.0), (4096, 10.0)] {
            var ratios: [Double] = []
            for _ in 0..<50 {
                let (new, old) = Self.sigmas(Self.terms(n, &rng))
                #expect(new <= old)
                ratios.append(old / new)
            }
            let median = ratios.sorted()[ratios.count / 2]
            #expect(median >= factor, "n=\(n): old/new σ median \(median) < \(factor)")
        }
        // terms of one sign: every partial sum is as large as Σ|t|, the two proxies agree
        let positive = Self.terms(1024, &rng).map { Swift.abs($0) }
        let (new, old) = Self.sigmas(positive)
        #expect(new == old, "one-signed terms: \(new) vs \(old)")
    }

    @Test("an order the model does not allow (positive terms first) breaks its σ; the any-order proxy covers it")
    func disallowedOrderIsNotCovered() {
        var rng = SeededGenerator(seed: 13)
        var msNew = 0.0, msOld = 0.0, worstOld = 0.0
        let samples = 60
        for _ in 0..<samples {
            let t = Self.terms(4096, &rng)
            // a kernel that adds the positive products first, then the negative ones (not K order)
            let reordered = t.filter { $0 > 0 } + t.filter { $0 <= 0 }
            let err = Swift.abs(Double(reordered.reduce(Float(0), +)) - Self.exactSum(t))
            let (new, old) = Self.sigmas(t)
            msNew += (err / new) * (err / new) / Double(samples)
            msOld += (err / old) * (err / old) / Double(samples)
            worstOld = Swift.max(worstOld, err / old)
        }
        // the allowed orders keep E[(e/σ)²] far below 1 (simulatedSumsWithinSigma); this one does not
        #expect(msNew > 1, "reordered sums: mean square of err/σ = \(msNew): the test no longer shows the assumption matters")
        #expect(msOld <= 1 && worstOld <= 6, "the any-order proxy was exceeded: mean square \(msOld), worst \(worstOld)σ")
    }

    @Test("float32 range statistics match a float64 computation and their definitions")
    func rangeStatsMatchDefinition() {
        var rng = SeededGenerator(seed: 14)
        let m = 3, n = 5
        for k in [1, 31, 32, 33, 200] {
            let a = (0..<(m * k)).map { _ in Float.random(in: -1...1, using: &rng) }
            let b = (0..<(n * k)).map { _ in Float.random(in: -1...1, using: &rng) }
            let (range, split) = StatisticalModel.rangeStats(a, m: m, k: k, b, n: n)
            for i in 0..<m {
                for j in 0..<n {
                    let t = (0..<k).map { Double(a[i * k + $0]) * Double(b[j * k + $0]) }
                    // the largest |sum| of a contiguous run, by brute force
                    var best = 0.0
                    for s in 0..<k { var acc = 0.0; for e in s..<k { acc += t[e]; best = Swift.max(best, Swift.abs(acc)) } }
                    // the largest |sum| of a set of whole 32-blocks
                    let blocks = stride(from: 0, to: k, by: 32).map { s in t[s..<Swift.min(k, s + 32)].reduce(0, +) }
                    let split64 = Swift.max(blocks.filter { $0 > 0 }.reduce(0, +), -blocks.filter { $0 < 0 }.reduce(0, +))
                    let abs = t.reduce(0) { $0 + Swift.abs($1) }
                    let tol = 2 * Double(k + 3) * 0x1p-24 * abs
                    #expect(Swift.abs(Double(range[i * n + j]) - best) <= tol, "k=\(k) (\(i),\(j)): range \(range[i * n + j]) vs \(best)")
                    #expect(Swift.abs(Double(split[i * n + j]) - split64) <= tol, "k=\(k) (\(i),\(j)): split \(split[i * n + j]) vs \(split64)")
                    let d = StatisticalModel.rangeStats(count: k) { t[$0] }
                    #expect(Swift.abs(d.range - best) <= 1e-12 * abs && Swift.abs(d.split - split64) <= 1e-12 * abs)
                }
            }
        }
    }

    @Test("a recipe's accumulation order: JSON, default, and the reference's variances (contiguous ≤ any)")
    func recipeAccumulationOrder() throws {
        #expect(Recipe.fusedFP8.accumulationOrder == .contiguous)
        let any = try Recipe.fromJSON(#"{"base": "fused-fp8", "accumulation": "any"}"#, origin: "t")
        #expect(any.accumulationOrder == .any && any.accumulation == .any)
        #expect(throws: RecipeSpecError.self) { try Recipe.fromJSON(#"{"accumulation": "sorted"}"#, origin: "t") }
        // a recipe without the field encodes as before (cache keys, result files)
        let json = String(decoding: try JSONEncoder().encode(Recipe.fusedBF16), as: UTF8.self)
        #expect(!json.contains("accumulation"))
        for format in [WeightFormat.bf16, .fp8e4m3fn] {
            let spec = SyntheticSpec(config: testShapes[4], format: format, tokens: 9, seed: 5)
            let layer = try SyntheticLayer(spec)
            let base = Recipe.default(for: format)
            var anyRecipe = base
            anyRecipe.accumulation = .any
            let tight = try #require(try runReference(layer, layer.inputs(), tokens: spec.tokens, recipe: base).statistics)
            let wide = try #require(try runReference(layer, layer.inputs(), tokens: spec.tokens, recipe: anyRecipe).statistics)
            var log = FailureLog("element variances, \(format)")
            for i in 0..<tight.elementVariance.count {
                log.check(tight.elementVariance[i] <= wide.elementVariance[i] * (1 + 1e-12),
                          "\(format) element \(i): \(tight.elementVariance[i]) > \(wide.elementVariance[i])")
            }
            log.finish()
            let sumTight = tight.elementVariance.reduce(0, +), sumWide = wide.elementVariance.reduce(0, +)
            #expect(sumTight < sumWide / 3, "\(format): Σ element variance \(sumTight) vs any-order \(sumWide)")
        }
    }
}
