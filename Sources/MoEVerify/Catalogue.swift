import Foundation
import MoEReference
import TensorIO

/// Where a case's layer and inputs come from.
public enum CaseSource: Codable, Sendable, Equatable {
    /// Generated from a seed (the catalogue, fuzz cases).
    case synthetic(SyntheticSpec)
    /// A case file (DESIGN §4): a user's checkpoint layer with its hidden states, or a golden.
    case file(path: String, prefix: String?)
}

/// One named case: a layer with inputs, and how the kernel is asked to run it.
public struct VerifyCase: Codable, Sendable, CustomStringConvertible {
    public var name: String
    public var source: CaseSource
    /// FP8 stage-1 split count (1 = off).
    public var splitK: Int
    /// Fuse the shared expert as slot E (only when it can fuse).
    public var fuseShared: Bool

    public init(name: String, spec: SyntheticSpec, splitK: Int = 1, fuseShared: Bool? = nil) {
        self.name = name
        self.source = .synthetic(spec)
        self.splitK = splitK
        self.fuseShared = fuseShared ?? spec.config.fusable
    }

    /// A case file as a case: its name is the file's, the shared expert fused when it can.
    public init(file path: String, prefix: String? = nil, splitK: Int = 1, fuseShared: Bool? = nil) throws {
        let f = try MoECaseFile(path: path, prefix: prefix)
        _ = try f.inputs() // a case needs hidden states: say so now, naming the file
        name = f.name.hasSuffix(".safetensors") ? String(f.name.dropLast(".safetensors".count)) : f.name
        source = .file(path: path, prefix: prefix)
        self.splitK = splitK
        self.fuseShared = fuseShared ?? f.config.fusable
    }

    /// The synthetic spec (nil for a case file); setting it makes the case synthetic.
    public var spec: SyntheticSpec? {
        get { if case let .synthetic(s) = source { return s } else { return nil } }
        set { if let newValue { source = .synthetic(newValue) } }
    }

    /// The layer with its inputs.
    public func openLayer() throws -> KernelLayerSource {
        switch source {
        case let .synthetic(spec): return try SyntheticLayer(spec)
        case let .file(path, prefix): return try MoECaseFile(path: path, prefix: prefix)
        }
    }

    // JSON (replay commands, reports): {"name", "spec": {...}} for a synthetic case, as replay
    // commands always were, or {"name", "file", "prefix"} for a case file; plus splitK, fuseShared.
    enum CodingKeys: String, CodingKey { case name, spec, file, prefix, splitK, fuseShared }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        if let spec = try c.decodeIfPresent(SyntheticSpec.self, forKey: .spec) {
            source = .synthetic(spec)
        } else if let path = try c.decodeIfPresent(String.self, forKey: .file) {
            source = .file(path: path, prefix: try c.decodeIfPresent(String.self, forKey: .prefix))
        } else {
            throw DecodingError.dataCorruptedError(forKey: .spec, in: c, debugDescription: "a case needs \"spec\" (synthetic) or \"file\" (a case file)")
        }
        splitK = try c.decodeIfPresent(Int.self, forKey: .splitK) ?? 1
        fuseShared = try c.decode(Bool.self, forKey: .fuseShared)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(name, forKey: .name)
        switch source {
        case let .synthetic(spec): try c.encode(spec, forKey: .spec)
        case let .file(path, prefix):
            try c.encode(path, forKey: .file)
            try c.encodeIfPresent(prefix, forKey: .prefix)
        }
        try c.encode(splitK, forKey: .splitK)
        try c.encode(fuseShared, forKey: .fuseShared)
    }

    public var description: String {
        let what: String
        switch source {
        case let .synthetic(spec): what = "\(spec)"
        case let .file(path, _): what = path
        }
        return "\(name) [\(what)\(splitK > 1 ? " split_k=\(splitK)" : "")\(fuseShared ? " fused" : "")]"
    }
}

/// The model shapes of FACTS §4, with the tensor-parallel degree their deployments divide I by.
public struct ModelShape: Sendable {
    public let name: String
    public let family: ModelFamily
    public let hidden: Int
    public let intermediate: Int
    public let sharedIntermediate: Int
    public let experts: Int
    public let topK: Int
    public let renormalize: Bool
    public let tensorParallel: Int

    public var config: MoEConfig {
        MoEConfig(family: family, hidden: hidden, intermediate: intermediate / tensorParallel,
                  sharedIntermediate: sharedIntermediate / tensorParallel, experts: experts, topK: topK, renormalize: renormalize)
    }

    init(_ name: String, _ family: ModelFamily, hidden: Int, intermediate: Int, sharedIntermediate: Int? = nil, experts: Int, topK: Int,
         renormalize: Bool = true, tensorParallel: Int) {
        self.name = name; self.family = family; self.hidden = hidden; self.intermediate = intermediate
        self.sharedIntermediate = sharedIntermediate ?? intermediate; self.experts = experts; self.topK = topK
        self.renormalize = renormalize; self.tensorParallel = tensorParallel
    }

    /// Is = I and renormalization unless stated.
    public static let all: [ModelShape] = [
        ModelShape("qwen3.5-397b-a17b-tp8", .qwen35Moe, hidden: 4096, intermediate: 1024, experts: 512, topK: 10, tensorParallel: 8),
        ModelShape("qwen3.5-122b-a10b-tp4", .qwen35Moe, hidden: 3072, intermediate: 1024, experts: 256, topK: 8, tensorParallel: 4),
        ModelShape("qwen3.5-35b-a3b-tp1", .qwen35Moe, hidden: 2048, intermediate: 512, experts: 256, topK: 8, tensorParallel: 1),
        ModelShape("qwen3-next-80b-a3b-tp2", .qwen3Next, hidden: 2048, intermediate: 512, experts: 512, topK: 10, tensorParallel: 2),
        ModelShape("qwen2-57b-a14b-tp4", .qwen2Moe, hidden: 3584, intermediate: 2560, sharedIntermediate: 20480, experts: 64, topK: 8,
                   renormalize: false, tensorParallel: 4),
        ModelShape("qwen1.5-moe-a2.7b-tp1", .qwen2Moe, hidden: 2048, intermediate: 1408, sharedIntermediate: 5632, experts: 60, topK: 4,
                   renormalize: false, tensorParallel: 1),
    ]
}

/// Named case suites.
public enum Catalogue {
    public static let suites = ["smoke", "splitk", "catalogue", "all"]

    static let formats: [WeightFormat] = [.bf16, .fp8e4m3fn, .fp8e4m3fnuz]


    /// The FP8 split-K accuracy cases (FACTS §5): H = 4096 (32 K-blocks), decode token counts,
    /// block scales spread over 2^16 across K, coherent large inputs so fp16 partials overflow and
    /// bf16-reduced partials are off by far more than the bound;
    /// split counts 1…32, where 32 is one K tile per split (aiter #3997's KBatch = 1).
    public static func splitK() -> [VerifyCase] {
        var out: [VerifyCase] = []
        let config = MoEConfig(family: .qwen35Moe, hidden: 4096, intermediate: 128, sharedIntermediate: 128, experts: 16, topK: 4)
        for f in [WeightFormat.fp8e4m3fn, .fp8e4m3fnuz] {
            for (t, tokens) in [1, 8].enumerated() {
                for s in [1, 2, 4, 8, 16, 32] {
                    let spec = SyntheticSpec(config: config, format: f, tokens: tokens, seed: 7000 + UInt64(t), routing: .uniform,
                                             inputs: .coherent, scales: .spreadAcrossK)
                    out.append(VerifyCase(name: "splitk-\(f.tag)-T\(tokens)-s\(s)", spec: spec, splitK: s))
                }
            }
        }
        return out
    }

    /// Small shapes: every format, odd sizes, each routing mode — seconds on any GPU.
    public static func smoke() -> [VerifyCase] {
        var out: [VerifyCase] = []
        let configs: [(String, MoEConfig)] = [
            ("q35-small", MoEConfig(family: .qwen35Moe, hidden: 256, intermediate: 128, sharedIntermediate: 128, experts: 8, topK: 2)),
            ("odd-shapes", MoEConfig(family: .qwen3Next, hidden: 200, intermediate: 96, sharedIntermediate: 96, experts: 7, topK: 3)),
            ("unfusable", MoEConfig(family: .qwen2Moe, hidden: 320, intermediate: 64, sharedIntermediate: 256, experts: 6, topK: 2, renormalize: false)),
            ("e-equals-k", MoEConfig(family: .qwen35Moe, hidden: 128, intermediate: 64, sharedIntermediate: 64, experts: 4, topK: 4)),
        ]
        for f in formats {
            for (name, c) in configs {
                for t in [1, 17, 33] {
                    out.append(VerifyCase(name: "smoke-\(name)-\(f.tag)-T\(t)", spec: SyntheticSpec(config: c, format: f, tokens: t, seed: UInt64(100 + t))))
                }
            }
            let c = configs[0].1
            for mode in RoutingMode.allCases where mode != .uniform {
                out.append(VerifyCase(name: "smoke-routing-\(mode.rawValue)-\(f.tag)", spec: SyntheticSpec(config: c, format: f, tokens: 16, seed: 5, routing: mode)))
            }
            for mode in InputMode.allCases where mode != .normal {
                out.append(VerifyCase(name: "smoke-inputs-\(mode.rawValue)-\(f.tag)", spec: SyntheticSpec(config: c, format: f, tokens: 16, seed: 6, inputs: mode)))
            }
        }
        return out
    }

    /// The model catalogue: every family at its real (TP-divided) shape, T ∈ {1, 2, 16, 33, 256, 4096},
    /// BF16 and both FP8 formats.
    public static func models(tokens: [Int] = [1, 2, 16, 33, 256, 4096]) -> [VerifyCase] {
        var out: [VerifyCase] = []
        for m in ModelShape.all {
            for f in formats {
                for t in tokens {
                    out.append(VerifyCase(name: "\(m.name)-\(f.tag)-T\(t)", spec: SyntheticSpec(config: m.config, format: f, tokens: t, seed: UInt64(t))))
                }
            }
        }
        return out
    }

    public static func suite(_ name: String) throws -> [VerifyCase] {
        switch name {
        case "smoke": return smoke()
        case "splitk": return splitK()
        case "catalogue": return models() + splitK()
        case "all": return smoke() + models() + splitK()
        default: throw VerifyError.unknownSuite(name, known: suites)
        }
    }
}

/// A verification that could not run (a case that runs and fails is a `CaseReport`, not an error).
public enum VerifyError: Error, CustomStringConvertible {
    /// A suite name that `Catalogue` does not know.
    case unknownSuite(String, known: [String])
    /// No case of a suite matches a filter.
    case noMatchingCases(suite: String, filter: String?)
    /// A `--shard` that is not `i/n` with `0 <= i < n`.
    case badShard(String)
    /// A `--replay` argument that is not a `VerifyCase` JSON.
    case badReplay(String)
    /// Any other wrong request (kept for callers that describe their own problem).
    case usage(String)
    /// Any other failure to run (kept for callers that describe their own problem).
    case failed(String)

    public var description: String {
        switch self {
        case let .unknownSuite(name, known): return "unknown suite '\(name)' (known: \(known.joined(separator: ", ")))"
        case let .noMatchingCases(suite, filter): return "no case of suite '\(suite)' matches filter '\(filter ?? "")'"
        case let .badShard(s): return "--shard expects i/n with 0 <= i < n, got '\(s)'"
        case let .badReplay(why): return "--replay: not a VerifyCase JSON (\(why))"
        case .usage(let s), .failed(let s): return s
        }
    }
}
