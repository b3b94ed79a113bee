import Foundation
import LowPrecision
import MoEReference
import TensorIO

/// A wrong kernel made from a right one: a change applied to a kernel's whole-layer output, for
/// measuring what a verdict can see (`moecheck sensitivity`). Each change is the exact
/// difference between the reference of the changed layer and the reference, added to the
/// kernel's own output and rounded to bf16 again, as a kernel with that defect would produce.
public enum Mutation: String, CaseIterable, Codable, Sendable {
    /// The output × 0.5.
    case halfOutput = "output-x0.5"
    /// An all-zero output.
    case zeroOutput = "output-zero"
    /// Every routed expert's contribution × 1.01 (the shared expert unchanged).
    case everyExpert1p01 = "every-expert-x1.01"
    /// The most used routed expert's contribution × 1.05.
    case oneExpert1p05 = "one-expert-x1.05"
    /// The K-th expert of every token replaced by its (K+1)-th (its weight renormalized as a
    /// router would).
    case swapKth = "kth-swapped-for-k+1th"
    /// The shared expert's contribution dropped.
    case sharedDropped = "shared-dropped"

    /// Applies the change to `out` (`[T, H]`, a kernel's output), given the reference `ref` it was
    /// computed against (with contributions) and a way to rerun the reference with other routing.
    public func apply(_ out: inout [Double], reference ref: ReferenceResult, rerun: (RoutingOverride) throws -> ReferenceResult) throws {
        let T = ref.tokens, H = ref.hidden, K = ref.topK, E = ref.experts
        guard let st = ref.statistics, let contrib = st.contributions else {
            throw VerifyError.failed("mutation \(rawValue): the reference kept no per-slot contributions (case too large)")
        }
        let slots = st.slots
        func addContribution(_ scale: Double, where pick: (Int, Int) -> Bool) {
            for t in 0..<T {
                for s in 0..<slots where pick(t, s) {
                    for h in 0..<H { out[t * H + h] += scale * Double(contrib[(t * slots + s) * H + h]) }
                }
            }
        }
        switch self {
        case .halfOutput:
            for i in out.indices { out[i] *= 0.5 }
        case .zeroOutput:
            for i in out.indices { out[i] = 0 }
        case .everyExpert1p01:
            addContribution(0.01) { _, s in s < K }
        case .oneExpert1p05:
            var count = [Int32: Int]()
            for t in 0..<T { for s in 0..<K { count[st.slotExperts[t * slots + s], default: 0] += 1 } }
            let target = count.max { $0.value != $1.value ? $0.value < $1.value : $0.key > $1.key }!.key
            addContribution(0.05) { t, s in s < K && st.slotExperts[t * slots + s] == target }
        case .sharedDropped:
            guard slots > K else { throw VerifyError.usage("mutation \(rawValue): the layer has no shared expert") }
            addContribution(-1) { _, s in s == K }
        case .swapKth:
            guard K < E else { throw VerifyError.usage("mutation \(rawValue): E = K, there is no (K+1)-th expert") }
            var ids = [[Int]]()
            for t in 0..<T {
                let row = (0..<E).map { ref.routerLogits[t * E + $0] }
                let order = (0..<E).sorted { row[$0] != row[$1] ? row[$0] > row[$1] : $0 < $1 }
                var chosen = (0..<K).map { Int(st.slotExperts[t * slots + $0]) }
                if let k = chosen.firstIndex(of: order[K - 1]) { chosen[k] = order[K] } else { chosen[K - 1] = order[K] }
                ids.append(chosen)
            }
            let swapped = try rerun(RoutingOverride(ids: ids))
            for i in out.indices { out[i] += swapped.output[i] - ref.output[i] }
        }
        for i in out.indices { out[i] = SmallFloatFormat.bfloat16.round(out[i]) }
    }
}

/// One row of a sensitivity study: a case, a mutation (nil: the kernel as it is) and what each
/// tier said.
public struct SensitivityRow: Codable, Sendable {
    public var caseName: String
    public var mutation: String
    public var rigorousFlagged: Bool
    public var statisticalFlagged: Bool
    public var sensitivity: Sensitivity?
    public var error: String?

    public var flagged: Bool { rigorousFlagged || statisticalFlagged }
    public var tier: String {
        switch (rigorousFlagged, statisticalFlagged) {
        case (true, true): return "both"
        case (true, false): return "rigorous"
        case (false, true): return "statistical"
        default: return "-"
        }
    }
}

/// Forward-only verdicts of a kernel, and of each mutation of it, on a set of cases.
public enum SensitivityStudy {
    /// The cases of the table: the Qwen3.5-35B-A3B and 397B-A17B-TP8 shapes, BF16 and FP8
    /// e4m3fn, T ∈ {1, 64, 333}, ordinary random data.
    public static func cases(tokens: [Int] = [1, 64, 333], shapes: [String] = ["qwen3.5-35b-a3b-tp1", "qwen3.5-397b-a17b-tp8"],
                             formats: [WeightFormat] = [.bf16, .fp8e4m3fn], seed: UInt64 = 23) throws -> [VerifyCase] {
        var out: [VerifyCase] = []
        for name in shapes {
            guard let shape = ModelShape.all.first(where: { $0.name == name }) else {
                throw VerifyError.usage("unknown shape '\(name)' (known: \(ModelShape.all.map(\.name).joined(separator: ", ")))")
            }
            for f in formats {
                for t in tokens {
                    let spec = SyntheticSpec(config: shape.config, format: f, tokens: t, seed: seed)
                    out.append(VerifyCase(name: "\(shape.name)-\(f.tag)-T\(t)", spec: spec))
                }
            }
        }
        return out
    }

    /// Runs each case forward-only, as it is and with each mutation (one reference and one kernel
    /// run per case, the mutations applied to the same output); `progress` sees every row.
    public static func run(kernel: KernelUnderTest, cases: [VerifyCase], mutations: [Mutation] = Mutation.allCases,
                           progress: (SensitivityRow) -> Void) -> [SensitivityRow] {
        var rows: [SensitivityRow] = []
        let verifier = CaseVerifier(kernel: kernel, mode: .forwardOnly)
        for vc in cases {
            let all: [Mutation?] = [nil] + mutations.map(Optional.some)
            do {
                for (m, stage) in try verifier.forwardOnlyStudy(vc, mutations: all) {
                    let row = SensitivityRow(caseName: vc.name, mutation: m?.rawValue ?? "none", rigorousFlagged: !(stage.verdict?.passed ?? true),
                                             statisticalFlagged: !(stage.precision?.passed ?? true), sensitivity: stage.precision?.sensitivity, error: nil)
                    rows.append(row)
                    progress(row)
                }
            } catch {
                let row = SensitivityRow(caseName: vc.name, mutation: "none", rigorousFlagged: false, statisticalFlagged: false, sensitivity: nil,
                                         error: "\(error)")
                rows.append(row)
                progress(row)
            }
        }
        return rows
    }
}
