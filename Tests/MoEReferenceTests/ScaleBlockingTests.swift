import Foundation
import MoEReference
import Testing
import TensorIO
import MoECheckTestSupport

// Combined fp8 gate_up scales blocked per half ([E, 2·ceil(I/128), ·]) and over all 2I rows
// ([E, ceil(2I/128), ·]) have the same shape when I mod 128 > 64: the writer records which one it
// used and the reader follows it, so such a file decodes exactly like its per-expert twin.
@Suite("Combined fp8 gate_up scale blocking")
struct ScaleBlockingTests {
    @Test("per-half blocking with an ambiguous shape decodes like the per-expert layout", arguments: [72, 100, 200])
    func ambiguousShape(_ I: Int) throws {
        #expect((2 * I + 127) / 128 == 2 * ((I + 127) / 128), "I=\(I) is not an ambiguous shape")
        let config = MoEConfig(family: .qwen35Moe, hidden: 256, intermediate: I, sharedIntermediate: I, experts: 3, topK: 2)
        let layer = try SyntheticLayer(SyntheticSpec(config: config, format: .fp8e4m3fn, tokens: 2, seed: 3))
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("moecheck-blocking-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let combinedPath = dir.appendingPathComponent("combined.safetensors").path
        let perExpertPath = dir.appendingPathComponent("per-expert.safetensors").path
        try layer.writeCaseFile(to: combinedPath, layout: .combined)
        try layer.writeCaseFile(to: perExpertPath, layout: .perExpert)
        let combined = try MoECaseFile(path: combinedPath), perExpert = try MoECaseFile(path: perExpertPath)
        #expect(combined.file.metadata["gate_up_scale_blocking"] == "per-half")
        for e in 0..<config.experts {
            var a = [Double](repeating: 0, count: 2 * I * 256), b = a
            try a.withUnsafeMutableBufferPointer { try combined.decodeGateUp(expert: e, into: $0.baseAddress!) }
            try b.withUnsafeMutableBufferPointer { try perExpert.decodeGateUp(expert: e, into: $0.baseAddress!) }
            let firstDiff = zip(a, b).enumerated().first { $0.element.0 != $0.element.1 }?.offset
            #expect(firstDiff == nil, "I=\(I), expert \(e): combined and per-expert gate_up differ at row \((firstDiff ?? 0) / 256)")
        }
    }
}
