import Foundation
import Testing
import TensorIO
import MoECheckTestSupport

// A small generator of MoE case files in HF checkpoint naming (DESIGN.md §4), written by the
// tests themselves: raw element bit patterns are drawn from a seeded generator and the values
// the reader must return are computed here from those bits and scales (fp8: code × scale with
// the e4m3 decoder of TestSupport.swift), never through the code under test.

let casePrefix = "model.layers.3.mlp."

func ceilDiv128(_ n: Int) -> Int { (n + 127) / 128 }

/// Storage format of the expert projections in a generated case.
enum StoredFormat: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case bf16, f32
    case fp8fn = "fp8-e4m3fn"
    case fp8fnuz = "fp8-e4m3fnuz"

    var dtype: DType {
        switch self {
        case .bf16: return .bf16
        case .f32: return .f32
        case .fp8fn: return .f8e4m3fn
        case .fp8fnuz: return .f8e4m3fnuz
        }
    }
    var weightFormat: WeightFormat {
        switch self {
        case .bf16: return .bf16
        case .f32: return .f32
        case .fp8fn: return .fp8e4m3fn
        case .fp8fnuz: return .fp8e4m3fnuz
        }
    }
    var isFP8: Bool { self == .fp8fn || self == .fp8fnuz }
    var testDescription: String { rawValue }
}

/// How combined `experts.gate_up_proj_scale_inv` blocks its 2I rows.
enum ScaleBlocking: String, Sendable {
    /// `[E, ceil(2I/128), ceil(H/128)]`: blocks of 128 rows over gate and up together (DESIGN §4).
    case combined
    /// `[E, 2·ceil(I/128), ceil(H/128)]`: gate and up blocked separately (sglang layout).
    case perHalf
}

struct LayerShape: Sendable, CustomTestStringConvertible {
    let family: ModelFamily
    let H: Int, I: Int, Is: Int, E: Int, K: Int

    var testDescription: String { "\(family.rawValue) H=\(H) I=\(I) Is=\(Is) E=\(E) K=\(K)" }
    var expectedConfig: MoEConfig {
        MoEConfig(family: family, hidden: H, intermediate: I, sharedIntermediate: Is, experts: E, topK: K, renormalize: family != .qwen2Moe)
    }
    /// Routed experts plus the shared one (slot E) when present.
    var slots: Int { E + (Is > 0 ? 1 : 0) }
    func intermediate(_ e: Int) -> Int { e == E ? Is : I }
}

enum ProjectionKind: UInt64 { case gate = 1, up = 2, gateUp = 3, down = 4 }

/// One generated layer: raw bits of every projection, and the tensors of a case file.
struct GeneratedCase {
    let shape: LayerShape
    let format: StoredFormat
    let layout: ExpertLayout
    let blocking: ScaleBlocking
    let rowDependentScales: Bool
    let seed: UInt64
    let tokens = 3

    /// Raw element bit patterns (bf16 / f32 bits, fp8 codes) of expert e's projections, row-major.
    var gate: [[UInt32]] = [], up: [[UInt32]] = [], down: [[UInt32]] = []
    var router: [Double] = [], sharedGate: [Double] = [], hidden: [Double] = []
    var tensors: [(String, Tensor)] = []
    var config: [String: Any] = [:]

    var label: String {
        "\(shape.testDescription) \(format.rawValue) \(layout.rawValue)\(layout == .combined && format.isFP8 ? " \(blocking.rawValue)-blocked" : "") seed \(seed)"
    }

    init(_ shape: LayerShape, _ format: StoredFormat, _ layout: ExpertLayout, blocking: ScaleBlocking = .combined,
         rowDependentScales: Bool = true, seed: UInt64 = 7) {
        self.shape = shape; self.format = format; self.layout = layout; self.blocking = blocking
        self.rowDependentScales = rowDependentScales; self.seed = seed
        var rng = SeededGenerator(seed: seed &* 0x1000_0001 &+ UInt64(shape.H * 131 + shape.I * 7 + shape.E))
        for e in 0..<shape.slots {
            let ie = shape.intermediate(e)
            gate.append((0..<(ie * shape.H)).map { _ in randomElement(&rng) })
            up.append((0..<(ie * shape.H)).map { _ in randomElement(&rng) })
            down.append((0..<(shape.H * ie)).map { _ in randomElement(&rng) })
        }
        func smallBF16(_ n: Int, _ denominator: Float) -> [Double] {
            (0..<n).map { _ in Double(Float(Int.random(in: -120...120, using: &rng)) / denominator) }
        }
        router = smallBF16(shape.E * shape.H, 32)
        sharedGate = smallBF16(shape.H, 64)
        hidden = smallBF16(tokens * shape.H, 8)
        config = Self.hfConfig(shape, fp8: format.isFP8)
        buildTensors()
    }

    // MARK: values

    func randomElement(_ rng: inout SeededGenerator) -> UInt32 {
        switch format {
        case .bf16: return UInt32(bf16Bits(exact: Float(Int.random(in: -127...127, using: &rng)) / 64))
        case .f32: return (Float(Int.random(in: -100_000...100_000, using: &rng)) / 256).bitPattern
        case .fp8fn:
            var c: UInt8
            repeat { c = UInt8.random(in: 0...255, using: &rng) } while c & 0x7F == 0x7F
            return UInt32(c)
        case .fp8fnuz:
            var c: UInt8
            repeat { c = UInt8.random(in: 0...255, using: &rng) } while c == 0x80
            return UInt32(c)
        }
    }

    func elementValue(_ raw: UInt32) -> Double {
        switch format {
        case .bf16: return Double(Float(bitPattern: raw << 16))
        case .f32: return Double(Float(bitPattern: raw))
        case .fp8fn: return referenceE4M3(UInt8(raw), fnuz: false)
        case .fp8fnuz: return referenceE4M3(UInt8(raw), fnuz: true)
        }
    }

    /// The block scale of (expert, projection, row block, column block): a small integer times a
    /// power of two. Without row dependence, gate, up and gate_up share one scale per column block,
    /// so both layouts describe the same weights.
    func scale(_ e: Int, _ kind: ProjectionKind, _ rowBlock: Int, _ columnBlock: Int) -> Float {
        var k = kind, rb = rowBlock
        if !rowDependentScales { rb = 0; if k != .down { k = .gateUp } }
        var h = SeededGenerator(seed: seed &* 1_000_003 &+ UInt64(e) << 32 &+ k.rawValue << 24 &+ UInt64(rb) << 12 &+ UInt64(columnBlock))
        let x = h.next()
        return Float(1 + x % 7) * Float(sign: .plus, exponent: -Int((x >> 8) % 6), significand: 1)
    }

    var combinedBlocked: Bool { layout == .combined && blocking == .combined }

    /// What `decodeGateUp(expert: e)` must return: `[gate; up]` as `[2·Ie, H]`.
    func expectedGateUp(_ e: Int) -> [Double] {
        let ie = shape.intermediate(e), H = shape.H
        let routedCombined = combinedBlocked && e < shape.E
        var out = [Double](repeating: 0, count: 2 * ie * H)
        for r in 0..<(2 * ie) {
            let isGate = r < ie, lr = isGate ? r : r - ie
            for c in 0..<H {
                var v = elementValue(isGate ? gate[e][lr * H + c] : up[e][lr * H + c])
                if format.isFP8 {
                    let s = routedCombined ? scale(e, .gateUp, r / 128, c / 128) : scale(e, isGate ? .gate : .up, lr / 128, c / 128)
                    v *= Double(s)
                }
                out[r * H + c] = v
            }
        }
        return out
    }

    /// What `decodeDown(expert: e)` must return: `[H, Ie]`.
    func expectedDown(_ e: Int) -> [Double] {
        let ie = shape.intermediate(e), H = shape.H
        var out = [Double](repeating: 0, count: H * ie)
        for r in 0..<H {
            for c in 0..<ie {
                var v = elementValue(down[e][r * ie + c])
                if format.isFP8 { v *= Double(scale(e, .down, r / 128, c / 128)) }
                out[r * ie + c] = v
            }
        }
        return out
    }

    // MARK: tensors

    func weightTensor(_ raw: [UInt32], _ dims: [Int]) -> Tensor {
        switch format {
        case .bf16: return Tensor(bits: raw.map { UInt16($0) }, shape: dims, dtype: .bf16)
        case .f32: return Tensor(bits: raw, shape: dims, dtype: .f32)
        case .fp8fn, .fp8fnuz: return Tensor(bits: raw.map { UInt8($0) }, shape: dims, dtype: format.dtype)
        }
    }

    /// Little-endian bytes of raw elements, as the file (and a kernel buffer) holds them.
    func bytes(_ raw: [UInt32]) -> [UInt8] {
        let width = format.dtype.byteSize
        var out: [UInt8] = []
        out.reserveCapacity(raw.count * width)
        for r in raw { for b in 0..<width { out.append(UInt8(truncatingIfNeeded: r >> (8 * UInt32(b)))) } }
        return out
    }

    func scaleGrid(_ e: Int, _ kind: ProjectionKind, rows: Int, columns: Int) -> [Float] {
        (0..<(rows * columns)).map { scale(e, kind, $0 / columns, $0 % columns) }
    }

    static func hfConfig(_ s: LayerShape, fp8: Bool) -> [String: Any] {
        var text: [String: Any] = [
            "hidden_size": s.H, "moe_intermediate_size": s.I, "shared_expert_intermediate_size": s.Is,
            "num_experts": s.E, "num_experts_per_tok": s.K, "num_hidden_layers": 4,
        ]
        var top: [String: Any]
        switch s.family {
        case .qwen2Moe:
            text["model_type"] = "qwen2_moe"; text["norm_topk_prob"] = false; top = text
        case .qwen3Next:
            text["model_type"] = "qwen3_next"; text["norm_topk_prob"] = true; top = text
        case .qwen35Moe:
            text["model_type"] = "qwen3_5_moe_text"
            top = ["model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
                   "text_config": text, "vision_config": ["hidden_size": 1152, "model_type": "qwen3_5_moe_vision"]]
        }
        if fp8 {
            top["quantization_config"] = ["quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]] as [String: Any]
        }
        return top
    }

    var metadata: [String: String] {
        let data = try! JSONSerialization.data(withJSONObject: config, options: [.sortedKeys])
        return ["config": String(decoding: data, as: UTF8.self)]
    }

    mutating func buildTensors() {
        let H = shape.H, I = shape.I, E = shape.E, cH = ceilDiv128(H)
        var t: [(String, Tensor)] = []
        t.append(("hidden_states", Tensor(hidden, shape: [tokens, H], dtype: .bf16)))
        t.append((casePrefix + "gate.weight", Tensor(router, shape: [E, H], dtype: .bf16)))
        if shape.Is > 0 { t.append((casePrefix + "shared_expert_gate.weight", Tensor(sharedGate, shape: [1, H], dtype: .bf16))) }
        func perExpert(_ e: Int, _ base: String) {
            let ie = shape.intermediate(e), cI = ceilDiv128(ie)
            for (proj, raw, dims, kind) in [("gate_proj", gate[e], [ie, H], ProjectionKind.gate), ("up_proj", up[e], [ie, H], .up),
                                            ("down_proj", down[e], [H, ie], .down)] {
                let name = base + proj + ".weight"
                t.append((name, weightTensor(raw, dims)))
                if format.isFP8 {
                    let (rows, cols) = kind == .down ? (cH, cI) : (cI, cH)
                    t.append((name + "_scale_inv", Tensor(scaleGrid(e, kind, rows: rows, columns: cols), shape: [rows, cols], dtype: .f32)))
                }
            }
        }
        switch layout {
        case .perExpert:
            for e in 0..<E { perExpert(e, casePrefix + "experts.\(e).") }
        case .combined:
            let cI = ceilDiv128(I)
            t.append((casePrefix + "experts.gate_up_proj", weightTensor((0..<E).flatMap { gate[$0] + up[$0] }, [E, 2 * I, H])))
            t.append((casePrefix + "experts.down_proj", weightTensor((0..<E).flatMap { down[$0] }, [E, H, I])))
            if format.isFP8 {
                var gu: [Float] = [], rowsGU = 0
                for e in 0..<E {
                    switch blocking {
                    case .combined:
                        rowsGU = ceilDiv128(2 * I)
                        gu += scaleGrid(e, .gateUp, rows: rowsGU, columns: cH)
                    case .perHalf:
                        rowsGU = 2 * cI
                        gu += scaleGrid(e, .gate, rows: cI, columns: cH) + scaleGrid(e, .up, rows: cI, columns: cH)
                    }
                }
                t.append((casePrefix + "experts.gate_up_proj_scale_inv", Tensor(gu, shape: [E, rowsGU, cH], dtype: .f32)))
                let dn = (0..<E).flatMap { scaleGrid($0, .down, rows: cH, columns: cI) }
                t.append((casePrefix + "experts.down_proj_scale_inv", Tensor(dn, shape: [E, cH, cI], dtype: .f32)))
            }
        }
        if shape.Is > 0 { perExpert(E, casePrefix + "shared_expert.") }
        t.append(("lm_head.unrelated", Tensor([1, 2] as [Double], shape: [2], dtype: .f32))) // extra tensors are ignored
        tensors = t
    }

    // MARK: editing (for the error cases)

    mutating func remove(_ name: String) {
        precondition(tensors.contains { $0.0 == name }, "no tensor \(name) in the generated case")
        tensors.removeAll { $0.0 == name }
    }

    mutating func replace(_ name: String, with tensor: Tensor) {
        guard let i = tensors.firstIndex(where: { $0.0 == name }) else { preconditionFailure("no tensor \(name) in the generated case") }
        tensors[i].1 = tensor
    }

    func write(to url: URL, metadata override: [String: String]? = nil) throws {
        try SafetensorsWriter.write(tensors, metadata: override ?? metadata, to: url.path)
    }
}
