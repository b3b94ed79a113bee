import Foundation
import LowPrecision
import MoEReference
import Testing
import TensorIO
import MoECheckTestSupport

// Shared helpers of the MoEReference tests (the generic ones are in MoECheckTestSupport): small synthetic shapes, a
// MoELayerSource wrapper that edits a layer (relabels experts, drops the shared expert, replaces
// the router or the shared gate, scales one expert), an independent scalar implementation of
// the fused recipes, and bound checks that name the worst element.

/// Small shapes covering the edge cases the brief asks for: H and I not multiples of 128, H and I
/// spanning several 128-blocks, E == K, K == 1, no renormalization with Is != I (not fusable).
let testShapes: [MoEConfig] = [
    MoEConfig(family: .qwen35Moe, hidden: 72, intermediate: 40, sharedIntermediate: 40, experts: 6, topK: 2),
    MoEConfig(family: .qwen3Next, hidden: 136, intermediate: 24, sharedIntermediate: 24, experts: 4, topK: 4),   // E == K
    MoEConfig(family: .qwen35Moe, hidden: 200, intermediate: 136, sharedIntermediate: 136, experts: 5, topK: 1), // K == 1
    MoEConfig(family: .qwen2Moe, hidden: 96, intermediate: 32, sharedIntermediate: 80, experts: 8, topK: 3),    // renorm off, Is != I
    MoEConfig(family: .qwen3Next, hidden: 264, intermediate: 48, sharedIntermediate: 48, experts: 7, topK: 3),   // 3 K-blocks
]

let testTokenCounts = [1, 5, 9, 3]

/// `count` specs cycling through the shapes and token counts, seeds derived from `seed`.
func testSpecs(_ count: Int, seed: UInt64, formats: [WeightFormat] = [.bf16],
               routing: RoutingMode = .uniform, inputs: InputMode = .normal, scales: ScaleProfile = .counter,
               shapes: [MoEConfig] = testShapes) -> [SyntheticSpec] {
    var rng = SeededGenerator(seed: seed)
    return (0..<count).map { i in
        SyntheticSpec(config: shapes[i % shapes.count], format: formats[i % formats.count],
                      tokens: testTokenCounts[(i / shapes.count + i) % testTokenCounts.count],
                      seed: rng.next() % 1_000_000, routing: routing, inputs: inputs, scales: scales)
    }
}

/// Runs the engine on a synthetic layer's own inputs.
func runReference(_ layer: MoELayerSource, _ x: [Double], tokens: Int, recipe: Recipe,
                  options: ReferenceOptions = ReferenceOptions(), routing: RoutingOverride? = nil) throws -> ReferenceResult {
    try MoEReferenceEngine(layer: layer, recipe: recipe, options: options).run(inputs: x, tokens: tokens, routing: routing)
}

/// A MoELayerSource that edits another one.
final class EditedLayer: MoELayerSource {
    let base: MoELayerSource
    var config: MoEConfig
    var weightFormat: WeightFormat { base.weightFormat }
    var name: String { "edited(\(base.name))" }
    /// New routed expert id -> the base layer's id.
    var baseExpert: [Int]
    /// Replaces the router `[E, H]` (after relabeling is not applied to it).
    var routerOverride: [Double]?
    /// Replaces the shared gate `[H]`.
    var sharedGateOverride: [Double]?
    /// Multiplies the down projection of new expert id `key` by the value.
    var downFactor: [Int: Double] = [:]

    init(_ base: MoELayerSource) {
        self.base = base
        self.config = base.config
        self.baseExpert = Array(0..<base.config.experts)
    }

    /// Relabels experts: new id `perm[e]` is base expert `e`.
    func relabel(_ perm: [Int]) {
        var inv = [Int](repeating: 0, count: perm.count)
        for (e, n) in perm.enumerated() { inv[n] = e }
        baseExpert = inv
    }

    func mapExpert(_ e: Int) -> Int { e == config.experts ? base.config.experts : baseExpert[e] }

    func routerWeight() throws -> [Double] {
        if let r = routerOverride { return r }
        let w = try base.routerWeight(), H = config.hidden
        var out = [Double](repeating: 0, count: w.count)
        for e in 0..<config.experts {
            let b = baseExpert[e]
            for h in 0..<H { out[e * H + h] = w[b * H + h] }
        }
        return out
    }

    func sharedGateWeight() throws -> [Double]? {
        guard config.hasSharedExpert else { return nil }
        return try sharedGateOverride ?? base.sharedGateWeight()
    }

    func decodeGateUp(expert e: Int, into out: UnsafeMutablePointer<Double>) throws {
        try base.decodeGateUp(expert: mapExpert(e), into: out)
    }

    func decodeDown(expert e: Int, into out: UnsafeMutablePointer<Double>) throws {
        try base.decodeDown(expert: mapExpert(e), into: out)
        if let f = downFactor[e] {
            let n = config.hidden * config.intermediate(ofExpert: e)
            for i in 0..<n { out[i] *= f }
        }
    }
}

// MARK: - independent scalar implementation of the fused recipes

/// A plain-loop float64 implementation of the aiter/sglang fused path (`fused-bf16`, and
/// `fused-fp8` on fp8 layers) that decodes the synthetic layer's raw kernel-layout bytes itself
/// (bf16 bit patterns, fp8 codes × block scales) and shares no GEMM, layout or routing code with
/// the engine. Only the fp8 activation quantizer (`GroupQuantizer`, tested in LowPrecisionTests)
/// is reused.
///
/// `w13BlockForScale(e, blockRow, kb)` picks which K block's scale stage 1 uses for K block `kb`:
/// the identity for a correct kernel; a fault model passes a neighbouring block.
struct ScalarFused {
    struct Result {
        var output: [Double]
        /// Σ over slots of |w · y| per element (the scale a relative comparison uses).
        var absSum: [Double]
        var ids: [[Int]]
        var weights: [[Double]]
        var sharedGate: [Double]
    }

    static func decodeMatrix(_ layer: SyntheticLayer, bytes: [UInt8], scales: [Float], rows: Int, cols: Int, gateUpHalf: Int?,
                             blockForScale: (Int, Int) -> Int) -> [[Double]] {
        var m = [[Double]](repeating: [Double](repeating: 0, count: cols), count: rows)
        if layer.weightFormat == .bf16 {
            for r in 0..<rows {
                for c in 0..<cols {
                    let i = 2 * (r * cols + c)
                    let bits = UInt32(bytes[i]) | UInt32(bytes[i + 1]) << 8
                    m[r][c] = Double(Float(bitPattern: bits << 16))
                }
            }
            return m
        }
        let codec = FP8Codec.codec(for: layer.weightFormat.fp8!)
        let blockCols = (cols + 127) / 128
        for r in 0..<rows {
            let blockRow: Int
            if let half = gateUpHalf {
                blockRow = r < half ? r / 128 : (half + 127) / 128 + (r - half) / 128
            } else {
                blockRow = r / 128
            }
            for c in 0..<cols {
                let kb = blockForScale(blockRow, c / 128)
                m[r][c] = Double(codec.value(bytes[r * cols + c])) * Double(scales[blockRow * blockCols + kb])
            }
        }
        return m
    }

    static func run(_ layer: SyntheticLayer, _ x: [Double], tokens T: Int, recipe: Recipe,
                    w13BlockForScale: @escaping (Int, Int, Int) -> Int = { _, _, kb in kb }) throws -> Result {
        precondition(recipe == .fusedBF16 || recipe == .fusedFP8, "ScalarFused models fused-bf16 and fused-fp8 only")
        let c = layer.config, H = c.hidden, E = c.experts, K = c.topK
        let bf16 = SmallFloatFormat.bfloat16
        let wg = try layer.routerWeight()
        let ws = try layer.sharedGateWeight()
        var experts: [Int: (w13: [[Double]], w2: [[Double]])] = [:]
        func expert(_ e: Int) -> (w13: [[Double]], w2: [[Double]]) {
            if let m = experts[e] { return m }
            let Ie = c.intermediate(ofExpert: e)
            let (b13, s13) = layer.gateUpBytes(expert: e)
            let (b2, s2) = layer.downBytes(expert: e)
            let m = (decodeMatrix(layer, bytes: b13, scales: s13, rows: 2 * Ie, cols: H, gateUpHalf: Ie) { br, kb in w13BlockForScale(e, br, kb) },
                     decodeMatrix(layer, bytes: b2, scales: s2, rows: H, cols: Ie, gateUpHalf: nil) { _, kb in kb })
            experts[e] = m
            return m
        }
        let quantizer = layer.weightFormat.fp8.map { GroupQuantizer(format: $0, convention: .multiplyReciprocal) }
        let fp8 = recipe.activationFP8
        var out = [Double](repeating: 0, count: T * H)
        var absSum = [Double](repeating: 0, count: T * H)
        var allIds: [[Int]] = [], allWeights: [[Double]] = [], gates: [Double] = []
        for t in 0..<T {
            let xt = Array(x[(t * H)..<((t + 1) * H)])
            // router: exact dot, bf16 logits, float64 softmax over all E, top-K (ties: lower id)
            var logits = [Double](repeating: 0, count: E)
            for e in 0..<E {
                var s = 0.0
                for h in 0..<H { s += xt[h] * wg[e * H + h] }
                logits[e] = bf16.round(s)
            }
            let m = logits.max()!
            var denom = 0.0
            for e in 0..<E { denom += exp(logits[e] - m) }
            var ids: [Int] = []
            var remaining = Set(0..<E)
            for _ in 0..<K {
                var best = -1
                for e in 0..<E where remaining.contains(e) {
                    if best < 0 || logits[e] > logits[best] { best = e }
                }
                ids.append(best)
                remaining.remove(best)
            }
            var w = ids.map { exp(logits[$0] - m) / denom }
            if c.renormalize {
                let s = w.reduce(0, +)
                w = w.map { $0 / s }
            }
            w = w.map { Double(Float($0)) } // fp32 routing weights
            var slots = Array(zip(ids, w))
            var g = 0.0
            if let ws {
                var d = 0.0
                for h in 0..<H { d += xt[h] * ws[h] }
                g = bf16.round(1 / (1 + exp(-bf16.round(d))))
                slots.append((E, g))
            }
            allIds.append(ids); allWeights.append(w); gates.append(g)
            let xin = fp8 ? quantizer!.fakeQuantize(row: xt.map { Float($0) }) : xt
            for (e, we) in slots {
                let Ie = c.intermediate(ofExpert: e)
                let (w13, w2) = expert(e)
                var act = [Double](repeating: 0, count: Ie)
                for i in 0..<Ie {
                    var gate = 0.0, up = 0.0
                    for h in 0..<H {
                        gate += xin[h] * w13[i][h]
                        up += xin[h] * w13[Ie + i][h]
                    }
                    act[i] = bf16.round(gate / (1 + exp(-gate)) * up)
                }
                if recipe.intermediateFP8 { act = quantizer!.fakeQuantize(row: act.map { Float($0) }) }
                for h in 0..<H {
                    var y = 0.0
                    for i in 0..<Ie { y += w2[h][i] * act[i] }
                    out[t * H + h] += we * y
                    absSum[t * H + h] += Swift.abs(we * y)
                }
            }
        }
        return Result(output: out, absSum: absSum, ids: allIds, weights: allWeights, sharedGate: gates)
    }
}

// MARK: - bound checks

struct BoundCheck: CustomStringConvertible {
    var violations = 0
    var worstRatio = 0.0
    var worstIndex = 0
    var hidden = 1
    var worstValue = 0.0
    var worstReference = 0.0
    var worstBound = 0.0

    var token: Int { worstIndex / hidden }
    var column: Int { worstIndex % hidden }

    var description: String {
        "\(violations) violation(s); worst |Δ|/bound = \(worstRatio) at token \(token), column \(column) " +
            "(value \(worstValue), reference \(worstReference), bound \(worstBound))"
    }
}

/// Compares a candidate output with the reference element by element: |y − output| ≤ bound,
/// and NaN where the reference is finite is a violation.
func checkBound(_ y: [Double], _ ref: ReferenceResult) -> BoundCheck {
    var r = BoundCheck()
    r.hidden = ref.hidden
    for i in 0..<y.count {
        let d = Swift.abs(y[i] - ref.output[i])
        let ratio = d.isNaN ? .infinity : (ref.bound[i] > 0 ? d / ref.bound[i] : (d == 0 ? 0 : .infinity))
        if ratio > 1 { r.violations += 1 }
        if ratio > r.worstRatio || (ratio.isInfinite && !r.worstRatio.isInfinite) {
            r.worstRatio = ratio; r.worstIndex = i
            r.worstValue = y[i]; r.worstReference = ref.output[i]; r.worstBound = ref.bound[i]
        }
    }
    return r
}
