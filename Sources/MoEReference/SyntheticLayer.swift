import Foundation
import LowPrecision
import TensorIO

/// How tokens are steered between experts in a generated layer (through a constant input
/// channel 0 and per-expert router biases on that channel, or duplicated router rows).
public enum RoutingMode: String, Codable, CaseIterable, Sendable {
    case uniform
    /// Experts `0..<max(1, E/8)` get a +4 logit bias.
    case hotExperts = "hot-experts"
    /// Expert 0 gets a +64 logit bias: every token picks it.
    case oneExpert = "one-expert"
    /// Every logit is shifted by −64 (FlashInfer #2822: all-negative logits).
    case allNegative = "all-negative"
    /// Odd router rows copy the even row before them with one weight changed by one step:
    /// near ties everywhere, flagged ambiguous where they straddle the K-th place.
    case nearTies = "near-ties"
}

/// How inputs are drawn.
public enum InputMode: String, Codable, CaseIterable, Sendable {
    /// `m · 2^-8`, m uniform in −127…127.
    case normal
    /// As normal, with every 64th channel (from 7) 64× larger.
    case outliers
    /// `m · 2^-2`: magnitudes up to ~32.
    case large
    /// Values on the fp8 e4m3 grid (`code · 2^-4`).
    case fp8Grid = "fp8-grid"
    /// `|m| · 2^-2`: large and all positive, so with `spread-across-k` scales every K block's
    /// partial sum is coherent (no cancellation inside a block) while blocks cancel each other —
    /// the data on which split-K partials reduced in bf16 or fp16 are visibly wrong.
    case coherent
}

/// How FP8 block scales are drawn.
public enum ScaleProfile: String, Codable, CaseIterable, Sendable {
    /// `2^-(p + 0…3)` from the counter generator (reproducible on the GPU).
    case counter
    /// Additionally × 2^(4·(kb mod 5) − 4) by K block `kb`: scales spread over 2^16 across K, so a
    /// wrong K-block scale index or a dropped split-K partial shows; the gate/up weights' signs are
    /// set per (row, K block) (alternating), so with `coherent` inputs each block's partial sum is
    /// coherent and split partial sums exceed the fp16 range.
    case spreadAcrossK = "spread-across-k"
}

/// A complete description of a generated case: every value follows from it.
public struct SyntheticSpec: Codable, Sendable, Equatable, CustomStringConvertible {
    public var config: MoEConfig
    public var format: WeightFormat
    public var tokens: Int
    public var seed: UInt64
    public var routing: RoutingMode
    public var inputs: InputMode
    public var scales: ScaleProfile

    public init(config: MoEConfig, format: WeightFormat, tokens: Int, seed: UInt64, routing: RoutingMode = .uniform,
                inputs: InputMode = .normal, scales: ScaleProfile = .counter) {
        self.config = config; self.format = format; self.tokens = tokens; self.seed = seed
        self.routing = routing; self.inputs = inputs; self.scales = scales
    }

    public var description: String {
        "T=\(tokens) \(config) \(format.rawValue) seed=\(seed) routing=\(routing.rawValue) inputs=\(inputs.rawValue)" +
            (scales == .counter ? "" : " scales=\(scales.rawValue)")
    }
}

/// A layer whose weights are a pure function of a `SyntheticSpec`, generated expert by expert.
///
/// Streams and layout follow the kernel ABI so a GPU can generate identical bits: routed experts
/// (and a fusable shared expert in slot E) live in `w13 [E', 2I, H]` and `w2 [E', H, I]`; fp8
/// scales in `w13_scale [E', 2·ceil(I/128), ceil(H/128)]` and `w2_scale [E', ceil(H/128), ceil(I/128)]`.
/// A shared expert that cannot fuse uses the streams `shared.w13` / `shared.w2` / `shared.w13_scale` /
/// `shared.w2_scale` with its own Is.
public final class SyntheticLayer: GenericDecodingLayerSource, KernelLayerSource {
    public let spec: SyntheticSpec
    public var config: MoEConfig { spec.config }
    public var weightFormat: WeightFormat { spec.format }
    public var name: String { "synthetic(\(spec))" }
    let generator: CounterGenerator

    public init(_ spec: SyntheticSpec) throws {
        try spec.config.validate(file: "synthetic")
        guard spec.tokens >= 1 else { throw ReferenceError.invalid("synthetic case needs tokens >= 1") }
        guard spec.format == .bf16 || spec.format.fp8 != nil else {
            throw ReferenceError.unsupported("synthetic layers store bf16 or fp8 weights, not \(spec.format.rawValue)")
        }
        self.spec = spec
        self.generator = CounterGenerator(seed: spec.seed)
    }

    /// Power-of-two exponent that makes a dot product over `n` terms O(1).
    public static func bf16Param(_ n: Int) -> Int { Int((5.2 + log2(Double(Swift.max(n, 1))) / 2).rounded()) }
    /// fp8 codes are ~2^7 larger than the bf16 integers' unit; the scale takes it back.
    public static func fp8Param(_ n: Int) -> Int { Swift.max(0, bf16Param(n) - 7) }

    public static let w13Stream = CounterGenerator.stream("w13")
    public static let w2Stream = CounterGenerator.stream("w2")
    public static let w13ScaleStream = CounterGenerator.stream("w13_scale")
    public static let w2ScaleStream = CounterGenerator.stream("w2_scale")
    public static let sharedW13Stream = CounterGenerator.stream("shared.w13")
    public static let sharedW2Stream = CounterGenerator.stream("shared.w2")
    public static let sharedW13ScaleStream = CounterGenerator.stream("shared.w13_scale")
    public static let sharedW2ScaleStream = CounterGenerator.stream("shared.w2_scale")

    /// Where expert `e`'s tensors live: (w13 stream, w2 stream, their scale streams, slot index).
    func streams(_ e: Int) -> (UInt64, UInt64, UInt64, UInt64, Int) {
        let c = config
        if e == c.experts && !c.fusable {
            return (Self.sharedW13Stream, Self.sharedW2Stream, Self.sharedW13ScaleStream, Self.sharedW2ScaleStream, 0)
        }
        return (Self.w13Stream, Self.w2Stream, Self.w13ScaleStream, Self.w2ScaleStream, e)
    }

    /// Raw kernel-layout bytes of one matrix of expert `slot` (`rows × cols`).
    func matrixBytes(stream: UInt64, slot: Int, rows: Int, cols: Int, param: Int) -> [UInt8] {
        let n = rows * cols
        if spec.format == .bf16 {   // generated in place as the bytes' UInt16 values (one allocation)
            if n == 0 { return [] }
            return [UInt8](unsafeUninitializedCapacity: 2 * n) { buf, count in
                let p = UnsafeMutableRawPointer(buf.baseAddress!).bindMemory(to: UInt16.self, capacity: n)
                generator.fillBF16(p, count: n, stream: stream, offset: slot * n, param: param)
                count = 2 * n
            }
        }
        var out = [UInt8](repeating: 0, count: n)
        out.withUnsafeMutableBufferPointer { generator.fillFP8($0.baseAddress!, count: n, stream: stream, offset: slot * n) }
        if spec.scales == .spreadAcrossK && (stream == Self.w13Stream || stream == Self.sharedW13Stream) {
            for r in 0..<rows { for c in 0..<cols { out[r * cols + c] = (out[r * cols + c] & 0x7F) | UInt8(((r + c / 128) & 1) << 7) } }
        }
        return out
    }

    /// Block scales of one matrix (`blockRows × blockCols`), with the profile applied.
    /// `kbOfColumn` says which block index counts as the K block (columns: the reduction dim).
    func matrixScales(stream: UInt64, slot: Int, blockRows: Int, blockCols: Int, param: Int) -> [Float] {
        let n = blockRows * blockCols
        var out = [Float](repeating: 0, count: n)
        out.withUnsafeMutableBufferPointer { generator.fillScales($0.baseAddress!, count: n, stream: stream, offset: slot * n, param: param) }
        if spec.scales == .spreadAcrossK {
            for r in 0..<blockRows {
                for kb in 0..<blockCols {
                    out[r * blockCols + kb] *= Float(sign: .plus, exponent: 4 * (kb % 5) - 4, significand: 1)
                }
            }
        }
        return out
    }

    public func gateUpBytes(expert e: Int) -> (bytes: [UInt8], scales: [Float]) {
        let H = config.hidden, Ie = config.intermediate(ofExpert: e)
        let (s13, _, sc13, _, slot) = streams(e)
        let bytes = matrixBytes(stream: s13, slot: slot, rows: 2 * Ie, cols: H, param: Self.bf16Param(H))
        guard spec.format.fp8 != nil else { return (bytes, []) }
        let si = (Ie + 127) / 128, sh = (H + 127) / 128
        return (bytes, matrixScales(stream: sc13, slot: slot, blockRows: 2 * si, blockCols: sh, param: Self.fp8Param(H)))
    }

    public func downBytes(expert e: Int) -> (bytes: [UInt8], scales: [Float]) {
        let H = config.hidden, Ie = config.intermediate(ofExpert: e)
        let (_, s2, _, sc2, slot) = streams(e)
        let bytes = matrixBytes(stream: s2, slot: slot, rows: H, cols: Ie, param: Self.bf16Param(Ie))
        guard spec.format.fp8 != nil else { return (bytes, []) }
        let si = (Ie + 127) / 128, sh = (H + 127) / 128
        return (bytes, matrixScales(stream: sc2, slot: slot, blockRows: sh, blockCols: si, param: Self.fp8Param(Ie)))
    }

    /// Decodes kernel-layout bytes + scales of a `rows × cols` matrix into Double.
    @_specialize(where T == Double)
    @_specialize(where T == Float)
    func decode<T: BinaryFloatingPoint>(_ bytes: [UInt8], _ scales: [Float], rows: Int, cols: Int, halves: Int?, into out: UnsafeMutablePointer<T>) {
        if spec.format == .bf16 {
            bytes.withUnsafeBytes { raw in
                let p = raw.bindMemory(to: UInt16.self)
                for i in 0..<(rows * cols) { out[i] = T(BFloat16.float(p[i])) }
            }
            return
        }
        let table = FP8Codec.codec(for: spec.format.fp8!).table
        let sc = (cols + 127) / 128
        for r in 0..<rows {
            // gate/up halves are blocked separately (scale rows: gate blocks, then up blocks)
            let br: Int
            if let half = halves { br = r < half ? r / 128 : (half + 127) / 128 + (r - half) / 128 } else { br = r / 128 }
            for c in 0..<cols {
                out[r * cols + c] = T(Double(table[Int(bytes[r * cols + c])]) * Double(scales[br * sc + c / 128]))
            }
        }
    }

    func checkExpert(_ e: Int) throws {
        guard e >= 0, e <= config.experts, e < config.experts || config.hasSharedExpert else {
            throw ReferenceError.invalid("expert \(e) out of range")
        }
    }


    @_specialize(where T == Double)
    @_specialize(where T == Float)
    public func gateUp<T: BinaryFloatingPoint>(_ e: Int, into out: UnsafeMutablePointer<T>) throws {
        try checkExpert(e)
        let Ie = config.intermediate(ofExpert: e)
        let (b, s) = gateUpBytes(expert: e)
        decode(b, s, rows: 2 * Ie, cols: config.hidden, halves: Ie, into: out)
    }

    @_specialize(where T == Double)
    @_specialize(where T == Float)
    public func down<T: BinaryFloatingPoint>(_ e: Int, into out: UnsafeMutablePointer<T>) throws {
        try checkExpert(e)
        let (b, s) = downBytes(expert: e)
        decode(b, s, rows: config.hidden, cols: config.intermediate(ofExpert: e), halves: nil, into: out)
    }

    /// Router weight `[E, H]` as bf16 values, with the routing mode applied.
    public func routerBF16() -> [UInt16] {
        let E = config.experts, H = config.hidden
        var w = [UInt16](repeating: 0, count: E * H)
        let p = Self.bf16Param(H) - 1
        w.withUnsafeMutableBufferPointer { generator.fillBF16($0.baseAddress!, count: E * H, stream: CounterGenerator.stream("router"), offset: 0, param: p) }
        func setBias(_ e: Int, _ v: Float) { w[e * H] = BFloat16.bits(v) }
        switch spec.routing {
        case .uniform: break
        case .hotExperts: for e in 0..<E { setBias(e, e < Swift.max(1, E / 8) ? 4 : 0) }
        case .oneExpert: for e in 0..<E { setBias(e, e == 0 ? 64 : 0) }
        case .allNegative: for e in 0..<E { setBias(e, -64) }
        case .nearTies:
            for e in stride(from: 1, to: E, by: 2) {
                for h in 0..<H { w[e * H + h] = w[(e - 1) * H + h] }
                let h = H > 1 ? 1 + (e % (H - 1)) : 0
                let v = BFloat16.float(w[e * H + h]) + Float(sign: .plus, exponent: -p, significand: 1)
                w[e * H + h] = BFloat16.bits(v)
            }
        }
        return w
    }

    public func routerWeight() throws -> [Double] { routerBF16().map { Double(BFloat16.float($0)) } }

    /// Shared-expert gate `[H]` as bf16 bits (nil without a shared expert).
    public func sharedGateBF16() -> [UInt16]? {
        guard config.hasSharedExpert else { return nil }
        let H = config.hidden
        var w = [UInt16](repeating: 0, count: H)
        w.withUnsafeMutableBufferPointer { generator.fillBF16($0.baseAddress!, count: H, stream: CounterGenerator.stream("shared_expert_gate"), offset: 0, param: Self.bf16Param(H) - 1) }
        return w
    }

    public func sharedGateWeight() throws -> [Double]? { sharedGateBF16()?.map { Double(BFloat16.float($0)) } }

    /// Inputs `[T, H]` as bf16 bits.
    public func inputsBF16() -> [UInt16] {
        let T = spec.tokens, H = config.hidden
        var x = [UInt16](repeating: 0, count: T * H)
        let stream = CounterGenerator.stream("hidden_states")
        switch spec.inputs {
        case .normal, .outliers:
            x.withUnsafeMutableBufferPointer { generator.fillBF16($0.baseAddress!, count: T * H, stream: stream, offset: 0, param: 8) }
            if spec.inputs == .outliers {
                for t in 0..<T { for h in stride(from: 7, to: H, by: 64) { x[t * H + h] = BFloat16.bits(BFloat16.float(x[t * H + h]) * 64) } }
            }
        case .large, .coherent:
            x.withUnsafeMutableBufferPointer { generator.fillBF16($0.baseAddress!, count: T * H, stream: stream, offset: 0, param: 2) }
            if spec.inputs == .coherent { for i in 0..<(T * H) { x[i] &= 0x7FFF } }
        case .fp8Grid:
            var codes = [UInt8](repeating: 0, count: T * H)
            codes.withUnsafeMutableBufferPointer { generator.fillFP8($0.baseAddress!, count: T * H, stream: stream, offset: 0) }
            for i in 0..<(T * H) { x[i] = BFloat16.bits(FP8Codec.e4m3fn.value(codes[i]) * 0x1p-4) }
        }
        if spec.routing != .uniform && spec.routing != .nearTies {
            for t in 0..<T { x[t * H] = BFloat16.bits(Float(1)) }
        }
        return x
    }

    public func inputs() -> [Double] { inputsBF16().map { Double(BFloat16.float($0)) } }

    public var tokens: Int { spec.tokens }

    /// Writes the layer (with its inputs) as a combined-layout case file under `directory`,
    /// named by the spec's hash, unless that file is already there.
    public func caseFile(in directory: String) throws -> CaseFileLocation {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let specJSON = try encoder.encode(spec)
        let key = specJSON.reduce(UInt64(0xcbf2_9ce4_8422_2325)) { ($0 ^ UInt64($1)) &* 0x100_0000_01b3 } // FNV-1a
        let path = (directory as NSString).appendingPathComponent(String(format: "synthetic-%016llx.safetensors", key))
        if !FileManager.default.fileExists(atPath: path) {
            let tmp = path + ".partial"
            try writeCaseFile(to: tmp, layout: .combined)
            _ = rename(tmp, path)
        }
        let configJSON = try JSONSerialization.data(withJSONObject: config.huggingFaceObject(quantization: spec.format), options: [.sortedKeys])
        return CaseFileLocation(path: path, prefix: "model.layers.0.mlp.", inputsPath: path, configJSON: String(decoding: configJSON, as: UTF8.self))
    }

    /// Writes the case as a case file (DESIGN §4) in the given expert layout, HF naming with
    /// prefix `model.layers.0.mlp.`, config in `__metadata__`.
    public func writeCaseFile(to path: String, layout: ExpertLayout, metadata extra: [String: String] = [:]) throws {
        let c = config, H = c.hidden, I = c.intermediate, E = c.experts
        let pre = "model.layers.0.mlp."
        let wdtype: DType = spec.format == .bf16 ? .bf16 : (spec.format == .fp8e4m3fn ? .f8e4m3fn : .f8e4m3fnuz)
        var tensors: [(String, Tensor)] = []
        tensors.append(("hidden_states", Tensor(bits: inputsBF16(), shape: [spec.tokens, H], dtype: .bf16)))
        tensors.append((pre + "gate.weight", Tensor(bits: routerBF16(), shape: [E, H], dtype: .bf16)))
        if let sg = sharedGateBF16() { tensors.append((pre + "shared_expert_gate.weight", Tensor(bits: sg, shape: [1, H], dtype: .bf16))) }
        let esize = spec.format == .bf16 ? 2 : 1
        func matrix(_ bytes: ArraySlice<UInt8>, _ shape: [Int]) -> Tensor {
            Tensor(dtype: wdtype, shape: shape, storage: bytes.withUnsafeBytes { ByteStorage(copying: $0) })
        }
        func scales(_ s: ArraySlice<Float>, _ shape: [Int]) -> Tensor { Tensor(Array(s), shape: shape, dtype: .f32) }
        func perExpert(_ base: String, _ e: Int) {
            let Ie = c.intermediate(ofExpert: e)
            let (gu, gus) = gateUpBytes(expert: e)
            let (d, ds) = downBytes(expert: e)
            let half = Ie * H * esize
            tensors.append((base + "gate_proj.weight", matrix(gu[0..<half], [Ie, H])))
            tensors.append((base + "up_proj.weight", matrix(gu[half...], [Ie, H])))
            tensors.append((base + "down_proj.weight", matrix(d[...], [H, Ie])))
            if spec.format.fp8 != nil {
                let si = (Ie + 127) / 128, sh = (H + 127) / 128
                tensors.append((base + "gate_proj.weight_scale_inv", scales(gus[0..<(si * sh)], [si, sh])))
                tensors.append((base + "up_proj.weight_scale_inv", scales(gus[(si * sh)...], [si, sh])))
                tensors.append((base + "down_proj.weight_scale_inv", scales(ds[...], [sh, si])))
            }
        }
        switch layout {
        case .perExpert:
            for e in 0..<E { perExpert(pre + "experts.\(e).", e) }
        case .combined:
            let routed = try kernelWeights(fuseShared: false)
            tensors.append((pre + "experts.gate_up_proj", matrix(routed.w13[...], [E, 2 * I, H])))
            tensors.append((pre + "experts.down_proj", matrix(routed.w2[...], [E, H, I])))
            if spec.format.fp8 != nil {
                let si = (I + 127) / 128, sh = (H + 127) / 128
                tensors.append((pre + "experts.gate_up_proj_scale_inv", scales(routed.w13Scale[...], [E, 2 * si, sh])))
                tensors.append((pre + "experts.down_proj_scale_inv", scales(routed.w2Scale[...], [E, sh, si])))
            }
        }
        if c.hasSharedExpert { perExpert(pre + "shared_expert.", E) }
        let configJSON = try JSONSerialization.data(withJSONObject: c.huggingFaceObject(quantization: spec.format), options: [.sortedKeys])
        var meta = extra
        meta["config"] = String(decoding: configJSON, as: UTF8.self)
        if layout == .combined && spec.format.fp8 != nil { meta["gate_up_scale_blocking"] = "per-half" }
        let specEncoder = JSONEncoder()
        specEncoder.outputFormatting = [.sortedKeys] // byte-reproducible files (key order is random otherwise)
        meta["moecheck_spec"] = String(decoding: try specEncoder.encode(spec), as: UTF8.self)
        try SafetensorsWriter.write(tensors, metadata: meta, to: path)
    }
}
