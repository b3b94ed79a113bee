import Foundation
import Testing
import TensorIO
import MoECheckTestSupport

/// Broken case files: each is rejected with the file, the tensor and the problem named.
@Suite("MoE case file errors")
struct CaseFileErrorTests {
    static let shape = LayerShape(family: .qwen3Next, H: 64, I: 32, Is: 32, E: 4, K: 2)
    static let p = casePrefix

    /// Writes `g` (with `metadata` when given) and expects opening it to fail mentioning the
    /// file path and every fragment.
    static func expectOpenFails(_ label: String, _ g: GeneratedCase, metadata: [String: String]? = nil,
                                mentions: [String], sourceLocation: SourceLocation = #_sourceLocation) throws {
        try withScratchDirectory { dir in
            let url = dir.appendingPathComponent("case.safetensors")
            try g.write(to: url, metadata: metadata)
            expectTensorIOError("\(label) [\(g.label)]", mentions: [url.path] + mentions, sourceLocation: sourceLocation) {
                _ = try MoECaseFile(path: url.path)
            }
        }
    }

    static func withConfig(_ g: GeneratedCase, _ edit: (inout [String: Any]) -> Void) -> GeneratedCase {
        var g = g
        edit(&g.config)
        return g
    }

    @Test("missing router")
    func missingRouter() throws {
        var g = GeneratedCase(Self.shape, .bf16, .perExpert)
        g.remove(Self.p + "gate.weight")
        try Self.expectOpenFails("missing router", g, mentions: ["mlp.gate.weight", "missing required tensor"])
    }

    @Test("missing an expert's down_proj, in both layouts")
    func missingDown() throws {
        var g = GeneratedCase(Self.shape, .bf16, .perExpert)
        g.remove(Self.p + "experts.2.down_proj.weight")
        try Self.expectOpenFails("missing down_proj", g, mentions: ["tensor '\(Self.p)experts.2.down_proj.weight'", "missing required tensor"])
        var c = GeneratedCase(Self.shape, .bf16, .combined)
        c.remove(Self.p + "experts.down_proj")
        try Self.expectOpenFails("missing combined down_proj", c, mentions: ["tensor '\(Self.p)experts.down_proj'", "missing required tensor"])
        var s = GeneratedCase(Self.shape, .bf16, .combined)
        s.remove(Self.p + "shared_expert.up_proj.weight")
        try Self.expectOpenFails("missing shared up_proj", s, mentions: ["tensor '\(Self.p)shared_expert.up_proj.weight'", "missing required tensor"])
    }

    @Test("no routed experts in either layout")
    func noExperts() throws {
        var g = GeneratedCase(Self.shape, .bf16, .combined)
        g.remove(Self.p + "experts.gate_up_proj")
        try Self.expectOpenFails("no experts", g, mentions: ["experts.gate_up_proj", "experts.0.gate_proj.weight", "neither layout"])
    }

    @Test("missing _scale_inv of an fp8 weight", arguments: [StoredFormat.fp8fn, .fp8fnuz])
    func missingScale(_ format: StoredFormat) throws {
        var g = GeneratedCase(Self.shape, format, .perExpert)
        g.remove(Self.p + "experts.1.up_proj.weight_scale_inv")
        try Self.expectOpenFails("missing scale", g, mentions: ["tensor '\(Self.p)experts.1.up_proj.weight_scale_inv'", "missing required tensor",
                                                               "experts.1.up_proj.weight"])
        var c = GeneratedCase(Self.shape, format, .combined)
        c.remove(Self.p + "experts.gate_up_proj_scale_inv")
        try Self.expectOpenFails("missing combined scale", c, mentions: ["tensor '\(Self.p)experts.gate_up_proj_scale_inv'", "missing required tensor"])
    }

    @Test("router shape disagreeing with the config")
    func routerShape() throws {
        var g = GeneratedCase(Self.shape, .bf16, .perExpert)
        g.replace(Self.p + "gate.weight", with: Tensor([Double](repeating: 0, count: 5 * 64), shape: [5, 64], dtype: .bf16))
        try Self.expectOpenFails("router shape", g, mentions: ["tensor '\(Self.p)gate.weight'", "shape [5, 64]", "expected [4, 64]"])
        var s = GeneratedCase(Self.shape, .bf16, .perExpert)
        s.replace(Self.p + "shared_expert_gate.weight", with: Tensor([Double](repeating: 0, count: 2 * 64), shape: [2, 64], dtype: .bf16))
        try Self.expectOpenFails("shared gate shape", s, mentions: ["tensor '\(Self.p)shared_expert_gate.weight'", "shape [2, 64]"])
    }

    @Test("expert shape disagreeing with the config", arguments: [StoredFormat.bf16, .fp8fn])
    func expertShape(_ format: StoredFormat) throws {
        var g = GeneratedCase(Self.shape, format, .perExpert)
        g.replace(Self.p + "experts.3.gate_proj.weight", with: Tensor([Double](repeating: 0, count: 32 * 63), shape: [32, 63], dtype: format.dtype))
        try Self.expectOpenFails("per-expert shape", g, mentions: ["tensor '\(Self.p)experts.3.gate_proj.weight'", "shape [32, 63]", "expected [32, 64]"])
        var c = GeneratedCase(Self.shape, format, .combined)
        c.replace(Self.p + "experts.gate_up_proj", with: Tensor([Double](repeating: 0, count: 4 * 32 * 64), shape: [4, 32, 64], dtype: format.dtype))
        try Self.expectOpenFails("combined shape", c, mentions: ["tensor '\(Self.p)experts.gate_up_proj'", "shape [4, 32, 64]", "expected [4, 64, 64]"])
    }

    @Test("scale shape wrong")
    func scaleShape() throws {
        var g = GeneratedCase(Self.shape, .fp8fn, .perExpert)
        g.replace(Self.p + "experts.0.down_proj.weight_scale_inv", with: Tensor([1, 1] as [Double], shape: [1, 2], dtype: .f32))
        try Self.expectOpenFails("per-expert scale shape", g, mentions: ["tensor '\(Self.p)experts.0.down_proj.weight_scale_inv'", "shape [1, 2]", "expected [1, 1]"])
        var c = GeneratedCase(Self.shape, .fp8fn, .combined)
        c.replace(Self.p + "experts.gate_up_proj_scale_inv", with: Tensor([Double](repeating: 1, count: 3), shape: [3, 1, 1], dtype: .f32))
        try Self.expectOpenFails("combined scale shape", c, mentions: ["tensor '\(Self.p)experts.gate_up_proj_scale_inv'", "shape [3, 1, 1]"])
        // H = 2I: down's scale must not be accepted in the per-half gate_up shape [E, 2·ceil(I/128), ceil(I/128)].
        var d = GeneratedCase(LayerShape(family: .qwen3Next, H: 64, I: 32, Is: 32, E: 4, K: 2), .fp8fn, .combined)
        d.replace(Self.p + "experts.down_proj_scale_inv", with: Tensor([Double](repeating: 1, count: 8), shape: [4, 2, 1], dtype: .f32))
        try Self.expectOpenFails("down scale in gate_up's per-half shape", d, mentions: ["tensor '\(Self.p)experts.down_proj_scale_inv'", "shape [4, 2, 1]", "expected [4, 1, 1]"])
        var n = GeneratedCase(Self.shape, .fp8fn, .perExpert)
        n.replace(Self.p + "experts.2.gate_proj.weight_scale_inv", with: Tensor([Double.nan], shape: [1, 1], dtype: .f32))
        try Self.expectOpenFails("NaN scale", n, mentions: ["tensor '\(Self.p)experts.2.gate_proj.weight_scale_inv'", "non-finite scale"])
    }

    @Test("no config at all; config not JSON (metadata and config.json)")
    func configMissingOrInvalid() throws {
        let g = GeneratedCase(Self.shape, .bf16, .perExpert)
        try Self.expectOpenFails("no config", g, metadata: ["producer": "test"], mentions: ["no config", "config.json"])
        try Self.expectOpenFails("config not JSON", g, metadata: ["config": "{\"model_type\": qwen3_next"], mentions: ["__metadata__['config']", "not a JSON object"])
        try Self.expectOpenFails("config a JSON array", g, metadata: ["config": "[1, 2]"], mentions: ["__metadata__['config']", "not a JSON object"])
        try withScratchDirectory { dir in
            let url = dir.appendingPathComponent("case.safetensors")
            try g.write(to: url, metadata: [:])
            let beside = dir.appendingPathComponent("config.json")
            try Data("model_type: qwen3_next\n".utf8).write(to: beside)
            expectTensorIOError("config.json not JSON", mentions: [beside.path, "not a JSON object"]) { _ = try MoECaseFile(path: url.path) }
        }
    }

    @Test("unsupported model_type, missing or non-integer sizes")
    func unsupportedConfig() throws {
        let g = GeneratedCase(Self.shape, .bf16, .perExpert)
        try Self.expectOpenFails("mixtral", Self.withConfig(g) { $0["model_type"] = "mixtral" }, mentions: ["config", "model_type 'mixtral'", "not a supported family", "qwen3_next"])
        try Self.expectOpenFails("no model_type", Self.withConfig(g) { $0["model_type"] = nil }, mentions: ["model_type ''"])
        try Self.expectOpenFails("missing hidden_size", Self.withConfig(g) { $0["hidden_size"] = nil }, mentions: ["config", "missing 'hidden_size'"])
        try Self.expectOpenFails("fractional num_experts", Self.withConfig(g) { $0["num_experts"] = 4.5 }, mentions: ["'num_experts' is not an integer"])
        try Self.expectOpenFails("block size 64", Self.withConfig(GeneratedCase(Self.shape, .fp8fn, .perExpert)) {
            $0["quantization_config"] = ["quant_method": "fp8", "weight_block_size": [64, 64]] as [String: Any]
        }, mentions: ["weight_block_size", "[64, 64]"])
    }

    @Test("top_k > num_experts")
    func topKTooLarge() throws {
        let g = GeneratedCase(Self.shape, .bf16, .perExpert)
        try Self.expectOpenFails("top_k 5 of 4", Self.withConfig(g) { $0["num_experts_per_tok"] = 5 }, mentions: ["num_experts_per_tok 5", "num_experts (4)"])
        try Self.expectOpenFails("top_k 0", Self.withConfig(g) { $0["num_experts_per_tok"] = 0 }, mentions: ["num_experts_per_tok 0"])
        // nested text_config is where Qwen3.5 keeps it
        let q = GeneratedCase(LayerShape(family: .qwen35Moe, H: 64, I: 32, Is: 32, E: 4, K: 2), .bf16, .perExpert)
        try Self.expectOpenFails("qwen3.5 top_k 9 of 4", Self.withConfig(q) {
            var text = $0["text_config"] as! [String: Any]; text["num_experts_per_tok"] = 9; $0["text_config"] = text
        }, mentions: ["num_experts_per_tok 9"])
    }

    @Test("NaN in hidden_states is reported with its position", arguments: [DType.bf16, .f32, .f64])
    func nanInput(_ dtype: DType) throws {
        var g = GeneratedCase(Self.shape, .bf16, .perExpert)
        var x = g.hidden
        x[1 * 64 + 5] = .nan
        g.replace("hidden_states", with: Tensor(x, shape: [3, 64], dtype: dtype))
        try Self.expectOpenFails("NaN input \(dtype)", g, mentions: ["tensor 'hidden_states'", "non-finite input nan", "[1, 5]"])
        x[1 * 64 + 5] = 0
        x[2 * 64 + 63] = -.infinity
        g.replace("hidden_states", with: Tensor(x, shape: [3, 64], dtype: dtype))
        try Self.expectOpenFails("-inf input \(dtype)", g, mentions: ["tensor 'hidden_states'", "-inf", "[2, 63]"])
        g.replace("hidden_states", with: Tensor([Double](repeating: 0, count: 3 * 63), shape: [3, 63], dtype: dtype))
        try Self.expectOpenFails("input width", g, mentions: ["tensor 'hidden_states'", "shape [3, 63]"])
        g.replace("hidden_states", with: Tensor([Double](repeating: 0, count: 3 * 64), shape: [3, 64], dtype: .i32))
        try Self.expectOpenFails("integer input", g, mentions: ["tensor 'hidden_states'", "not a floating-point type"])
    }

    @Test("Inf in a router weight is reported with its position")
    func infRouter() throws {
        var g = GeneratedCase(Self.shape, .bf16, .perExpert)
        var r = g.router
        r[2 * 64 + 7] = .infinity
        g.replace(Self.p + "gate.weight", with: Tensor(r, shape: [4, 64], dtype: .bf16))
        try Self.expectOpenFails("inf router", g, mentions: ["tensor '\(Self.p)gate.weight'", "non-finite weight inf", "[2, 7]"])
        var s = GeneratedCase(Self.shape, .bf16, .perExpert)
        var sg = s.sharedGate
        sg[10] = .nan
        s.replace(Self.p + "shared_expert_gate.weight", with: Tensor(sg, shape: [1, 64], dtype: .f32))
        try Self.expectOpenFails("NaN shared gate", s, mentions: ["tensor '\(Self.p)shared_expert_gate.weight'", "nan", "[0, 10]"])
    }

    @Test("NaN fp8 code in an expert weight is thrown by decodeGateUp/decodeDown", arguments: [ExpertLayout.perExpert, .combined])
    func nanCode(_ layout: ExpertLayout) throws {
        try withScratchDirectory { dir in
            var g = GeneratedCase(Self.shape, .fp8fn, layout)
            let H = 64, I = 32, E = 4
            // expert 1, up row 3, column 10 := 0x7F (NaN in e4m3fn)
            let name: String
            if layout == .perExpert {
                name = Self.p + "experts.1.up_proj.weight"
                var codes = g.up[1].map { UInt8($0) }
                codes[3 * H + 10] = 0x7F
                g.replace(name, with: Tensor(bits: codes, shape: [I, H], dtype: .f8e4m3fn))
            } else {
                name = Self.p + "experts.gate_up_proj"
                var codes = (0..<E).flatMap { g.gate[$0] + g.up[$0] }.map { UInt8($0) }
                codes[(1 * 2 * I + I + 3) * H + 10] = 0x7F
                g.replace(name, with: Tensor(bits: codes, shape: [E, 2 * I, H], dtype: .f8e4m3fn))
            }
            // and the shared expert's down row 40, column 2 := 0xFF (NaN too)
            var down = g.down[E].map { UInt8($0) }
            down[40 * I + 2] = 0xFF
            g.replace(Self.p + "shared_expert.down_proj.weight", with: Tensor(bits: down, shape: [H, I], dtype: .f8e4m3fn))
            let url = dir.appendingPathComponent("nan.safetensors")
            try g.write(to: url)
            let c = try MoECaseFile(path: url.path)  // weights are decoded lazily
            var buffer = [Double](repeating: 0, count: 2 * I * H)
            let rowText = layout == .perExpert ? "row 3, column 10" : "expert 1, row \(I + 3), column 10"
            expectTensorIOError("NaN code, \(layout)", mentions: [url.path, "tensor '\(name)'", "non-finite weight nan", rowText]) {
                try buffer.withUnsafeMutableBufferPointer { try c.decodeGateUp(expert: 1, into: $0.baseAddress!) }
            }
            for e in [0, 2, 3, E] {
                do {
                    try buffer.withUnsafeMutableBufferPointer { try c.decodeGateUp(expert: e, into: $0.baseAddress!) }
                } catch {
                    Issue.record("\(url.path): expert \(e) gate_up has no NaN, yet: \(error)")
                }
            }
            expectTensorIOError("NaN code in shared down, \(layout)", mentions: [url.path, "tensor '\(Self.p)shared_expert.down_proj.weight'", "row 40, column 2"]) {
                try buffer.withUnsafeMutableBufferPointer { try c.decodeDown(expert: E, into: $0.baseAddress!) }
            }
        }
    }

    @Test("Inf/NaN in a bf16 expert weight is thrown by the Double and the Float decode", arguments: [ExpertLayout.perExpert, .combined])
    func nonFiniteBF16(_ layout: ExpertLayout) throws {
        try withScratchDirectory { dir in
            var g = GeneratedCase(Self.shape, .bf16, layout)
            let H = 64, I = 32, E = 4
            // expert 2, gate row 5, column 63 := +Inf (0x7F80); expert 0's down row 7, column 31 := NaN (0xFFC1)
            let gateName: String, downName: String
            if layout == .perExpert {
                gateName = Self.p + "experts.2.gate_proj.weight"
                var bits = g.gate[2].map { UInt16($0) }
                bits[5 * H + 63] = 0x7F80
                g.replace(gateName, with: Tensor(bits: bits, shape: [I, H], dtype: .bf16))
                downName = Self.p + "experts.0.down_proj.weight"
                var d = g.down[0].map { UInt16($0) }
                d[7 * I + 31] = 0xFFC1
                g.replace(downName, with: Tensor(bits: d, shape: [H, I], dtype: .bf16))
            } else {
                gateName = Self.p + "experts.gate_up_proj"
                var bits = (0..<E).flatMap { g.gate[$0] + g.up[$0] }.map { UInt16($0) }
                bits[(2 * 2 * I + 5) * H + 63] = 0x7F80
                g.replace(gateName, with: Tensor(bits: bits, shape: [E, 2 * I, H], dtype: .bf16))
                downName = Self.p + "experts.down_proj"
                var d = (0..<E).flatMap { g.down[$0] }.map { UInt16($0) }
                d[7 * I + 31] = 0xFFC1
                g.replace(downName, with: Tensor(bits: d, shape: [E, H, I], dtype: .bf16))
            }
            let url = dir.appendingPathComponent("inf.safetensors")
            try g.write(to: url)
            let c = try MoECaseFile(path: url.path)
            var d64 = [Double](repeating: 0, count: 2 * I * H)
            var f32 = [Float](repeating: 0, count: 2 * I * H)
            let gateRow = layout == .perExpert ? "row 5, column 63" : "expert 2, row 5, column 63"
            let downRow = layout == .perExpert ? "row 7, column 31" : "expert 0, row 7, column 31"
            expectTensorIOError("bf16 Inf, Double, \(layout)", mentions: [url.path, "tensor '\(gateName)'", "non-finite weight inf", gateRow]) {
                try d64.withUnsafeMutableBufferPointer { try c.decodeGateUp(expert: 2, into: $0.baseAddress!) }
            }
            expectTensorIOError("bf16 Inf, Float, \(layout)", mentions: [url.path, "tensor '\(gateName)'", "non-finite weight inf", gateRow]) {
                try f32.withUnsafeMutableBufferPointer { try c.decodeGateUp(expert: 2, into: $0.baseAddress!) }
            }
            expectTensorIOError("bf16 NaN, Float, \(layout)", mentions: [url.path, "tensor '\(downName)'", "non-finite weight nan", downRow]) {
                try f32.withUnsafeMutableBufferPointer { try c.decodeDown(expert: 0, into: $0.baseAddress!) }
            }
            for e in [0, 1, 3, E] {
                do {
                    try f32.withUnsafeMutableBufferPointer { try c.decodeGateUp(expert: e, into: $0.baseAddress!) }
                } catch {
                    Issue.record("\(url.path): expert \(e) gate_up has no Inf/NaN, yet: \(error)")
                }
            }
        }
    }

    @Test("mixed storage formats")
    func mixedFormats() throws {
        var g = GeneratedCase(Self.shape, .bf16, .perExpert)
        g.replace(Self.p + "experts.1.up_proj.weight", with: Tensor(g.up[1].map { Double(Float(bitPattern: $0 << 16)) }, shape: [32, 64], dtype: .f32))
        try Self.expectOpenFails("bf16 + f32", g, mentions: ["mix storage formats", "bf16", "f32"])
        var s = GeneratedCase(Self.shape, .bf16, .combined)
        s.replace(Self.p + "shared_expert.gate_proj.weight", with: Tensor([Double](repeating: 0, count: 32 * 64), shape: [32, 64], dtype: .f8e4m3fn))
        s.tensors.append((Self.p + "shared_expert.gate_proj.weight_scale_inv", Tensor([1] as [Double], shape: [1, 1], dtype: .f32)))
        try Self.expectOpenFails("bf16 + fp8 shared", s, mentions: ["mix storage formats", "fp8-e4m3fn"])
        var i = GeneratedCase(Self.shape, .bf16, .perExpert)
        i.replace(Self.p + "experts.0.gate_proj.weight", with: Tensor([Double](repeating: 0, count: 32 * 64), shape: [32, 64], dtype: .i32))
        try Self.expectOpenFails("integer weight", i, mentions: ["tensor '\(Self.p)experts.0.gate_proj.weight'", "not a floating-point type"])
    }

    @Test("two layers in one file need a prefix choice")
    func twoLayers() throws {
        try withScratchDirectory { dir in
            var g = GeneratedCase(Self.shape, .bf16, .perExpert)
            let other = g.tensors.filter { $0.0.hasPrefix(casePrefix) }.map { ($0.0.replacingOccurrences(of: "layers.3.", with: "layers.4."), $0.1) }
            g.tensors += other
            let url = dir.appendingPathComponent("two.safetensors")
            try g.write(to: url)
            expectTensorIOError("two layers", mentions: [url.path, "several MoE layers", "model.layers.3.mlp.gate.weight", "model.layers.4.mlp.gate.weight", "--prefix"]) {
                _ = try MoECaseFile(path: url.path)
            }
            let c = try MoECaseFile(path: url.path, prefix: "model.layers.4.mlp.")
            #expect(c.prefix == "model.layers.4.mlp." && c.layout == .perExpert, "\(url.path): prefix choice gives \(c.prefix)")
            expectTensorIOError("wrong prefix", mentions: [url.path, "tensor 'model.layers.9.mlp.gate.weight'", "not found"]) {
                _ = try MoECaseFile(path: url.path, prefix: "model.layers.9.mlp.")
            }
        }
    }
}
