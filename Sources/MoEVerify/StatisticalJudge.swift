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
    /// weights and shared gate (false when they were given to it). Tokens the model cannot judge
    /// (`ReferenceStatistics.excludedTokens`) are left out.
    ///
    /// With an output rounding the error is taken about `round(o)`, the reference rounded as the
    /// kernel rounds: a correct kernel's output equals it except where its noise flips the
    /// rounding, so the test sees far below half an output step.
    public static func judgeOutput(_ actual: [Double], reference ref: ReferenceResult, tokens mask: [Bool]? = nil,
                                   includeRouter: Bool = true) -> PrecisionVerdict? {
        guard let st = ref.statistics else { return nil }
        let T = ref.tokens, H = ref.hidden, slots = st.slots, D = slots + 1
        let rounded = !st.outputFlipVariance.isEmpty
        let f = ref.recipe.output.format
        // a change smaller than half an output step can round back to the same output value
        func outHalfStep(_ o: Double) -> Double { f.map { $0.ulp(of: o) / 2 } ?? 0 }
        let judged = (0..<T).filter { (mask?[$0] ?? true) && !st.excludedTokens[$0] }
        let F = (0..<T).map { st.expertTokenVariance[$0] + (includeRouter ? st.routerTokenVariance[$0] : 0) }
        // Variance and systematic bound of Σ d·e over one token, for a direction d with Σd² = d2:
        // the correlated part exactly where the reference projected it (else Cauchy–Schwarz), then
        // the elementwise parts (noise before the rounding, flips of the rounding, ties).
        func directional(_ t: Int, _ j: Int, _ d2: Double) -> (Double, Double) {
            guard let dv = st.directionVariance else { return (d2 * F[t], d2.squareRoot() * st.tieNorm[t]) }
            let v = includeRouter ? dv[t * D + j] : Swift.min(dv[t * D + j], d2 * st.expertTokenVariance[t])
            return (v, st.directionBias?[t * D + j] ?? d2.squareRoot() * st.tieNorm[t])
        }
        // The token's known alternatives along direction j (likely fp8 group-scale moves tested as
        // hypotheses): the range of their shifts, and the output rounding's flip variance and tie
        // bias under the worst of them, which replace the elementwise ones; nil where it has none.
        func alternative(_ t: Int, _ j: Int) -> (low: Double, high: Double, flip: Double, tie: Double)? {
            guard let a = st.alternatives, !a[4 * (t * D + j) + 2].isNaN else { return nil }
            let k = 4 * (t * D + j)
            return (a[k], a[k + 1], a[k + 2], a[k + 3])
        }
        // Σ d·e against the interval [low, high] of the hypotheses' shifts (0 without alternatives):
        // under the true hypothesis the error minus its shift has the modelled sd, and the true
        // shift lies in the interval, so a correct kernel is at most λ·sd + bias outside it.
        struct Accumulator {
            var n = 0.0, pre = 0.0, flip = 0.0, bias = 0.0, d2 = 0.0, rig = Double.infinity, low = 0.0, high = 0.0
            mutating func add(token: (Double, Double)) { pre += token.0; bias += token.1 }
            mutating func add(alternative alt: (low: Double, high: Double, flip: Double, tie: Double)) {
                flip += alt.flip; bias += alt.tie; low += alt.low; high += alt.high
            }
            /// How far Σ d·e lies outside the hypotheses' shifts.
            var outside: Double { n > high ? n - high : (n < low ? n - low : 0) }
            func z() -> (z: Double, limit: Double) {
                let sd = pre.squareRoot() + flip.squareRoot()
                let m = outside
                return (sd > 0 ? m / sd : (m != 0 ? .infinity : 0), bias / Swift.max(sd, .leastNormalMagnitude))
            }
        }
        var Q = 0.0, M = 0.0, A2 = 0.0, Amax = 0.0, tieNorm2 = 0.0
        var nonFinite = 0
        var output = Accumulator()
        var experts = [Int: Accumulator]()
        var err = [Double](repeating: 0, count: H)   // the token's error row (NaN where non-finite)
        var rigNum = [Double](repeating: 0, count: H) // the token's rigorous-sensitivity numerators 2·bound + half an output step
        for t in judged {
            var tokenOut = Accumulator()
            var tokenM = 0.0, tokenA2 = 0.0, tokenMax = 0.0, tokenPre = 0.0
            // with known alternatives the output rounding's flips and ties are the token's own (below)
            let outAlternative = alternative(t, 0)
            for h in 0..<H {
                let i = t * H + h
                let o = ref.output[i]
                let e = actual[i] - (rounded ? f!.round(o) : o)
                err[h] = e
                rigNum[h] = 2 * ref.bound[i] + outHalfStep(o)
                if !e.isFinite { nonFinite += 1; continue }
                let pre = st.elementVariance[i], flip = rounded ? st.outputFlipVariance[i] : 0
                let m = rounded ? flip : pre
                Q += e * e; tokenM += m; tokenA2 += m * m; tokenMax = Swift.max(tokenMax, m); tokenPre += pre
                let tie = rounded ? st.outputTieBias[i] : 0
                tieNorm2 += tie * tie
                tokenOut.n += e * o; tokenOut.pre += o * o * pre
                if outAlternative == nil { tokenOut.flip += o * o * flip; tokenOut.bias += Swift.abs(o) * tie }
                tokenOut.d2 += o * o
                if o != 0 { output.rig = Swift.min(output.rig, rigNum[h] / Swift.abs(o)) }
            }
            // The token's correlated variance is a sum of independent causes, each moving the whole
            // row along one vector (one χ² block, not H independent elements): Σ b² ≤ b_max·E + R²
            // (E the experts' share with its largest cause b_max, R the routing weights' as one block).
            let E = st.expertTokenVariance[t], R = st.routerTokenVariance[t]
            let bE = st.expertTokenBlockMax.isEmpty ? E : Swift.min(E, st.expertTokenBlockMax[t])
            M += tokenM
            if !rounded {
                let Rj = includeRouter ? R : 0
                A2 += tokenA2 + bE * E + Rj * Rj; Amax = Swift.max(Amax, tokenMax, bE, Rj)
                M += F[t]
            } else if E + R > 0 {
                // the flips' mass: the independent share (1 − c) elementwise, the correlated share c in
                // blocks proportional to the causes before the rounding; an ordered combine keeps no
                // independent part apart (c unknown): max of the two pure cases bounds any mix
                let corr = E + R, k = tokenM / corr
                let blockA2 = k * k * (bE * E + R * R), blockMax = k * Swift.max(bE, R)
                if tokenPre == 0 && ref.recipe.combine.simulatesOrder {
                    A2 += Swift.max(tokenA2, blockA2); Amax = Swift.max(Amax, tokenMax, blockMax)
                } else {
                    let c = corr / (tokenPre + corr)
                    A2 += (1 - c) * (1 - c) * tokenA2 + c * c * blockA2; Amax = Swift.max(Amax, (1 - c) * tokenMax, c * blockMax)
                }
            } else {
                A2 += tokenA2; Amax = Swift.max(Amax, tokenMax)
            }
            tokenOut.add(token: directional(t, 0, tokenOut.d2))
            if let outAlternative { tokenOut.add(alternative: outAlternative) }
            output.n += tokenOut.n; output.pre += tokenOut.pre; output.flip += tokenOut.flip; output.bias += tokenOut.bias; output.d2 += tokenOut.d2
            output.low += tokenOut.low; output.high += tokenOut.high
            if let contrib = st.contributions {
                for s in 0..<slots {
                    let ex = Int(st.slotExperts[t * slots + s])
                    var a = experts[ex] ?? Accumulator()
                    var d2 = 0.0
                    let slotAlternative = alternative(t, 1 + s)
                    for h in 0..<H {
                        let i = t * H + h
                        let c = Double(contrib[(t * slots + s) * H + h])
                        if !err[h].isFinite { continue }
                        a.n += err[h] * c; a.pre += c * c * st.elementVariance[i]; d2 += c * c
                        if rounded && slotAlternative == nil { a.flip += c * c * st.outputFlipVariance[i]; a.bias += Swift.abs(c) * st.outputTieBias[i] }
                        if c != 0 { a.rig = Swift.min(a.rig, rigNum[h] / Swift.abs(c)) }
                    }
                    a.d2 += d2
                    a.add(token: directional(t, 1 + s, d2))
                    if let slotAlternative { a.add(alternative: slotAlternative) }
                    experts[ex] = a
                }
            }
            tieNorm2 += st.tieNorm[t] * st.tieNorm[t]
        }
        let tests = 2 + experts.count
        let lam = lambda(tests: tests)
        let tau = Foundation.log(Double(tests) / falseAlarmBudget)
        // mean square: χ² tail of the random part, plus the systematic part's norm
        let msLimit = ((M + 2 * (tau * A2).squareRoot() + 2 * tau * Amax).squareRoot() + tieNorm2.squareRoot()).squared
        var failures: [String] = []
        if nonFinite > 0 { failures.append("\(nonFinite) non-finite output element(s)") }
        let msRatio = M > 0 ? Q / M : (Q > 0 ? .infinity : 0)
        let msThreshold = M > 0 ? msLimit / M : 0
        if Q > msLimit {
            failures.append(String(format: "error mean square %.3g is %.2f× the predicted %.3g (limit %.2f×)", Q, msRatio, M, msThreshold))
        }
        let (zOut, biasOut) = output.z()
        if Swift.abs(zOut) > lam + biasOut {
            failures.append(String(format: "error correlates with the output: z = %+.1f (limit %.1f), a scale error of about %+.2e",
                                   zOut, lam + biasOut, output.d2 > 0 ? output.outside / output.d2 : 0))
        }
        var worstZ = 0.0, worstE = -1
        for (ex, a) in experts.sorted(by: { $0.key < $1.key }) {
            let (z, bias) = a.z()
            if Swift.abs(z) - bias > Swift.abs(worstZ) || worstE < 0 { worstZ = z; worstE = ex }
            if Swift.abs(z) > lam + bias && failures.count < 12 {
                failures.append(String(format: "error correlates with expert %d's contribution: z = %+.1f (limit %.1f), a scale error of about %+.2e",
                                       ex, z, lam + bias, a.d2 > 0 ? a.outside / a.d2 : 0))
            }
        }
        // the smallest scale error surely detected: ε·Σd² ≥ 2λ·sd + 2·bias + the spread of the
        // known alternatives' shifts (the true one may sit at either end, the kernel's at the other)
        func detectable(_ a: Accumulator) -> Double {
            let sd = a.pre.squareRoot() + a.flip.squareRoot()
            return a.d2 > 0 ? (2 * lam * sd + 2 * a.bias + (a.high - a.low)) / a.d2 : .infinity
        }
        var sens: Sensitivity? = nil
        if output.d2 > 0 {
            let routed = experts.keys.filter { $0 < ref.experts }.sorted()
            func median(_ v: [Double]) -> Double { v.isEmpty ? .nan : v.sorted()[v.count / 2] }
            let statE = routed.map { detectable(experts[$0]!) }
            sens = Sensitivity(
                rigorousOutput: output.rig, rigorousExpert: median(routed.map { experts[$0]!.rig }),
                statisticalOutput: detectable(output), statisticalExpert: median(statE), statisticalExpertWorst: statE.max() ?? .nan,
                statisticalShared: experts[ref.experts].map(detectable))
        }
        return PrecisionVerdict(passed: failures.isEmpty, falseAlarmBudget: falseAlarmBudget, lambda: lam, meanSquareRatio: msRatio,
                                meanSquareThreshold: msThreshold, outputZ: zOut, worstExpertZ: worstZ, worstExpert: worstE, tests: tests,
                                tokensJudged: judged.count, tokensExcluded: T - judged.count, failures: failures, sensitivity: sens)
    }

    /// Judges stage 1's intermediate (`[T·S, I]` kernel values against the reference's, with its
    /// per-element variance): mean square and the projection on the reference intermediate.
    /// `tie`: each element's systematic bound (a rounding tie), `keep`: which elements to judge.
    public static func judgeElements(_ actual: [Double], reference: [Double], variance: [Double], tie: [Double], keep: [Bool]) -> PrecisionVerdict {
        var Q = 0.0, M = 0.0, A2 = 0.0, Amax = 0.0, n = 0.0, v = 0.0, rr = 0.0, bias = 0.0, tie2 = 0.0
        var nonFinite = 0
        for i in 0..<actual.count where keep[i] {
            let e = actual[i] - reference[i]
            if !e.isFinite { nonFinite += 1; continue }
            let vi = variance[i], r = reference[i]
            Q += e * e; M += vi; A2 += vi * vi; Amax = Swift.max(Amax, vi)
            n += e * r; v += r * r * vi; rr += r * r
            bias += Swift.abs(r) * tie[i]; tie2 += tie[i] * tie[i]
        }
        let tests = 2
        let lam0 = lambda(tests: tests)
        let lam = lam0 + (v > 0 ? bias / v.squareRoot() : 0)
        let tau = Foundation.log(Double(tests) / falseAlarmBudget)
        let msLimit = ((M + 2 * (tau * A2).squareRoot() + 2 * tau * Amax).squareRoot() + tie2.squareRoot()).squared
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

extension Double {
    fileprivate var squared: Double { self * self }
}
