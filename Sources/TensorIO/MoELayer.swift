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

/// Where a layer lives as a case file (DESIGN §4): what a Python adapter's worker opens.
public struct CaseFileLocation: Sendable, Equatable {
    /// The case file (layer tensors in HF naming, with `prefix`).
    public var path: String
    /// The layer's tensor-name prefix inside the file (`model.layers.0.mlp.`).
    public var prefix: String
    /// The file and tensor holding the hidden states `[T, H]`.
    public var inputsPath: String
    public var inputsTensor: String
    /// The HF config object of the layer, as JSON.
    public var configJSON: String

    public init(path: String, prefix: String, inputsPath: String, inputsTensor: String = "hidden_states", configJSON: String) {
        self.path = path; self.prefix = prefix; self.inputsPath = inputsPath; self.inputsTensor = inputsTensor; self.configJSON = configJSON
    }
}

/// A layer with inputs that a kernel can run: the reference's view (`MoELayerSource`) plus the
/// stored bytes a kernel uploads. The synthetic catalogue and fuzz layers, and case files (a
/// user's checkpoint layer with hidden states) conform; every kernel takes one.
///
/// The kernel-facing tensors are bf16 (router, shared gate, hidden states) and bf16 or fp8
/// (expert projections, with 128×128 block scales). A source whose values are not exactly
/// representable there throws from the accessor, naming the tensor: a kernel never runs on a
/// layer other than the one the reference judges.
public protocol KernelLayerSource: MoELayerSource {
    /// T, the rows of the hidden states.
    var tokens: Int { get }
    /// Hidden states `[T, H]` as stored (what a kernel that takes the layer as stored sees).
    func inputs() throws -> [Double]
    /// Hidden states `[T, H]` as bf16 bits.
    func inputsBF16() throws -> [UInt16]
    /// Router weight `[E, H]` as bf16 bits.
    func routerBF16() throws -> [UInt16]
    /// Shared-expert gate `[H]` as bf16 bits, nil without a shared expert.
    func sharedGateBF16() throws -> [UInt16]?
    /// Expert `e` (`e == E`: the shared expert): gate rows then up rows `[2·Ie, H]` as stored
    /// bytes (bf16 or fp8 codes) and, for fp8, their block scales blocked per half
    /// `[2·⌈Ie/128⌉, ⌈H/128⌉]` (empty for bf16).
    func gateUpBytes(expert e: Int) throws -> (bytes: [UInt8], scales: [Float])
    /// Expert `e`: down `[H, Ie]` as stored bytes and, for fp8, scales `[⌈H/128⌉, ⌈Ie/128⌉]`.
    func downBytes(expert e: Int) throws -> (bytes: [UInt8], scales: [Float])
    /// The layer as a case file, written under `directory` when it is not one already.
    func caseFile(in directory: String) throws -> CaseFileLocation
}

extension KernelLayerSource {
    /// The hidden states as the kernel receives them (bf16 values).
    public func kernelInputs() throws -> [Double] { try inputsBF16().map { Double(BFloat16.float($0)) } }

    /// The one packer of the kernel layout of `Kernels/include/moe_kernels.h`: `w13 [slots, 2I, H]`
    /// (gate rows, then up rows), `w2 [slots, H, I]` and, for fp8, scales
    /// `[slots, 2·⌈I/128⌉, ⌈H/128⌉]` / `[slots, ⌈H/128⌉, ⌈I/128⌉]`; slots = E, or E + 1 with the
    /// shared expert fused in slot E (sglang PR #20736). Raw codes are copied, never converted.
    public func kernelWeights(fuseShared: Bool) throws -> FusedWeights {
        let c = config
        let name = (self as? MoECaseFile)?.path ?? self.name
        if fuseShared && !c.fusable {
            throw TensorIOError(file: name, "shared expert cannot fuse: shared_expert_intermediate_size \(c.sharedIntermediate) != moe_intermediate_size \(c.intermediate)")
        }
        guard weightFormat == .bf16 || weightFormat.fp8 != nil else {
            throw TensorIOError(file: name, "kernel weights must be BF16 or FP8; this layer stores \(weightFormat.rawValue)")
        }
        let slots = c.experts + (fuseShared ? 1 : 0)
        let esize = weightFormat == .bf16 ? 2 : 1
        let si = (c.intermediate + 127) / 128, sh = (c.hidden + 127) / 128
        var w13: [UInt8] = [], w2: [UInt8] = [], s13: [Float] = [], s2: [Float] = []
        w13.reserveCapacity(slots * 2 * c.intermediate * c.hidden * esize)
        w2.reserveCapacity(slots * c.intermediate * c.hidden * esize)
        if weightFormat.fp8 != nil { s13.reserveCapacity(slots * 2 * si * sh); s2.reserveCapacity(slots * si * sh) }
        for e in 0..<slots {
            let (b13, sc13) = try gateUpBytes(expert: e)
            let (b2, sc2) = try downBytes(expert: e)
            w13 += b13; w2 += b2; s13 += sc13; s2 += sc2
        }
        return FusedWeights(format: weightFormat, slots: slots, hidden: c.hidden, intermediate: c.intermediate,
                            w13: w13, w2: w2, w13Scale: s13, w2Scale: s2)
    }
}
