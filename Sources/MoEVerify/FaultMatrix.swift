import Foundation
import MoEReference
import TensorIO

/// The fault-detection matrix: every injected fault against a few case families, plus the
/// unfaulted baseline. A harmful fault counts as detected when at least one family flags it (a
/// split-K fault cannot show on a BF16 case); a benign variant must pass every family.
public struct FaultMatrix: Codable, Sendable {
    public struct Cell: Codable, Sendable {
        public var fault: String
        public var family: String
        /// `ordinary` (random data like the catalogue's) or `designed` (data built for a fault class).
        public var data: String
        public var flagged: Bool
        /// Which tier flagged it: `rigorous`, `statistical`, `both`, or `-`.
        public var tier: String
        /// The first failing stage (or the error) when flagged.
        public var evidence: String
    }

    /// One row of `moecheck faults --json`.
    public struct Row: Codable, Sendable {
        public var fault: String, family: String, data: String, detected: Bool, tier: String
    }

    public var rows: [Row] { cells.map { Row(fault: $0.fault, family: $0.family, data: $0.data, detected: $0.flagged, tier: $0.tier) } }

    /// Whether a family's data is designed for a fault class (split-K data, near ties) rather than
    /// ordinary random data.
    public static func dataKind(_ vc: VerifyCase) -> String {
        guard let spec = vc.spec else { return "case file" }
        return spec.inputs == .normal && spec.routing == .uniform && spec.scales == .counter ? "ordinary" : "designed"
    }

    /// Which tier flagged a case: the rigorous one (bounds, router, align, errors) and/or the statistical one.
    public static func tier(_ r: CaseReport) -> String {
        let rigorous = r.error != nil || r.stages.contains { st in st.verdict.map { !$0.passed } ?? !st.passed }
            || r.stages.contains { $0.stage == "router" && !$0.passed }
        let statistical = r.stages.contains { !($0.precision?.passed ?? true) }
        switch (rigorous, statistical) {
        case (true, true): return "both"
        case (true, false): return "rigorous"
        case (false, true): return "statistical"
        default: return "-"
        }
    }
    public var families: [String]
    public var faults: [String]
    public var cells: [Cell]
    public var baselineFailures: [String]

    public init(families: [String], faults: [String], cells: [Cell], baselineFailures: [String]) {
        self.families = families; self.faults = faults; self.cells = cells; self.baselineFailures = baselineFailures
    }

    /// The matrix without `faults` (mutants that changed nothing on these cases).
    public func removing(_ dropped: [String]) -> FaultMatrix {
        FaultMatrix(families: families, faults: faults.filter { !dropped.contains($0) }, cells: cells.filter { !dropped.contains($0.fault) },
                    baselineFailures: baselineFailures)
    }

    public static func isBenign(_ fault: String) -> Bool { fault.hasPrefix("benign_") }

    public var missed: [String] {
        faults.filter { f in !Self.isBenign(f) && !cells.contains { $0.fault == f && $0.flagged } }
    }

    public var falseAlarms: [Cell] { cells.filter { Self.isBenign($0.fault) && $0.flagged } }

    public var passed: Bool { missed.isEmpty && falseAlarms.isEmpty && baselineFailures.isEmpty }

    /// The case families: each fault has at least one family where it changes the result.
    public static func families(large: Bool) -> [VerifyCase] {
        let small = MoEConfig(family: .qwen35Moe, hidden: 256, intermediate: 128, sharedIntermediate: 128, experts: 8, topK: 2)
        let real = MoEConfig(family: .qwen35Moe, hidden: 2048, intermediate: 512, sharedIntermediate: 512, experts: 256, topK: 8)
        let c = large ? real : small
        let split = MoEConfig(family: .qwen35Moe, hidden: large ? 4096 : 1024, intermediate: 128, sharedIntermediate: 128, experts: 8, topK: 2)
        let kb = split.hidden / 128
        func spec(_ cfg: MoEConfig, _ f: WeightFormat, _ t: Int, routing: RoutingMode = .uniform, inputs: InputMode = .normal, scales: ScaleProfile = .counter) -> SyntheticSpec {
            SyntheticSpec(config: cfg, format: f, tokens: t, seed: 11, routing: routing, inputs: inputs, scales: scales)
        }
        return [
            VerifyCase(name: "splitk-fp8fn-one-tile-per-split-ordinary", spec: spec(split, .fp8e4m3fn, 2), splitK: kb),
            VerifyCase(name: "bf16-T33", spec: spec(c, .bf16, 33)),
            VerifyCase(name: "fp8fn-T33", spec: spec(c, .fp8e4m3fn, 33)),
            VerifyCase(name: "fp8fnuz-T33", spec: spec(c, .fp8e4m3fnuz, 33)),
            VerifyCase(name: "bf16-near-ties", spec: spec(c, .bf16, 16, routing: .nearTies)),
            VerifyCase(name: "splitk-fp8fn-one-tile-per-split", spec: spec(split, .fp8e4m3fn, 2, inputs: .coherent, scales: .spreadAcrossK), splitK: kb),
            VerifyCase(name: "splitk-fp8fnuz-4-splits", spec: spec(split, .fp8e4m3fnuz, 2, inputs: .coherent, scales: .spreadAcrossK), splitK: 4),
        ]
    }

    /// Extra families for the helper-level mutants of a Python adapter: at T = 33 of the real shape
    /// the expert that `expert_down_x1p01` scales (the first token's top expert) serves one or two
    /// tokens, and a 1 % scale hides in the noise of a recipe that rounds after every projection
    /// (hf-bf16) or quantizes to fp8 (measured on the H200: missed by hf_eager_bf16 and
    /// torch_fused_fp8). With hot experts (an eighth of them favoured) at T = 256 it serves about
    /// T·K/(E/8) tokens.
    public static func pythonFamilies(large: Bool) -> [VerifyCase] {
        let small = MoEConfig(family: .qwen35Moe, hidden: 256, intermediate: 128, sharedIntermediate: 128, experts: 16, topK: 2)
        let real = MoEConfig(family: .qwen35Moe, hidden: 2048, intermediate: 512, sharedIntermediate: 512, experts: 256, topK: 8)
        let c = large ? real : small
        return [WeightFormat.bf16, .fp8e4m3fn].map { f in
            VerifyCase(name: "\(f.tag)-T256-hot-experts", spec: SyntheticSpec(config: c, format: f, tokens: 256, seed: 13, routing: .hotExperts))
        }
    }

    /// Runs the matrix. `makeKernel(fault)` returns the kernel with `fault` selected (nil: none).
    public static func run(faults: [String], families: [VerifyCase], makeKernel: (String?) throws -> KernelUnderTest,
                           rigorousOnly: Bool = false, progress: (String) -> Void) throws -> FaultMatrix {
        // Variants may legitimately keep the shared gate in fp32: allow either rounding there.
        let relax: (Recipe) -> Recipe = { r in
            var r = r
            if r.sharedGate == .bf16 { r.sharedGate = .bf16OrFP32 }
            return r
        }
        var baselineFailures: [String] = []
        let base = CaseVerifier(kernel: try makeKernel(nil), adjustRecipe: relax, rigorousOnly: rigorousOnly)
        for vc in families {
            let r = base.verify(vc)
            if !r.passed { baselineFailures.append(r.line) }
            progress("baseline \(vc.name): \(r.passed ? "pass" : "FAIL")")
        }
        var cells: [Cell] = []
        for f in faults {
            let v = CaseVerifier(kernel: try makeKernel(f), adjustRecipe: relax, rigorousOnly: rigorousOnly)
            for vc in families {
                let r = v.verify(vc)
                let evidence = r.error ?? r.stages.first(where: { !$0.passed }).map { "\($0.stage): \($0.problems.first ?? $0.worst)" } ?? ""
                cells.append(Cell(fault: f, family: vc.name, data: dataKind(vc), flagged: !r.passed, tier: tier(r), evidence: evidence))
                progress("\(f) × \(vc.name): \(r.passed ? "pass" : "flagged")")
            }
        }
        return FaultMatrix(families: families.map(\.name), faults: faults, cells: cells, baselineFailures: baselineFailures)
    }

    /// The matrix as a text table: D = detected (flagged), . = passed; benign rows must be all '.'.
    public var table: String {
        let w = (faults.map(\.count).max() ?? 10) + 2
        var s = "fault".padding(toLength: w, withPad: " ", startingAt: 0) + families.enumerated().map { "F\($0.offset + 1)" }.joined(separator: "  ") + "  verdict\n"
        for f in faults {
            var line = f.padding(toLength: w, withPad: " ", startingAt: 0)
            for fam in families {
                let flagged = cells.first { $0.fault == f && $0.family == fam }?.flagged ?? false
                line += (flagged ? "D " : ". ") + "  "
            }
            let benign = Self.isBenign(f)
            let any = cells.contains { $0.fault == f && $0.flagged }
            line += benign ? (any ? "FALSE ALARM" : "accepted (benign)") : (any ? "detected" : "MISSED")
            s += line + "\n"
        }
        for (i, fam) in families.enumerated() {
            s += "F\(i + 1) = \(fam) (\(cells.first { $0.family == fam }?.data ?? "-"))\n"
        }
        return s
    }
}
