import Foundation
import Testing
import TensorIO
import MoECheckTestSupport

/// One malformed file, built byte by byte, and what its error must say.
struct MalformedCase: CustomTestStringConvertible, Sendable {
    let name: String
    let bytes: [UInt8]
    /// The tensor the error must name, when the problem belongs to one.
    let tensor: String?
    /// Fragments of the problem text.
    let problem: [String]
    var testDescription: String { name }
}

/// SafetensorsFile rejects every malformed file with a TensorIOError naming file, tensor and problem.
@Suite("Malformed safetensors files")
struct MalformedFileTests {
    static let a = #""a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#
    static let b = #""b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}"#
    static let validHeader = "{\(a),\(b)}"
    static let validData = [UInt8](0..<12)
    static let valid = rawSafetensors(header: validHeader, data: validData)

    static func one(_ entry: String, data: Int) -> [UInt8] {
        rawSafetensors(header: "{\(entry)}", data: [UInt8](repeating: 1, count: data))
    }

    static let cases: [MalformedCase] = [
        MalformedCase(name: "empty file", bytes: [], tensor: nil, problem: ["truncated", "0 bytes"]),
        MalformedCase(name: "shorter than 8 bytes", bytes: [0x10, 0, 0], tensor: nil, problem: ["truncated", "3 bytes", "8-byte header length"]),
        MalformedCase(name: "cut inside the header", bytes: Array(valid.prefix(8 + 20)), tensor: nil,
                      problem: ["header length \(validHeader.utf8.count)", "runs past the end"]),
        MalformedCase(name: "cut in the data region", bytes: Array(valid.dropLast(3)), tensor: "b",
                      problem: ["data_offsets [8, 12]", "run past the 9-byte data region"]),
        MalformedCase(name: "header length past the end", bytes: rawSafetensors(header: validHeader, data: validData, headerLength: UInt64(validHeader.utf8.count + 13)),
                      tensor: nil, problem: ["header length \(validHeader.utf8.count + 13)", "runs past the end"]),
        MalformedCase(name: "header length absurdly large", bytes: rawSafetensors(header: validHeader, data: validData, headerLength: UInt64.max),
                      tensor: nil, problem: ["header length 18446744073709551615", "runs past the end"]),
        MalformedCase(name: "header length zero", bytes: rawSafetensors(header: "", data: []), tensor: nil, problem: ["not valid JSON"]),
        MalformedCase(name: "invalid JSON", bytes: rawSafetensors(header: #"{"a": {"dtype": "F32",  "#, data: []), tensor: nil, problem: ["not valid JSON"]),
        MalformedCase(name: "JSON not an object", bytes: rawSafetensors(header: "[1, 2]", data: []), tensor: nil, problem: ["not an object"]),
        MalformedCase(name: "entry not an object", bytes: rawSafetensors(header: #"{"a": 5}"#), tensor: "a", problem: ["not an object"]),
        MalformedCase(name: "unknown dtype", bytes: one(#""a":{"dtype":"F8_E5M2","shape":[2],"data_offsets":[0,2]}"#, data: 2), tensor: "a",
                      problem: ["unknown dtype 'F8_E5M2'", "F8_E4M3FNUZ"]),
        MalformedCase(name: "dtype not a string", bytes: one(#""a":{"dtype":4,"shape":[2],"data_offsets":[0,8]}"#, data: 8), tensor: "a", problem: ["'dtype'"]),
        MalformedCase(name: "missing dtype", bytes: one(#""a":{"shape":[2],"data_offsets":[0,8]}"#, data: 8), tensor: "a", problem: ["missing 'dtype'"]),
        MalformedCase(name: "missing shape", bytes: one(#""a":{"dtype":"F32","data_offsets":[0,8]}"#, data: 8), tensor: "a", problem: ["'shape'"]),
        MalformedCase(name: "missing data_offsets", bytes: one(#""a":{"dtype":"F32","shape":[2]}"#, data: 8), tensor: "a", problem: ["'data_offsets'"]),
        MalformedCase(name: "data_offsets of one integer", bytes: one(#""a":{"dtype":"F32","shape":[2],"data_offsets":[8]}"#, data: 8), tensor: "a", problem: ["'data_offsets' must be two integers"]),
        MalformedCase(name: "data_offsets as strings", bytes: one(#""a":{"dtype":"F32","shape":[2],"data_offsets":["0","8"]}"#, data: 8), tensor: "a", problem: ["'data_offsets' must be two integers"]),
        MalformedCase(name: "negative shape", bytes: one(#""a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}"#, data: 8), tensor: "a",
                      problem: ["shape", "not a non-negative integer"]),
        MalformedCase(name: "non-integer shape", bytes: one(#""a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}"#, data: 8), tensor: "a",
                      problem: ["shape", "not a non-negative integer"]),
        MalformedCase(name: "string in shape", bytes: one(#""a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}"#, data: 8), tensor: "a",
                      problem: ["shape", "not a non-negative integer"]),
        MalformedCase(name: "shape overflowing Int", bytes: one(#""a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,8]}"#, data: 8), tensor: "a",
                      problem: ["overflows"]),
        MalformedCase(name: "shape whose byte count overflows Int", bytes: one(#""a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}"#, data: 8), tensor: "a",
                      problem: ["overflows"]),
        MalformedCase(name: "offsets descending", bytes: one(#""a":{"dtype":"U8","shape":[0],"data_offsets":[8,0]}"#, data: 8), tensor: "a",
                      problem: ["data_offsets [8, 0]", "not an ascending"]),
        MalformedCase(name: "negative offset", bytes: one(#""a":{"dtype":"U8","shape":[2],"data_offsets":[-2,0]}"#, data: 0), tensor: "a",
                      problem: ["data_offsets [-2, 0]"]),
        MalformedCase(name: "overlapping offsets",
                      bytes: rawSafetensors(header: #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#, data: [UInt8](repeating: 0, count: 8)),
                      tensor: "b", problem: ["overlap", "ends at 8"]),
        MalformedCase(name: "gapped offsets",
                      bytes: rawSafetensors(header: #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],"data_offsets":[10,14]}}"#, data: [UInt8](repeating: 0, count: 14)),
                      tensor: "b", problem: ["gap of 2 bytes"]),
        MalformedCase(name: "gap before the first tensor", bytes: one(#""a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}"#, data: 4), tensor: "a", problem: ["gap of 2 bytes"]),
        MalformedCase(name: "trailing bytes not covered", bytes: rawSafetensors(header: validHeader, data: validData + [9, 9, 9, 9]), tensor: nil,
                      problem: ["data region holds 16 bytes but the tensors cover 12"]),
        MalformedCase(name: "shape and byte length disagree", bytes: one(#""a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}"#, data: 8), tensor: "a",
                      problem: ["shape [3] of F32 needs 12 bytes", "hold 8"]),
        MalformedCase(name: "scalar with no bytes", bytes: one(#""a":{"dtype":"F64","shape":[],"data_offsets":[0,0]}"#, data: 0), tensor: "a",
                      problem: ["needs 8 bytes"]),
        MalformedCase(name: "__metadata__ value not a string", bytes: rawSafetensors(header: #"{"__metadata__":{"k":1}}"#), tensor: nil, problem: ["__metadata__ key 'k'"]),
        MalformedCase(name: "__metadata__ not an object", bytes: rawSafetensors(header: #"{"__metadata__":"x"}"#), tensor: nil, problem: ["__metadata__ is not an object"]),
    ]

    @Test("the hand-built valid file opens (baseline for the malformed cases)")
    func validBaseline() throws {
        try withScratchDirectory { dir in
            let url = dir.appendingPathComponent("valid.safetensors")
            try writeBytes(Self.valid, to: url)
            let file = try SafetensorsFile(path: url.path)
            #expect(file.names == ["a", "b"], "\(url.path): names \(file.names)")
            #expect(try file.tensor("b").bits(as: UInt8.self) == [8, 9, 10, 11], "\(url.path): tensor b")
            expectTensorIOError("absent tensor", mentions: [url.path, "'zz'", "not found"]) { _ = try file.tensor("zz") }
        }
    }

    @Test("malformed file is rejected with file, tensor and problem named", arguments: cases)
    func rejects(_ c: MalformedCase) throws {
        try withScratchDirectory { dir in
            let url = dir.appendingPathComponent("bad.safetensors")
            try writeBytes(c.bytes, to: url)
            var mentions = [url.path] + c.problem
            if let t = c.tensor { mentions.append("tensor '\(t)'") }
            expectTensorIOError("\(c.name) (\(url.lastPathComponent))", mentions: mentions) {
                _ = try SafetensorsFile(path: url.path)
            }
        }
    }

    @Test("a directory is not a safetensors file")
    func directory() throws {
        try withScratchDirectory { dir in
            let sub = dir.appendingPathComponent("model.safetensors", isDirectory: true)
            try FileManager.default.createDirectory(at: sub, withIntermediateDirectories: false)
            expectTensorIOError("directory", mentions: [sub.path, "directory"]) { _ = try SafetensorsFile(path: sub.path) }
        }
    }

    @Test("a nonexistent file is reported by path")
    func nonexistent() throws {
        try withScratchDirectory { dir in
            let path = dir.appendingPathComponent("missing.safetensors").path
            expectTensorIOError("nonexistent", mentions: [path, "cannot open", "No such file"]) { _ = try SafetensorsFile(path: path) }
        }
    }

    @Test("a header over the 100 MB limit is refused without parsing it (sparse file)")
    func headerOverLimit() throws {
        try withScratchDirectory { dir in
            let url = dir.appendingPathComponent("hugeheader.safetensors")
            let n = UInt64(SafetensorsFile.maximumHeaderBytes + 8)
            try writeBytes(rawSafetensors(header: "", headerLength: n), to: url)
            let handle = try FileHandle(forWritingTo: url)
            try handle.truncate(atOffset: 8 + n + 8)
            try handle.close()
            expectTensorIOError("header over the limit", mentions: [url.path, "header length \(n)", "exceeds the 100000000-byte limit"]) {
                _ = try SafetensorsFile(path: url.path)
            }
        }
    }
}
