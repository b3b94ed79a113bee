import Foundation
import TensorIO

/// MoECheck's version, recorded in every file it writes.
public let moecheckVersion = "0.1.0"

extension ReferenceResult {
    /// The result as named tensors (DESIGN §4): `output`, `bound`, `router_logits`,
    /// `router_logit_bound`, `topk_ids`, `topk_weights`, `topk_weight_bound`, `shared_gate`,
    /// `shared_gate_bound`, `ambiguous_tokens`. Values are float64: `output` is the exact value of
    /// the layer under the recipe before the output rounding, and a correct kernel's output `o`
    /// satisfies `|o − output| ≤ bound` element by element.
    public func tensors() -> [(String, Tensor)] {
        let T = tokens
        var t: [(String, Tensor)] = [
            ("output", Tensor(output, shape: [T, hidden], dtype: .f64)),
            ("bound", Tensor(bound, shape: [T, hidden], dtype: .f64)),
            ("router_logits", Tensor(routerLogits, shape: [T, experts], dtype: .f64)),
            ("router_logit_bound", Tensor(routerLogitBound, shape: [T, experts], dtype: .f64)),
            ("topk_ids", Tensor(int32: topkIds, shape: [T, slots])),
            ("topk_weights", Tensor(topkWeights, shape: [T, slots], dtype: .f64)),
            ("topk_weight_bound", Tensor(topkWeightBound, shape: [T, slots], dtype: .f64)),
            ("shared_gate", Tensor(sharedGate, shape: [T, 1], dtype: .f64)),
            ("shared_gate_bound", Tensor(sharedGateBound, shape: [T, 1], dtype: .f64)),
            ("ambiguous_tokens", Tensor(ambiguousTokens.map { $0 ? 1.0 : 0.0 }, shape: [T], dtype: .u8)),
        ]
        if let inter = intermediate, let ib = intermediateBound {
            t.append(("intermediate", Tensor(inter, shape: [T, slots, intermediateWidth], dtype: .f64)))
            t.append(("intermediate_bound", Tensor(ib, shape: [T, slots, intermediateWidth], dtype: .f64)))
        }
        return t
    }

    /// Metadata recorded with a result: recipe, versions, BLAS threads.
    public func metadata(extra: [String: String] = [:]) -> [String: String] {
        var m = extra
        m["recipe"] = recipe.name
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys] // byte-reproducible files (key order is random otherwise)
        m["recipe_json"] = String(decoding: (try? encoder.encode(recipe)) ?? Data(), as: UTF8.self)
        m["moecheck_version"] = moecheckVersion
        m["openblas_threads"] = String(BLAS.threads)
        m["shared_fused"] = sharedFused ? "true" : "false"
        return m
    }

    public func write(to path: String, extra: [String: String] = [:]) throws {
        try SafetensorsWriter.write(tensors(), metadata: metadata(extra: extra), to: path)
    }
}
