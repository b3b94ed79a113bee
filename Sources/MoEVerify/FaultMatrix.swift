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
        public var flagged: Bool
        /// The first failing stage (or the error) when flagged.
        public var evidence: String
    }
    public var families: [String]
    public var faults: [String]
    public var cells: [Cell]
    public var baselineFailures: [String]

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
            VerifyCase(name: "bf16-T33", spec: spec(c, .bf16, 33)),
            VerifyCase(name: "fp8fn-T33", spec: spec(c, .fp8e4m3fn, 33)),
            VerifyCase(name: "fp8fnuz-T33", spec: spec(c, .fp8e4m3fnuz, 33)),
            VerifyCase(name: "bf16-near-ties", spec: spec(c, .bf16, 16, routing: .nearTies)),
            VerifyCase(name: "splitk-fp8fn-one-tile-per-split", spec: spec(split, .fp8e4m3fn, 2, inputs: .coherent, scales: .spreadAcrossK), splitK: kb),
            VerifyCase(name: "splitk-fp8fnuz-4-splits", spec: spec(split, .fp8e4m3fnuz, 2, inputs: .coherent, scales: .spreadAcrossK), splitK: 4),
        ]
    }

    /// Runs the matrix. `makeKernel(fault)` returns the kernel with `fault` selected (nil: none).
    public static func run(faults: [String], families: [VerifyCase], makeKernel: (String?) throws -> KernelUnderTest,
                           progress: (String) -> Void) throws -> FaultMatrix {
        // Variants may legitimately keep the shared gate in fp32: allow either rounding there.
        let relax: (Recipe) -> Recipe = { r in
            var r = r
            if r.sharedGate == .bf16 { r.sharedGate = .bf16OrFP32 }
            return r
        }
        var baselineFailures: [String] = []
        let base = CaseVerifier(kernel: try makeKernel(nil), adjustRecipe: relax)
        for vc in families {
            let r = base.verify(vc)
            if !r.passed { baselineFailures.append(r.line) }
            progress("baseline \(vc.name): \(r.passed ? "pass" : "FAIL")")
        }
        var cells: [Cell] = []
        for f in faults {
            let v = CaseVerifier(kernel: try makeKernel(f), adjustRecipe: relax)
            for vc in families {
                let r = v.verify(vc)
                let evidence = r.error ?? r.stages.first(where: { !$0.passed }).map { "\($0.stage): \($0.problems.first ?? $0.worst)" } ?? ""
                cells.append(Cell(fault: f, family: vc.name, flagged: !r.passed, evidence: evidence))
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
        for (i, fam) in families.enumerated() { s += "F\(i + 1) = \(fam)\n" }
        return s
    }
}
