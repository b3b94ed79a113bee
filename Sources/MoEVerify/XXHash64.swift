/// XXH64 (Yann Collet's xxHash, 64-bit variant, as specified in xxhash's `doc/xxhash_spec.md`):
/// a fast non-cryptographic hash, here the reference cache's checksum of every entry (a torn
/// or corrupted write is detected, never trusted) and, with two seeds, its 128-bit digest of
/// case files' content. Not for anything an adversary chooses.
public enum XXHash64 {
    static let prime1: UInt64 = 0x9E37_79B1_85EB_CA87
    static let prime2: UInt64 = 0xC2B2_AE3D_27D4_EB4F
    static let prime3: UInt64 = 0x1656_67B1_9E37_79F9
    static let prime4: UInt64 = 0x85EB_CA77_C2B2_AE63
    static let prime5: UInt64 = 0x27D4_EB2F_1656_67C5

    @inline(__always) static func rotl(_ x: UInt64, _ r: UInt64) -> UInt64 { (x << r) | (x >> (64 - r)) }

    @inline(__always) static func round(_ acc: UInt64, _ input: UInt64) -> UInt64 {
        rotl(acc &+ input &* prime2, 31) &* prime1
    }

    @inline(__always) static func merge(_ acc: UInt64, _ v: UInt64) -> UInt64 {
        (acc ^ round(0, v)) &* prime1 &+ prime4
    }

    /// The hash of `bytes` with `seed`.
    public static func hash(_ bytes: UnsafeRawBufferPointer, seed: UInt64 = 0) -> UInt64 {
        let n = bytes.count
        guard let p = bytes.baseAddress else { return finish(seed &+ prime5, nil, 0) }
        @inline(__always) func word(_ at: Int) -> UInt64 { UInt64(littleEndian: p.loadUnaligned(fromByteOffset: at, as: UInt64.self)) }
        var h: UInt64
        var i = 0
        if n >= 32 {
            var v1 = seed &+ prime1 &+ prime2, v2 = seed &+ prime2, v3 = seed, v4 = seed &- prime1
            while i + 32 <= n {
                v1 = round(v1, word(i)); v2 = round(v2, word(i + 8)); v3 = round(v3, word(i + 16)); v4 = round(v4, word(i + 24))
                i += 32
            }
            h = rotl(v1, 1) &+ rotl(v2, 7) &+ rotl(v3, 12) &+ rotl(v4, 18)
            h = merge(h, v1); h = merge(h, v2); h = merge(h, v3); h = merge(h, v4)
        } else {
            h = seed &+ prime5
        }
        h = h &+ UInt64(n)
        while i + 8 <= n {
            h ^= round(0, word(i))
            h = rotl(h, 27) &* prime1 &+ prime4
            i += 8
        }
        return finish(h, p + i, n - i)
    }

    /// The last 0–7 bytes and the avalanche.
    static func finish(_ h0: UInt64, _ tail: UnsafeRawPointer?, _ count: Int) -> UInt64 {
        var h = h0, i = 0
        if let tail {
            if count - i >= 4 {
                h ^= UInt64(UInt32(littleEndian: tail.loadUnaligned(fromByteOffset: i, as: UInt32.self))) &* prime1
                h = rotl(h, 23) &* prime2 &+ prime3
                i += 4
            }
            while i < count {
                h ^= UInt64(tail.load(fromByteOffset: i, as: UInt8.self)) &* prime5
                h = rotl(h, 11) &* prime1
                i += 1
            }
        }
        h ^= h >> 33; h = h &* prime2
        h ^= h >> 29; h = h &* prime3
        h ^= h >> 32
        return h
    }

    /// 128 bits as 32 hex digits: the hashes with seeds 0 and 1 (a content digest).
    public static func digest128(_ bytes: UnsafeRawBufferPointer) -> String {
        let a = hash(bytes, seed: 0), b = hash(bytes, seed: 0x5851_F42D_4C95_7F2D)
        return hex(a) + hex(b)
    }

    static func hex(_ v: UInt64) -> String {
        let s = String(v, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }
}
