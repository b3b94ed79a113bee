import Foundation
import Testing
import TensorIO
import MoECheckTestSupport

/// A checkpoint-sized file is opened by mapping it, not by reading it.
@Suite("Big safetensors file")
struct BigFileTests {
    @Test("a 1.5 GB sparse file opens and yields its last tensor without being read",
          .enabled(if: residentBytes() != nil, "needs /proc/self/statm (Linux)"))
    func bigSparseFile() throws {
        try withScratchDirectory { dir in
            let url = dir.appendingPathComponent("big.safetensors")
            let bigBytes = 1_500_000_000
            let header = #"{"__metadata__":{"format":"pt"},"big":{"dtype":"BF16","shape":[750000000],"data_offsets":[0,1500000000]},"#
                + #""tail":{"dtype":"F32","shape":[4],"data_offsets":[1500000000,1500000016]}}"#
            var padded = header
            while (8 + padded.utf8.count) % 8 != 0 { padded += " " }
            try writeBytes(rawSafetensors(header: padded), to: url)
            let dataStart = UInt64(8 + padded.utf8.count)
            let handle = try FileHandle(forWritingTo: url)
            try handle.truncate(atOffset: dataStart + UInt64(bigBytes))
            try handle.seek(toOffset: dataStart + UInt64(bigBytes))
            let tail: [Float] = [1.5, -2, 3.25, 1e-3]
            try handle.write(contentsOf: tail.withUnsafeBytes { Data($0) })
            try handle.close()
            let size = try FileManager.default.attributesOfItem(atPath: url.path)[.size] as? Int ?? 0
            #expect(size == Int(dataStart) + bigBytes + 16, "\(url.path): \(size) bytes")

            let before = residentBytes()!
            let file = try SafetensorsFile(path: url.path)
            let t = try file.tensor("tail")
            let values = t.floats()
            let big = try file.tensor("big")
            let after = residentBytes()!
            #expect(values == tail, "\(url.path): tensor 'tail' read \(values), wrote \(tail)")
            #expect(big.shape == [750_000_000] && big.dtype == .bf16, "\(url.path): tensor 'big' is \(big.dtype) \(big.shape)")
            #expect(file.metadata == ["format": "pt"], "\(url.path): metadata \(file.metadata)")
            let growth = after - before
            #expect(growth < 200_000_000, "\(url.path): resident memory grew by \(growth) bytes opening a \(size)-byte file (read instead of mapped?)")
            try FileManager.default.removeItem(at: url)
        }
    }
}
