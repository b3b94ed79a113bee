import Foundation
import Testing
import TensorIO
import MoECheckTestSupport

/// MoECaseFile reads generated layers in both expert layouts and every storage format, returning
/// exactly the values written.
@Suite("MoE case files")
struct CaseFileTests {
    static let shapes: [LayerShape] = [
        LayerShape(family: .qwen2Moe, H: 64, I: 32, Is: 96, E: 4, K: 2),     // Is != I, norm_topk_prob false
        LayerShape(family: .qwen3Next, H: 200, I: 96, Is: 96, E: 8, K: 2),   // partial 128-blocks in both directions
        LayerShape(family: .qwen35Moe, H: 136, I: 64, Is: 64, E: 6, K: 2),   // nested text_config
        LayerShape(family: .qwen2Moe, H: 130, I: 80, Is: 0, E: 5, K: 2),     // no shared expert
    ]

    static func decodeAll(_ c: MoECaseFile, _ shape: LayerShape) throws -> (gateUp: [[Double]], down: [[Double]]) {
        var gu: [[Double]] = [], dn: [[Double]] = []
        for e in 0..<shape.slots {
            let ie = shape.intermediate(e)
            var a = [Double](repeating: .nan, count: 2 * ie * shape.H)
            try a.withUnsafeMutableBufferPointer { try c.decodeGateUp(expert: e, into: $0.baseAddress!) }
            var b = [Double](repeating: .nan, count: shape.H * ie)
            try b.withUnsafeMutableBufferPointer { try c.decodeDown(expert: e, into: $0.baseAddress!) }
            gu.append(a); dn.append(b)
        }
        return (gu, dn)
    }

    /// First differing element, for messages.
    static func firstDifference(_ a: [Double], _ b: [Double]) -> String? {
        guard a.count == b.count else { return "\(a.count) elements vs \(b.count)" }
        for i in a.indices where a[i].bitPattern != b[i].bitPattern { return "element \(i): \(a[i]) vs \(b[i])" }
        return nil
    }

    static func check(_ g: GeneratedCase, at url: URL) throws {
        let path = url.path, label = "\(url.lastPathComponent) [\(g.label)]"
        let c = try MoECaseFile(path: path)
        #expect(c.prefix == casePrefix, "\(label): prefix '\(c.prefix)'")
        #expect(c.layout == g.layout, "\(label): layout \(c.layout)")
        #expect(c.config == g.shape.expectedConfig, "\(label): config \(c.config), expected \(g.shape.expectedConfig)")
        #expect(c.weightFormat == g.format.weightFormat, "\(label): weightFormat \(c.weightFormat)")
        #expect(c.configSource == "__metadata__", "\(label): config source \(c.configSource)")
        #expect(c.tokens == g.tokens, "\(label): tokens \(c.tokens)")
        #expect(try c.inputs() == g.hidden, "\(label): hidden_states differ")
        #expect(try c.routerWeight() == g.router, "\(label): router weight differs")
        let sg = try c.sharedGateWeight()
        if g.shape.Is > 0 { #expect(sg == g.sharedGate, "\(label): shared_expert_gate differs") } else { #expect(sg == nil, "\(label): shared gate without a shared expert") }
        let (gu, dn) = try decodeAll(c, g.shape)
        for e in 0..<g.shape.slots {
            let who = e == g.shape.E ? "shared expert" : "expert \(e)"
            if let d = firstDifference(gu[e], g.expectedGateUp(e)) { Issue.record("\(label): decodeGateUp(\(who)) \(d)") }
            if let d = firstDifference(dn[e], g.expectedDown(e)) { Issue.record("\(label): decodeDown(\(who)) \(d)") }
        }
        expectTensorIOError("\(label): expert out of range", mentions: [path, "expert \(g.shape.slots) out of range"]) {
            var x = [Double](repeating: 0, count: 2 * g.shape.I * g.shape.H + 2 * g.shape.Is * g.shape.H)
            try x.withUnsafeMutableBufferPointer { try c.decodeGateUp(expert: g.shape.slots, into: $0.baseAddress!) }
        }
    }

    @Test("both layouts decode exactly what was written", arguments: shapes, StoredFormat.allCases)
    func decodesExactly(_ shape: LayerShape, _ format: StoredFormat) throws {
        try withScratchDirectory { dir in
            for layout in [ExpertLayout.perExpert, .combined] {
                let g = GeneratedCase(shape, format, layout)
                let url = dir.appendingPathComponent("\(layout.rawValue).safetensors")
                try g.write(to: url)
                try Self.check(g, at: url)
            }
        }
    }

    @Test("combined gate_up scales blocked per half (sglang layout) decode exactly",
          arguments: [shapes[0], shapes[2]], [StoredFormat.fp8fn, .fp8fnuz])
    func perHalfScales(_ shape: LayerShape, _ format: StoredFormat) throws {
        try withScratchDirectory { dir in
            let g = GeneratedCase(shape, format, .combined, blocking: .perHalf)
            let url = dir.appendingPathComponent("perhalf.safetensors")
            try g.write(to: url)
            try Self.check(g, at: url)
        }
    }

    @Test("per-expert and combined layouts of the same weights decode identically", arguments: shapes, StoredFormat.allCases)
    func layoutsAgree(_ shape: LayerShape, _ format: StoredFormat) throws {
        try withScratchDirectory { dir in
            var decoded: [ExpertLayout: ([[Double]], [[Double]])] = [:]
            for layout in [ExpertLayout.perExpert, .combined] {
                let g = GeneratedCase(shape, format, layout, rowDependentScales: false, seed: 99)
                let url = dir.appendingPathComponent("\(layout.rawValue).safetensors")
                try g.write(to: url)
                decoded[layout] = try Self.decodeAll(MoECaseFile(path: url.path), shape)
            }
            let (pg, pd) = decoded[.perExpert]!, (cg, cd) = decoded[.combined]!
            for e in 0..<shape.slots {
                if let d = Self.firstDifference(pg[e], cg[e]) { Issue.record("\(shape.testDescription) \(format): expert \(e) gate_up per-expert vs combined: \(d)") }
                if let d = Self.firstDifference(pd[e], cd[e]) { Issue.record("\(shape.testDescription) \(format): expert \(e) down per-expert vs combined: \(d)") }
            }
        }
    }

    @Test("config from a config.json beside the file when __metadata__ has none", arguments: [shapes[1], shapes[2]])
    func configBesideFile(_ shape: LayerShape) throws {
        try withScratchDirectory { dir in
            let g = GeneratedCase(shape, .fp8fn, .perExpert)
            let url = dir.appendingPathComponent("layer.safetensors")
            try g.write(to: url, metadata: ["producer": "test"])
            let beside = dir.appendingPathComponent("config.json")
            try JSONSerialization.data(withJSONObject: g.config, options: [.prettyPrinted]).write(to: beside)
            let c = try MoECaseFile(path: url.path)
            #expect(c.configSource == beside.path, "\(url.path): config source \(c.configSource), expected \(beside.path)")
            #expect(c.config == shape.expectedConfig, "\(url.path): config \(c.config) from config.json")
            // __metadata__ wins over config.json
            let other = dir.appendingPathComponent("with-metadata.safetensors")
            try g.write(to: other)
            try JSONSerialization.data(withJSONObject: ["model_type": "llama"]).write(to: beside)
            #expect(try MoECaseFile(path: other.path).configSource == "__metadata__", "\(other.path): config.json used although __metadata__ has one")
        }
    }

    @Test("config families: norm_topk_prob defaults and overrides")
    func familyRenormalization() throws {
        let base: [String: Any] = ["hidden_size": 8, "moe_intermediate_size": 4, "num_experts": 4, "num_experts_per_tok": 2]
        func config(_ extra: [String: Any]) throws -> MoEConfig {
            try MoEConfig.fromHuggingFace(base.merging(extra) { _, b in b }, file: "inline")
        }
        #expect(try config(["model_type": "qwen2_moe"]).renormalize == false, "qwen2_moe default")
        #expect(try config(["model_type": "qwen2_moe", "norm_topk_prob": true]).renormalize == true, "qwen2_moe with norm_topk_prob true")
        #expect(try config(["model_type": "qwen3_next"]).renormalize == true, "qwen3_next default")
        #expect(try config(["model_type": "qwen3_next", "norm_topk_prob": false]).renormalize == false, "qwen3_next with norm_topk_prob false")
        #expect(try config(["model_type": "qwen3_5_moe", "norm_topk_prob": false]).renormalize == true, "qwen3_5_moe always renormalizes")
        #expect(try config(["model_type": "qwen2_moe"]).sharedIntermediate == 0, "missing shared_expert_intermediate_size means none")
    }

    // MARK: fused kernel view

    static func expectedFused(_ g: GeneratedCase) -> FusedWeights {
        let s = g.shape, slots = s.E + 1, cH = ceilDiv128(s.H), cI = ceilDiv128(s.I)
        var w13: [UInt8] = [], w2: [UInt8] = [], s13: [Float] = [], s2: [Float] = []
        for e in 0..<slots {
            w13 += g.bytes(g.gate[e]) + g.bytes(g.up[e])
            w2 += g.bytes(g.down[e])
            guard g.format.isFP8 else { continue }
            if g.combinedBlocked && e < s.E {
                s13 += g.scaleGrid(e, .gateUp, rows: 2 * cI, columns: cH)
            } else {
                s13 += g.scaleGrid(e, .gate, rows: cI, columns: cH) + g.scaleGrid(e, .up, rows: cI, columns: cH)
            }
            s2 += g.scaleGrid(e, .down, rows: cH, columns: cI)
        }
        return FusedWeights(format: g.format.weightFormat, slots: slots, hidden: s.H, intermediate: s.I, w13: w13, w2: w2, w13Scale: s13, w2Scale: s2)
    }

    static let fusable: [LayerShape] = [
        LayerShape(family: .qwen3Next, H: 200, I: 96, Is: 96, E: 5, K: 2),
        LayerShape(family: .qwen35Moe, H: 136, I: 64, Is: 64, E: 4, K: 2),
        LayerShape(family: .qwen35Moe, H: 160, I: 128, Is: 128, E: 4, K: 2),  // I % 128 == 0: combined blocking fuses
    ]

    @Test("kernelWeights(fuseShared: true): slot E holds the shared expert's bytes (gate rows, then up rows) and scales",
          arguments: fusable, [StoredFormat.bf16, .fp8fn, .fp8fnuz])
    func fusedWeights(_ shape: LayerShape, _ format: StoredFormat) throws {
        try withScratchDirectory { dir in
            var variants: [(ExpertLayout, ScaleBlocking)] = [(.perExpert, .combined)]
            // per-half gate_up scales are recognisable only where their row count differs from ceil(2I/128)
            if 2 * ceilDiv128(shape.I) != ceilDiv128(2 * shape.I) || shape.I % 128 == 0 { variants.append((.combined, .perHalf)) }
            if !format.isFP8 || shape.I % 128 == 0 { variants.append((.combined, .combined)) }
            for (layout, blocking) in variants {
                let g = GeneratedCase(shape, format, layout, blocking: blocking)
                let url = dir.appendingPathComponent("\(layout.rawValue)-\(blocking.rawValue).safetensors")
                try g.write(to: url)
                let label = "\(url.lastPathComponent) [\(g.label)]"
                let got = try MoECaseFile(path: url.path).kernelWeights(fuseShared: true)
                let want = Self.expectedFused(g)
                #expect(got.slots == shape.E + 1 && got.hidden == shape.H && got.intermediate == shape.I && got.format == format.weightFormat,
                        "\(label): fused header \(got.slots) slots H=\(got.hidden) I=\(got.intermediate) \(got.format)")
                #expect(got.w13.count == want.w13.count && got.w2.count == want.w2.count, "\(label): fused sizes w13 \(got.w13.count) w2 \(got.w2.count)")
                let slotBytes = 2 * shape.I * shape.H * format.dtype.byteSize
                for e in 0...shape.E where got.w13.count == want.w13.count {
                    let r = (e * slotBytes)..<((e + 1) * slotBytes)
                    #expect(got.w13[r] == want.w13[r], "\(label): w13 slot \(e)\(e == shape.E ? " (shared expert)" : "") differs")
                }
                #expect(got.w2 == want.w2, "\(label): w2 differs")
                #expect(got.w13Scale == want.w13Scale, "\(label): w13 scales differ (\(got.w13Scale.count) vs \(want.w13Scale.count))")
                #expect(got.w2Scale == want.w2Scale, "\(label): w2 scales differ (\(got.w2Scale.count) vs \(want.w2Scale.count))")
                if let shared = got.w13Scale.isEmpty ? nil : Array(got.w13Scale.suffix(2 * ceilDiv128(shape.I) * ceilDiv128(shape.H))) {
                    let expected = g.scaleGrid(shape.E, .gate, rows: ceilDiv128(shape.I), columns: ceilDiv128(shape.H))
                                 + g.scaleGrid(shape.E, .up, rows: ceilDiv128(shape.I), columns: ceilDiv128(shape.H))
                    #expect(shared == expected, "\(label): shared expert's scales in slot E")
                }
            }
        }
    }

    @Test("kernelWeights(fuseShared: true) throws when Is != I, and for combined fp8 scales blocked across the gate/up boundary")
    func fusedWeightsRefused() throws {
        try withScratchDirectory { dir in
            let wide = GeneratedCase(LayerShape(family: .qwen2Moe, H: 64, I: 32, Is: 96, E: 4, K: 2), .bf16, .perExpert)
            let url = dir.appendingPathComponent("wide.safetensors")
            try wide.write(to: url)
            expectTensorIOError("Is != I", mentions: [url.path, "cannot fuse", "96", "32"]) { _ = try MoECaseFile(path: url.path).kernelWeights(fuseShared: true) }

            let across = GeneratedCase(LayerShape(family: .qwen3Next, H: 200, I: 96, Is: 96, E: 4, K: 2), .fp8fn, .combined)
            let url2 = dir.appendingPathComponent("across.safetensors")
            try across.write(to: url2)
            expectTensorIOError("combined fp8 blocks across gate/up", mentions: [url2.path, "experts.gate_up_proj_scale_inv", "gate/up boundary"]) {
                _ = try MoECaseFile(path: url2.path).kernelWeights(fuseShared: true)
            }

            let f32 = GeneratedCase(LayerShape(family: .qwen3Next, H: 64, I: 32, Is: 32, E: 4, K: 2), .f32, .perExpert)
            let url3 = dir.appendingPathComponent("f32.safetensors")
            try f32.write(to: url3)
            expectTensorIOError("f32 kernel weights", mentions: [url3.path, "BF16 or FP8", "f32"]) { _ = try MoECaseFile(path: url3.path).kernelWeights(fuseShared: true) }
        }
    }
}
