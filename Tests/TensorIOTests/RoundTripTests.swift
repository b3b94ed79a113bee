import Foundation
import Testing
import TensorIO
import MoECheckTestSupport

/// SafetensorsWriter → SafetensorsFile keeps every bit, shape and metadata entry.
@Suite("Safetensors round trip")
struct RoundTripTests {
    static let shapes: [[Int]] = [[], [0], [3, 5], [2, 1, 3]]

    /// Random bytes (NaN payloads, subnormals and all) as a tensor of `dtype` and `shape`.
    static func randomTensor(_ dtype: DType, _ shape: [Int], _ rng: inout SeededGenerator) -> Tensor {
        let count = shape.reduce(1, *) * dtype.byteSize
        let bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let storage = bytes.withUnsafeBytes { ByteStorage(copying: $0) }
        return Tensor(dtype: dtype, shape: shape, storage: storage)
    }

    static func bytes(_ t: Tensor) -> [UInt8] { Array(t.rawBytes) }

    @Test("every dtype and shape survives a round trip bit for bit", arguments: DType.allCases)
    func roundTripOneDType(_ dtype: DType) throws {
        try withScratchDirectory { dir in
            var rng = SeededGenerator(seed: 0x5AFE + UInt64(dtype.byteSize) &* 977 &+ UInt64(dtype.rawValue.count))
            let path = dir.appendingPathComponent("\(dtype).safetensors").path
            var written: [(String, Tensor)] = []
            for shape in Self.shapes {
                written.append(("t\(shape.map(String.init).joined(separator: "x"))", Self.randomTensor(dtype, shape, &rng)))
            }
            try SafetensorsWriter.write(written, metadata: ["dtype": dtype.rawValue], to: path)
            let file = try SafetensorsFile(path: path)
            #expect(file.names == written.map(\.0), "\(path): names \(file.names) not in written order")
            #expect(file.metadata == ["dtype": dtype.rawValue], "\(path): metadata \(file.metadata)")
            for (name, t) in written {
                let r = try file.tensor(name)
                #expect(r.dtype == dtype, "\(path): tensor \(name): dtype \(r.dtype), wrote \(dtype)")
                #expect(r.shape == t.shape, "\(path): tensor \(name): shape \(r.shape), wrote \(t.shape)")
                #expect(file.shape(of: name) == t.shape && file.dtype(of: name) == dtype, "\(path): tensor \(name): header accessors")
                #expect(Self.bytes(r) == Self.bytes(t), "\(path): tensor \(name) (\(dtype) \(t.shape)): bytes differ after the round trip")
            }
        }
    }

    @Test("all dtypes in one file, with __metadata__; header is 8-byte aligned and space padded")
    func roundTripAllInOneFile() throws {
        try withScratchDirectory { dir in
            var rng = SeededGenerator(seed: 42)
            let path = dir.appendingPathComponent("all.safetensors").path
            var written: [(String, Tensor)] = []
            for dtype in DType.allCases {
                for shape in Self.shapes {
                    written.append(("\(dtype.rawValue.lowercased()).\(shape.count)d.\(shape.reduce(1, *))", Self.randomTensor(dtype, shape, &rng)))
                }
            }
            let metadata = ["config": #"{"model_type": "qwen3_5_moe", "quote": "\"", "unicode": "é✓"}"#, "producer": "swift", "empty": ""]
            try SafetensorsWriter.write(written, metadata: metadata, to: path)

            let raw = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
            let n = raw.prefix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
            #expect((8 + Int(n)) % 8 == 0, "\(path): header length \(n) leaves the data region unaligned")
            let header = raw[8..<(8 + Int(n))]
            #expect(header.first == UInt8(ascii: "{"), "\(path): header does not start with '{'")
            let trimmed = header.reversed().drop { $0 == 0x20 }
            #expect(trimmed.first == UInt8(ascii: "}"), "\(path): header padding is not spaces after the JSON object")
            let dataBytes = written.reduce(0) { $0 + $1.1.byteCount }
            #expect(raw.count == 8 + Int(n) + dataBytes, "\(path): \(raw.count) bytes, expected \(8 + Int(n) + dataBytes)")

            let file = try SafetensorsFile(path: path)
            #expect(file.metadata == metadata, "\(path): metadata \(file.metadata) != \(metadata)")
            #expect(Set(file.names) == Set(written.map(\.0)), "\(path): names differ")
            for (name, t) in written {
                let r = try file.tensor(name)
                #expect(r.dtype == t.dtype && r.shape == t.shape, "\(path): tensor \(name): \(r.dtype) \(r.shape), wrote \(t.dtype) \(t.shape)")
                #expect(Self.bytes(r) == Self.bytes(t), "\(path): tensor \(name): bytes differ after the round trip")
            }
        }
    }

    @Test("exact values decode to the same Double in every dtype")
    func valuesDecode() throws {
        let values: [Double] = [0, 1, -2, 0.5, -0.25, 3, 7, 96]
        try withScratchDirectory { dir in
            let path = dir.appendingPathComponent("values.safetensors").path
            var written: [(String, Tensor)] = []
            for dtype in DType.allCases {
                let v = dtype.isFloatingPoint ? values : values.map { abs($0.rounded(.down)) }
                written.append((dtype.rawValue, Tensor(v, shape: [2, 4], dtype: dtype)))
            }
            try SafetensorsWriter.write(written, to: path)
            let file = try SafetensorsFile(path: path)
            for (name, t) in written {
                let got = try file.tensor(name).doubles()
                #expect(got == t.doubles(), "\(path): tensor \(name): decoded \(got), wrote \(t.doubles())")
                let want = t.dtype.isFloatingPoint ? values : values.map { abs($0.rounded(.down)) }
                #expect(got == want, "\(path): tensor \(name): decoded \(got), expected \(want)")
            }
            #expect(try file.tensor("F8_E4M3").bits(as: UInt8.self) == [0x00, 0x38, 0xC0, 0x30, 0xA8, 0x44, 0x4E, 0x6C] as [UInt8],
                    "\(path): tensor F8_E4M3: codes of [0, 1, -2, 0.5, -0.25, 3, 7, 96]")
        }
    }

    @Test("tensors at unaligned data offsets decode correctly")
    func unalignedOffsets() throws {
        try withScratchDirectory { dir in
            let path = dir.appendingPathComponent("unaligned.safetensors").path
            let t = [("a", Tensor([1, 2, 3] as [Double], shape: [3], dtype: .u8)),
                     ("b", Tensor([1.5, -2.25] as [Double], shape: [2], dtype: .f64)),
                     ("c", Tensor([7] as [Double], shape: [1], dtype: .u8)),
                     ("d", Tensor([-3.5, 1e-3] as [Double], shape: [2], dtype: .f32)),
                     ("e", Tensor([-5, 6] as [Double], shape: [2], dtype: .i64))]
            try SafetensorsWriter.write(t, to: path)
            let file = try SafetensorsFile(path: path)
            for (name, w) in t {
                #expect(try file.tensor(name).doubles() == w.doubles(), "\(path): tensor \(name) at an unaligned offset")
            }
        }
    }

    @Test("writer rejects duplicate and reserved names, naming the tensor")
    func writerRejectsNames() throws {
        try withScratchDirectory { dir in
            let path = dir.appendingPathComponent("dup.safetensors").path
            let t = Tensor([1] as [Double], shape: [1], dtype: .f32)
            expectTensorIOError("duplicate name", mentions: [path, "'x'", "duplicate"]) {
                try SafetensorsWriter.write([("x", t), ("x", t)], to: path)
            }
            expectTensorIOError("reserved name", mentions: [path, "__metadata__"]) {
                try SafetensorsWriter.write([("__metadata__", t)], to: path)
            }
            #expect(!FileManager.default.fileExists(atPath: path), "\(path): written although the writer threw")
        }
    }
}
