/// SplitMix64 (Steele, Lea, Flood 2014): the one seeded generator of MoECheck.
///
/// `next()` adds the golden-ratio increment `0x9E3779B97F4A7C15` to the state and returns the
/// state through `mix(_:)`, the finalizer (two xor-shift-multiply rounds and a final xor-shift).
/// Integer arithmetic only, so a seed gives the same sequence on every machine and on a GPU
/// (`moe_fill_counter` uses the same `mix`). Used by the counter generator of synthetic layers,
/// the fuzzer's case generator, the test-support target and lowprecision-bench: one piece of code.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    /// The golden-ratio increment added to the state before each output.
    public static let increment: UInt64 = 0x9E37_79B9_7F4A_7C15

    public var state: UInt64

    /// A generator whose first output is `mix(seed)`.
    public init(seed: UInt64) { state = seed }

    /// The SplitMix64 output for state `x` before its increment: `finalize(x + increment)`.
    /// A bijection on `UInt64`, so distinct counters give distinct outputs.
    @inlinable @inline(__always)
    public static func mix(_ x: UInt64) -> UInt64 {
        var z = x &+ increment
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    @inlinable
    public mutating func next() -> UInt64 {
        let out = Self.mix(state)
        state &+= Self.increment
        return out
    }
}
