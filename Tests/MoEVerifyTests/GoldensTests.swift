import Foundation
import MoEReference
@testable import MoEVerify
import Testing
import TensorIO
import MoECheckTestSupport

private let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
private let goldensDir = repoRoot + "/Goldens"

@discardableResult
private func shell(_ args: [String], input: Data? = nil) throws -> (status: Int32, out: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = args
    p.currentDirectoryURL = URL(fileURLWithPath: repoRoot)
    let pipe = Pipe(), inPipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    if input != nil { p.standardInput = inPipe }
    try p.run()
    if let input { inPipe.fileHandleForWriting.write(input); try inPipe.fileHandleForWriting.close() }
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}

private func tempDir(_ tag: String) throws -> String {
    let d = NSTemporaryDirectory() + "moecheck-goldens-\(tag)-\(UUID().uuidString)"
    try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
    return d
}

private let pythonReady: Bool = {
    (try? shell(["python3", "-c", "import safetensors, ml_dtypes, numpy"]).status) == 0
}()

private let sha256sumAvailable: Bool = { (try? shell(["sha256sum", "--version"]).status) == 0 }()

@Suite("Goldens", .serialized)
struct GoldensTests {
    @Test("SHA-256 known-answer vectors (FIPS 180-4 examples)")
    func sha256Vectors() {
        #expect(SHA256.hash([UInt8]()) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(SHA256.hash(Array("abc".utf8)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(SHA256.hash(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8))
            == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        #expect(SHA256.hash(Array(("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu").utf8))
            == "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1")
        #expect(SHA256.hash([UInt8](repeating: 0x61, count: 1_000_000)) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
        // streaming in odd chunks gives the same digest
        let data = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        var s = SHA256()
        var i = 0, step = 1
        while i < data.count { let j = min(data.count, i + step); s.update(data[i..<j]); i = j; step = step * 3 % 97 + 1 }
        #expect(SHA256.hex(s.finalize()) == SHA256.hash(data))
    }

    @Test("SHA-256 agrees with sha256sum at every length around the padding boundaries", .enabled(if: sha256sumAvailable, "sha256sum not installed"))
    func sha256MatchesCoreutils() throws {
        for n in [1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 65_537] {
            let data = Data((0..<n).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ n) })
            let (status, out) = try shell(["sha256sum"], input: data)
            #expect(status == 0)
            #expect(String(out.prefix(64)) == SHA256.hash([UInt8](data)), "length \(n)")
        }
        let f = goldensDir + "/qwen3_5_moe_bf16_combined_t17.case.safetensors"
        let (_, out) = try shell(["sha256sum", f])
        #expect(String(out.prefix(64)) == (try SHA256.hashFile(f)).sha256)
    }

    @Test("every committed golden file has the manifest's size and sha256; the set covers what issue #4 asks")
    func manifestHashesAndCoverage() throws {
        let m = try GoldenManifest.load(goldensDir)
        #expect(m.cases.count == GoldenSuites.defaultSuite().count)
        var total = 0
        for c in m.cases {
            for f in c.files {
                let (h, n) = try SHA256.hashFile(goldensDir + "/" + f.file)
                #expect(h == f.sha256, "\(f.file)")
                #expect(n == f.bytes, "\(f.file)")
                total += n
            }
        }
        #expect(total < 6_500_000, "the committed set should stay a few MB (\(total) bytes)")
        #expect(Set(m.cases.map(\.family)) == Set(ModelFamily.allCases.map(\.rawValue)))
        #expect(Set(m.cases.map(\.weight_dtype)) == ["BF16", "F8_E4M3", "F8_E4M3FNUZ"])
        #expect(Set(m.cases.map(\.layout)) == ["combined", "per-expert"])
        #expect(m.cases.contains { $0.shared_fused } && m.cases.contains { !$0.shared_fused && $0.Is > 0 })
        #expect(m.cases.contains { $0.H == 2048 && $0.I == 512 && $0.E == 256 && $0.K == 8 && $0.family == "qwen3_5_moe" })
        #expect(m.cases.contains { $0.name.contains("splitk") && $0.H == 4096 && $0.T <= 8 && $0.scales == "spread-across-k" && $0.inputs == "coherent" })
        for t in [1, 17, 33] { #expect(m.cases.contains { $0.T == t }) }
        #expect(m.cases.contains { $0.E & ($0.E - 1) != 0 })
        #expect(m.cases.contains { $0.H % 128 != 0 && $0.I % 128 != 0 })
        #expect(m.cases.contains { $0.routing == "all-negative" })
        #expect(Set(m.cases.map(\.recipe)).isSuperset(of: ["fused-bf16", "fused-fp8", "exact", "hf-bf16"]))
    }

    @Test("near-tie golden has at least one token flagged ambiguous")
    func nearTieAmbiguous() throws {
        let m = try GoldenManifest.load(goldensDir)
        let c = try #require(m.cases.first { $0.routing == "near-ties" })
        let f = try SafetensorsFile(path: goldensDir + "/" + c.name + ".expected.safetensors")
        let flags = try f.tensor("ambiguous_tokens").doubles()
        #expect(flags.contains(1), "no ambiguous token in \(c.name)")
        #expect(Int(flags.reduce(0, +)) == c.ambiguous_tokens)
    }

    @Test("regenerating the small cases reproduces the committed files byte for byte (1 and 2 OpenBLAS threads)")
    func regenerateBitIdentical() throws {
        let m = try GoldenManifest.load(goldensDir)
        let committed = Dictionary(uniqueKeysWithValues: m.cases.map { ($0.name, $0) })
        let before = BLAS.threads
        defer { BLAS.setThreads(before) }
        for threads in [m.openblas_threads, 2] {
            BLAS.setThreads(threads)
            let dir = try tempDir("regen")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let fresh = try Goldens.generate(suite: GoldenSuites.smallSuite(), into: dir)
            #expect(fresh.cases.count >= 5)
            for e in fresh.cases {
                let old = try #require(committed[e.name])
                // The goldens were generated where OpenBLAS runs its AVX-512 kernels; another
                // kernel family may round a float64 GEMM differently in the last bit (README,
                // Goldens/README.md): there the expected tensors must verify within their bound.
                let sameKernels = FastGEMM.path == 3
                let r = Goldens.verify(old, in: goldensDir, requireBits: sameKernels)
                for (a, b) in zip(e.files, old.files) {
                    if a.file.hasSuffix(".case.safetensors") {
                        #expect(a == b, "\(a.file): case files depend on neither threads nor CPU")
                    } else if threads == m.openblas_threads && (sameKernels || r.bitIdentical) {
                        #expect(a == b, "\(a.file) regenerated with a different hash")
                    }
                }
                // the tensors (not the metadata's thread count) are identical at any thread count
                #expect(r.passed && (r.bitIdentical || !sameKernels), "\(r.line)")
            }
        }
    }

    @Test("goldens verify flags a changed expected tensor and a changed hash")
    func verifyDetectsTampering() throws {
        let m = try GoldenManifest.load(goldensDir)
        let c = try #require(m.cases.first { $0.name == "qwen3_5_moe_bf16_perexpert_t1" })
        let dir = try tempDir("tamper")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for f in c.files { try FileManager.default.copyItem(atPath: goldensDir + "/" + f.file, toPath: dir + "/" + f.file) }
        #expect(Goldens.verify(c, in: dir, requireBits: true).passed)
        // rewrite the expected file with one output element moved by one ulp, and fix up the manifest hash
        let exp = dir + "/" + c.name + ".expected.safetensors"
        let sf = try SafetensorsFile(path: exp)
        var tensors = try sf.names.map { ($0, try sf.tensor($0)) }
        let i = try #require(tensors.firstIndex { $0.0 == "output" })
        var out = tensors[i].1.doubles()
        out[7] = out[7].nextUp
        tensors[i].1 = Tensor(out, shape: tensors[i].1.shape, dtype: .f64)
        let meta = sf.metadata
        try SafetensorsWriter.write(tensors, metadata: meta, to: exp + ".tmp")
        try FileManager.default.removeItem(atPath: exp)
        try FileManager.default.moveItem(atPath: exp + ".tmp", toPath: exp)
        let stale = Goldens.verify(c, in: dir, requireBits: true)
        #expect(!stale.passed && stale.problems.contains { $0.contains("sha256") })
        var fixed = c
        fixed.files = try c.files.map { f in let (h, n) = try SHA256.hashFile(dir + "/" + f.file); return GoldenFile(file: f.file, bytes: n, sha256: h) }
        let r = Goldens.verify(fixed, in: dir, requireBits: true)
        #expect(!r.passed && r.problems.contains { $0.hasPrefix("output: 1/") }, "\(r.line)")
        // a one-ulp change lies inside the bound: accepted (as 'within bound') without --strict-bits
        let loose = Goldens.verify(fixed, in: dir, requireBits: false)
        #expect(loose.passed && !loose.bitIdentical, "\(loose.line)")
    }

    @Test("the Python safetensors package reads every golden file", .tags(.python), .enabled(if: pythonReady, "python3 with safetensors + ml_dtypes + numpy is not importable"))
    func pythonLoadsEveryGolden() throws {
        let (status, out) = try shell(["python3", "scripts/check_goldens_python.py", "Goldens"])
        #expect(status == 0, "\(out)")
        #expect(out.contains("files OK"))
    }

    @Test("scripts/goldens_example.py runs as written and passes the fused-bf16 BF16 cases", .tags(.python), .enabled(if: pythonReady, "python3 with safetensors + ml_dtypes + numpy is not importable"))
    func pythonExampleRuns() throws {
        let m = try GoldenManifest.load(goldensDir)
        let cases = m.cases.filter { $0.weight_dtype == "BF16" && $0.recipe == "fused-bf16" }
        #expect(cases.count >= 4)
        for c in cases {
            let (status, out) = try shell(["python3", "scripts/goldens_example.py", "Goldens/" + c.name])
            #expect(status == 0 && out.contains("PASS") && out.contains("calc_diff="), "\(c.name): \(out)")
        }
        // the placeholder is not an exact-recipe kernel: the example must say FAIL there
        let (status, out) = try shell(["python3", "scripts/goldens_example.py", "Goldens/qwen3_5_moe_bf16_exact_t4"])
        #expect(status == 1 && out.contains("FAIL"), "\(out)")
    }
}

/// On another CPU the regenerated bound may differ from the stored one by a step of the output
/// format (the bound interval is rounded to it), never by more.
@Suite("Goldens: comparing a regenerated bound")
struct GoldenBoundComparisonTests {
    /// A stored expected file with `output` and `bound`.
    static func storedFile(output: [Double], bound: [Double]) throws -> (SafetensorsFile, String) {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("golden-bound-\(UUID().uuidString).safetensors").path
        try SafetensorsWriter.write([("output", Tensor(output, shape: [1, output.count], dtype: .f64)),
                                     ("bound", Tensor(bound, shape: [1, bound.count], dtype: .f64))], to: path)
        return (try SafetensorsFile(path: path), path)
    }

    @Test("a bound that moved by one or two bf16 steps passes for a bf16 output; by more, or for an unrounded output, fails")
    func boundSteps() throws {
        // output 100 (bf16 step there: 0.5), stored bound 0.75
        let (file, path) = try Self.storedFile(output: [100, 1], bound: [0.75, 1e-3])
        defer { try? FileManager.default.removeItem(atPath: path) }
        let stored = try file.tensor("bound")
        func compare(_ fresh: [Double], _ rounding: Rounding) -> String? {
            Goldens.compareWithinBound("bound", fresh: Tensor(fresh, shape: [1, 2], dtype: .f64), stored: stored, storedFile: file,
                                       requireBits: false, outputRounding: rounding)
        }
        #expect(compare([0.75 * (1 + 5e-5), 1e-3], .bf16) == nil, "a 5e-5 relative change is inside the fp32 tolerance")
        #expect(compare([1.25, 1e-3], .bf16) == nil, "one bf16 step (0.5 at 100) must pass")
        #expect(compare([1.75, 1e-3], .bf16) == nil, "two bf16 steps must pass")
        #expect(compare([2.5, 1e-3], .bf16)?.contains("regenerated bound differs") == true, "3.5 steps must fail")
        #expect(compare([1.25, 1e-3], .none)?.contains("1e-4 relative at") == true, "an unrounded output's bound has no step to allow")
        #expect(compare([0.75, 1e-3 + 0.02], .bf16)?.contains("[0, 1]") == true, "at output 1 a bf16 step is 2^-7: 0.02 is more than two")
    }
}
