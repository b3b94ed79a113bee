import LowPrecision

/// The tests' seeded generator: LowPrecision's `SplitMix64`, the one implementation in the package.
public typealias SeededGenerator = SplitMix64

extension SplitMix64 {
    /// Uniform in `0..<n` (modulo; `n` small against 2^64).
    public mutating func int(_ n: Int) -> Int { Int(next() % UInt64(n)) }

    /// A Fisher–Yates permutation of `0..<n`.
    public mutating func permutation(_ n: Int) -> [Int] {
        var p = Array(0..<n)
        if n > 1 { for i in stride(from: n - 1, to: 0, by: -1) { p.swapAt(i, int(i + 1)) } }
        return p
    }
}
