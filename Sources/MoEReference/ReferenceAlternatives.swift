import Foundation
import LowPrecision

// Known alternatives (docs/error-bounds.md, "Known alternatives").
//
// A 1×128 group of the fp8-requantized intermediate moves its scale when its largest bf16
// element rounds the other way; where that happens with a high probability (0.71 on one group
// of the 35B-A3B T = 1 case) the move is not noise but one of two known outcomes, each an exact
// vector along the output. The statistical tier then tests every combination of a token's
// likely moves as a hypothesis instead of charging their p·r² as variance.

/// One likely fp8 group-scale move of a token (`ScaleAlternative`) as it reaches the token's
/// output: move k adds `weight·shifts[k]` to the output (`RowAlternative`).
struct TokenAlternative {
    /// The expert, the row in its `ProjectionInput`, the slot's routing weight.
    var expert: Int, row: Int, weight: Double
    var alternative: ScaleAlternative
    var partial: [Float], shifts: [[Float]], codeShare: [Float]

    /// Per output element, the variance the alternative takes out of the model: the scale move's
    /// `(factor − residual)·(w·partial)²` and the code changes' `w²·codeShare`.
    func taken(_ h: Int) -> Double {
        let p = weight * Double(partial[h])
        return (alternative.factor - alternative.residualFactor) * p * p + weight * weight * Double(codeShare[h])
    }

    /// The variance it takes out along all of the output (its selection order).
    var variance: Double { (0..<partial.count).reduce(0.0) { $0 + taken($1) } }
}

extension MoEReferenceEngine {
    /// At most this many hypotheses per token (every combination of its selected groups' moves,
    /// no move included): the largest moves first, the rest stays variance.
    public static let maxHypotheses = 16

    /// Whether the statistical model tests likely fp8 group-scale moves as known alternatives: an
    /// fp8 intermediate requantized from a bf16 rounding with exact quantization arithmetic (the
    /// codes at a moved scale are then known), its down projection, weighting and combine
    /// in fp32 (a move then reaches the output as the vector it is), the output rounded to a grid or
    /// not at all, and the contributions kept (the test directions need them).
    func knownAlternativesEnabled(tokens T: Int) -> Bool {
        statisticsEnabled && recipe.intermediateFP8 && recipe.quantizationArithmetic == .exact && recipe.intermediate == .bf16 && recipe.down == .none && recipe.weighted == .none
            && !recipe.combine.simulatesOrder && recipe.output != .bf16OrFP32 && keepsContributions(tokens: T)
    }

    /// Picks each token's known alternatives (largest variance first, while the combinations stay
    /// within `maxHypotheses`) and leaves only their residual factor in the projection inputs, so
    /// that `directionVariance` models the rest. The others stay variance as they were.
    func selectAlternatives(_ acc: inout Combined, tokens T: Int) -> [[TokenAlternative]] {
        var selected = [[TokenAlternative]](repeating: [], count: T)
        for t in 0..<T where !acc.alternatives[t].isEmpty {
            let candidates = acc.alternatives[t].map { ($0, $0.variance) }.enumerated().sorted {
                $0.element.1 != $1.element.1 ? $0.element.1 > $1.element.1 : $0.offset < $1.offset
            }
            var hypotheses = 1
            for (_, (a, _)) in candidates {
                let h = hypotheses * (1 + a.alternative.moves.count)
                guard h <= Self.maxHypotheses else { continue }
                hypotheses = h
                selected[t].append(a)
                let p = acc.projections[a.expert]!
                let Ie = p.inputVariance.count / Swift.max(p.rows.count, 1)
                acc.projections[a.expert]!.groupFactors[a.row * p.groups + a.alternative.group] = a.alternative.residualFactor
                for (i, v) in a.alternative.codeVariance.enumerated() where v > 0 {
                    let k = a.row * Ie + a.alternative.start + i
                    acc.projections[a.expert]!.inputVariance[k] = Swift.max(0, p.inputVariance[k] - v)
                }
            }
        }
        return selected
    }

    /// Per token and test direction (the token's output, then each slot's contribution: the
    /// judge's directions), `[T, 1 + slots, 4]`: the lowest and highest shift of the error along
    /// the direction over the token's hypotheses (every combination of its selected moves, none
    /// included), and the largest flip variance and tie bias of the output rounding along it
    /// under any hypothesis, the rounding's input noise being the rest of the model's (the
    /// selected moves' variance taken out). With an output rounding a hypothesis' shift is
    /// `Σ_h d_h·(round(o_h + δ_h) − round(o_h))`, and its flips those of `round(o + δ + noise)`
    /// about `round(o + δ)`; without, `Σ d·δ` and none. NaN flip: the token has none (the judge
    /// then takes the elementwise flips and ties). Nil without the contributions.
    func alternativeBounds(_ selected: [[TokenAlternative]], _ acc: Combined, routerShare: (Int) -> Double, tokens T: Int) -> [Double]? {
        guard let contrib = acc.contributions else { return nil }
        let c = layer.config
        let H = c.hidden
        let slotsAll = c.topK + (c.hasSharedExpert ? 1 : 0)
        let D = 1 + slotsAll
        var bounds = [Double](repeating: 0, count: T * D * 4)
        for k in 0..<(T * D) { bounds[4 * k + 2] = .nan }
        let tokens = (0..<T).filter { !selected[$0].isEmpty }
        // σ² of the rest per element, before the selected moves are taken out
        let rest0 = (0..<tokens.count).map { k in
            (0..<H).map { h in
                let i = tokens[k] * H + h
                return acc.elementVariance[i] + acc.correlatedVariance[i] + routerShare(i)
            }
        }
        let out = acc.out, output = recipe.output, f = recipe.output.format
        bounds.withUnsafeMutableBufferPointer { bp in
            let b = bp.baseAddress!
            // each token writes only its own rows
            ParallelLoops.chunks(tokens.count, minimum: 1) { range in
                for k in range {
                    let t = tokens[k], alts = selected[t]
                    var rest = rest0[k]
                    for a in alts {
                        for h in 0..<H { rest[h] = Swift.max(0, rest[h] - a.taken(h)) }
                    }
                    let sigma = rest.map { $0.squareRoot() }
                    var dirs = [Double](repeating: 0, count: D * H)
                    for h in 0..<H { dirs[h] = out[t * H + h] }
                    for s in 0..<slotsAll {
                        for h in 0..<H { dirs[(1 + s) * H + h] = Double(contrib[(t * slotsAll + s) * H + h]) }
                    }
                    var low = [Double](repeating: .infinity, count: D), high = [Double](repeating: -.infinity, count: D)
                    var flipMax = [Double](repeating: 0, count: D), tieMax = [Double](repeating: 0, count: D)
                    var choice = [Int](repeating: 0, count: alts.count)
                    var shift = [Double](repeating: 0, count: H)
                    while true {
                        for h in 0..<H { shift[h] = 0 }
                        for (a, ch) in zip(alts, choice) where ch > 0 {
                            let move = a.shifts[ch - 1]
                            for h in 0..<H { shift[h] += a.weight * Double(move[h]) }
                        }
                        var s = [Double](repeating: 0, count: D), fl = s, ti = s
                        for h in 0..<H {
                            let o = out[t * H + h]
                            var delta = shift[h], fv = 0.0, tv = 0.0
                            if let f {
                                delta = f.round(o + shift[h]) - f.round(o)
                                (fv, tv) = StatisticalModel.roundingVarianceAndTieBias(o + shift[h], sigma: sigma[h], output)
                            }
                            for j in 0..<D {
                                let d = dirs[j * H + h]
                                s[j] += d * delta; fl[j] += d * d * fv; ti[j] += Swift.abs(d) * tv
                            }
                        }
                        for j in 0..<D {
                            low[j] = Swift.min(low[j], s[j]); high[j] = Swift.max(high[j], s[j])
                            flipMax[j] = Swift.max(flipMax[j], fl[j]); tieMax[j] = Swift.max(tieMax[j], ti[j])
                        }
                        // the next combination (mixed radix: each group none or one of its moves)
                        var g = 0
                        while g < alts.count {
                            choice[g] += 1
                            if choice[g] <= alts[g].alternative.moves.count { break }
                            choice[g] = 0
                            g += 1
                        }
                        if g == alts.count { break }
                    }
                    for j in 0..<D {
                        let o = 4 * (t * D + j)
                        b[o] = low[j]; b[o + 1] = high[j]; b[o + 2] = flipMax[j]; b[o + 3] = tieMax[j]
                    }
                }
            }
        }
        return bounds
    }
}
