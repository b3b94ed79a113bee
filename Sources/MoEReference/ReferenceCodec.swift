import Foundation

/// The binary form of a `ReferenceResult` with its `ReferenceStatistics`: what the on-disk
/// reference cache (MoEVerify's `ReferenceCache`) stores.
///
/// One function pair, `encode` / `decode`, lists every field of both types in declaration
/// order. Each field is written as its name, a one-byte kind and its value: integers as
/// 64-bit little-endian, floating-point arrays as their raw little-endian IEEE bits (`Double`
/// 8 bytes, `Float` 4 bytes, so NaN payloads and signed zeros survive), `Bool` arrays one byte
/// per element, optionals with a presence byte, the recipe as its JSON. The decoder checks every
/// name and kind, so a stream written by a different field list fails with the field that
/// differs instead of decoding garbage. `resultFields` / `statisticsFields` name the fields in
/// the order written; a test compares them with the types' stored properties (Mirror), so a
/// field added to either type without a line here breaks that test instead of silently dropping
/// out of the cache. Bump `formatVersion` whenever the stream changes.
public enum ReferenceCodec {
    /// Version of the stream layout (part of every cache key).
    public static let formatVersion = 3

    /// `ReferenceResult`'s stored properties, in the order `encode` writes them.
    public static let resultFields = [
        "tokens", "hidden", "experts", "topK", "slots", "sharedFused", "recipe", "output", "bound", "routerLogits",
        "routerLogitBound", "topkIds", "topkWeights", "topkWeightBound", "sharedGate", "sharedGateBound", "ambiguousTokens",
        "routerTolerance", "intermediate", "intermediateBound", "intermediateWidth", "statistics",
    ]

    /// `ReferenceStatistics`' stored properties, in the order `encode` writes them.
    public static let statisticsFields = [
        "elementVariance", "outputFlipVariance", "outputTieBias", "tieNorm", "directionBias", "excludedTokens",
        "expertTokenVariance", "routerTokenVariance", "expertTokenBlockMax", "intermediateVariance", "intermediateTieBias", "slotExperts", "slots",
        "contributions", "ambiguousTokens", "midpointTokens", "directionVariance", "alternatives",
    ]

    /// The bytes of `r` (see the type's description).
    public static func encode(_ r: ReferenceResult) throws -> [UInt8] {
        var w = Writer()
        // the large arrays, so the buffer grows once
        let s = r.statistics
        let doubles = [r.output, r.bound, r.routerLogits, r.routerLogitBound, r.intermediate ?? [], r.intermediateBound ?? [],
                       s?.elementVariance ?? [], s?.outputFlipVariance ?? [], s?.outputTieBias ?? [],
                       s?.intermediateVariance ?? [], s?.intermediateTieBias ?? []].reduce(0) { $0 + $1.count }
        w.out.reserveCapacity(8 * doubles + 4 * (s?.contributions?.count ?? 0) + 64 * 1024)
        w.int("tokens", r.tokens); w.int("hidden", r.hidden); w.int("experts", r.experts); w.int("topK", r.topK)
        w.int("slots", r.slots); w.bool("sharedFused", r.sharedFused)
        let recipeEncoder = JSONEncoder()
        recipeEncoder.outputFormatting = .sortedKeys
        w.bytes("recipe", Array(try recipeEncoder.encode(r.recipe)))
        w.doubles("output", r.output); w.doubles("bound", r.bound)
        w.doubles("routerLogits", r.routerLogits); w.doubles("routerLogitBound", r.routerLogitBound)
        w.int32s("topkIds", r.topkIds); w.doubles("topkWeights", r.topkWeights); w.doubles("topkWeightBound", r.topkWeightBound)
        w.doubles("sharedGate", r.sharedGate); w.doubles("sharedGateBound", r.sharedGateBound)
        w.bools("ambiguousTokens", r.ambiguousTokens); w.doubles("routerTolerance", r.routerTolerance)
        w.doubles("intermediate", r.intermediate); w.doubles("intermediateBound", r.intermediateBound)
        w.int("intermediateWidth", r.intermediateWidth)
        w.present("statistics", r.statistics != nil)
        if let s {
            w.doubles("elementVariance", s.elementVariance); w.doubles("outputFlipVariance", s.outputFlipVariance)
            w.doubles("outputTieBias", s.outputTieBias); w.doubles("tieNorm", s.tieNorm); w.doubles("directionBias", s.directionBias)
            w.bools("excludedTokens", s.excludedTokens)
            w.doubles("expertTokenVariance", s.expertTokenVariance); w.doubles("routerTokenVariance", s.routerTokenVariance)
            w.doubles("expertTokenBlockMax", s.expertTokenBlockMax)
            w.doubles("intermediateVariance", s.intermediateVariance); w.doubles("intermediateTieBias", s.intermediateTieBias)
            w.int32s("slotExperts", s.slotExperts); w.int("slots", s.slots); w.floats("contributions", s.contributions)
            w.bools("ambiguousTokens", s.ambiguousTokens); w.bools("midpointTokens", s.midpointTokens)
            w.doubles("directionVariance", s.directionVariance); w.doubles("alternatives", s.alternatives)
        }
        return w.out
    }

    /// The result `encode` wrote into `bytes`; throws `ReferenceCodecError` naming the field
    /// where the stream is short, differs from this field list, or holds an impossible value.
    public static func decode(_ bytes: UnsafeRawBufferPointer) throws -> ReferenceResult {
        var r = Reader(bytes)
        let tokens = try r.int("tokens"), hidden = try r.int("hidden"), experts = try r.int("experts"), topK = try r.int("topK")
        let slots = try r.int("slots"), sharedFused = try r.bool("sharedFused")
        let recipeJSON = try r.bytes("recipe")
        let recipe: Recipe
        do { recipe = try JSONDecoder().decode(Recipe.self, from: Data(recipeJSON)) } catch {
            throw ReferenceCodecError.badValue(field: "recipe", "not a recipe JSON (\(error))")
        }
        let output = try r.doubles("output"), bound = try r.doubles("bound")
        let routerLogits = try r.doubles("routerLogits"), routerLogitBound = try r.doubles("routerLogitBound")
        let topkIds = try r.int32s("topkIds"), topkWeights = try r.doubles("topkWeights"), topkWeightBound = try r.doubles("topkWeightBound")
        let sharedGate = try r.doubles("sharedGate"), sharedGateBound = try r.doubles("sharedGateBound")
        let ambiguousTokens = try r.bools("ambiguousTokens"), routerTolerance = try r.doubles("routerTolerance")
        let intermediate = try r.optionalDoubles("intermediate"), intermediateBound = try r.optionalDoubles("intermediateBound")
        let intermediateWidth = try r.int("intermediateWidth")
        var statistics: ReferenceStatistics? = nil
        if try r.present("statistics") {
            // read in stream order (the initializer's argument order differs)
            let elementVariance = try r.doubles("elementVariance"), outputFlipVariance = try r.doubles("outputFlipVariance")
            let outputTieBias = try r.doubles("outputTieBias"), tieNorm = try r.doubles("tieNorm"), directionBias = try r.optionalDoubles("directionBias")
            let excludedTokens = try r.bools("excludedTokens")
            let expertTokenVariance = try r.doubles("expertTokenVariance"), routerTokenVariance = try r.doubles("routerTokenVariance")
            let expertTokenBlockMax = try r.doubles("expertTokenBlockMax")
            statistics = ReferenceStatistics(
                elementVariance: elementVariance, outputFlipVariance: outputFlipVariance,
                outputTieBias: outputTieBias, tieNorm: tieNorm, directionBias: directionBias,
                excludedTokens: excludedTokens,
                expertTokenVariance: expertTokenVariance, routerTokenVariance: routerTokenVariance, expertTokenBlockMax: expertTokenBlockMax,
                intermediateVariance: try r.optionalDoubles("intermediateVariance"), intermediateTieBias: try r.optionalDoubles("intermediateTieBias"),
                slotExperts: try r.int32s("slotExperts"), slots: try r.int("slots"), contributions: try r.optionalFloats("contributions"),
                ambiguousTokens: try r.bools("ambiguousTokens"), midpointTokens: try r.bools("midpointTokens"),
                directionVariance: try r.optionalDoubles("directionVariance"), alternatives: try r.optionalDoubles("alternatives"))
        }
        guard r.offset == bytes.count else { throw ReferenceCodecError.badValue(field: "end", "\(bytes.count - r.offset) byte(s) after the last field") }
        return ReferenceResult(
            tokens: tokens, hidden: hidden, experts: experts, topK: topK, slots: slots, sharedFused: sharedFused, recipe: recipe,
            output: output, bound: bound, routerLogits: routerLogits, routerLogitBound: routerLogitBound, topkIds: topkIds,
            topkWeights: topkWeights, topkWeightBound: topkWeightBound, sharedGate: sharedGate, sharedGateBound: sharedGateBound,
            ambiguousTokens: ambiguousTokens, routerTolerance: routerTolerance, intermediate: intermediate,
            intermediateBound: intermediateBound, intermediateWidth: intermediateWidth, statistics: statistics)
    }

    /// What follows a field's name in the stream.
    enum Kind: UInt8 {
        case int = 1, bool, bytes, doubles, floats, int32s, bools, absent, present
    }

    struct Writer {
        var out: [UInt8] = []

        mutating func raw<T: FixedWidthInteger>(_ v: T) {
            withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) }
        }

        mutating func header(_ name: String, _ kind: Kind) {
            let utf8 = Array(name.utf8)
            raw(UInt16(utf8.count))
            out.append(contentsOf: utf8)
            out.append(kind.rawValue)
        }

        mutating func int(_ name: String, _ v: Int) { header(name, .int); raw(Int64(v)) }
        mutating func bool(_ name: String, _ v: Bool) { header(name, .bool); out.append(v ? 1 : 0) }
        mutating func present(_ name: String, _ v: Bool) { header(name, v ? .present : .absent) }

        mutating func bytes(_ name: String, _ v: [UInt8], kind: Kind = .bytes) {
            header(name, kind)
            raw(Int64(v.count))
            out.append(contentsOf: v)
        }

        /// The elements' little-endian bytes after the kind and the element count (`bits`: the
        /// element's bit pattern, used on a big-endian host only).
        mutating func array<T, B: FixedWidthInteger>(_ name: String, _ kind: Kind, _ v: [T], bits: (T) -> B) {
            precondition(MemoryLayout<T>.size == MemoryLayout<B>.size)
            header(name, kind)
            raw(Int64(v.count))
            #if _endian(little)
            v.withUnsafeBytes { out.append(contentsOf: $0) }
            #else
            for x in v { raw(bits(x)) }
            #endif
        }

        mutating func doubles(_ name: String, _ v: [Double]) { array(name, .doubles, v, bits: \.bitPattern) }
        mutating func doubles(_ name: String, _ v: [Double]?) {
            if let v { doubles(name, v) } else { header(name, .absent) }
        }
        mutating func floats(_ name: String, _ v: [Float]?) {
            if let v { array(name, .floats, v, bits: \.bitPattern) } else { header(name, .absent) }
        }
        mutating func int32s(_ name: String, _ v: [Int32]) { array(name, .int32s, v, bits: { $0 }) }
        mutating func bools(_ name: String, _ v: [Bool]) { bytes(name, v.map { $0 ? 1 : 0 }, kind: .bools) }
    }

    struct Reader {
        let base: UnsafeRawBufferPointer
        var offset = 0
        init(_ base: UnsafeRawBufferPointer) { self.base = base }

        mutating func take(_ n: Int, _ field: String) throws -> UnsafeRawBufferPointer {
            guard n >= 0, n <= base.count - offset else { throw ReferenceCodecError.truncated(field: field) }
            defer { offset += n }
            return UnsafeRawBufferPointer(rebasing: base[offset..<(offset + n)])
        }

        mutating func raw<T: FixedWidthInteger>(_: T.Type, _ field: String) throws -> T {
            T(littleEndian: try take(MemoryLayout<T>.size, field).loadUnaligned(as: T.self))
        }

        /// Reads a field's name and kind; returns the kind (checked against `kinds`).
        mutating func header(_ name: String, _ kinds: [Kind]) throws -> Kind {
            let length = Int(try raw(UInt16.self, name))
            let found = String(decoding: try take(length, name), as: UTF8.self)
            guard found == name else { throw ReferenceCodecError.fieldMismatch(expected: name, found: found) }
            let k = try take(1, name)[0]
            guard let kind = Kind(rawValue: k), kinds.contains(kind) else {
                throw ReferenceCodecError.badValue(field: name, "kind \(k), expected \(kinds.map { "\($0)" }.joined(separator: " or "))")
            }
            return kind
        }

        mutating func count(_ name: String, elementSize: Int) throws -> Int {
            let n = try raw(Int64.self, name)
            guard n >= 0, n <= Int64((base.count - offset) / elementSize) else { throw ReferenceCodecError.truncated(field: name) }
            return Int(n)
        }

        mutating func int(_ name: String) throws -> Int {
            _ = try header(name, [.int])
            return Int(try raw(Int64.self, name))
        }

        mutating func bool(_ name: String) throws -> Bool {
            _ = try header(name, [.bool])
            switch try take(1, name)[0] {
            case 0: return false
            case 1: return true
            case let b: throw ReferenceCodecError.badValue(field: name, "byte \(b) is not a Bool")
            }
        }

        mutating func present(_ name: String) throws -> Bool { try header(name, [.present, .absent]) == .present }

        mutating func bytes(_ name: String, kind: Kind = .bytes) throws -> [UInt8] {
            _ = try header(name, [kind])
            return Array(try take(try count(name, elementSize: 1), name))
        }

        /// The elements after a header already read (`fromBits`: on a big-endian host only).
        mutating func elements<T, B: FixedWidthInteger>(_: T.Type, _ name: String, fromBits: (B) -> T) throws -> [T] {
            precondition(MemoryLayout<T>.size == MemoryLayout<B>.size)
            let n = try count(name, elementSize: MemoryLayout<T>.size)
            let src = try take(n * MemoryLayout<T>.size, name)
            #if _endian(little)
            return [T](unsafeUninitializedCapacity: n) { buffer, initialized in
                UnsafeMutableRawBufferPointer(buffer).copyMemory(from: src)
                initialized = n
            }
            #else
            return (0..<n).map { fromBits(B(littleEndian: src.loadUnaligned(fromByteOffset: $0 * MemoryLayout<B>.size, as: B.self))) }
            #endif
        }

        mutating func doubles(_ name: String) throws -> [Double] {
            _ = try header(name, [.doubles])
            return try elements(Double.self, name, fromBits: Double.init(bitPattern:) as (UInt64) -> Double)
        }

        mutating func optionalDoubles(_ name: String) throws -> [Double]? {
            guard try header(name, [.doubles, .absent]) == .doubles else { return nil }
            return try elements(Double.self, name, fromBits: Double.init(bitPattern:) as (UInt64) -> Double)
        }

        mutating func optionalFloats(_ name: String) throws -> [Float]? {
            guard try header(name, [.floats, .absent]) == .floats else { return nil }
            return try elements(Float.self, name, fromBits: Float.init(bitPattern:) as (UInt32) -> Float)
        }

        mutating func int32s(_ name: String) throws -> [Int32] {
            _ = try header(name, [.int32s])
            return try elements(Int32.self, name, fromBits: { (b: Int32) in b })
        }

        mutating func bools(_ name: String) throws -> [Bool] {
            try bytes(name, kind: .bools).map { b in
                guard b <= 1 else { throw ReferenceCodecError.badValue(field: name, "byte \(b) is not a Bool") }
                return b == 1
            }
        }
    }
}

/// Why a byte stream is not a `ReferenceCodec` encoding.
public enum ReferenceCodecError: Error, CustomStringConvertible, Equatable {
    /// The stream ends inside `field`.
    case truncated(field: String)
    /// The stream holds `found` where this field list has `expected`.
    case fieldMismatch(expected: String, found: String)
    /// `field` holds a value no encoding writes.
    case badValue(field: String, String)

    public var description: String {
        switch self {
        case let .truncated(field): return "reference encoding ends inside field '\(field)'"
        case let .fieldMismatch(expected, found): return "reference encoding has field '\(found)' where '\(expected)' was expected (written by another field list)"
        case let .badValue(field, why): return "reference encoding, field '\(field)': \(why)"
        }
    }
}
