import Foundation
import MoEReference
import TensorIO

/// Runs a sequence of cases with several in flight: the references of the next cases are computed
/// (or read from the cache) concurrently on background threads, the kernel runs one case at a
/// time on the caller's thread, in the cases' order, and each case is judged on a background
/// thread while the kernel runs the next. With `depth` 2 and one CPU this is the classic
/// pipeline: case n + 1's reference beside case n's kernel.
///
/// Memory stays bounded: at most `depth` cases are in flight (from the oldest not yet reported
/// to the newest whose reference has started), and no more than `memoryBudget` bytes of their
/// estimated footprint (`ReferencePipeline.footprint`), except that one case is always allowed.
/// Reports come in the cases' order, on the caller's thread, with the same verdicts and numbers
/// as a serial run (judging is a pure function of the case's reference and kernel outputs; the
/// oracle's results do not depend on what runs beside it). The kernel is called on the
/// caller's thread only; recipes are read from the kernel there once, before the first case.
public struct ReferencePipeline {
    public let verifier: CaseVerifier
    let recipes: [WeightFormat: Result<Recipe, Error>]
    /// Cases in flight at most (≥ 1; 1: each case's reference just before its kernel, judged in turn).
    public var depth: Int
    /// Bytes of estimated footprint the cases in flight may hold together.
    public var memoryBudget: Int
    let queue = DispatchQueue(label: "moecheck.reference-pipeline", attributes: .concurrent)

    /// The default number of cases in flight: the CPUs this process may use, at least 2.
    public static var defaultDepth: Int { Swift.max(2, BLAS.usableCPUs) }
    /// The default memory budget: a quarter of the physical memory.
    public static var defaultMemoryBudget: Int { Int(ProcessInfo.processInfo.physicalMemory / 4) }

    public init(verifier: CaseVerifier, depth: Int = ReferencePipeline.defaultDepth, memoryBudget: Int = ReferencePipeline.defaultMemoryBudget) {
        self.verifier = verifier
        self.depth = Swift.max(1, depth)
        self.memoryBudget = memoryBudget
        recipes = Self.recipeTable(verifier)
    }

    /// The verifier's (adjusted) recipe for every weight format, read once on the caller's thread.
    static func recipeTable(_ verifier: CaseVerifier) -> [WeightFormat: Result<Recipe, Error>] {
        var table: [WeightFormat: Result<Recipe, Error>] = [:]
        for f in WeightFormat.allCases { table[f] = Result { try verifier.recipe(for: f) } }
        return table
    }

    /// `vc`'s reference prepared by `verifier` with the recipes of `table` (any thread).
    static func prepare(_ vc: VerifyCase, _ verifier: CaseVerifier, _ table: [WeightFormat: Result<Recipe, Error>]) -> Result<PreparedReference, Error> {
        Result {
            try verifier.prepareReference(vc) { f in
                guard let r = table[f] else { throw VerifyError.failed("no recipe for \(f.rawValue)") }
                return try r.get()
            }
        }
    }

    /// A rough upper estimate of the bytes one case holds while in flight: the reference's
    /// `[T, H]` arrays (output, bound, variances, …, and the kernel's outputs), its contributions
    /// `[T, S+1, H]`, the intermediate arrays `[T·S, I]`, the router's `[T, E]` arrays and one
    /// bf16 copy of the layer's weights (the kernel's upload). 0 for a case file (its size is not
    /// known without opening it; such cases are counted by `depth` alone).
    public static func footprint(_ vc: VerifyCase) -> Int {
        guard let spec = vc.spec else { return 0 }
        let c = spec.config, T = spec.tokens
        let S = c.topK + 1, I = Swift.max(c.intermediate, c.sharedIntermediate)
        let (th, o1) = T.multipliedReportingOverflow(by: c.hidden)
        if o1 { return Int.max / 4 }
        let reference = th * 8 * 14 + th * S * 4 + T * S * I * 8 * 5 + T * c.experts * 8 * 4
        let weights = (c.experts + 1) * 3 * I * c.hidden * 2
        return reference + weights
    }

    /// One case in flight.
    final class Slot: @unchecked Sendable {
        let vc: VerifyCase
        let bytes: Int
        let referenceReady = DispatchSemaphore(value: 0)
        var reference: Result<PreparedReference, Error>!
        var kernelDone = false
        let judged = DispatchSemaphore(value: 0)
        var report: CaseReport!
        init(_ vc: VerifyCase, bytes: Int) { self.vc = vc; self.bytes = bytes }
    }

    func start(_ vc: VerifyCase) -> Slot {
        let slot = Slot(vc, bytes: Self.footprint(vc))
        let verifier = self.verifier, recipes = self.recipes
        queue.async {
            slot.reference = Self.prepare(vc, verifier, recipes)
            slot.referenceReady.signal()
        }
        return slot
    }

    /// Verifies the cases `next()` gives, in order, until it gives nil; `each` gets every case
    /// with its report, in order, on the caller's thread. `next()` is asked for a new case
    /// whenever fewer than `depth` cases are in flight (and the memory budget allows), so a
    /// stop condition inside it is checked up to `depth` cases early.
    public func run(next: () -> VerifyCase?, each: (VerifyCase, CaseReport) -> Void) {
        var inFlight: [Slot] = []   // in the cases' order: reported ones leave from the front
        var bytes = 0
        var exhausted = false
        var held: VerifyCase? = nil  // a case drawn but over the memory budget: it starts once room is made
        func fill() {
            while !exhausted && inFlight.count < depth {
                guard let vc = held ?? next() else { exhausted = true; return }
                let b = Self.footprint(vc)
                if !inFlight.isEmpty && bytes.addingReportingOverflow(b).partialValue > memoryBudget { held = vc; return }
                held = nil
                inFlight.append(start(vc))
                bytes += b
            }
        }
        while true {
            fill()
            if inFlight.isEmpty { break }
            if let k = inFlight.firstIndex(where: { !$0.kernelDone }) {
                // the next kernel in order: wait for its reference, run it here, judge it beside the next kernel
                let slot = inFlight[k]
                let t0 = Date()
                slot.referenceReady.wait()
                let waited = Date().timeIntervalSince(t0)
                let done = verifier.runKernel(slot.vc, reference: slot.reference, waited: waited)
                slot.reference = nil
                slot.kernelDone = true
                let verifier = self.verifier
                queue.async {
                    slot.report = verifier.judge(done)
                    slot.judged.signal()
                }
                fill()
            }
            // report the judged cases at the front; wait for the front only when no kernel is left to run
            while let front = inFlight.first, front.kernelDone {
                if !inFlight.contains(where: { !$0.kernelDone }) { front.judged.wait() }
                else if front.judged.wait(timeout: .now()) == .timedOut { break }
                inFlight.removeFirst()
                bytes -= front.bytes
                each(front.vc, front.report)
                front.report = nil
                fill()
            }
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

extension ReferencePipeline {
    /// A reference being prepared on a background thread.
    final class Pending: @unchecked Sendable {
        let ready = DispatchSemaphore(value: 0)
        var result: Result<PreparedReference, Error>!
        let bytes: Int
        init(bytes: Int) { self.bytes = bytes }
    }

    /// Several kernels on the same cases (`verify` with several kernels): each case's reference
    /// is prepared once per distinct key of `keys[case]` (kernel index, memo key) and given to
    /// every kernel of that key, which run one after the other on the caller's thread. With
    /// `pipelined`, the next case's references are prepared on background threads while the
    /// kernels run this case (one case ahead, when the estimated footprint of both cases' references
    /// fits `memoryBudget`). `each` gets (kernel index, report, seconds including the wait for
    /// the reference) in order. Returns how many runs used a reference another kernel had used.
    public static func runSeveral(_ cases: [VerifyCase], keys: [String: [(kernel: Int, key: String)]], verifiers: [CaseVerifier],
                                  pipelined: Bool, memoryBudget: Int, each: (Int, CaseReport, Double) -> Void) -> Int {
        // recipes read from the kernels here, once: kernels are called on this thread only
        let recipes = verifiers.map(recipeTable)
        let queue = DispatchQueue(label: "moecheck.several-references", attributes: .concurrent)
        func start(_ vc: VerifyCase) -> [String: Pending] {
            var out: [String: Pending] = [:]
            for (i, key) in keys[vc.name] ?? [] where out[key] == nil {
                let p = Pending(bytes: footprint(vc))
                out[key] = p
                let v = verifiers[i], table = recipes[i]
                queue.async {
                    p.result = prepare(vc, v, table)
                    p.ready.signal()
                }
            }
            return out
        }
        var shared = 0
        var next: [String: Pending]? = nil
        for (n, vc) in cases.enumerated() {
            let current = next ?? start(vc)
            next = nil
            if pipelined, n + 1 < cases.count {
                let held = current.values.reduce(0) { $0.addingReportingOverflow($1.bytes).partialValue }
                let more = Set((keys[cases[n + 1].name] ?? []).map(\.key)).count.multipliedReportingOverflow(by: footprint(cases[n + 1])).partialValue
                if held.addingReportingOverflow(more).partialValue <= memoryBudget { next = start(cases[n + 1]) }
            }
            // kernels whose reference is the same run one after the other
            let taking = keys[vc.name] ?? []
            let order = taking.indices.sorted { a, b in
                let fa = taking.firstIndex { $0.key == taking[a].key }!, fb = taking.firstIndex { $0.key == taking[b].key }!
                return fa != fb ? fa < fb : a < b
            }.map { taking[$0] }
            var used = Set<String>()
            for (i, key) in order {
                let p = current[key]!
                let t0 = Date()
                p.ready.wait()
                p.ready.signal()   // stays open for the other kernels of this key
                let waited = Date().timeIntervalSince(t0)
                let again = !used.insert(key).inserted
                if again { shared += 1 }
                let r = verifiers[i].verify(vc, reference: p.result, waited: waited, shared: again)
                each(i, r, Date().timeIntervalSince(t0))
            }
        }
        return shared
    }
}
