import Foundation
import LowPrecision
import MoEReference
import TensorIO

/// A layer seen without its shared expert (for kernels that dispatch the routed experts only,
/// as they must when `Is != I`).
public final class RoutedOnlyLayer: MoELayerSource {
    let base: MoELayerSource
    public let config: MoEConfig
    public init(_ base: MoELayerSource) {
        self.base = base
        var c = base.config
        c.sharedIntermediate = 0
        config = c
    }
    public var weightFormat: WeightFormat { base.weightFormat }
    public var name: String { base.name + " (routed only)" }
    public func routerWeight() throws -> [Double] { try base.routerWeight() }
    public func sharedGateWeight() throws -> [Double]? { nil }
    public func decodeGateUp(expert e: Int, into out: UnsafeMutablePointer<Double>) throws { try base.decodeGateUp(expert: e, into: out) }
    public func decodeDown(expert e: Int, into out: UnsafeMutablePointer<Double>) throws { try base.decodeDown(expert: e, into: out) }
    public func decodeGateUp(expert e: Int, into out: UnsafeMutablePointer<Float>) throws { try base.decodeGateUp(expert: e, into: out) }
    public func decodeDown(expert e: Int, into out: UnsafeMutablePointer<Float>) throws { try base.decodeDown(expert: e, into: out) }
    public func rawBF16(expert e: Int, _ projection: ExpertProjection) -> UnsafeRawPointer? { base.rawBF16(expert: e, projection) }
}

/// The verdict of one stage of one case.
public struct StageReport: Codable, Sendable {
    public var stage: String
    public var passed: Bool
    /// The rigorous tier (per-element bound).
    public var verdict: Verdict?
    /// The statistical tier (nil where the stage has none, or with `--rigorous-only`).
    public var precision: PrecisionVerdict?
    /// Where the worst element sits, in the stage's own terms.
    public var worst: String
    public var problems: [String]
}

/// Everything verify says about one case.
public struct CaseReport: Codable, Sendable {
    public var name: String
    /// The synthetic spec, or nil for a case file (`source`).
    public var spec: SyntheticSpec?
    /// The case file the layer came from (nil for a synthetic case).
    public var source: String?
    /// The kernel that ran it.
    public var kernel: String?
    public var splitK: Int
    public var fused: Bool
    public var recipe: String
    public var passed: Bool
    public var stages: [StageReport]
    public var ambiguousTokens: Int
    public var teacherForcedTokens: Int
    public var runsIdentical: Bool
    public var kernelMilliseconds: Double
    public var referenceSeconds: Double
    public var error: String?
    /// The smallest scale errors this case's whole-layer verdict would detect, per tier.
    public var sensitivity: Sensitivity?
    /// Seconds outside the kernel and the reference, by phase (a Python adapter's transfers).
    public var kernelOverhead: [String: Double]?
    /// Seconds spent judging the kernel's results against the reference (all stages, both tiers).
    public var judgeSeconds: Double? = nil
    /// Why the case was not run: the kernel declared the layer outside its contract (a Python
    /// adapter's `Unsupported`), or the declared recipe cannot run on its weights. Not a failure.
    public var skipped: String? = nil
    /// How `skipped` begins where the case ran but could not be judged (out of GPU memory), as
    /// against outside a contract.
    public static let notJudged = "not judged: "
    /// Whether the reference came from the on-disk cache (nil: no cache in use).
    public var referenceCached: Bool? = nil
    /// Seconds the kernel side waited for this case's reference (pipelined runs; nil: not pipelined).
    public var waitSeconds: Double? = nil

    /// The one line printed per case.
    public var line: String {
        if let skipped { return "SKIP \(name): \(skipped)" }
        if let error { return "FAIL \(name): \(error)" }
        let marks = stages.map { "\($0.stage) \($0.passed ? "ok" : "FAIL")" }.joined(separator: ", ")
        var s = "\(passed ? "PASS" : "FAIL") \(name): \(marks)"
        if let fwd = stages.last(where: { $0.stage.hasPrefix("forward") })?.verdict { s += " | \(fwd)" }
        s += String(format: " | kernel %.3f ms, reference %.2f s", kernelMilliseconds, referenceSeconds)
        if referenceCached == true { s += " (cached)" }
        if ambiguousTokens > 0 { s += ", \(ambiguousTokens) ambiguous token(s), \(teacherForcedTokens) teacher-forced" }
        if !runsIdentical { s += ", runs differ bitwise" }
        if let sensitivity { s += "\n    " + sensitivity.line }
        for st in stages where !st.passed {
            s += "\n    \(st.stage): worst at \(st.worst)"
            for p in st.problems.prefix(5) { s += "\n    \(st.stage): \(p)" }
            if let pr = st.precision, !pr.passed { s += "\n    \(st.stage): " + pr.summary }
        }
        return s
    }
}

/// How much of a kernel the verifier may use.
public enum VerifyMode: String, Codable, Sendable, CaseIterable {
    /// Every stage the kernel exposes: router, align, stage 1 and stage 2 teacher-forced with the
    /// reference's routing, and the whole layer judged with the kernel's own (accepted) routing.
    case stages
    /// The whole layer's output only (a kernel with no stage outputs): tokens whose routing a
    /// correct kernel may choose either way are left out of each tier's verdict.
    case forwardOnly = "forward-only"
}

/// The last case's reference, shared by the verifiers of several kernels judged on the same cases
/// (`verify --python A --python B`): a kernel whose recipe, fusion and inputs match reuses it
/// instead of recomputing the float64 reference. Holds one case (memory stays bounded).
public final class ReferenceMemo: @unchecked Sendable {
    struct Entry {
        let key: String
        let prepared: PreparedReference
    }
    var entry: Entry?
    /// Cases whose reference was reused.
    public private(set) var hits = 0
    public init() {}
    func lookup(_ key: String) -> Entry? {
        guard let e = entry, e.key == key else { return nil }
        hits += 1
        return e
    }
}

/// One case's reference side, ready before its kernel runs: the layer (which the kernel then
/// runs), the reference result, and what a teacher-forced rerun needs — the engine and inputs,
/// built on first use where the result came from the cache.
public final class PreparedReference: @unchecked Sendable {
    public let layer: KernelLayerSource
    let referenceLayer: MoELayerSource
    let options: ReferenceOptions
    let storedInputs: Bool
    public let reference: ReferenceResult
    /// Seconds computing the reference (or reading it from the cache).
    public let seconds: Double
    /// Whether it came from the cache (nil: no cache in use).
    public let cached: Bool?
    private var engine: MoEReferenceEngine?
    private var inputs: [Double]?

    init(layer: KernelLayerSource, referenceLayer: MoELayerSource, options: ReferenceOptions, storedInputs: Bool, reference: ReferenceResult,
         seconds: Double, cached: Bool?, engine: MoEReferenceEngine? = nil, inputs: [Double]? = nil) {
        self.layer = layer; self.referenceLayer = referenceLayer; self.options = options; self.storedInputs = storedInputs
        self.reference = reference; self.seconds = seconds; self.cached = cached; self.engine = engine; self.inputs = inputs
    }

    private let rerunLock = NSLock()

    /// The reference rerun with other routing (teacher forcing, mutations): never cached. Only
    /// the tokens whose routed experts the override changes are rerun, spliced into `reference`
    /// (`MoEReferenceEngine.run(inputs:tokens:routing:replacing:)`); no engine is built where
    /// none changes.
    func rerun(_ routing: RoutingOverride) throws -> ReferenceResult {
        rerunLock.lock()
        defer { rerunLock.unlock() }
        if routing.ids.count == reference.tokens && MoEReferenceEngine.changedTokens(routing, from: reference).isEmpty { return reference }
        if engine == nil { engine = try MoEReferenceEngine(layer: referenceLayer, recipe: reference.recipe, options: options) }
        if inputs == nil { inputs = storedInputs ? try layer.inputs() : try layer.kernelInputs() }
        return try engine!.run(inputs: inputs!, tokens: reference.tokens, routing: routing, replacing: reference)
    }
}

/// Runs one case against a kernel and the reference, stage by stage.
public struct CaseVerifier {
    public let kernel: KernelUnderTest
    /// Shares the reference with other verifiers of the same cases (nil: none).
    public var memo: ReferenceMemo?
    /// Reads and writes references on disk (nil: none).
    public var cache: ReferenceCache?
    /// Adjusts the kernel's declared recipe (e.g. to allow either rounding where a variant may).
    public var adjustRecipe: ((Recipe) -> Recipe)?
    /// Judge with the rigorous tier only (the statistical tier is still reported where computed).
    public var rigorousOnly: Bool
    public var mode: VerifyMode
    /// An unfused case runs the routed experts only (a C ABI kernel dispatches them alone when
    /// `Is != I`); false: the layer is whole either way (a Python adapter runs the whole block).
    public var routedOnlyWhenUnfused: Bool

    public init(kernel: KernelUnderTest, adjustRecipe: ((Recipe) -> Recipe)? = nil, rigorousOnly: Bool = false, mode: VerifyMode = .stages) {
        self.kernel = kernel
        self.routedOnlyWhenUnfused = !(kernel is WholeLayerKernel)
        self.adjustRecipe = adjustRecipe
        self.rigorousOnly = rigorousOnly
        self.mode = mode
    }

    /// Verifies one case. `reference`: its reference prepared beforehand (`ReferencePipeline`),
    /// after the kernel side `waited` seconds for it; nil: prepared here.
    /// `shared`: `reference` was already used by another kernel's verifier (its seconds are
    /// reported there, 0 here).
    public func verify(_ vc: VerifyCase, reference: Result<PreparedReference, Error>? = nil, waited: Double? = nil, shared: Bool = false) -> CaseReport {
        judge(runKernel(vc, reference: reference, waited: waited, shared: shared))
    }

    /// A case whose kernel has run (or failed), waiting to be judged.
    struct KernelDone: @unchecked Sendable {
        let vc: VerifyCase
        var report: CaseReport
        /// nil where the reference or the kernel failed (`report` says how).
        let prepared: Prepared?
    }

    /// The first half of `verify`: the reference (given, or prepared here) and the kernel's run,
    /// on the caller's thread (the kernel's).
    func runKernel(_ vc: VerifyCase, reference: Result<PreparedReference, Error>?, waited: Double?, shared: Bool = false) -> KernelDone {
        var source: String? = nil
        if case let .file(path, _) = vc.source { source = path }
        var report = CaseReport(name: vc.name, spec: vc.spec, source: source, kernel: kernel.name, splitK: vc.splitK, fused: vc.fuseShared, recipe: "",
                                passed: false, stages: [], ambiguousTokens: 0, teacherForcedTokens: 0, runsIdentical: true, kernelMilliseconds: 0,
                                referenceSeconds: 0, error: nil, sensitivity: nil)
        report.waitSeconds = waited
        var prepared: Prepared? = nil
        do { prepared = try prepare(vc, reference: reference, shared: shared) } catch { Self.classify(error, into: &report) }
        return KernelDone(vc: vc, report: report, prepared: prepared)
    }

    /// The second half of `verify`: the verdicts, on any thread (it touches the case's own
    /// reference and kernel outputs only; a teacher-forced rerun runs the engine).
    func judge(_ done: KernelDone) -> CaseReport {
        var report = done.report
        guard let p = done.prepared else { return report }
        do { try verify(done.vc, prepared: p, into: &report) } catch { Self.classify(error, into: &report) }
        return report
    }

    /// What a case's error makes of its report: a skip (outside the kernel's or the recipe's
    /// contract, or an adapter out of GPU memory after its retries) or an error.
    static func classify(_ error: Error, into report: inout CaseReport) {
        switch error {
        case PythonAdapterError.caseFailed(_, "unsupported", let message, _):
            report.skipped = "unsupported by the kernel: \(message)"
            report.passed = true
        case PythonAdapterError.caseFailed(_, "memory", let message, _):
            // the GPU was full (other processes): no verdict either way
            report.skipped = CaseReport.notJudged + "the adapter ran out of GPU memory: \(message)"
            report.passed = true
        case ReferenceError.unsupported(let message):
            report.skipped = "unsupported by the declared recipe: \(message)"
            report.passed = true
        default:
            report.error = "\(error)"
            report.passed = false
        }
    }

    /// The kernel's declared recipe for `format`, adjusted.
    func recipe(for format: WeightFormat) throws -> Recipe {
        var r = try kernel.recipe(for: format)
        if let adjustRecipe { r = adjustRecipe(r) }
        return r
    }

    /// One case's reference side and the kernel's run.
    struct Prepared {
        let reference: PreparedReference
        /// 0 where the reference was shared from another kernel's verifier (`ReferenceMemo`).
        let referenceSeconds: Double
        let run: KernelRun
        var layer: KernelLayerSource { reference.layer }

        /// The reference rerun with other routing (teacher forcing, mutations).
        func rerun(_ routing: RoutingOverride) throws -> ReferenceResult { try reference.rerun(routing) }
    }

    /// The memo's key: everything the reference depends on. A synthetic case's stored inputs are
    /// its kernel inputs (both its bf16 hidden states), so there the key is what the reference
    /// computes — the case, the fusion it runs, the recipe of the case's format — and a C ABI
    /// library and an adapter of the same recipe share one reference; for a case file, also the
    /// kernel's kind and its recipes for every format.
    public func memoKey(_ vc: VerifyCase) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        // the recipe's name is a label (reports show the verifier's own): a library's "declared by …" fused-bf16 is fused-bf16
        func json(_ r: Recipe?) -> String {
            guard var r else { return "-" }
            r.name = ""
            return (try? String(decoding: encoder.encode(r), as: UTF8.self)) ?? "?"
        }
        let caseKey = (try? String(decoding: encoder.encode(vc), as: UTF8.self)) ?? vc.name
        if case let .synthetic(spec) = vc.source {
            let c = spec.config
            let fuse = routedOnlyWhenUnfused ? vc.fuseShared : c.fusable
            let routedOnly = !(fuse || !c.hasSharedExpert || !routedOnlyWhenUnfused)
            return "\(caseKey)|fuse \(fuse)|routed-only \(routedOnly)|\(mode)|" + json(try? recipe(for: spec.format))
        }
        let recipes = WeightFormat.allCases.map { json(try? recipe(for: $0)) }
        return "\(caseKey)|\(kernel is WholeLayerKernel)|\(routedOnlyWhenUnfused)|\(mode)|" + recipes.joined(separator: "|")
    }

    /// The case's reference (`given`, else shared through the memo, else prepared now), then the kernel's run.
    func prepare(_ vc: VerifyCase, reference given: Result<PreparedReference, Error>? = nil, shared: Bool = false) throws -> Prepared {
        var prepared: PreparedReference
        var seconds: Double
        let key = given == nil && memo != nil ? memoKey(vc) : nil
        if let given {
            prepared = try given.get()
            seconds = shared ? 0 : prepared.seconds
        } else if let memo, let key, let hit = memo.lookup(key) {
            prepared = hit.prepared
            seconds = 0
        } else {
            prepared = try prepareReference(vc, recipe: recipe(for:))
            seconds = prepared.seconds
            if let memo, let key { memo.entry = ReferenceMemo.Entry(key: key, prepared: prepared) }
        }
        let ref = prepared.reference
        let run = try kernel.run(vc, layer: prepared.layer, referenceIds: ref.topkIds, referenceWeights: ref.topkWeights.map { Float($0) })
        return Prepared(reference: prepared, referenceSeconds: seconds, run: run)
    }

    /// Builds the case's layer and its reference with the (adjusted) declared recipe: read from
    /// the cache where it holds it, else computed (and stored). Touches the kernel only through
    /// `recipe` and its type, so `ReferencePipeline` runs it on its own thread.
    func prepareReference(_ vc: VerifyCase, recipe recipeFor: (WeightFormat) throws -> Recipe) throws -> PreparedReference {
        let layer = try vc.openLayer()
        let c = layer.config
        if vc.fuseShared && !c.fusable { throw VerifyError.usage("\(vc.name): the shared expert cannot fuse (Is != I)") }
        // a whole-layer kernel is not told whether to fuse: its routing may show the shared slot whenever it can fuse
        let fuse = routedOnlyWhenUnfused ? vc.fuseShared : c.fusable
        let routedOnly = !(fuse || !c.hasSharedExpert || !routedOnlyWhenUnfused)
        let refLayer: MoELayerSource = routedOnly ? RoutedOnlyLayer(layer) : layer
        let recipe = try recipeFor(layer.weightFormat)
        // a whole-layer kernel (Python adapter, recorded output) takes the hidden states as stored
        let storedInputs = kernel is WholeLayerKernel
        let options = ReferenceOptions(keepIntermediate: mode == .stages, fuseShared: fuse, keepContributions: true)
        let start = Date()
        var key: ReferenceCacheKey? = nil
        if let cache {
            do {
                key = try ReferenceCacheKey.make(source: vc.source, variant: .init(routedOnly: routedOnly, storedInputs: storedInputs),
                                                 recipe: recipe, options: options, digests: cache.caseDigests)
            } catch {
                cache.warnOnce("reference cache: \(vc.name): \(error); computed without the cache")
            }
            if let key, let hit = cache.lookup(key) {
                return PreparedReference(layer: layer, referenceLayer: refLayer, options: options, storedInputs: storedInputs, reference: hit,
                                         seconds: Date().timeIntervalSince(start), cached: true)
            }
        }
        let engine = try MoEReferenceEngine(layer: refLayer, recipe: recipe, options: options)
        let x = storedInputs ? try layer.inputs() : try layer.kernelInputs()
        let ref = try engine.run(inputs: x, tokens: layer.tokens)
        let prepared = PreparedReference(layer: layer, referenceLayer: refLayer, options: options, storedInputs: storedInputs, reference: ref,
                                         seconds: Date().timeIntervalSince(start), cached: cache == nil ? nil : false, engine: engine, inputs: x)
        if let cache, let key { cache.store(prepared.reference, key: key) }
        return prepared
    }

    /// Forward-only: each tier leaves out the tokens whose experts a correct kernel may pick either way.
    static func forwardOnlyMask(_ ref: ReferenceResult) -> (rigorous: [Bool]?, statistical: [Bool]?) {
        (ref.ambiguousTokens.map { !$0 }, ref.statistics.map { $0.ambiguousTokens.map { !$0 } })
    }

    func verify(_ vc: VerifyCase, prepared p: Prepared, into report: inout CaseReport) throws {
        let judgeStart = Date()
        defer { report.judgeSeconds = Date().timeIntervalSince(judgeStart) }
        let ref = p.reference.reference, run = p.run
        // its own name where the reference was shared with a kernel of the same recipe under another name
        report.recipe = (try? recipe(for: p.reference.layer.weightFormat))?.name ?? ref.recipe.name
        report.referenceSeconds = p.referenceSeconds
        report.referenceCached = p.reference.cached
        report.ambiguousTokens = ref.ambiguousTokens.filter { $0 }.count
        report.kernelMilliseconds = run.forwardMilliseconds
        var judged = ref
        var mask: (rigorous: [Bool]?, statistical: [Bool]?) = (nil, nil)
        if mode == .stages, let routing = run.routing {
            let router = try judgeRouter(routing, ref: ref, rerun: p.rerun)
            report.stages.append(router.report)
            report.teacherForcedTokens = router.forced
            judged = router.forcedRef
        } else {
            mask = Self.forwardOnlyMask(ref)
        }
        if mode == .stages {
            if let align = run.alignProblems {
                report.stages.append(StageReport(stage: "align", passed: align.isEmpty, verdict: nil, precision: nil, worst: "-", problems: align))
            }
            if let inter = run.intermediate { report.stages.append(judgeStage1(inter, ref: ref, intermediate: p.layer.config.intermediate)) }
            if let staged = run.stagedOutput { report.stages.append(judgeStage2(staged, ref: ref)) }
        }
        report.kernelOverhead = run.overhead.isEmpty ? nil : run.overhead
        var previous: (output: [Double], stage: StageReport)? = nil
        for (i, out) in run.forwardOutputs.enumerated() {
            var stage: StageReport
            if let previous, Self.bitwiseEqual(previous.output, out) {
                // the same bits judged against the same reference: the same verdict (judging is a pure function)
                stage = previous.stage
                stage.stage = "forward#\(i + 1)"
            } else {
                stage = judgeWholeLayer(out, ref: judged, stage: "forward#\(i + 1)", mask: mask)
            }
            report.stages.append(stage)
            previous = (out, stage)
        }
        report.sensitivity = report.stages.last { $0.stage.hasPrefix("forward") }?.precision?.sensitivity
        if run.forwardOutputs.count == 2 {
            report.runsIdentical = Self.bitwiseEqual(run.forwardOutputs[0], run.forwardOutputs[1])
        }
        report.passed = report.stages.allSatisfy(\.passed)
    }

    /// Forward-only verdicts of one case for several changes of the kernel's output (nil: none),
    /// with one reference run and one kernel run: `moecheck sensitivity`.
    public func forwardOnlyStudy(_ vc: VerifyCase, mutations: [Mutation?]) throws -> [(Mutation?, StageReport)] {
        let p = try prepare(vc)
        guard let kernelOut = p.run.forwardOutputs.first else { throw VerifyError.failed("\(vc.name): the kernel returned no whole-layer output") }
        let ref = p.reference.reference
        let mask = Self.forwardOnlyMask(ref)
        return try mutations.map { m in
            var out = kernelOut
            try m?.apply(&out, reference: ref, rerun: p.rerun)
            return (m, judgeWholeLayer(out, ref: ref, stage: "forward", mask: mask))
        }
    }

    /// A stage passes when the rigorous tier passes and, unless `rigorousOnly`, the statistical one.
    func passes(_ v: Verdict, _ p: PrecisionVerdict?) -> Bool { v.passed && (rigorousOnly || p?.passed ?? true) }

    /// The router: logits within their bound, the kernel's top-K equal to the reference's or, at
    /// an ambiguous token, a possible choice (then teacher-forced), the shared slot, the weights.
    func judgeRouter(_ run: KernelRouting, ref: ReferenceResult, rerun: (RoutingOverride) throws -> ReferenceResult) throws
        -> (report: StageReport, forced: Int, forcedRef: ReferenceResult) {
        let T = ref.tokens, E = ref.experts, K = ref.topK, S = run.slots, RS = ref.slots
        var routerProblems: [String] = []
        var logitVerdict: Verdict? = nil
        if let logits = run.logits {
            let v = Verdict.compare(actual: logits.map(Double.init), reference: ref.routerLogits, bound: ref.routerLogitBound)
            if !v.passed { routerProblems.append("router logits outside their bound: \(v.violations) of \(v.elements)") }
            logitVerdict = v
        }
        let fused = S == K + 1
        guard (S == K || fused), run.ids.count == T * S, run.weights.count == T * S else {
            let p = "routing has \(run.ids.count) ids and \(run.weights.count) weights for T=\(T) tokens and \(S) slots; expected slots K=\(K) or K+1=\(K + 1)"
            return (StageReport(stage: "router", passed: false, verdict: logitVerdict, precision: nil, worst: "-", problems: [p]), 0, ref)
        }
        if fused && !ref.sharedFused {
            routerProblems.append("the routing has a shared slot (K+1 columns) but this case's shared expert is not fused (none, or Is != I)")
        }
        var override = [[Int]]()
        var forced = 0
        // every token's choice goes into the override (the rerun takes one per token and reruns
        // those that change the reference's experts); the list of problems stops growing after
        // 20 and says how many more there were
        var moreProblems = 0
        func problem(_ p: String) {
            if routerProblems.count < 20 { routerProblems.append(p) } else { moreProblems += 1 }
        }
        for t in 0..<T {
            let kSet = (0..<K).map { Int(run.ids[t * S + $0]) }
            let rSet = (0..<K).map { Int(ref.topkIds[t * RS + $0]) }
            if Set(kSet) != Set(rSet) {
                let plausible = ref.ambiguousTokens[t] && Self.plausible(chosen: kSet, logits: ref.routerLogits, bound: ref.routerLogitBound,
                                                                          tolerance: ref.routerTolerance[t], token: t, experts: E)
                if plausible {
                    forced += 1
                    override.append(kSet)
                } else {
                    problem("token \(t): kernel chose experts \(kSet.sorted()), reference \(rSet.sorted())\(ref.ambiguousTokens[t] ? " (ambiguous, but not a possible choice)" : " (not ambiguous)")")
                    override.append(rSet)
                }
            } else {
                override.append(kSet)
            }
            if fused && ref.sharedFused {
                if run.ids[t * S + K] != Int32(E) {
                    problem("token \(t): shared slot has id \(run.ids[t * S + K]), expected \(E)")
                }
                let g = run.weights[t * S + K]
                if !(Swift.abs(g - ref.sharedGate[t]) <= ref.sharedGateBound[t]) {
                    problem(String(format: "token %d: shared weight %.6g, reference sigmoid gate %.6g ± %.2g", t, g, ref.sharedGate[t], ref.sharedGateBound[t]))
                }
            }
        }
        if moreProblems > 0 { routerProblems.append("… and \(moreProblems) more token problem(s)") }
        // routed weights, matched by id, against the reference with the kernel's (accepted) choice
        let forcedRef = forced > 0 ? try rerun(RoutingOverride(ids: override)) : ref
        var wk: [Double] = [], wr: [Double] = [], wb: [Double] = []
        for t in 0..<T where override.count == T {
            for s in 0..<K {
                let id = run.ids[t * S + s]
                if let j = (0..<K).first(where: { forcedRef.topkIds[t * RS + $0] == id }) {
                    wk.append(run.weights[t * S + s]); wr.append(forcedRef.topkWeights[t * RS + j]); wb.append(forcedRef.topkWeightBound[t * RS + j])
                }
            }
        }
        let weightVerdict = Verdict.compare(actual: wk, reference: wr, bound: wb)
        if !weightVerdict.passed {
            let i = weightVerdict.worstIndex
            routerProblems.append(String(format: "routing weights outside their bound: %d of %d (worst: token %d, kernel %.6g, reference %.6g ± %.2g)",
                                         weightVerdict.violations, weightVerdict.elements, i / Swift.max(K, 1), weightVerdict.worstValue, weightVerdict.worstReference, weightVerdict.worstBound))
        }
        let worst = logitVerdict.map { $0.worstIndex >= 0 ? "token \($0.worstIndex / E), expert \($0.worstIndex % E)" : "-" } ?? "-"
        let report = StageReport(stage: "router", passed: routerProblems.isEmpty, verdict: logitVerdict, precision: nil, worst: worst, problems: routerProblems)
        return (report, forced, forcedRef)
    }

    /// Whether two arrays hold the same bits (NaN payloads and signed zeros included).
    static func bitwiseEqual(_ a: [Double], _ b: [Double]) -> Bool {
        guard a.count == b.count else { return false }
        return a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in pa.count == 0 || memcmp(pa.baseAddress!, pb.baseAddress!, pa.count) == 0 } }
    }

    /// `[T·S, I]` rows of a `[T·S, width]` array (the reference's intermediate layout), in (token, slot, column) order.
    static func gatherRows(_ a: [Double], pairs: Int, width: Int, columns I: Int) -> [Double] {
        if width == I { return a.count == pairs * I ? a : Array(a[0..<(pairs * I)]) }
        return [Double](unsafeUninitializedCapacity: pairs * I) { out, count in
            a.withUnsafeBufferPointer { src in
                for p in 0..<pairs { (out.baseAddress! + p * I).update(from: src.baseAddress! + p * width, count: I) }
            }
            count = pairs * I
        }
    }

    /// Stage 1 with the reference's ids: the bf16 intermediate per (token, slot).
    func judgeStage1(_ kernelIntermediate: [Double], ref: ReferenceResult, intermediate I: Int) -> StageReport {
        let T = ref.tokens, S = ref.slots, width = ref.intermediateWidth
        let variance = ref.statistics?.intermediateVariance, ties = ref.statistics?.intermediateTieBias
        let excluded = ref.statistics?.excludedTokens
        // the (token, slot, column) elements of the reference's [T·S, width] arrays, as flat [T·S·I] arrays
        let pairs = T * S
        let interRef = Self.gatherRows(ref.intermediate!, pairs: pairs, width: width, columns: I)
        let interBound = Self.gatherRows(ref.intermediateBound!, pairs: pairs, width: width, columns: I)
        let interK = Self.gatherRows(kernelIntermediate, pairs: pairs, width: I, columns: I)
        var interVar: [Double] = [], interTie: [Double] = [], keep: [Bool] = []
        if let variance, let ties, let excluded {
            interVar = Self.gatherRows(variance, pairs: pairs, width: width, columns: I)
            interTie = Self.gatherRows(ties, pairs: pairs, width: width, columns: I)
            keep = [Bool](unsafeUninitializedCapacity: pairs * I) { out, count in
                for t in 0..<T { (out.baseAddress! + t * S * I).initialize(repeating: !excluded[t], count: S * I) }
                count = pairs * I
            }
        }
        let v1 = Verdict.compare(actual: interK, reference: interRef, bound: interBound)
        let p1 = variance == nil ? nil : StatisticalJudge.judgeElements(interK, reference: interRef, variance: interVar, tie: interTie, keep: keep)
        var problems = v1.passed ? [] : ["intermediate outside its bound: \(v1.violations) of \(v1.elements) (\(v1))"]
        if let p1, !p1.passed { problems += p1.failures.map { "precision: \($0)" } }
        return StageReport(stage: "stage1", passed: passes(v1, p1), verdict: v1, precision: p1,
                           worst: Self.pairLocation(v1.worstIndex, ids: ref.topkIds, S: S, width: I, v: v1), problems: problems)
    }

    /// Stages 1 + 2 with the reference's ids and weights.
    func judgeStage2(_ staged: [Double], ref: ReferenceResult) -> StageReport {
        let v2 = Verdict.compare(actual: staged, reference: ref.output, bound: ref.bound)
        let p2 = StatisticalJudge.judgeOutput(staged, reference: ref, includeRouter: false)
        var problems = v2.passed ? [] : ["output outside its bound: \(v2.violations) of \(v2.elements)"]
        if let p2, !p2.passed { problems += p2.failures.map { "precision: \($0)" } }
        return StageReport(stage: "stage2", passed: passes(v2, p2), verdict: v2, precision: p2,
                           worst: Self.outputLocation(v2.worstIndex, ids: ref.topkIds, S: ref.slots, H: ref.hidden, v: v2), problems: problems)
    }

    /// The whole layer against `ref`, over the tokens each tier's mask keeps (all without one).
    func judgeWholeLayer(_ out: [Double], ref: ReferenceResult, stage: String, mask: (rigorous: [Bool]?, statistical: [Bool]?)) -> StageReport {
        let H = ref.hidden
        let v: Verdict
        // the kept elements' flat indices (with a mask the verdict's worst index counts kept elements only)
        let kept = mask.rigorous.map { keep in (0..<ref.tokens).filter { keep[$0] }.flatMap { t in (t * H)..<((t + 1) * H) } }
        if let kept {
            v = Verdict.compare(actual: kept.map { out[$0] }, reference: kept.map { ref.output[$0] }, bound: kept.map { ref.bound[$0] })
        } else {
            v = Verdict.compare(actual: out, reference: ref.output, bound: ref.bound)
        }
        let p = StatisticalJudge.judgeOutput(out, reference: ref, tokens: mask.statistical)
        var problems = v.passed ? [] : ["output outside its bound: \(v.violations) of \(v.elements), \(v.nonFinite) non-finite"]
        if let p, !p.passed { problems += p.failures.map { "precision: \($0)" } }
        var worst = "-"
        if v.worstIndex >= 0 {
            let flat = kept.map { $0[v.worstIndex] } ?? v.worstIndex
            worst = Self.outputLocation(flat, ids: ref.topkIds, S: ref.slots, H: H, v: v)
        }
        return StageReport(stage: stage, passed: passes(v, p), verdict: v, precision: p, worst: worst, problems: problems)
    }

    /// Whether `chosen` is a top-K choice consistent with the logits within their bounds: no
    /// expert left out is certainly larger than one taken.
    static func plausible(chosen: [Int], logits: [Double], bound: [Double], tolerance: Double, token t: Int, experts E: Int) -> Bool {
        let taken = Set(chosen)
        guard chosen.allSatisfy({ $0 >= 0 && $0 < E }), taken.count == chosen.count else { return false }
        let minTakenHigh = chosen.map { logits[t * E + $0] + bound[t * E + $0] + tolerance }.min() ?? .infinity
        let row = (0..<E).map { logits[t * E + $0] }
        guard let top = (0..<E).max(by: { row[$0] < row[$1] }) else { return false }
        let maxLow = row[top] - bound[t * E + top]
        // Experts whose fp32 probability may underflow to 0 are tied at 0: any of them may be taken.
        if MoEReferenceEngine.mayUnderflow(minTakenHigh, max: maxLow) {
            for j in 0..<E where !taken.contains(j) {
                let low = logits[t * E + j] - bound[t * E + j] - tolerance
                if low > minTakenHigh && !MoEReferenceEngine.mayUnderflow(logits[t * E + j] + bound[t * E + j] + tolerance, max: maxLow) { return false }
            }
            return true
        }
        for j in 0..<E where !taken.contains(j) {
            if logits[t * E + j] - bound[t * E + j] - tolerance > minTakenHigh { return false }
        }
        return true
    }

    static func pairLocation(_ i: Int, ids: [Int32], S: Int, width: Int, v: Verdict) -> String {
        guard i >= 0 else { return "-" }
        let pair = i / width, col = i % width
        return String(format: "token %d, slot %d (expert %d), column %d: kernel %.6g, reference %.6g ± %.3g", pair / S, pair % S, ids[pair], col,
                      v.worstValue, v.worstReference, v.worstBound)
    }

    static func outputLocation(_ i: Int, ids: [Int32], S: Int, H: Int, v: Verdict) -> String {
        guard i >= 0 else { return "-" }
        let t = i / H, h = i % H
        let experts = (0..<S).map { String(ids[t * S + $0]) }.joined(separator: ",")
        return String(format: "token %d (experts %@), column %d: kernel %.6g, reference %.6g ± %.3g", t, experts, h, v.worstValue, v.worstReference, v.worstBound)
    }
}
