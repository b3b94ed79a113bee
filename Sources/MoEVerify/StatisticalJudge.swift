import Foundation
import MoEReference

/// The smallest scale errors a case's verdict would surely detect: a kernel whose output (or one
/// expert's contribution) is off by a factor `1 + ε` with `|ε|` at least this is flagged by that
/// tier (the statistical one with probability ≥ 1 − its false-alarm budget).
public struct Sensitivity: Codable, Sendable, Equatable {
    /// Whole output scaled: rigorous tier (`min (2·bound + half an output step)/|output|` over the
    /// judged elements: past that a correct kernel's error and the output rounding cannot hide it).
    public var rigorousOutput: Double
    /// One routed expert's contribution scaled, median over the routed experts of the case.
    public var rigorousExpert: Double
    /// Whole output scaled: statistical tier (`2λ·√Var(Σ e·o) / Σ o²`).
    public var statisticalOutput: Double
    /// One routed expert's contribution scaled: median and worst over the routed experts.
    public var statisticalExpert: Double
    public var statisticalExpertWorst: Double
    /// The shared expert's contribution scaled (nil without a shared expert).
    public var statisticalShared: Double?

    public var line: String {
        func f(_ v: Double) -> String { v.isFinite ? String(format: "%.1e", v) : "-" }
        return "sensitivity: output ×(1±\(f(statisticalOutput))) stat / \(f(rigorousOutput)) rig, one expert \(f(statisticalExpert)) stat "
            + "(worst \(f(statisticalExpertWorst))) / \(f(rigorousExpert)) rig"
    }
}

/// The statistical tier's verdict on one stage: the kernel's error against the error a kernel
/// following the declared recipe makes under the model of `StatisticalModel` (docs/error-bounds.md).
public struct PrecisionVerdict: Codable, Sendable {
    public var passed: Bool
    /// The false-alarm budget of the whole verdict (all its tests together) under the model.
    public var falseAlarmBudget: Double
    /// The two-sided z threshold of each projection test (Bonferroni over the tests).
    public var lambda: Double
    /// Σe² / its predicted mean, and the threshold on that ratio.
    public var meanSquareRatio: Double
    public var meanSquareThreshold: Double
    /// z of Σ e·reference (a scale error of the whole stage output).
    public var outputZ: Double
    /// The largest |z| of the per-expert tests (Σ e·contribution of that expert), and its expert.
    public var worstExpertZ: Double
    public var worstExpert: Int
    public var tests: Int
    public var tokensJudged: Int
    public var tokensExcluded: Int
    public var failures: [String]
    public var sensitivity: Sensitivity?

    public var summary: String {
        String(format: "precision: mse %.2f× predicted (limit %.2f), z(output) %+.1f, max |z(expert)| %.1f (limit %.1f)%@",
               meanSquareRatio, meanSquareThreshold, outputZ, Swift.abs(worstExpertZ), lambda,
               tokensExcluded > 0 ? " over \(tokensJudged) tokens (\(tokensExcluded) ambiguous excluded)" : "")
    }
}

/// The statistical tier: tests a kernel's error against the variance model of a correct kernel.
///
/// - Mean square: `Σ e²` against its predicted mean `M = Σ_h Var_h + Σ_t F_t`, with the
///   Laurent–Massart χ² tail (`M + 2√(τ·Σa²) + 2τ·max a`, τ = ln(tests/α)).
/// - Projections: for a direction d (the reference output; each expert's contribution),
///   `z = Σ d·e / √(Σ d²·Var_h + Σ_t ‖d_t‖²·F_t)`, flagged when `|z| > λ`, λ from the sub-Gaussian
///   tail `2·exp(−λ²/2)` with the budget α split over the tests (Bonferroni).
/// A scale error of `1 + ε` in one expert adds `ε·Σ c²` to that expert's numerator while the
/// kernel's rounding noise grows only like its square root: this is what the worst-case bound
/// cannot see.
public enum StatisticalJudge {
    /// False-alarm probability of one case's statistical verdict under the model.
    public static let falseAlarmBudget = 1e-6

    static func lambda(tests m: Int) -> Double { (2 * Foundation.log(2 * Double(m) / falseAlarmBudget)).squareRoot() }

    /// Judges a whole-layer output `[T, H]` (or stage 2's) against `ref`. `tokens`: which
    /// tokens to judge (nil: all); `includeRouter`: whether the kernel computed its own routing
    /// weights and shared gate (false when they were given to it).
    public static func judgeOutput(_ actual: [Double], reference ref: ReferenceResult, tokens mask: [Bool]? = nil,
                                   includeRouter: Bool = true) -> PrecisionVerdict? {
        guard let st = ref.statistics else { return nil }
        let T = ref.tokens, H = ref.hidden, slots = st.slots
        // a change smaller than half an output step can round back to the same output value
        func outHalfStep(_ o: Double) -> Double { ref.recipe.output.format.map { $0.ulp(of: o) / 2 } ?? 0 }
        let judged = (0..<T).filter { mask?[$0] ?? true }
        // per-token correlated variance
        let F = (0..<T).map { st.expertTokenVariance[$0] + (includeRouter ? st.routerTokenVariance[$0] : 0) }
        var Q = 0.0, M = 0.0, A2 = 0.0, Amax = 0.0
        var nOut = 0.0, vOut = 0.0, oo = 0.0
        var nonFinite = 0
        // per expert: numerator, variance, Σc²
        var expertN = [Int: Double](), expertV = [Int: Double](), expertC2 = [Int: Double]()
        var rigOut = Double.infinity
        var rigExpert = [Int: Double]()
        for t in judged {
            var norm2 = 0.0
            for h in 0..<H {
                let i = t * H + h
                let e = actual[i] - ref.output[i]
                if !e.isFinite { nonFinite += 1; continue }
                let v = st.elementVariance[i], o = ref.output[i]
                Q += e * e; M += v; A2 += v * v; Amax = Swift.max(Amax, v)
                nOut += e * o; vOut += o * o * v; oo += o * o; norm2 += o * o
                if o != 0 { rigOut = Swift.min(rigOut, (2 * ref.bound[i] + outHalfStep(o)) / Swift.abs(o)) }
            }
            M += F[t]; A2 += F[t] * F[t]; Amax = Swift.max(Amax, F[t])
            // along a direction: exactly under the model where the reference projected it, else Cauchy–Schwarz
            let D = slots + 1
            func directional(_ j: Int, _ d2: Double) -> Double {
                guard let dv = st.directionVariance else { return d2 * F[t] }
                return includeRouter ? dv[t * D + j] : Swift.min(dv[t * D + j], d2 * st.expertTokenVariance[t]) + 0
            }
            vOut += directional(0, norm2)
            if let contrib = st.contributions {
                for s in 0..<slots {
                    let e = Int(st.slotExperts[t * slots + s])
                    var n = 0.0, v = 0.0, c2 = 0.0, rig = Double.infinity
                    for h in 0..<H {
                        let c = Double(contrib[(t * slots + s) * H + h])
                        let err = actual[t * H + h] - ref.output[t * H + h]
                        if !err.isFinite { continue }
                        n += err * c; v += c * c * st.elementVariance[t * H + h]; c2 += c * c
                        if c != 0 { rig = Swift.min(rig, (2 * ref.bound[t * H + h] + outHalfStep(ref.output[t * H + h])) / Swift.abs(c)) }
                    }
                    expertN[e, default: 0] += n
                    expertV[e, default: 0] += v + directional(1 + s, c2)
                    expertC2[e, default: 0] += c2
                    rigExpert[e] = Swift.min(rigExpert[e] ?? .infinity, rig)
                }
            }
        }
        let tests = 2 + expertN.count
        let lam = lambda(tests: tests)
        if ProcessInfo.processInfo.environment["MOECHECK_DEBUG_STATS"] != nil {
            let ev = judged.reduce(0.0) { a, t in a + (0..<H).reduce(0.0) { $0 + st.elementVariance[t * H + $1] } }
            let fe = judged.reduce(0.0) { $0 + st.expertTokenVariance[$1] * Double(1) }
            let fr = judged.reduce(0.0) { $0 + st.routerTokenVariance[$1] }
            print(String(format: "DEBUG stats: Σo²=%.3e Σev=%.3e ΣFexp=%.3e ΣFrouter=%.3e Q=%.3e vOut=%.3e nOut=%.3e", oo, ev, fe, fr, Q, vOut, nOut))
        }
        let tau = Foundation.log(Double(tests) / falseAlarmBudget)
        let msLimit = M + 2 * (tau * A2).squareRoot() + 2 * tau * Amax
        var failures: [String] = []
        if nonFinite > 0 { failures.append("\(nonFinite) non-finite output element(s)") }
        let msRatio = M > 0 ? Q / M : (Q > 0 ? .infinity : 0)
        let msThreshold = M > 0 ? msLimit / M : 0
        if Q > msLimit {
            failures.append(String(format: "error mean square %.3g is %.2f× the predicted %.3g (limit %.2f×)", Q, msRatio, M, msThreshold))
        }
        let zOut = vOut > 0 ? nOut / vOut.squareRoot() : (nOut != 0 ? .infinity : 0)
        if Swift.abs(zOut) > lam {
            failures.append(String(format: "error correlates with the output: z = %+.1f (limit %.1f), a scale error of about %+.2e", zOut, lam, oo > 0 ? nOut / oo : 0))
        }
        var worstZ = 0.0, worstE = -1
        for (e, n) in expertN.sorted(by: { $0.key < $1.key }) {
            let v = expertV[e]!
            let z = v > 0 ? n / v.squareRoot() : (n != 0 ? .infinity : 0)
            if Swift.abs(z) > Swift.abs(worstZ) || worstE < 0 { worstZ = z; worstE = e }
            if Swift.abs(z) > lam && failures.count < 12 {
                let c2 = expertC2[e]!
                failures.append(String(format: "error correlates with expert %d's contribution: z = %+.1f (limit %.1f), a scale error of about %+.2e",
                                       e, z, lam, c2 > 0 ? n / c2 : 0))
            }
        }
        var sens: Sensitivity? = nil
        if oo > 0 {
            let routed = expertN.keys.filter { $0 < ref.experts }
            func median(_ v: [Double]) -> Double { v.isEmpty ? .nan : v.sorted()[v.count / 2] }
            let statE = routed.map { 2 * lam * expertV[$0]!.squareRoot() / Swift.max(expertC2[$0]!, .leastNormalMagnitude) }
            let shared = expertN.keys.first { $0 == ref.experts }
            sens = Sensitivity(
                rigorousOutput: rigOut, rigorousExpert: median(routed.map { rigExpert[$0]! }),
                statisticalOutput: 2 * lam * vOut.squareRoot() / oo, statisticalExpert: median(statE),
                statisticalExpertWorst: statE.max() ?? .nan,
                statisticalShared: shared.map { 2 * lam * expertV[$0]!.squareRoot() / Swift.max(expertC2[$0]!, .leastNormalMagnitude) })
        }
        return PrecisionVerdict(passed: failures.isEmpty, falseAlarmBudget: falseAlarmBudget, lambda: lam, meanSquareRatio: msRatio,
                                meanSquareThreshold: msThreshold, outputZ: zOut, worstExpertZ: worstZ, worstExpert: worstE, tests: tests,
                                tokensJudged: judged.count, tokensExcluded: T - judged.count, failures: failures, sensitivity: sens)
    }

    /// Judges stage 1's intermediate (`[T·S, I]` kernel values against the reference's, with its
    /// per-element variance): mean square and the projection on the reference intermediate.
    public static func judgeElements(_ actual: [Double], reference: [Double], variance: [Double]) -> PrecisionVerdict {
        var Q = 0.0, M = 0.0, A2 = 0.0, Amax = 0.0, n = 0.0, v = 0.0, rr = 0.0
        var nonFinite = 0
        for i in 0..<actual.count {
            let e = actual[i] - reference[i]
            if !e.isFinite { nonFinite += 1; continue }
            let vi = variance[i], r = reference[i]
            Q += e * e; M += vi; A2 += vi * vi; Amax = Swift.max(Amax, vi)
            n += e * r; v += r * r * vi; rr += r * r
        }
        let tests = 2
        let lam = lambda(tests: tests)
        let tau = Foundation.log(Double(tests) / falseAlarmBudget)
        let msLimit = M + 2 * (tau * A2).squareRoot() + 2 * tau * Amax
        var failures: [String] = []
        if nonFinite > 0 { failures.append("\(nonFinite) non-finite element(s)") }
        if Q > msLimit {
            failures.append(String(format: "error mean square %.3g is %.2f× the predicted %.3g (limit %.2f×)", Q, M > 0 ? Q / M : .infinity, M, M > 0 ? msLimit / M : 0))
        }
        let z = v > 0 ? n / v.squareRoot() : (n != 0 ? .infinity : 0)
        if Swift.abs(z) > lam {
            failures.append(String(format: "error correlates with the values: z = %+.1f (limit %.1f), a scale error of about %+.2e", z, lam, rr > 0 ? n / rr : 0))
        }
        return PrecisionVerdict(passed: failures.isEmpty, falseAlarmBudget: falseAlarmBudget, lambda: lam, meanSquareRatio: M > 0 ? Q / M : (Q > 0 ? .infinity : 0),
                                meanSquareThreshold: M > 0 ? msLimit / M : 0, outputZ: z, worstExpertZ: 0, worstExpert: -1, tests: tests,
                                tokensJudged: 0, tokensExcluded: 0, failures: failures, sensitivity: nil)
    }
}
