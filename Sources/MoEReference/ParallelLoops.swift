import Foundation

/// Element-wise loops of the oracle spread over the pinned thread count. Only for work whose
/// every element is computed on its own (a pure function of its index): the values, and so the
/// bits, are those of the serial loop whatever the split.
enum ParallelLoops {
    /// Calls `body` with contiguous chunks covering `0..<n`, concurrently on up to `BLAS.threads`
    /// threads; serially (one chunk) below `minimum` elements per thread.
    static func chunks(_ n: Int, minimum: Int = 1 << 14, _ body: (Range<Int>) -> Void) {
        let lanes = Swift.min(Swift.max(1, BLAS.threads), n / Swift.max(1, minimum))
        if lanes <= 1 { body(0..<n); return }
        let count = lanes * 4   // a few chunks per thread: a slow thread does not hold the rest up
        DispatchQueue.concurrentPerform(iterations: count) { k in
            let lo = n * k / count, hi = n * (k + 1) / count
            if lo < hi { body(lo..<hi) }
        }
    }

    /// `(0..<n).map(f)`, computed in parallel chunks: the same values in the same places.
    static func map(_ n: Int, minimum: Int = 1 << 14, _ f: (Int) -> Double) -> [Double] {
        [Double](unsafeUninitializedCapacity: n) { buffer, initialized in
            if let base = buffer.baseAddress {
                chunks(n, minimum: minimum) { range in for i in range { (base + i).initialize(to: f(i)) } }
            }
            initialized = n
        }
    }
}
