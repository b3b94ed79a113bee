import Foundation
import MoEReference
import TensorIO

/// Serializes the float64 oracle's runs in this process. The engine sets OpenBLAS's global
/// thread count around its expert batches, so two runs at once (the pipeline's next case and a
/// teacher-forced rerun of the current one) would race on it; every engine run the verifier
/// makes goes through here.
enum ReferenceExecution {
    static let lock = NSLock()

    static func exclusive<T>(_ body: () throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }
}

/// Computes the references of a sequence of cases one case ahead of the kernel, on one
/// background thread: while the kernel runs case n (a GPU call, or a Python adapter in its own
/// process), the CPU computes (or reads from the cache) the reference of case n + 1.
///
/// Memory stays bounded: the reference of at most one case beyond the one being judged is held
/// (a request for case n + 2 is made only once case n + 1 has been taken). Reports come in the
/// cases' order. The kernel is called on the caller's thread only; recipes are read from the
/// kernel there once, before the first case.
public struct ReferencePipeline {
    public let verifier: CaseVerifier
    let recipes: [WeightFormat: Result<Recipe, Error>]
    let queue = DispatchQueue(label: "moecheck.reference-pipeline")

    public init(verifier: CaseVerifier) {
        self.verifier = verifier
        var table: [WeightFormat: Result<Recipe, Error>] = [:]
        for f in WeightFormat.allCases { table[f] = Result { try verifier.recipe(for: f) } }
        recipes = table
    }

    /// A reference being computed on the background thread.
    final class Pending: @unchecked Sendable {
        let vc: VerifyCase
        let done = DispatchSemaphore(value: 0)
        var result: Result<PreparedReference, Error>!
        init(_ vc: VerifyCase) { self.vc = vc }
    }

    func start(_ vc: VerifyCase) -> Pending {
        let pending = Pending(vc)
        let verifier = self.verifier, recipes = self.recipes
        queue.async {
            pending.result = Result {
                try verifier.prepareReference(vc) { f in
                    guard let r = recipes[f] else { throw VerifyError.failed("no recipe for \(f.rawValue)") }
                    return try r.get()
                }
            }
            pending.done.signal()
        }
        return pending
    }

    /// Verifies the cases `next()` gives, in order, until it gives nil; `each` gets every
    /// case with its report. `next()` is asked for case n + 1 as soon as case n's reference is ready (before
    /// case n's kernel runs), so a stop condition inside it is checked one case early.
    public func run(next: () -> VerifyCase?, each: (VerifyCase, CaseReport) -> Void) {
        var pending = next().map(start)
        while let current = pending {
            let t0 = Date()
            current.done.wait()
            let waited = Date().timeIntervalSince(t0)
            pending = next().map(start)
            each(current.vc, verifier.verify(current.vc, reference: current.result, waited: waited))
        }
    }

    /// `run` over a list of cases.
    public func run(_ cases: [VerifyCase], each: (VerifyCase, CaseReport) -> Void) {
        var i = 0
        run(next: { () -> VerifyCase? in
            defer { i += 1 }
            return i < cases.count ? cases[i] : nil
        }, each: each)
    }
}
