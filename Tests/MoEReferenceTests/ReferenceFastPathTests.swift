import Foundation
import LowPrecision
@testable import MoEReference
import Testing
import TensorIO
import MoECheckTestSupport

/// The oracle's fast paths against the paths they shortcut, bit for bit: the combine's raw-pointer
/// loop, the shared expert's concurrent tasks, and the repeated-row detection by hashes.
@Suite("Reference fast paths")
struct ReferenceFastPathTests {
    static func bits(_ a: [Double]?) -> [UInt64]? { a?.map(\.bitPattern) }
    static func bits(_ a: [Float]?) -> [UInt32]? { a?.map(\.bitPattern) }

    /// Every array of two results, statistics included; the name of the first that differs.
    static func firstDifference(_ a: ReferenceResult, _ b: ReferenceResult) -> String? {
        let pairs: [(String, [Double]?, [Double]?)] = [
            ("output", a.output, b.output), ("bound", a.bound, b.bound), ("topkWeights", a.topkWeights, b.topkWeights),
            ("intermediate", a.intermediate, b.intermediate), ("intermediateBound", a.intermediateBound, b.intermediateBound),
            ("elementVariance", a.statistics?.elementVariance, b.statistics?.elementVariance),
            ("outputFlipVariance", a.statistics?.outputFlipVariance, b.statistics?.outputFlipVariance),
            ("tieNorm", a.statistics?.tieNorm, b.statistics?.tieNorm),
            ("expertTokenVariance", a.statistics?.expertTokenVariance, b.statistics?.expertTokenVariance),
            ("routerTokenVariance", a.statistics?.routerTokenVariance, b.statistics?.routerTokenVariance),
            ("intermediateVariance", a.statistics?.intermediateVariance, b.statistics?.intermediateVariance),
            ("directionVariance", a.statistics?.directionVariance, b.statistics?.directionVariance),
            ("directionBias", a.statistics?.directionBias, b.statistics?.directionBias),
        ]
        for (name, x, y) in pairs where bits(x) != bits(y) { return name }
        if bits(a.statistics?.contributions) != bits(b.statistics?.contributions) { return "contributions" }
        if a.statistics?.excludedTokens != b.statistics?.excludedTokens { return "excludedTokens" }
        return nil
    }

    static let specs: [SyntheticSpec] = [WeightFormat.bf16, .fp8e4m3fn].flatMap { format in
        [testShapes[0], testShapes[3], testShapes[4]].enumerated().map { i, shape in
            SyntheticSpec(config: shape, format: format, tokens: 23 + 10 * i, seed: UInt64(40 + i))
        }
    }

    @Test("the combine's raw-pointer loop equals the general loop", arguments: specs)
    func combineFastPath(spec: SyntheticSpec) throws {
        let layer = try SyntheticLayer(spec)
        let recipe = Recipe.default(for: spec.format)
        for keepContributions in [false, true] {
            let options = ReferenceOptions(keepIntermediate: true, keepContributions: keepContributions)
            let fast = try MoEReferenceEngine(layer: layer, recipe: recipe, options: options)
            let general = try MoEReferenceEngine(layer: layer, recipe: recipe, options: options)
            general.combineFastPath = false
            let a = try fast.run(inputs: layer.inputs(), tokens: spec.tokens), b = try general.run(inputs: layer.inputs(), tokens: spec.tokens)
            #expect(Self.firstDifference(a, b) == nil, "\(spec) contributions \(keepContributions): \(Self.firstDifference(a, b) ?? "")")
        }
    }

    @Test("the shared expert's concurrent tasks give the bits of the serial order", arguments: specs)
    func sharedExpertConcurrent(spec: SyntheticSpec) throws {
        let layer = try SyntheticLayer(spec)
        let engine = try MoEReferenceEngine(layer: layer, recipe: .default(for: spec.format),
                                            options: ReferenceOptions(keepIntermediate: true, keepContributions: true))
        let x = try layer.inputs(), T = spec.tokens, E = spec.config.experts
        let router = try engine.route(x, tokens: T, routing: nil)
        let inputs = engine.quantizeActivations(x, tokens: T, router: router)
        for e in [E, 0] where !inputs.rowsOf[e].isEmpty {
            var s1 = MoEReferenceEngine.WeightScratch(), s2 = MoEReferenceEngine.WeightScratch()
            let serial = try BLAS.withThreads(1) { try engine.processExpert(e, inputs, &s1, concurrent: false) }
            let concurrent = try BLAS.withThreads(1) { try engine.processExpert(e, inputs, &s2, concurrent: true) }
            let pairs: [(String, [Double], [Double])] = [
                ("act", serial.act, concurrent.act), ("actBound", serial.actBound, concurrent.actBound),
                ("actVariance", serial.actVariance, concurrent.actVariance), ("y", serial.y, concurrent.y),
                ("yBound", serial.yBound, concurrent.yBound), ("yVariance", serial.yVariance, concurrent.yVariance),
                ("yCorrelated", serial.yCorrelated, concurrent.yCorrelated), ("rowVariance", serial.rowVariance, concurrent.rowVariance),
                ("rowNorm2", serial.rowNorm2, concurrent.rowNorm2), ("rowTieNorm", serial.rowTieNorm, concurrent.rowTieNorm),
                ("projection.inputVariance", serial.projection?.inputVariance ?? [], concurrent.projection?.inputVariance ?? []),
                ("projection.groupFactors", serial.projection?.groupFactors ?? [], concurrent.projection?.groupFactors ?? []),
            ]
            #expect(!serial.y.isEmpty && !serial.yVariance.isEmpty)
            for (name, a, b) in pairs { #expect(Self.bits(a) == Self.bits(b), "\(spec) expert \(e): \(name) differs") }
        }
    }

    @Test("repeated rows: the hash-and-compare search equals a Set of rows (−0 equal to +0)")
    func repeatedRows() {
        var rng = SeededGenerator(seed: 9)
        let columns = 5
        var rows: [[Double]] = (0..<12).map { _ in (0..<columns).map { _ in Double(Int(rng.next() % 3)) - 1 } }
        rows.append(rows[3])
        rows.append(rows[0].map { $0 == 0 ? -0.0 : $0 })   // equal to row 0 under ==
        rows.append([0, 0, 0, 0, 0])
        rows.append([-0.0, 0, -0.0, 0, 0])
        var seen = Set<[Double]>()
        let want = rows.map { !seen.insert($0).inserted }
        let got = MoEReferenceEngine.repeatedRows(rows.flatMap { $0 }, rows: rows.count, columns: columns)
        #expect(got == want)
        #expect(want.contains(true))
    }
}
