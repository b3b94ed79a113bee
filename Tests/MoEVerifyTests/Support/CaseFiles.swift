import Foundation
import MoEReference
import TensorIO
import MoECheckTestSupport

// Case files for the CLI tests: a good one written by SyntheticLayer.writeCaseFile, and one
// malformed file of each kind the brief lists, each made from the good one by a single edit.

enum CaseFiles {
    /// The small fusable layer every CLI test uses: H=128, I=Is=64, E=4, K=2, 3 tokens.
    static let spec = SyntheticSpec(config: MoEConfig(family: .qwen35Moe, hidden: 128, intermediate: 64, sharedIntermediate: 64,
                                                      experts: 4, topK: 2),
                                    format: .bf16, tokens: 3, seed: 42)

    /// Writes the good case file (combined layout) to `path`.
    static func writeGood(to path: String, spec: SyntheticSpec = spec) throws {
        try SyntheticLayer(spec).writeCaseFile(to: path, layout: .combined)
    }

    /// The ways a case file can be broken, with the words the tool's message must contain.
    enum Malformation: String, CaseIterable, CustomStringConvertible {
        case truncated
        case badJSONHeader = "bad-json-header"
        case unknownDType = "unknown-dtype"
        case missingRouter = "missing-router"
        case nanInHiddenStates = "nan-in-hidden-states"

        var description: String { rawValue }

        /// Words (lower-cased) the tool's output must contain besides the file name.
        var expectedWords: [String] {
            switch self {
            case .truncated: return ["truncated"]
            case .badJSONHeader: return ["json"]
            case .unknownDType: return ["dtype", "q4_k"]
            case .missingRouter: return ["gate.weight", "missing"]
            case .nanInHiddenStates: return ["hidden_states", "nan"]
            }
        }

        /// Writes a copy of the good case at `good`, broken this way, to `path`.
        func write(from good: String, to path: String) throws {
            let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: good)))
            let headerLength = Int(bytes[0..<8].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) })
            let header = Array(bytes[8..<(8 + headerLength)])
            let data = Array(bytes[(8 + headerLength)...])
            switch self {
            case .truncated:
                // the header is intact, the data region stops half way
                try Data(bytes[0..<(8 + headerLength + data.count / 2)]).write(to: URL(fileURLWithPath: path))
            case .badJSONHeader:
                var broken = header
                let junk = Array("{\"hidden_states\": [oops".utf8)
                for (i, b) in junk.enumerated() where i < broken.count { broken[i] = b }
                try Data(bytes[0..<8] + broken + data).write(to: URL(fileURLWithPath: path))
            case .unknownDType:
                var object = try JSONSerialization.jsonObject(with: Data(header)) as! [String: Any]
                var entry = object["hidden_states"] as! [String: Any]
                entry["dtype"] = "Q4_K"
                object["hidden_states"] = entry
                try Self.writeRaw(header: object, data: data, to: path)
            case .missingRouter:
                let file = try SafetensorsFile(path: good)
                let kept = try file.names.filter { !$0.hasSuffix("mlp.gate.weight") }.map { ($0, try file.tensor($0)) }
                try SafetensorsWriter.write(kept, metadata: file.metadata, to: path)
            case .nanInHiddenStates:
                let file = try SafetensorsFile(path: good)
                var tensors: [(String, Tensor)] = []
                for name in file.names {
                    let t = try file.tensor(name)
                    if name == "hidden_states" {
                        var bits = t.bits(as: UInt16.self)
                        bits[bits.count / 2 + 1] = 0x7FC0   // bf16 quiet NaN in token 1
                        tensors.append((name, Tensor(bits: bits, shape: t.shape, dtype: t.dtype)))
                    } else {
                        tensors.append((name, t))
                    }
                }
                try SafetensorsWriter.write(tensors, metadata: file.metadata, to: path)
            }
        }

        static func writeRaw(header: [String: Any], data: [UInt8], to path: String) throws {
            var json = [UInt8](try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys]))
            while json.count % 8 != 0 { json.append(0x20) }
            var out = [UInt8]()
            for i in 0..<8 { out.append(UInt8((UInt64(json.count) >> (8 * UInt64(i))) & 0xFF)) }
            out += json
            out += data
            try Data(out).write(to: URL(fileURLWithPath: path))
        }
    }
}
