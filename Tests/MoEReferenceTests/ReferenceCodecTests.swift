import Foundation
import LowPrecision
import MoEReference
import Testing
import TensorIO
import MoECheckTestSupport

// ReferenceCodec: the binary form the reference cache stores. A round trip must reproduce every
// field of ReferenceResult and ReferenceStatistics bit for bit, and the codec's field lists must
// be the types' stored properties, so a field added later cannot drop out of the cache silently.

@Suite("ReferenceCodec: the reference cache's binary form")
struct ReferenceCodecTests {
    /// References with everything kept (intermediate, statistics, contributions), and without.
    static func references() throws -> [(String, ReferenceResult)] {
        let fused = MoEConfig(family: .qwen35Moe, hidden: 200, intermediate: 136, sharedIntermediate: 136, experts: 6, topK: 2)
        let unfused = MoEConfig(family: .qwen2Moe, hidden: 96, intermediate: 32, sharedIntermediate: 80, experts: 8, topK: 3, renormalize: false)
        var out: [(String, ReferenceResult)] = []
        let all = ReferenceOptions(keepIntermediate: true, keepContributions: true)
        for (name, config, format, recipe, options) in [
            ("fused bf16, everything kept", fused, WeightFormat.bf16, Recipe.fusedBF16, all),
            ("fused fp8 e4m3fnuz, everything kept", fused, .fp8e4m3fnuz, Recipe.fusedFP8, all),
            ("unfused bf16 hf-bf16", unfused, .bf16, Recipe.hfBF16, all),
            ("exact, no statistics", fused, .bf16, Recipe.exact, ReferenceOptions(statistics: false)),
            ("no bounds", fused, .fp8e4m3fn, Recipe.fusedFP8, ReferenceOptions(computeBounds: false, fuseShared: false)),
        ] {
            let layer = try SyntheticLayer(SyntheticSpec(config: config, format: format, tokens: 9, seed: 17))
            out.append((name, try runReference(layer, try layer.inputs(), tokens: 9, recipe: recipe, options: options)))
        }
        return out
    }

    @Test("a round trip reproduces every field bit for bit")
    func roundTrip() throws {
        for (name, r) in try Self.references() {
            let bytes = try ReferenceCodec.encode(r)
            let back = try bytes.withUnsafeBytes { try ReferenceCodec.decode($0) }
            let diff = bitDifferences(r, back)
            #expect(diff.isEmpty, "\(name): \(diff.prefix(5))")
            #expect(try ReferenceCodec.encode(back) == bytes, "\(name): re-encoding differs")
        }
    }

    @Test("the round trips exercise every optional field with a value")
    func everyOptionalPresent() throws {
        let refs = try Self.references().map(\.1)
        let withStatistics = refs.compactMap(\.statistics)
        #expect(refs.contains { $0.intermediate != nil && $0.intermediateBound != nil })
        #expect(refs.contains { $0.statistics == nil })
        #expect(withStatistics.contains { $0.directionBias != nil }, "directionBias")
        #expect(withStatistics.contains { $0.directionVariance != nil }, "directionVariance")
        #expect(withStatistics.contains { $0.contributions != nil }, "contributions")
        #expect(withStatistics.contains { $0.intermediateVariance != nil && $0.intermediateTieBias != nil }, "intermediate statistics")
        #expect(withStatistics.contains { !$0.midpointTokens.isEmpty }, "midpointTokens")
    }

    @Test("the codec lists exactly the stored properties of ReferenceResult and ReferenceStatistics")
    func fieldListsMatchTheTypes() throws {
        let (_, r) = try #require(try Self.references().first)
        let s = try #require(r.statistics)
        #expect(storedProperties(r) == ReferenceCodec.resultFields,
                "ReferenceResult's fields changed: add them to ReferenceCodec.encode/decode and resultFields, and bump formatVersion")
        #expect(storedProperties(s) == ReferenceCodec.statisticsFields,
                "ReferenceStatistics' fields changed: add them to ReferenceCodec.encode/decode and statisticsFields, and bump formatVersion")
    }

    @Test("NaN payloads, signed zeros and infinities survive")
    func specialValues() throws {
        let (_, base) = try #require(try Self.references().first)
        var r = base
        r.output[0] = Double(bitPattern: 0x7FF8_0000_DEAD_BEEF)
        r.output[1] = -0.0
        r.bound[2] = .infinity
        r.statistics!.contributions![3] = Float(bitPattern: 0xFFC0_1234)
        let back = try ReferenceCodec.encode(r).withUnsafeBytes { try ReferenceCodec.decode($0) }
        #expect(bitDifferences(r, back).isEmpty)
    }

    @Test("a truncated or altered stream throws an error naming the field, never a wrong result")
    func damagedStreams() throws {
        let (_, r) = try #require(try Self.references().last)
        let bytes = try ReferenceCodec.encode(r)
        var cuts = Array(stride(from: 0, to: bytes.count, by: Swift.max(1, bytes.count / 97)))
        cuts.append(bytes.count - 1)
        for n in cuts {
            let head = Array(bytes.prefix(n))
            #expect(throws: ReferenceCodecError.self, "cut at \(n) of \(bytes.count)") {
                _ = try head.withUnsafeBytes { try ReferenceCodec.decode($0) }
            }
        }
        // the first field's name altered: the decoder names what it expected
        var renamed = bytes
        renamed[2] = UInt8(ascii: "X")   // "tokens" → "Xokens"
        do {
            _ = try renamed.withUnsafeBytes { try ReferenceCodec.decode($0) }
            Issue.record("a renamed field decoded")
        } catch let e as ReferenceCodecError {
            #expect(e == .fieldMismatch(expected: "tokens", found: "Xokens"), "\(e)")
        }
        // bytes after the last field
        let longer = bytes + [0]
        #expect(throws: ReferenceCodecError.self) { _ = try longer.withUnsafeBytes { try ReferenceCodec.decode($0) } }
    }
}
