import Foundation
import LowPrecision
import MoEReference
import Testing
import TensorIO
import MoECheckTestSupport

/// Runs `body`, which must throw a `ReferenceError` of the given kind whose text mentions every fragment.
func expectReferenceError(_ tag: String, unsupported: Bool = false, mentions fragments: [String],
                          sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("\(tag): expected a ReferenceError, nothing was thrown", sourceLocation: sourceLocation)
    } catch let error as ReferenceError {
        switch (error, unsupported) {
        case (.unsupported, true), (.invalid, false): break
        default: Issue.record("\(tag): wrong error kind: \(error)", sourceLocation: sourceLocation)
        }
        for f in fragments where !error.description.contains(f) {
            Issue.record("\(tag): error text does not mention \"\(f)\": \(error.description)", sourceLocation: sourceLocation)
        }
    } catch {
        Issue.record("\(tag): expected a ReferenceError, got \(type(of: error)): \(error)", sourceLocation: sourceLocation)
    }
}

@Suite("Bad input")
struct BadInputTests {
    static let spec = SyntheticSpec(config: testShapes[0], format: .bf16, tokens: 5, seed: 7)

    @Test("non-finite inputs name token and column", arguments: [Double.nan, .infinity, -.infinity])
    func nonFiniteInput(_ bad: Double) throws {
        let layer = try SyntheticLayer(Self.spec)
        let H = Self.spec.config.hidden
        for (t, col) in [(0, 0), (3, 17), (4, H - 1)] {
            var x = layer.inputs()
            x[t * H + col] = bad
            expectReferenceError("\(Self.spec) input \(bad) at token \(t), column \(col)", mentions: ["token \(t)", "column \(col)"]) {
                _ = try runReference(layer, x, tokens: Self.spec.tokens, recipe: .fusedBF16)
            }
        }
    }

    @Test("input shape and token count are checked")
    func inputShape() throws {
        let layer = try SyntheticLayer(Self.spec)
        let x = layer.inputs()
        expectReferenceError("\(Self.spec) T=0", mentions: ["tokens"]) { _ = try runReference(layer, [], tokens: 0, recipe: .exact) }
        expectReferenceError("\(Self.spec) short input", mentions: ["\(x.count - 1)"]) {
            _ = try runReference(layer, Array(x.dropLast()), tokens: Self.spec.tokens, recipe: .exact)
        }
    }

    @Test("fp8 recipes on bf16 weights are unsupported")
    func fp8RecipeOnBF16() throws {
        let layer = try SyntheticLayer(Self.spec)
        expectReferenceError("\(Self.spec) fused-fp8", unsupported: true, mentions: ["fused-fp8", "bf16"]) {
            _ = try MoEReferenceEngine(layer: layer, recipe: .fusedFP8)
        }
        var intermediateOnly = Recipe.fusedBF16
        intermediateOnly.name = "bf16-with-fp8-intermediate"
        intermediateOnly.intermediateFP8 = true
        expectReferenceError("\(Self.spec) fp8 intermediate", unsupported: true, mentions: ["bf16-with-fp8-intermediate"]) {
            _ = try MoEReferenceEngine(layer: layer, recipe: intermediateOnly)
        }
        // and every fp8 recipe runs on fp8 weights
        let fp8 = try SyntheticLayer(SyntheticSpec(config: testShapes[0], format: .fp8e4m3fn, tokens: 2, seed: 7))
        for r in Recipe.named { _ = try MoEReferenceEngine(layer: fp8, recipe: r) }
    }

    @Test("routing overrides: out-of-range ids, duplicates and wrong shapes are rejected")
    func routingOverride() throws {
        let layer = try SyntheticLayer(Self.spec) // E = 6, K = 2, T = 5
        let x = layer.inputs(), T = Self.spec.tokens, E = Self.spec.config.experts
        func run(_ ids: [[Int]]) throws { _ = try runReference(layer, x, tokens: T, recipe: .fusedBF16, routing: RoutingOverride(ids: ids)) }
        let good = (0..<T).map { [$0 % E, ($0 + 1) % E] }
        try run(good)
        var bad = good; bad[2] = [1, E]
        expectReferenceError("override id E", mentions: ["\(E)", "token 2", "out of range"]) { try run(bad) }
        bad = good; bad[4] = [-1, 0]
        expectReferenceError("override id -1", mentions: ["-1", "token 4", "out of range"]) { try run(bad) }
        bad = good; bad[1] = [3, 3]
        expectReferenceError("override duplicate", mentions: ["token 1", "twice"]) { try run(bad) }
        bad = good; bad[0] = [1]
        expectReferenceError("override short row", mentions: ["token 0"]) { try run(bad) }
        expectReferenceError("override missing token", mentions: ["routing override"]) { try run(Array(good.dropLast())) }
    }

    @Test("a routing override is followed exactly (teacher forcing)")
    func routingOverrideFollowed() throws {
        let layer = try SyntheticLayer(Self.spec)
        let x = layer.inputs(), T = Self.spec.tokens, E = Self.spec.config.experts, K = Self.spec.config.topK
        let ids = (0..<T).map { [($0 + 2) % E, ($0 + 5) % E] }
        let r = try runReference(layer, x, tokens: T, recipe: .exact, options: ReferenceOptions(fuseShared: false), routing: RoutingOverride(ids: ids))
        for t in 0..<T {
            #expect(Set((0..<K).map { Int(r.topkIds[t * K + $0]) }) == Set(ids[t]), "override ids not used at token \(t)")
            let row = (0..<E).map { r.routerLogits[t * E + $0] }
            let p = ids[t].map { exp(row[$0]) }
            let w = Dictionary(uniqueKeysWithValues: (0..<K).map { (Int(r.topkIds[t * K + $0]), r.topkWeights[t * K + $0]) })
            for (j, e) in ids[t].enumerated() {
                let want = p[j] / p.reduce(0, +)
                #expect(Swift.abs(w[e]! - want) <= 1e-12 * want, "override weight at token \(t), expert \(e): \(w[e]!) vs \(want)")
            }
        }
    }
}
