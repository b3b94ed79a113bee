import ArgumentParser
import Foundation
import TensorIO

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Describe a MoE case file: family, shapes, routing, dtypes, layout, fusability, and any problems.")

    @Argument(help: "A safetensors case file (or a layer cut from a checkpoint).")
    var file: String

    @OptionGroup var layer: LayerPrefixOption

    @Flag(help: "Skip decoding every expert weight to look for NaN/Inf.")
    var noScan = false

    func run() throws {
        let c: MoECaseFile
        c = try failing("moecheck inspect") { try MoECaseFile(path: file, prefix: layer.prefix) }
        let cfg = c.config
        var problems: [String] = []
        print("file:        \(file)")
        print("family:      \(cfg.family.rawValue)")
        print("prefix:      '\(c.prefix)'")
        print("config from: \(c.configSource)")
        print("H (hidden):  \(cfg.hidden)")
        print("I (expert):  \(cfg.intermediate)")
        print("Is (shared): \(cfg.sharedIntermediate)\(cfg.hasSharedExpert ? "" : " (no shared expert)")")
        print("E experts:   \(cfg.experts)")
        print("K top-k:     \(cfg.topK)")
        print("renormalize: \(cfg.renormalize)")
        print("layout:      \(c.layout.rawValue)")
        print("weights:     \(c.weightFormat.rawValue)\(c.weightFormat.fp8 != nil ? " with 128x128 block scales (weight_scale_inv)" : "")")
        for (k, v) in c.dtypeSummary.sorted(by: { $0.key < $1.key }) { print("  dtype \(k): \(v)") }
        if cfg.fusable {
            print("fusable:     yes (Is == I): shared expert rides as expert \(cfg.experts), top-k \(cfg.topK + 1)")
        } else if cfg.hasSharedExpert {
            print("fusable:     no (Is \(cfg.sharedIntermediate) != I \(cfg.intermediate)): shared expert runs unfused")
        } else {
            print("fusable:     no shared expert")
        }
        print("tokens:      \(c.tokens == 0 ? "none (no hidden_states: 'reference' needs inputs)" : String(c.tokens))")
        if !noScan {
            let E = cfg.experts + (cfg.hasSharedExpert ? 1 : 0)
            for e in 0..<E {
                let Ie = cfg.intermediate(ofExpert: e)
                var buf = [Double](repeating: 0, count: max(2 * Ie * cfg.hidden, cfg.hidden * Ie))
                do {
                    try buf.withUnsafeMutableBufferPointer { try c.decodeGateUp(expert: e, into: $0.baseAddress!) }
                    try buf.withUnsafeMutableBufferPointer { try c.decodeDown(expert: e, into: $0.baseAddress!) }
                } catch {
                    problems.append("\(error)")
                }
            }
        }
        if problems.isEmpty {
            print("problems:    none")
        } else {
            print("problems:")
            for p in problems { print("  - \(p)") }
            throw ExitCode(1)
        }
    }
}
