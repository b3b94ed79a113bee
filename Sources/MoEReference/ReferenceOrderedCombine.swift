import Foundation
import LowPrecision

/// The combine of a recipe whose accumulation the reference simulates in the kernel's own order
/// (`CombineMode.simulatesOrder`): each bf16 rounding of a partial sum is computed as the kernel
/// computes it, so the rigorous radius passes through every rounding as an interval and the
/// statistical model charges a rounding only where the kernel's inputs may differ from the
/// reference's (`StatisticalModel.orderedRounding`), not half a step of every partial sum.
///
/// Per element `[T, H]`: the partial sum's flip probability (the variance lives in
/// `Combined.elementVariance`), and, for the last rounding (the output's), its input value,
/// variance and flip probability — the router's share is added to them once it is known.
/// For `fp32RoutedBF16Shared` also Σ|c| and the smallest bf16 step of the routed contributions:
/// when `Σ|c| < 2²⁴·step`, every fp32 partial sum of them is exact in any order.
struct OrderedCombineState {
    var flip: [Double]
    var lastInput: [Double]
    var lastVariance: [Double]
    var lastFlip: [Double]
    var routedAbs: [Double]
    var routedStep: [Double]
    /// Additions made so far per token (a token's last one is its `slotsAll`-th).
    var added: [Int]
    /// Whether the statistical part is kept (false: values and bounds only).
    let stats: Bool

    init(tokens T: Int, hidden H: Int, stats: Bool, mode: CombineMode) {
        let n = stats ? T * H : 0
        flip = [Double](repeating: 0, count: n)
        lastInput = [Double](repeating: 0, count: n)
        lastVariance = [Double](repeating: 0, count: n)
        lastFlip = [Double](repeating: 0, count: n)
        let routed = mode == .fp32RoutedBF16Shared ? n : 0   // the exactness test of the routed fp32 sum only
        routedAbs = [Double](repeating: 0, count: routed)
        routedStep = [Double](repeating: .infinity, count: routed)
        added = [Int](repeating: 0, count: T)
        self.stats = stats
    }
}

/// Raw pointers into an `OrderedCombineState` for the combine's workers (they own disjoint tokens).
struct OrderedCombinePointers {
    let flip, lastInput, lastVariance, lastFlip, routedAbs, routedStep: UnsafeMutablePointer<Double>?
    let added: UnsafeMutablePointer<Int>
}

extension OrderedCombineState {
    mutating func withPointers(_ body: (OrderedCombinePointers) -> Void) {
        withPointer(&flip) { fl in withPointer(&lastInput) { li in withPointer(&lastVariance) { lv in withPointer(&lastFlip) { lf in
        withPointer(&routedAbs) { ra in withPointer(&routedStep) { rs in
            added.withUnsafeMutableBufferPointer { ad in
                body(OrderedCombinePointers(flip: fl, lastInput: li, lastVariance: lv, lastFlip: lf, routedAbs: ra, routedStep: rs, added: ad.baseAddress!))
            }
        } } } } } }
    }
}

extension MoEReferenceEngine {
    /// The fp32 accumulation of the routed contributions as the statistical model sees it: its
    /// variance proxy (0 when every partial sum is exact) and whether it may differ at all.
    static func routedFP32Noise(absSum: Double, step: Double, terms: Int) -> (variance: Double, mayDiffer: Bool) {
        if absSum == 0 || absSum < 0x1p24 * step { return (0, false) }
        let s = StatisticalModel.accumulationSigmaFactor(terms: terms, unitRoundoff: 0x1p-24) * absSum
        return (s * s, true)
    }

    /// One contribution `c` (rigorous radius `cb`, variance `v`, flip probability `p`) of token
    /// `t`'s element `i` entering the ordered accumulation: `out`/`outBound` hold the running
    /// value and radius (`absSum`: Σ(|c| + radius) of the contributions added before), `variance` the running variance. `slot`: the contribution is the
    /// shared expert's (`fp32RoutedBF16Shared` rounds the routed sum before adding it); `last`:
    /// its rounding is the output's.
    @inline(__always)
    static func orderedAdd(_ c: Double, _ cb: Double, v: Double, p: Double, i: Int, shared: Bool, last: Bool, routedTerms: Int,
                           mode: CombineMode, out: UnsafeMutablePointer<Double>, outBound: UnsafeMutablePointer<Double>,
                           absSum: UnsafeMutablePointer<Double>, variance: UnsafeMutablePointer<Double>?, state s: OrderedCombinePointers) {
        let bf = SmallFloatFormat.bfloat16
        let u = 0x1p-24
        if mode == .fp32RoutedBF16Shared && !shared {
            // routed: an fp32 sum, rounded once when the shared expert's contribution arrives
            out[i] += c
            outBound[i] += cb
            if let variance, let fl = s.flip, let ra = s.routedAbs, let rs = s.routedStep {
                variance[i] += v
                fl[i] = Swift.min(1, fl[i] + p)
                ra[i] += Swift.abs(c)
                if c != 0 { rs[i] = Swift.min(rs[i], bf.ulp(of: c)) }
                if last {
                    let (nv, differ) = routedFP32Noise(absSum: ra[i], step: rs[i], terms: routedTerms)
                    s.lastInput![i] = out[i]; s.lastVariance![i] = variance[i] + nv; s.lastFlip![i] = differ ? 1 : fl[i]
                }
            }
            return
        }
        if mode == .fp32RoutedBF16Shared {
            // the routed sum's own rounding to bf16 (fp32 accumulation: γ·Σ|c| in the radius)
            let rb = outBound[i] + Self.gamma(routedTerms + 2, u) * absSum[i]
            let r = out[i]
            (out[i], outBound[i]) = Self.roundInterval(r, rb, .bf16)
            if let variance, let fl = s.flip, let ra = s.routedAbs, let rs = s.routedStep {
                let (nv, differ) = routedFP32Noise(absSum: ra[i], step: rs[i], terms: routedTerms)
                (variance[i], fl[i]) = StatisticalModel.orderedRounding(r, variance: variance[i] + nv, probability: differ ? 1 : fl[i], bf)
            }
        }
        // a bf16 buffer's addition: the exact sum of two bf16 values rounded once (an fp32 add
        // first is exact, or leaves the bf16 rounding unchanged)
        let pre = out[i] + c
        let preBound = outBound[i] + cb
        (out[i], outBound[i]) = Self.roundInterval(pre, preBound == 0 ? 0 : preBound + u * (Swift.abs(pre) + preBound), .bf16)
        if let variance, let fl = s.flip {
            let vPre = variance[i] + v, pPre = Swift.min(1, fl[i] + p)
            if last {
                s.lastInput![i] = pre; s.lastVariance![i] = vPre; s.lastFlip![i] = pPre
            } else {
                (variance[i], fl[i]) = StatisticalModel.orderedRounding(pre, variance: vPre, probability: pPre, bf)
            }
        }
    }
}
