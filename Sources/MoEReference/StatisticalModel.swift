import CFastGEMM
import Foundation
import LowPrecision

/// The statistical error model of a kernel that follows a recipe (docs/error-bounds.md,
/// "Statistical tier").
///
/// Where the rigorous bound takes every rounding error at its worst, this model treats the
/// rounding errors of a correct kernel as independent, zero-mean and bounded (Higham & Mary,
/// SIAM J. Sci. Comput. 2019): an fp32 dot product of n terms then errs by a sub-Gaussian
/// amount with variance proxy `n·u²·(Σ|a·b|)²`, and a rounding point whose input carries such
/// noise of standard deviation σ lands on the reference's rounded value except with probability
/// `exp(−d²/(2σ²))`, d being the distance to the nearest rounding boundary. Every quantity here
/// is a *variance proxy*: under the model the kernel's error has at most this variance, and its
/// weighted sums have sub-Gaussian tails with it.
public enum StatisticalModel {
    /// √n·u: the standard-deviation proxy of an n-term fp32 dot product per unit of Σ|a·b|.
    @inline(__always)
    public static func accumulationSigmaFactor(terms n: Int, unitRoundoff u: Double) -> Double {
        Double(n).squareRoot() * u
    }

    /// Variance proxy of `kernel − reference` after a rounding point, where the kernel's input
    /// differs from the reference's exact pre-rounding value `v` by noise of standard deviation
    /// `sigma`, and the reference carries `round(v)`.
    ///
    /// Values below fp32's smallest normal may be flushed to zero by the kernel: (2⁻¹²⁶)² there.
    /// `E[err²] = Σ_k P(|err| ≥ k·q)·(2k−1)·q²` for an error that is a multiple of the step q; the
    /// probability of crossing the k-th boundary is at most `exp(−d_k²/(2σ²))`. Three boundaries
    /// on each side are counted; noise wider than a step adds `σ² + q²`. Without rounding the
    /// noise passes through (`σ²`). `bf16OrFP32` adds the rounding's own size (the kernel may keep
    /// the unrounded value).
    public static func roundingVariance(_ v: Double, sigma: Double, _ rounding: Rounding) -> Double {
        guard let f = rounding.format else { return sigma * sigma }
        // an fp32 kernel may flush results below 2^-126 to zero (FTZ)
        let grid = Swift.max(gridVariance(v, sigma: sigma, f), Swift.abs(v) < 0x1p-126 ? 0x1p-252 : 0)
        guard rounding == .bf16OrFP32 else { return grid }
        let rv = f.round(v)
        return Swift.max(grid, (v - rv) * (v - rv) + sigma * sigma)
    }

    /// `roundingVariance(v, sigma:, rounding)` and `tieBias(v, rounding.format)` together: the
    /// boundary distances found once, then the same operations as the two.
    public static func roundingVarianceAndTieBias(_ v: Double, sigma: Double, _ rounding: Rounding) -> (variance: Double, tie: Double) {
        guard let f = rounding.format, v.isFinite else { return (roundingVariance(v, sigma: sigma, rounding), 0) }
        let distances = boundaryDistances(v, f)
        let grid = Swift.max(sigma > 0 ? gridVariance(sigma: sigma, distances) : 0, Swift.abs(v) < 0x1p-126 ? 0x1p-252 : 0)
        var variance = grid
        if rounding == .bf16OrFP32 {
            let rv = f.round(v)
            variance = Swift.max(grid, (v - rv) * (v - rv) + sigma * sigma)
        }
        return (variance, tieBias(distances))
    }

    /// `roundingVariance` for a grid `f` (round to nearest even).
    public static func gridVariance(_ v: Double, sigma: Double, _ f: SmallFloatFormat) -> Double {
        guard sigma > 0, v.isFinite else { return 0 }
        return gridVariance(sigma: sigma, boundaryDistances(v, f))
    }

    /// `gridVariance` from the value's boundary distances (`boundaryDistances`), sigma > 0.
    @inline(__always)
    static func gridVariance(sigma: Double, _ distances: (out: Double, in: Double, stepOut: Double, stepIn: Double)) -> Double {
        let (dOut, dIn, qOut, qIn) = distances
        // beyond 9σ of both boundaries the crossing probability is below e^-40: nothing to add
        if Swift.min(dOut, dIn) > 9 * sigma && sigma <= qIn / 4 { return 0 }
        var variance = 0.0
        let twoSigma2 = 2 * sigma * sigma
        for k in 1...3 {
            let kk = Double(k - 1), weight = Double(2 * k - 1)
            let pOut = crossing(dOut + kk * qOut, twoSigma2)
            let pIn = crossing(dIn + kk * qIn, twoSigma2)
            variance += weight * (pOut * qOut * qOut + pIn * qIn * qIn)
        }
        if sigma > qIn / 4 { variance += sigma * sigma + qOut * qOut }
        return variance
    }

    /// `exp(−d²/(2σ²))` (`twoSigma2` = 2σ²), without calling `exp` where the result is 0: below
    /// −746 the exact value is under half the smallest subnormal (e^−745.13…), so `exp` rounds it
    /// to 0 — the same bits, the cost of a comparison (most boundaries lie many σ away).
    @inline(__always)
    static func crossing(_ d: Double, _ twoSigma2: Double) -> Double {
        let x = -d * d / twoSigma2
        return x < -746 ? 0 : Foundation.exp(x)
    }

    /// The size of the systematic error a kernel may make where the reference's value sits on a
    /// rounding boundary (a tie, within 2⁻¹² of a step): structured data (grid values, repeated
    /// rows) put many values there, and a kernel's last-bit difference then rounds them all the
    /// same way, which no zero-mean model covers. One step of the grid there, else 0.
    public static func tieBias(_ v: Double, _ f: SmallFloatFormat?) -> Double {
        guard let f, v.isFinite else { return 0 }
        return tieBias(boundaryDistances(v, f))
    }

    @inline(__always)
    static func tieBias(_ distances: (out: Double, in: Double, stepOut: Double, stepIn: Double)) -> Double {
        let (dOut, dIn, qOut, qIn) = distances
        return Swift.min(dOut, dIn) <= Swift.max(qOut, qIn) * 0x1p-12 ? Swift.max(qOut, qIn) : 0
    }

    /// Distances from |v| to the rounding boundaries around `round(v)` outward (larger
    /// magnitude) and inward, and the grid's steps on each side.
    @inline(__always)
    static func boundaryDistances(_ v: Double, _ f: SmallFloatFormat) -> (out: Double, in: Double, stepOut: Double, stepIn: Double) {
        let a = Swift.abs(v), ar = Swift.abs(f.round(v, saturating: true))
        let qOut = f.ulp(of: ar)
        let qIn = ar > 0 ? f.ulp(of: ar - qOut / 4) : qOut
        return (Swift.max(0, ar + qOut / 2 - a), Swift.max(0, a - (ar - qIn / 2)), qOut, qIn)
    }

    /// The fp8 requantization of one row of the bf16 intermediate per 1×128 group, seen by the
    /// model: replaces each element's variance (`variance[offset..<offset+count]`, before: of the
    /// bf16 value; after: of its fp8 value) and returns, per group, the variance factor of the
    /// group scale moving when the group's largest element flips (every dequantized value of the
    /// group then moves by the same relative amount r, with probability p: factor p·r², an error
    /// along `Σ_{i∈g} a_i·W2[:,i]`), and the row's share of the trace, `Σ_g factor·(Σ|a_i|·‖W2[:,i]‖)²`.
    ///
    /// An element's code changes with the probability that its bf16 value flips (Var/step²)
    /// when an fp8 midpoint lies within one bf16 step, with the probability that the scale moves
    /// when one lies within the scale's relative step, and always when the scaled value sits on
    /// a midpoint and the quantization arithmetic is `approximate` (a kernel's `x·(1/scale)` may
    /// differ in the last bit; with `exact` arithmetic the same bf16 value and scale give the same code).
    ///
    /// `preRounding` (the bf16 values before their rounding and the σ of a kernel's noise there,
    /// indexed like `row`; `exact` quantization arithmetic only): also returns, for each group
    /// whose scale may move by one bf16 step of its `amax` with probability at least
    /// `knownMoveProbability`, that move as a known alternative (`ScaleAlternative`,
    /// docs/error-bounds.md "Known alternatives"), and charges a bf16 flip that crosses an fp8
    /// midpoint under any of the group's scales.
    public static func requantizationVariance(row: [Double], variance: inout [Double], tie: inout [Double], offset: Int, count: Int,
                                              quantizer q: GroupQuantizer, columnNorms2: [Double],
                                              approximate: Bool = true, preRounding: (value: [Double], sigma: [Double])? = nil)
        -> (groupFactors: [Double], trace: Double, alternatives: [ScaleAlternative]) {
        let bf = SmallFloatFormat.bfloat16
        let f8 = q.codec.format
        var correlated = 0.0
        var factors: [Double] = []
        var alternatives: [ScaleAlternative] = []
        var start = 0
        while start < count {
            let end = Swift.min(start + q.groupSize, count)
            var amax = 0.0
            for i in start..<end { amax = Swift.max(amax, Swift.abs(row[offset + i])) }
            let s = Double(q.scale(amax: Float(amax)))
            let stepAmax = bf.ulp(of: amax)
            var pScale = 0.0
            for i in start..<end where Swift.abs(row[offset + i]) >= amax - 1.01 * stepAmax {
                pScale += Swift.min(1, variance[offset + i] / (stepAmax * stepAmax))
            }
            pScale = Swift.min(1, pScale)
            let relScale = amax > 0 ? stepAmax / amax : 0
            var known = preRounding.flatMap { pre in
                amax > 0 && pScale > 0 && !approximate
                    ? scaleAlternative(group: factors.count, row: row, preRounding: pre, offset: offset, range: start..<end,
                                       amax: amax, scale: s, factor: pScale * relScale * relScale, quantizer: q) : nil
            }
            var groupShift = 0.0
            for i in start..<end {
                let v = row[offset + i], vv = variance[offset + i]
                let z = v / s
                let (dOut, dIn, qOut, qIn) = boundaryDistances(z, f8)
                let dMid = Swift.min(dOut, dIn)
                let step = Swift.max(qOut, qIn) * s
                let stepB = bf.ulp(of: v)
                var vq = 0.0
                var nearMidpoint = dMid * s <= 1.01 * stepB
                if let scales = known?.scales {
                    // each alternative scale's dequantized value (the codes a kernel then forms: the
                    // exact move), and a bf16 flip that crosses an fp8 midpoint under any of the scales
                    let deq = f8.round(z, saturating: true) * s
                    for (k, sk) in scales.enumerated() {
                        let zk = Double(q.scaled(Float(v), scale: sk)), sk = Double(sk)
                        known!.deltas[k][i - start] = f8.round(zk, saturating: true) * sk - deq
                        let (o, n, _, _) = boundaryDistances(zk, f8)
                        if Swift.min(o, n) * sk <= 1.01 * stepB { nearMidpoint = true }
                    }
                }
                if nearMidpoint { vq += Swift.min(1, vv / (stepB * stepB)) * step * step }
                if dMid <= 1.01 * Swift.abs(z) * relScale {
                    // codes a scale move changes: with known alternatives only their residual is noise
                    vq += pScale * step * step
                    if known != nil { known!.codeVariance[i - start] = Swift.max(0, pScale - known!.residualProbability) * step * step }
                }
                if approximate && dMid <= Swift.abs(z) * 0x1p-21 + 0x1p-60 { vq += step * step }
                // a systematic choice: on an fp8 midpoint (approximate arithmetic), or a bf16 tie one bf16 step from one
                let onMidpoint = approximate && dMid <= Swift.abs(z) * 0x1p-20 + 0x1p-60
                tie[offset + i] = onMidpoint || (tie[offset + i] > 0 && dMid * s <= 1.01 * stepB) ? step : 0
                // noise wider than a bf16 step is continuous: its own tail decides (a bf16 flip
                // moves by exactly one step and cannot reach an fp8 midpoint further away)
                if vv > stepB * stepB { vq = Swift.max(vq, gridVariance(z, sigma: vv.squareRoot() / s, f8) * s * s) }
                variance[offset + i] = vq
                groupShift += Swift.abs(f8.round(z, saturating: true) * s) * columnNorms2[i].squareRoot()
            }
            correlated += pScale * (relScale * groupShift) * (relScale * groupShift)
            if let known { alternatives.append(known) }
            factors.append(pScale * relScale * relScale)
            start = end
        }
        return (factors, correlated, alternatives)
    }

    /// A move of one fp8 group's scale by one bf16 step of its `amax` at or above this probability
    /// is tested as a known alternative instead of charged as variance (λ·√p·r of threshold
    /// against r of spread: the alternative is the sharper one from p ≈ 1/λ² ≈ 0.03 on).
    public static let knownMoveProbability = 0.05

    /// The one-step moves of a group's scale (`requantizationVariance`) that a correct kernel
    /// makes with probability at least `knownMoveProbability`, from the bf16 values near the
    /// group's `amax` before their rounding and the σ of a kernel's noise there.
    ///
    /// The scale is `scale(amax)`: it moves up when an element at `amax` rounds to the next bf16
    /// value outward (probability ≤ Σ of their outward crossing probabilities), down when every
    /// element at `amax` rounds inward (≤ the smallest inward crossing probability). Moves by two
    /// or more steps (two or three boundaries away, as in `gridVariance`), and a one-step move
    /// below the threshold, stay variance: `residualFactor` (in units of the relative step r²,
    /// as `factor`). Nil where an element near `amax` has noise wider than a quarter step (the
    /// move is no longer one of two discrete values) or no move reaches the threshold.
    static func scaleAlternative(group: Int, row: [Double], preRounding: (value: [Double], sigma: [Double]), offset: Int, range: Range<Int>,
                                 amax: Double, scale s: Double, factor: Double, quantizer q: GroupQuantizer) -> ScaleAlternative? {
        let bf = SmallFloatFormat.bfloat16
        let stepAmax = bf.ulp(of: amax)
        var pUp = 0.0, pDown = 1.0, multi = 0.0
        var qUp = stepAmax, qDown = stepAmax
        for i in range where Swift.abs(row[offset + i]) >= amax - 1.01 * stepAmax {
            let v = preRounding.value[offset + i], sigma = preRounding.sigma[offset + i]
            guard v.isFinite, sigma.isFinite else { return nil }
            if sigma == 0 { if Swift.abs(row[offset + i]) == amax { pDown = 0 }; continue }
            let (dOut, dIn, qOut, qIn) = boundaryDistances(v, bf)
            if sigma > qIn / 4 { return nil }
            let twoSigma2 = 2 * sigma * sigma
            // two and three boundaries away, on either side: moves of more than one step (or, for an
            // element below amax, the move up one step), as gridVariance weighs them
            for k in 2...3 {
                let kk = Double(k - 1), weight = Double(2 * k - 1)
                multi += weight * (crossing(dOut + kk * qOut, twoSigma2) + crossing(dIn + kk * qIn, twoSigma2))
            }
            if Swift.abs(row[offset + i]) == amax {
                pUp += crossing(dOut, twoSigma2)
                pDown = Swift.min(pDown, crossing(dIn, twoSigma2))
                qUp = qOut; qDown = qIn
            }
        }
        pUp = Swift.min(1, pUp)
        guard amax - qDown > 0 else { return nil }
        let up = q.scale(amax: Float(amax + qUp)), down = q.scale(amax: Float(amax - qDown))
        let relStep = stepAmax / amax
        var scales: [Float] = [], moves: [Double] = [], probabilities: [Double] = []
        var residual = multi * relStep * relStep, residualP = multi
        for (p, sk) in [(pUp, up), (pDown, down)] where p > 0 {
            let r = Double(sk) / s - 1
            if p >= knownMoveProbability && r != 0 {
                scales.append(sk); moves.append(r); probabilities.append(p)
            } else {
                residual += p * r * r; residualP += p
            }
        }
        guard !moves.isEmpty, residual < factor else { return nil }
        let n = range.count
        return ScaleAlternative(group: group, start: range.lowerBound, moves: moves, scales: scales, probabilities: probabilities, factor: factor,
                                residualFactor: residual, residualProbability: Swift.min(1, residualP),
                                deltas: [[Double]](repeating: [Double](repeating: 0, count: n), count: moves.count),
                                codeVariance: [Double](repeating: 0, count: n))
    }

    /// Whether a correct kernel may order two logits the other way round (or tie them) with a
    /// probability above the model's negligible level (6σ on each side): `high` is the
    /// reference's K-th logit before rounding, `low` the (K+1)-th.
    public static func maySwap(high: Double, highSigma: Double, low: Double, lowSigma: Double, rounding: Rounding, slack: Double) -> Bool {
        let lambda = 6.0
        let hi = high - lambda * highSigma, lo = low + lambda * lowSigma
        if let f = rounding.format {
            return f.round(hi) <= f.round(lo) + slack
        }
        return hi <= lo + slack
    }
}

extension StatisticalModel {
    /// The probability that a kernel's value after a rounding point differs from the reference's
    /// `round(v)` when its input carries noise of standard deviation `sigma`: the crossing
    /// probability of the nearest boundary on each side (as in `gridVariance`); 1 for a value the
    /// recipe leaves unrounded (any noise shows) or may leave unrounded.
    public static func flipProbability(_ v: Double, sigma: Double, _ rounding: Rounding) -> Double {
        guard sigma > 0, v.isFinite else { return 0 }
        guard let f = rounding.format, rounding != .bf16OrFP32 else { return 1 }
        let (dOut, dIn, _, qIn) = boundaryDistances(v, f)
        if sigma > qIn / 4 { return 1 }
        let twoSigma2 = 2 * sigma * sigma
        return Swift.min(1, crossing(dOut, twoSigma2) + crossing(dIn, twoSigma2))
    }

    /// One rounding of an accumulation the reference simulates in the kernel's own order (a bf16
    /// buffer's partial sum): the kernel's exact pre-rounding value differs from the reference's
    /// `pre` by δ with `E[δ²] ≤ variance` and `P(δ ≠ 0) ≤ probability` (its inputs are values on a
    /// grid that equal the reference's unless one of them flipped). Equal inputs give the same
    /// rounding, ties included; otherwise the rounding changes only if |δ| reaches the nearest
    /// boundary (Chebyshev: `P ≤ E[δ²]/d²`), and then by at most |δ| + one step q:
    /// `E[err²] ≤ (√E[δ²] + q·√P_cross)²`, and the rounded value differs with probability P_cross.
    /// Distribution-free given the two moments, so it needs no Gaussian tail for noise made of
    /// rare one-step flips (where a Gaussian tail would be far too small one step away).
    public static func orderedRounding(_ pre: Double, variance: Double, probability: Double, _ f: SmallFloatFormat) -> (variance: Double, probability: Double) {
        guard pre.isFinite, variance > 0 || probability > 0 else { return (0, 0) }
        let (dOut, dIn, qOut, qIn) = boundaryDistances(pre, f)
        let d = Swift.min(dOut, dIn), q = Swift.max(qOut, qIn)
        var p = Swift.min(1, probability)
        if d > 0 { p = Swift.min(p, variance / (d * d)) }
        let sd = variance.squareRoot() + q * p.squareRoot()
        return (sd * sd, p)
    }

    /// Variance proxy of the weighted combine's own accumulation over `slots` terms: fp32
    /// `(√(S+2)·u·Σ|c|)²`; bf16 (atomics or a bf16 buffer, any order): S roundings of partial sums,
    /// each within half a bf16 step of `Σ|c|`.
    public static func combineVariance(absSum: Double, slots: Int, combine: CombineMode) -> Double {
        switch combine {
        case .exact: return 0
        case .fp32:
            let s = accumulationSigmaFactor(terms: slots + 2, unitRoundoff: 0x1p-24) * absSum
            return s * s
        case .bf16:
            let half = SmallFloatFormat.bfloat16.ulp(of: absSum) / 2
            return Double(slots) * half * half
        case .bf16ExpertOrder, .fp32RoutedBF16Shared:
            return 0  // simulated step by step (orderedRounding)
        }
    }


}

/// A move of one fp8 group's scale that a correct kernel makes with a probability too high to
/// treat as noise (`StatisticalModel.scaleAlternative`): every dequantized value `a_i` of the
/// group then moves by `r·a_i`, an error along `r·Σ_{i∈g} a_i·W2[:,i]` of known shape. The
/// statistical tier tests it as an alternative (docs/error-bounds.md, "Known alternatives").
public struct ScaleAlternative: Sendable, Equatable {
    /// The group's index in its row, and its first element's.
    public var group: Int
    public var start: Int
    /// The relative scale changes `s'/s − 1` tested as alternatives (one bf16 step of `amax` up,
    /// down), the scales themselves, and a bound on the probability of each.
    public var moves: [Double]
    public var scales: [Float]
    public var probabilities: [Double]
    /// The group's variance factor as `requantizationVariance` charges it (`p·r²`), what of it
    /// stays variance when the moves are alternatives, and the probability of a move that is not
    /// one of them (two or more steps; a direction below `knownMoveProbability`).
    public var factor: Double
    public var residualFactor: Double
    public var residualProbability: Double
    /// Per move, the exact change of each dequantized value of the group (the kernel's codes at
    /// the other scale times that scale, minus the reference's): the move's own code changes
    /// included.
    public var deltas: [[Double]]
    /// The variance of each element's code changes by a scale move that the alternatives take
    /// over (`requantizationVariance` charges the element `p·step²` for them; the residual's share stays).
    public var codeVariance: [Double]
}

/// How a kernel may order the fp32 additions of one dot product, as the statistical model
/// assumes it (the recipe's `accumulation`; docs/error-bounds.md, "Accumulation noise").
public enum AccumulationOrder: String, Codable, Sendable, CaseIterable {
    /// Each partial sum the kernel rounds is the sum of a contiguous run of terms in K order
    /// (sequential, tiled/blocked, mma steps, pairwise over contiguous halves), or the sum of
    /// whole pieces whose boundaries are multiples of `StatisticalModel.accumulationBlock`,
    /// combined in any order (split-K partials, atomics, per-128-block fp8 partials).
    case contiguous
    /// Any order: every partial sum bounded by Σ|t| only (the Higham–Mary proxy √n·u·Σ|t|).
    case any
}

extension StatisticalModel {
    /// The granularity at which a kernel may split a dot product's K range and combine the
    /// pieces in any order (split-K points, tile steps): 32.
    public static let accumulationBlock = 32

    /// Standard-deviation proxy of the accumulation error of an fp32 dot product of `length`
    /// terms t with `terms` rounding points in all (additions plus the fp8 scale products),
    /// given `absSum` ≥ Σ|t| and, for `.contiguous`, `range` = max − min of the prefix sums
    /// (the largest |sum| of a contiguous run) and `split` = the larger of the sums of positive
    /// and of negative `accumulationBlock`-block partials (the largest |sum| of whole blocks),
    /// both computed in float32 in index order (`rangeStats`).
    ///
    /// Every rounding point rounds a partial sum σ_j to σ_j·(1 + δ_j), |δ_j| ≤ u, δ_j mean-
    /// independent of what came before (Higham–Mary), and the error is exactly Σ_j δ_j·σ_j
    /// (telescoping over the summation tree), a martingale whose increments are bounded by
    /// u·|σ_j|: sub-Gaussian with variance proxy u²·Σ_j c_j² for any deterministic c_j ≥ |σ_j|
    /// (Azuma–Hoeffding). Here |σ_j| ≤ range (a contiguous run; at most `terms` of them) or ≤
    /// split (whole blocks; at most blocks − 1 such additions), each plus the worst-case error
    /// of the computed partial sum, γ·Σ|t|, and the float32 evaluation's own error, 2γ_{k+3}·Σ|t|.
    /// `.any` (or a larger result): `√terms·u·Σ|t|`.
    public static func accumulationSigma(terms n: Int, length k: Int, unitRoundoff u: Double, absSum: Double, range: Double, split: Double,
                                         order: AccumulationOrder) -> Double {
        AccumulationSigma(terms: n, length: k, unitRoundoff: u, order: order)(absSum: absSum, range: range, split: split)
    }

    /// `accumulationSigma` for many dot products of one shape: what depends only on the shape
    /// (√n·u, the margin's factor, the block count) computed once, then the same operations.
    public struct AccumulationSigma: Sendable {
        let contiguous: Bool
        let oldFactor: Double, marginFactor: Double, terms: Double, splits: Double, u: Double

        public init(terms n: Int, length k: Int, unitRoundoff u: Double, order: AccumulationOrder) {
            let blocks = (k + accumulationBlock - 1) / accumulationBlock
            contiguous = order == .contiguous
            oldFactor = accumulationSigmaFactor(terms: n, unitRoundoff: u)
            marginFactor = 2 * StatisticalModel.gamma(k + 3, 0x1p-24) + StatisticalModel.gamma(n + blocks, u)
            terms = Double(n)
            splits = Double(Swift.max(0, blocks - 1))
            self.u = u
        }

        @inline(__always)
        public func callAsFunction(absSum: Double, range: Double, split: Double) -> Double {
            let old = oldFactor * absSum
            guard contiguous, absSum.isFinite else { return old }
            let margin = marginFactor * absSum
            let r = range + margin, s = split + margin
            let v = (terms * r * r + splits * s * s).squareRoot() * u
            return Swift.min(old, v)
        }

        /// The square of `callAsFunction` for `count` dot products at once, `range`/`split` nil
        /// for zeros (`mc_accumulation_variance`: the same operations, vectorized; the same bits).
        public func variances(absSum: UnsafePointer<Double>, range: UnsafePointer<Float>?, split: UnsafePointer<Float>?, count: Int,
                              into out: UnsafeMutablePointer<Double>) {
            mc_accumulation_variance(absSum, range, split, count, oldFactor, marginFactor, terms, splits, u, contiguous ? 1 : 0, out)
        }
    }

    @inline(__always)
    static func gamma(_ n: Int, _ u: Double) -> Double { let nu = Double(n) * u; return nu / (1 - nu) }

    /// `range` and `split` (see `accumulationSigma`) of every dot product `A[i,:]·B[j,:]`, A
    /// `[m, k]`, B `[n, k]` row-major float32: `[m, n]` each, in float32, index order.
    public static func rangeStats(_ a: [Float], m: Int, k: Int, _ b: [Float], n: Int) -> (range: [Float], split: [Float]) {
        var range = [Float](repeating: 0, count: m * n), split = [Float](repeating: 0, count: m * n)
        guard m > 0, n > 0, k > 0 else { return (range, split) }
        precondition(a.count >= m * k && b.count >= n * k, "rangeStats: operands smaller than [m, k] and [n, k]")
        let ok = a.withUnsafeBufferPointer { ap in b.withUnsafeBufferPointer { bp in range.withUnsafeMutableBufferPointer { rp in
            split.withUnsafeMutableBufferPointer { sp in
                mc_range_stats(ap.baseAddress!, m, k, bp.baseAddress!, k, n, accumulationBlock, rp.baseAddress!, sp.baseAddress!)
            } } } }
        precondition(ok == 1, "rangeStats: out of memory")
        return (range, split)
    }

    /// The size in floats of `B [rows, columns]` packed for `rangeStats(_:m:k:packed:n:)`.
    public static func packedCount(rows n: Int, columns k: Int) -> Int { mc_range_packed_count(n, k) }

    /// The code path of the packed range statistics: the best this CPU has, or one named (tests:
    /// every path gives the same bits).
    public enum RangeStatsPath: Int32, Sendable, CaseIterable {
        case auto = 0, portable = 1, avx2 = 2
    }

    /// `rangeStats(_:m:k:_:n:)` against `B [n, k]` packed by `MoEReferenceEngine.PreparedWeights`
    /// (panels of 8 columns, `mc_range_stats_packed`), with rows of `a` `lda` apart, into `[m, n]`
    /// outputs `ldc` apart. False when `path` is not available on this CPU.
    @discardableResult
    public static func rangeStats(_ a: UnsafePointer<Float>, lda: Int, m: Int, k: Int, packed: UnsafePointer<Float>, n: Int,
                                  range: UnsafeMutablePointer<Float>, split: UnsafeMutablePointer<Float>, ldc: Int,
                                  path: RangeStatsPath = .auto) -> Bool {
        mc_range_stats_packed(a, lda, m, k, packed, n, accumulationBlock, range, split, ldc, path.rawValue) == 1
    }

    /// The same into new `[m, n]` arrays; with `parallel`, rows spread over the pinned thread
    /// count (each output is computed on its own: the same bits).
    public static func rangeStats(_ a: [Float], m: Int, k: Int, packed: [Float], n: Int, parallel: Bool = false) -> (range: [Float], split: [Float]) {
        var range = [Float](repeating: 0, count: m * n), split = [Float](repeating: 0, count: m * n)
        guard m > 0, n > 0, k > 0 else { return (range, split) }
        precondition(a.count >= m * k && packed.count >= packedCount(rows: n, columns: k), "rangeStats: operands smaller than [m, k] and packed [n, k]")
        a.withUnsafeBufferPointer { ap in packed.withUnsafeBufferPointer { bp in range.withUnsafeMutableBufferPointer { rp in
            split.withUnsafeMutableBufferPointer { sp in
                let (a0, b0, r0, s0) = (ap.baseAddress!, bp.baseAddress!, rp.baseAddress!, sp.baseAddress!)
                ParallelLoops.chunks(m, minimum: parallel ? 1 : m) { rows in
                    rangeStats(a0 + rows.lowerBound * k, lda: k, m: rows.count, k: k, packed: b0, n: n,
                               range: r0 + rows.lowerBound * n, split: s0 + rows.lowerBound * n, ldc: n)
                }
            } } } }
        return (range, split)
    }

    /// `range` and `split` of one dot product's terms `t(0..<k)`, in float64.
    public static func rangeStats(count k: Int, _ t: (Int) -> Double) -> (range: Double, split: Double) {
        var s = 0.0, hi = 0.0, lo = 0.0, block = 0.0, pos = 0.0, neg = 0.0
        for q in 0..<k {
            let v = t(q)
            s += v; block += v
            hi = Swift.max(hi, s); lo = Swift.min(lo, s)
            if (q + 1) % accumulationBlock == 0 || q == k - 1 {
                if block > 0 { pos += block } else { neg -= block }
                block = 0
            }
        }
        return (hi - lo, Swift.max(pos, neg))
    }
}

/// The statistical model of a correct kernel's error for one reference run: a kernel's output
/// error `e = o − output` has, along any direction `d` (per token), variance at most
/// `Σ_h d_h²·elementVariance[t,h] + ‖d_t‖²·(expertTokenVariance[t] + routerTokenVariance[t])`
/// (the second term by Cauchy–Schwarz over the errors that reach all of a token's output
/// through the down projection, the routing weights and the shared gate).
public struct ReferenceStatistics: Sendable {
    /// `[T, H]`: independent per element before the output rounding (stage-2 and combine
    /// accumulation).
    public var elementVariance: [Double]
    /// `[T, H]`: with an output rounding, the variance of the kernel's output about the
    /// reference's output rounded the same way (`round(o)`), from its noise before the rounding
    /// (σ² = elementVariance + the token's correlated variance); empty without one.
    public var outputFlipVariance: [Double]
    /// `[T, H]`: one output step where `o` sits on a rounding tie (a systematic choice), else 0.
    public var outputTieBias: [Double]
    /// `[T]`: a bound on the norm of the systematic error that upstream ties (intermediate, fp8
    /// midpoints) bring into the token's output; `[T, 1 + slots]`: the same along each test direction.
    public var tieNorm: [Double]
    public var directionBias: [Double]?
    /// `[T]`: tokens the statistical tier leaves out: a repeat of an earlier token's input
    /// (identical computations make identical errors) or a router value on a rounding tie.
    public var excludedTokens: [Bool]
    /// `[T]`: stage-1 intermediate flips and fp8 requantization changes, propagated through W2.
    public var expertTokenVariance: [Double]
    /// `[T]`: routing weights (logit flips, softmax evaluation, weight rounding) and shared gate.
    public var routerTokenVariance: [Double]
    /// `[T]`: the largest single independent cause in `expertTokenVariance[t]`: one intermediate
    /// element's flip (`w²·Var(a_i)·‖W2[:,i]‖²`) or one fp8 group's scale move (`factor·‖Σ_{i∈g}
    /// a_i·W2[:,i]‖²`). Each such cause moves a whole output row along one vector, so the mean
    /// square test takes it as one χ² block, not as H independent elements. Empty: unknown (the
    /// whole token's correlated variance is then one block).
    public var expertTokenBlockMax: [Double] = []
    /// `[T·S, Imax]` variance of the bf16 intermediate (before fp8 requantization), when kept.
    public var intermediateVariance: [Double]?
    /// `[T·S, Imax]` one bf16 step where the intermediate sits on a rounding tie, when kept.
    public var intermediateTieBias: [Double]?
    /// `[T, slots]`: routed experts in descending weight, then the shared expert (id E).
    public var slotExperts: [Int32]
    public var slots: Int
    /// `[T, slots, H]` each slot's weighted contribution, when kept.
    public var contributions: [Float]?
    /// Tokens whose K-th and (K+1)-th experts a correct kernel may swap with non-negligible
    /// probability under the model.
    public var ambiguousTokens: [Bool]
    /// Tokens with an fp8 activation code on a rounding midpoint (their stage-1 variance is the
    /// rigorous radius), empty without fp8 activations.
    public var midpointTokens: [Bool]
    /// `[T, 1 + slots]`: the variance of `d·e_t` from the correlated errors (stage-1 flips and
    /// fp8 scale changes through W2, routing weights, shared gate), computed exactly under the
    /// model for d = the token's output (column 0) and d = each slot's contribution (column
    /// 1 + s); nil when the contributions were not kept (the judge then falls back to
    /// Cauchy–Schwarz: ‖d‖²·(expert + router token variance)).
    public var directionVariance: [Double]?
    /// `[T, 1 + slots, 4]`: per token and test direction (as `directionVariance`), the token's
    /// known alternatives — likely fp8 group-scale moves tested as hypotheses, whose variance
    /// `directionVariance` then leaves out: the lowest and highest shift of the error along the
    /// direction over the token's hypotheses, and the largest flip variance and tie bias of the
    /// output rounding along it under any of them; NaN flip where the token has none
    /// (docs/error-bounds.md, "Known alternatives"). Nil where the model has none: the recipe
    /// (`MoEReferenceEngine.knownAlternativesEnabled`), or the contributions not kept.
    public var alternatives: [Double]? = nil
}
