import Foundation
import LowPrecision

/// The model families whose MoE layer MoECheck models (FACTS §4).
public enum ModelFamily: String, Codable, CaseIterable, Sendable {
    /// Qwen1.5-MoE / Qwen2-MoE: `norm_topk_prob` (default false), shared expert often wider than I.
    case qwen2Moe = "qwen2_moe"
    /// Qwen3-Next: `norm_topk_prob` (default true).
    case qwen3Next = "qwen3_next"
    /// Qwen3.5-MoE: always renormalizes (its config has no `norm_topk_prob`).
    case qwen35Moe = "qwen3_5_moe"
}

/// How the projection weights of the experts are stored.
public enum WeightFormat: String, Codable, CaseIterable, Sendable {
    case f64, f32, bf16
    case fp8e4m3fn = "fp8-e4m3fn"
    case fp8e4m3fnuz = "fp8-e4m3fnuz"

    public var fp8: SmallFloatFormat? {
        switch self {
        case .fp8e4m3fn: return .e4m3fn
        case .fp8e4m3fnuz: return .e4m3fnuz
        default: return nil
        }
    }

    /// The safetensors dtype the projection weights are stored in (the inverse of `init(dtype:)`
    /// on these five): the one mapping from this vocabulary to safetensors' strings (`dtype.rawValue`).
    public var dtype: DType {
        switch self {
        case .f64: return .f64
        case .f32: return .f32
        case .bf16: return .bf16
        case .fp8e4m3fn: return .f8e4m3fn
        case .fp8e4m3fnuz: return .f8e4m3fnuz
        }
    }

    /// The short tag in case names ("bf16", "fp8fn", "fp8fnuz", "f32", "f64").
    public var tag: String {
        switch self {
        case .fp8e4m3fn: return "fp8fn"
        case .fp8e4m3fnuz: return "fp8fnuz"
        case .f64, .f32, .bf16: return rawValue
        }
    }

    /// The format of weights stored as `dtype`: fp8 and bf16 as themselves, F64 as f64, any
    /// other dtype as f32.
    public init(dtype: DType) {
        switch dtype {
        case .f64: self = .f64
        case .bf16: self = .bf16
        case .f8e4m3fn: self = .fp8e4m3fn
        case .f8e4m3fnuz: self = .fp8e4m3fnuz
        default: self = .f32
        }
    }
}

/// The shape and routing semantics of one MoE layer.
public struct MoEConfig: Codable, Equatable, Sendable, CustomStringConvertible {
    public var family: ModelFamily
    /// H
    public var hidden: Int
    /// I of each routed expert
    public var intermediate: Int
    /// Is of the shared expert; 0 when the layer has none.
    public var sharedIntermediate: Int
    /// E routed experts
    public var experts: Int
    /// K routed experts per token
    public var topK: Int
    /// Renormalize the K routed weights to sum to 1.
    public var renormalize: Bool

    public init(family: ModelFamily, hidden: Int, intermediate: Int, sharedIntermediate: Int, experts: Int, topK: Int, renormalize: Bool? = nil) {
        self.family = family
        self.hidden = hidden
        self.intermediate = intermediate
        self.sharedIntermediate = sharedIntermediate
        self.experts = experts
        self.topK = topK
        self.renormalize = renormalize ?? (family != .qwen2Moe)
    }

    public var hasSharedExpert: Bool { sharedIntermediate > 0 }

    /// The shared expert can ride in the routed dispatch as expert id E (sglang
    /// `can_fuse_shared_expert`: shared_expert_intermediate_size == moe_intermediate_size).
    public var fusable: Bool { hasSharedExpert && sharedIntermediate == intermediate }

    /// Intermediate size of expert `e` (`e == experts` is the shared expert).
    public func intermediate(ofExpert e: Int) -> Int { e == experts ? sharedIntermediate : intermediate }

    public var description: String {
        "\(family.rawValue) H=\(hidden) I=\(intermediate) Is=\(sharedIntermediate) E=\(experts) K=\(topK) renormalize=\(renormalize)"
    }

    /// Rejects shapes no layer can have.
    public func validate(file: String) throws {
        func bad(_ s: String) -> TensorIOError { TensorIOError(file: file, "config: \(s)") }
        guard hidden >= 1 else { throw bad("hidden_size \(hidden) must be >= 1") }
        guard intermediate >= 1 else { throw bad("moe_intermediate_size \(intermediate) must be >= 1") }
        guard sharedIntermediate >= 0 else { throw bad("shared_expert_intermediate_size \(sharedIntermediate) must be >= 0") }
        guard experts >= 1 else { throw bad("num_experts \(experts) must be >= 1") }
        guard topK >= 1, topK <= experts else { throw bad("num_experts_per_tok \(topK) must be in 1...num_experts (\(experts))") }
    }

    /// Reads an HF `config.json` object (Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE; a nested
    /// `text_config` is used when present).
    public static func fromHuggingFace(_ object: [String: Any], file: String) throws -> MoEConfig {
        var o = object
        if let text = object["text_config"] as? [String: Any] { o = text.merging(object) { a, _ in a } }
        func int(_ key: String, required: Bool = true) throws -> Int? {
            guard let v = o[key] else {
                if required { throw TensorIOError(file: file, "config: missing '\(key)'") }
                return nil
            }
            guard let n = v as? NSNumber, let i = Int(exactly: n.doubleValue) else {
                throw TensorIOError(file: file, "config: '\(key)' is not an integer (\(v))")
            }
            return i
        }
        let modelType = (o["model_type"] as? String) ?? ""
        let family: ModelFamily
        if modelType.hasPrefix("qwen3_5_moe") || modelType.hasPrefix("qwen3_5") { family = .qwen35Moe }
        else if modelType.hasPrefix("qwen3_next") { family = .qwen3Next }
        else if modelType.hasPrefix("qwen2_moe") { family = .qwen2Moe }
        else {
            throw TensorIOError(file: file, "config: model_type '\(modelType)' is not a supported family (\(ModelFamily.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        var renormalize: Bool
        switch family {
        case .qwen35Moe: renormalize = true
        case .qwen3Next: renormalize = (o["norm_topk_prob"] as? Bool) ?? true
        case .qwen2Moe: renormalize = (o["norm_topk_prob"] as? Bool) ?? false
        }
        if let n = o["norm_topk_prob"], !(n is Bool) && !(n is NSNumber) {
            throw TensorIOError(file: file, "config: 'norm_topk_prob' is not a boolean")
        }
        if family == .qwen35Moe, let n = o["norm_topk_prob"] as? Bool, !n {
            renormalize = true // Qwen3.5 always renormalizes; the key is ignored by transformers.
        }
        let c = MoEConfig(family: family, hidden: try int("hidden_size")!, intermediate: try int("moe_intermediate_size")!,
                          sharedIntermediate: try int("shared_expert_intermediate_size", required: false) ?? 0,
                          experts: try int("num_experts")!, topK: try int("num_experts_per_tok")!, renormalize: renormalize)
        try c.validate(file: file)
        return c
    }

    /// The HF config object for this layer (what case files carry in `__metadata__["config"]`).
    public func huggingFaceObject(quantization: WeightFormat? = nil) -> [String: Any] {
        var o: [String: Any] = [
            "model_type": family.rawValue,
            "hidden_size": hidden, "moe_intermediate_size": intermediate,
            "shared_expert_intermediate_size": sharedIntermediate,
            "num_experts": experts, "num_experts_per_tok": topK,
        ]
        if family != .qwen35Moe { o["norm_topk_prob"] = renormalize }
        if let q = quantization, q.fp8 != nil {
            o["quantization_config"] = ["quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": [128, 128]] as [String: Any]
        }
        return o
    }
}

/// Where the reference gets one MoE layer's weights from: a case file cut from a checkpoint, or
/// a layer generated from a seed. Weights come out as exact `Double` values (fp8 dequantized as
/// `code × scale`), one expert at a time, so a layer never has to be materialized whole.
public protocol MoELayerSource: AnyObject {
    var config: MoEConfig { get }
    /// Storage format of the expert projections (routed and shared).
    var weightFormat: WeightFormat { get }
    /// A short name for reports.
    var name: String { get }
    /// Router weight `[E, H]`, row-major.
    func routerWeight() throws -> [Double]
    /// Shared-expert gate `[H]`, or nil when the layer has no shared expert.
    func sharedGateWeight() throws -> [Double]?
    /// Expert `e` (`e == E`: the shared expert): `[gate; up]` as `[2·Ie, H]` into `out`.
    func decodeGateUp(expert e: Int, into out: UnsafeMutablePointer<Double>) throws
    /// Expert `e` (`e == E`: the shared expert): down `[H, Ie]` into `out`.
    func decodeDown(expert e: Int, into out: UnsafeMutablePointer<Double>) throws
    /// The same in binary32 (the reference's float32 mode); by default decoded as Double and converted.
    func decodeGateUp(expert e: Int, into out: UnsafeMutablePointer<Float>) throws
    func decodeDown(expert e: Int, into out: UnsafeMutablePointer<Float>) throws
    /// The stored bfloat16 bits of one projection of expert `e` (`e == E`: the shared expert),
    /// row-major, rows `H` (gate, up) or `Ie` (down) elements long, when the source holds them as
    /// plain bf16 in memory; nil otherwise. The float32 mode's fused GEMM reads them without a
    /// decoded copy. Any alignment; valid while the source lives. Default: nil.
    func rawBF16(expert e: Int, _ projection: ExpertProjection) -> UnsafeRawPointer?
}

/// A layer source that decodes both precisions through one generic routine per projection
/// (`gateUp`, `down`); the four `decode…` entry points of `MoELayerSource` forward to them.
public protocol GenericDecodingLayerSource: MoELayerSource {
    /// Expert `e` (`e == E`: the shared expert): `[gate; up]` as `[2·Ie, H]` into `out`.
    func gateUp<T: BinaryFloatingPoint>(_ e: Int, into out: UnsafeMutablePointer<T>) throws
    /// Expert `e`: down `[H, Ie]` into `out`.
    func down<T: BinaryFloatingPoint>(_ e: Int, into out: UnsafeMutablePointer<T>) throws
}

extension GenericDecodingLayerSource {
    public func decodeGateUp(expert e: Int, into out: UnsafeMutablePointer<Double>) throws { try gateUp(e, into: out) }
    public func decodeDown(expert e: Int, into out: UnsafeMutablePointer<Double>) throws { try down(e, into: out) }
    public func decodeGateUp(expert e: Int, into out: UnsafeMutablePointer<Float>) throws { try gateUp(e, into: out) }
    public func decodeDown(expert e: Int, into out: UnsafeMutablePointer<Float>) throws { try down(e, into: out) }
}

/// One of an expert's three projections.
public enum ExpertProjection: Sendable {
    case gate, up, down
}

extension MoELayerSource {
    public func rawBF16(expert e: Int, _ projection: ExpertProjection) -> UnsafeRawPointer? { nil }

    public func decodeGateUp(expert e: Int, into out: UnsafeMutablePointer<Float>) throws {
        let n = 2 * config.intermediate(ofExpert: e) * config.hidden
        var d = [Double](repeating: 0, count: n)
        try d.withUnsafeMutableBufferPointer { try decodeGateUp(expert: e, into: $0.baseAddress!) }
        for i in 0..<n { out[i] = Float(d[i]) }
    }

    public func decodeDown(expert e: Int, into out: UnsafeMutablePointer<Float>) throws {
        let n = config.intermediate(ofExpert: e) * config.hidden
        var d = [Double](repeating: 0, count: n)
        try d.withUnsafeMutableBufferPointer { try decodeDown(expert: e, into: $0.baseAddress!) }
        for i in 0..<n { out[i] = Float(d[i]) }
    }
}
