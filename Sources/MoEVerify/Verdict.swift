import Foundation
import LowPrecision

/// The comparison of a kernel's output with the reference: pass when every element lies within
/// its bound and nothing is NaN/Inf where the reference is finite. Every verdict also carries the
/// usual metrics so it can be read next to other suites' numbers.
public struct Verdict: Codable, Sendable, CustomStringConvertible {
    public var passed: Bool
    public var elements: Int
    /// Elements outside their bound (NaN/Inf count as outside).
    public var violations: Int
    public var nonFinite: Int
    public var maxAbsError: Double
    public var maxRelError: Double
    /// Max error in units of the bf16 ulp at the reference value.
    public var maxULP: Double
    /// sqrt(Σ(a−b)²/Σb²)
    public var rmsRelError: Double
    /// ‖a−b‖²/(‖a‖²+‖b‖²) (DeepGEMM's calc_diff)
    public var calcDiff: Double
    /// Largest |a−b| / bound (≤ 1 passes).
    public var worstBoundRatio: Double
    /// Flat index of the worst element (largest error/bound ratio, or first non-finite).
    public var worstIndex: Int
    public var worstValue: Double
    public var worstReference: Double
    public var worstBound: Double

    /// Compares `actual` with `reference ± bound` element by element.
    public static func compare(actual: [Double], reference: [Double], bound: [Double]) -> Verdict {
        precondition(actual.count == reference.count && bound.count == reference.count)
        var v = Verdict(passed: true, elements: actual.count, violations: 0, nonFinite: 0, maxAbsError: 0, maxRelError: 0, maxULP: 0,
                        rmsRelError: 0, calcDiff: 0, worstBoundRatio: 0, worstIndex: -1, worstValue: 0, worstReference: 0, worstBound: 0)
        var se = 0.0, sr = 0.0, sa = 0.0, sab = 0.0
        for i in 0..<actual.count {
            let a = actual[i], r = reference[i], b = bound[i]
            if !a.isFinite {
                if r.isFinite || a.isNaN != r.isNaN {
                    v.nonFinite += 1
                    v.violations += 1
                    if v.worstBoundRatio < .infinity {
                        v.worstBoundRatio = .infinity
                        v.worstIndex = i; v.worstValue = a; v.worstReference = r; v.worstBound = b
                    }
                }
                continue
            }
            let d = Swift.abs(a - r)
            v.maxAbsError = Swift.max(v.maxAbsError, d)
            if r != 0 { v.maxRelError = Swift.max(v.maxRelError, d / Swift.abs(r)) }
            let ulp = SmallFloatFormat.bfloat16.ulp(of: r)
            v.maxULP = Swift.max(v.maxULP, d / ulp)
            se += d * d; sr += r * r; sa += a * a; sab += a * r
            let ratio = d == 0 ? 0 : (b > 0 ? d / b : .infinity)
            if d > b { v.violations += 1 }
            if ratio > v.worstBoundRatio || v.worstIndex < 0 {
                v.worstBoundRatio = ratio
                v.worstIndex = i; v.worstValue = a; v.worstReference = r; v.worstBound = b
            }
        }
        v.rmsRelError = sr > 0 ? (se / sr).squareRoot() : (se > 0 ? .infinity : 0)
        let denom = sa + sr
        v.calcDiff = denom > 0 ? Swift.max(0, (sa + sr - 2 * sab) / denom) : 0
        v.passed = v.violations == 0
        return v
    }

    public var description: String {
        String(format: "max_abs=%.3e max_rel=%.3e max_ulp=%.1f rms_rel=%.3e calc_diff=%.3e worst/bound=%.3f violations=%d/%d",
               maxAbsError, maxRelError, maxULP, rmsRelError, calcDiff, worstBoundRatio.isFinite ? worstBoundRatio : 1e99, violations, elements)
    }
}
