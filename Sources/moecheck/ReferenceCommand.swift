import ArgumentParser
import Foundation
import MoEReference
import TensorIO

struct Reference: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the float64 reference on a case file and write output, routing and per-element bounds.",
        discussion: """
        Recipes: \(Recipe.named.map(\.name).joined(separator: ", ")). The output file holds output, bound, \
        router_logits, router_logit_bound, topk_ids, topk_weights, topk_weight_bound, shared_gate, shared_gate_bound, \
        ambiguous_tokens (see README: case-file schema).
        """)

    @Option(name: .customLong("case"), help: "The case file (safetensors, HF checkpoint naming, with hidden_states).")
    var caseFile: String

    @Option(help: "Recipe name (default: fused-fp8 for fp8 weights, fused-bf16 otherwise).")
    var recipe: String?

    @Option(help: "Where to write the result (safetensors).")
    var output: String

    @OptionGroup var layer: LayerPrefixOption

    @Flag(help: "Report the shared expert unfused (topk columns = K) instead of as slot E.")
    var unfused = false

    @Flag(help: "Float32 value GEMMs (fast mode; with --no-bounds, bf16 weights go through the fused AVX-512/AVX2 GEMM where the CPU has one, MOECHECK_FAST_GEMM=off to disable).")
    var float32 = false

    @Flag(help: "Skip the per-element bound (faster; the bound tensors are then written as zeros).")
    var noBounds = false

    @Flag(help: .hidden) // timing: keep the contributions and compute the direction variances, as verify's reference does
    var keepContributions = false

    @OptionGroup var blas: BLASOptions

    func run() throws {
        blas.apply()
        let c: MoECaseFile
        c = try failing("moecheck reference") { try MoECaseFile(path: caseFile, prefix: layer.prefix) }
        let r = try Recipe.named(recipe, orDefaultFor: c.weightFormat)
        let x = try failing("moecheck reference") { try c.inputs() }
        let start = Date()
        do {
            let engine = try MoEReferenceEngine(layer: c, recipe: r, options: ReferenceOptions(computeBounds: !noBounds, float32: float32, fuseShared: !unfused,
                                                                                         keepContributions: keepContributions))
            let result = try engine.run(inputs: x, tokens: c.tokens)
            try result.write(to: output, extra: ["case": URL(fileURLWithPath: caseFile).lastPathComponent])
            let amb = result.ambiguousTokens.filter { $0 }.count
            print("reference: \(c.tokens) tokens, \(c.config), recipe \(r.name), \(String(format: "%.2f", Date().timeIntervalSince(start))) s, " +
                  "\(amb) ambiguous token(s), max bound \(String(format: "%.3e", result.maxBound)) -> \(output)")
        } catch {
            throw ToolFailure.failed(command: "moecheck reference: \(caseFile)", error)
        }
    }
}
