import Foundation
import MoEReference
import TensorIO

/// An output a user computed any way they like, judged as a kernel's (`moecheck judge`): the
/// whole layer's output `[T, H]` from a safetensors file and, optionally, the kernel's own
/// routing (`topk_ids`, `topk_weights` `[T, S]`) so ambiguous tokens are teacher-forced and the
/// router is judged. Without routing the verdict is forward-only.
public final class RecordedKernel: WholeLayerKernel {
    public let outputPath: String
    public let routingPath: String?
    public let declared: Recipe
    public var name: String { "recorded output \(URL(fileURLWithPath: outputPath).lastPathComponent)" }
    public var device: String { "recorded" }

    public init(output: String, routing: String? = nil, recipe: Recipe) {
        outputPath = output
        routingPath = routing
        declared = recipe
    }

    public func recipe(for format: WeightFormat) throws -> Recipe { declared }

    /// The one float tensor of `file` (or the one named `output`/`out`), shape `[T, H]`.
    static func outputTensor(_ path: String, tokens T: Int, hidden H: Int) throws -> [Double] {
        let f = try SafetensorsFile(path: path)
        let floats = f.names.filter { (try? f.tensor($0))?.dtype.isFloatingPoint ?? false }
        let name: String
        if let n = ["output", "out"].first(where: { f.contains($0) }) { name = n }
        else if floats.count == 1 { name = floats[0] }
        else {
            throw TensorIOError(file: path, "cannot tell which tensor is the layer output: name it 'output' (float tensors here: \(floats.joined(separator: ", ")))")
        }
        let t = try f.tensor(name)
        guard t.dtype.isFloatingPoint else { throw TensorIOError(file: path, tensor: name, "dtype \(t.dtype.rawValue) is not a float type") }
        guard t.shape == [T, H] else { throw TensorIOError(file: path, tensor: name, "shape \(t.shape), expected [T, H] = [\(T), \(H)] of the case") }
        return t.doubles()
    }

    public func run(_ vc: VerifyCase, layer: KernelLayerSource, referenceIds: [Int32], referenceWeights: [Float]) throws -> KernelRun {
        let T = layer.tokens, c = layer.config
        let out = try Self.outputTensor(outputPath, tokens: T, hidden: c.hidden)
        var routing: KernelRouting? = nil
        if let routingPath {
            let f = try SafetensorsFile(path: routingPath)
            let ids = try f.tensor("topk_ids"), w = try f.tensor("topk_weights")
            guard ids.shape.count == 2, ids.shape[0] == T, ids.shape == w.shape else {
                throw TensorIOError(file: routingPath, tensor: "topk_ids", "shape \(ids.shape) with topk_weights \(w.shape); expected both [T, S] with T = \(T)")
            }
            let S = ids.shape[1]
            guard S == c.topK || S == c.topK + 1 else {
                throw TensorIOError(file: routingPath, tensor: "topk_ids", "\(S) slots; expected K = \(c.topK) or K+1 = \(c.topK + 1) (shared expert fused as id \(c.experts))")
            }
            let idValues = ids.doubles()
            if let bad = idValues.firstIndex(where: { $0 < 0 || $0 > Double(c.experts) || $0 != $0.rounded() }) {
                throw TensorIOError(file: routingPath, tensor: "topk_ids", "\(ids.position(of: bad)) = \(idValues[bad]) is not an expert id in 0...\(c.experts)")
            }
            routing = KernelRouting(logits: nil, ids: idValues.map { Int32($0) }, weights: w.doubles(), slots: S)
        }
        return KernelRun(routing: routing, alignProblems: nil, intermediate: nil, stagedOutput: nil, forwardOutputs: [out], forwardMilliseconds: 0)
    }
}
