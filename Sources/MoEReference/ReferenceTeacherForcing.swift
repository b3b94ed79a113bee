import Foundation

// Teacher forcing of only the tokens that need it.
//
// The tokens of an MoE layer are independent computations: the router (logits, top-K, softmax,
// shared gate), the per-token fp8 activation quantization, every expert's rows and the combine
// of each token's contributions (in expert order, whatever the other tokens route to) all work
// on one token's row at a time. A rerun with a kernel's routing at a few ambiguous tokens
// therefore needs only those tokens' rows: rerun them as a batch of their own and splice the
// result into the reference of the whole case.

extension ReferenceResult {
    /// This result with the rows of `tokens` replaced by `sub`, a run of the same engine on
    /// those tokens' inputs only (`sub`'s token i is this result's token `tokens[i]`).
    ///
    /// Every per-token array of the result and of its statistics is spliced row by row; a row's
    /// width is the array's count over the token count (so an empty array stays empty). Fields
    /// that are not purely per token:
    /// - `statistics.excludedTokens`: a token is excluded for a router value on a rounding tie
    ///   (its own routing) or for repeating an earlier token's input (the whole case). A spliced
    ///   token is excluded where this result or `sub` excludes it: the sub-run knows the new
    ///   routing's ties, this result the duplicates (a property of the inputs, which routing does
    ///   not change). Conservative: a tie of the replaced routing keeps excluding the token.
    /// - `statistics.contributions` (and `directionVariance`, `directionBias`, `alternatives`, computed from
    ///   them) are kept only where the whole case holds at most
    ///   `ReferenceOptions.contributionLimit` of them; `sub` must follow the whole case's choice
    ///   (present in both or absent in both), as `MoEReferenceEngine.run(inputs:tokens:routing:replacing:)`
    ///   makes it: a sub-run that kept them would also have modelled `outputFlipVariance` with
    ///   them, unlike the rest of the case.
    /// - `statistics.alternatives` (the known alternatives' bounds along the same directions) as
    ///   `directionVariance`: kept with the contributions.
    /// - `statistics.slots` and the scalars of the result (shape, recipe, fusion,
    ///   `intermediateWidth`): case-global, must be equal.
    ///
    /// Throws `ReferenceError.invalid` where `tokens` repeats a token or leaves `0..<tokens`, or
    /// where a shape of `sub` does not match (never a silent mis-splice).
    public func replacingTokens(_ tokens: [Int], with sub: ReferenceResult) throws -> ReferenceResult {
        let T = self.tokens
        func check(_ ok: Bool, _ what: @autoclosure () -> String) throws {
            if !ok { throw ReferenceError.invalid("splicing a rerun of \(tokens.count) token(s) into a reference of \(T): \(what())") }
        }
        try check(sub.tokens == tokens.count, "the rerun has \(sub.tokens) token(s)")
        var seen = [Bool](repeating: false, count: T)
        for t in tokens {
            try check(t >= 0 && t < T, "token \(t) is out of range 0..<\(T)")
            try check(!seen[t], "token \(t) is listed twice")
            seen[t] = true
        }
        try check(sub.hidden == hidden && sub.experts == experts && sub.topK == topK && sub.slots == slots && sub.sharedFused == sharedFused,
                  "shapes differ: H \(sub.hidden)/\(hidden), E \(sub.experts)/\(experts), K \(sub.topK)/\(topK), slots \(sub.slots)/\(slots), fused \(sub.sharedFused)/\(sharedFused)")
        try check(sub.recipe == recipe, "recipes differ: \(sub.recipe.name) and \(recipe.name)")
        try check(sub.intermediateWidth == intermediateWidth, "intermediate widths differ: \(sub.intermediateWidth) and \(intermediateWidth)")

        /// Rows `tokens` of `full` (`[T, width]`) replaced by the rows of `part` (`[tokens.count, width]`).
        func splice<E>(_ full: [E], _ part: [E], _ name: String) throws -> [E] {
            let width = full.count / T
            try check(full.count == width * T, "\(name) holds \(full.count) values, not a multiple of \(T) tokens")
            try check(part.count == width * tokens.count, "\(name) of the rerun holds \(part.count) values, expected \(tokens.count)·\(width)")
            guard width > 0 else { return full }
            var out = full
            out.withUnsafeMutableBufferPointer { o in part.withUnsafeBufferPointer { p in
                for (i, t) in tokens.enumerated() {
                    (o.baseAddress! + t * width).update(from: p.baseAddress! + i * width, count: width)
                }
            } }
            return out
        }
        /// Both present (spliced) or both absent.
        func splice<E>(_ full: [E]?, _ part: [E]?, _ name: String) throws -> [E]? {
            try check((full == nil) == (part == nil), "\(name) is kept by \(full == nil ? "the rerun only" : "the reference only")")
            guard let full, let part else { return nil }
            return try splice(full, part, name)
        }

        var r = self
        r.output = try splice(output, sub.output, "output")
        r.bound = try splice(bound, sub.bound, "bound")
        r.routerLogits = try splice(routerLogits, sub.routerLogits, "routerLogits")
        r.routerLogitBound = try splice(routerLogitBound, sub.routerLogitBound, "routerLogitBound")
        r.topkIds = try splice(topkIds, sub.topkIds, "topkIds")
        r.topkWeights = try splice(topkWeights, sub.topkWeights, "topkWeights")
        r.topkWeightBound = try splice(topkWeightBound, sub.topkWeightBound, "topkWeightBound")
        r.sharedGate = try splice(sharedGate, sub.sharedGate, "sharedGate")
        r.sharedGateBound = try splice(sharedGateBound, sub.sharedGateBound, "sharedGateBound")
        r.ambiguousTokens = try splice(ambiguousTokens, sub.ambiguousTokens, "ambiguousTokens")
        r.routerTolerance = try splice(routerTolerance, sub.routerTolerance, "routerTolerance")
        r.intermediate = try splice(intermediate, sub.intermediate, "intermediate")
        r.intermediateBound = try splice(intermediateBound, sub.intermediateBound, "intermediateBound")

        guard let st = statistics else {
            try check(sub.statistics == nil, "statistics are kept by the rerun only")
            return r
        }
        guard let ss = sub.statistics else { try check(false, "statistics are kept by the reference only"); return r }
        try check(ss.slots == st.slots, "statistics' slots differ: \(ss.slots) and \(st.slots)")
        var s = st
        s.elementVariance = try splice(st.elementVariance, ss.elementVariance, "elementVariance")
        s.outputFlipVariance = try splice(st.outputFlipVariance, ss.outputFlipVariance, "outputFlipVariance")
        s.outputTieBias = try splice(st.outputTieBias, ss.outputTieBias, "outputTieBias")
        s.tieNorm = try splice(st.tieNorm, ss.tieNorm, "tieNorm")
        s.excludedTokens = try splice(st.excludedTokens, ss.excludedTokens, "excludedTokens")
        for t in tokens where st.excludedTokens[t] { s.excludedTokens[t] = true }
        s.expertTokenVariance = try splice(st.expertTokenVariance, ss.expertTokenVariance, "expertTokenVariance")
        s.routerTokenVariance = try splice(st.routerTokenVariance, ss.routerTokenVariance, "routerTokenVariance")
        s.expertTokenBlockMax = try splice(st.expertTokenBlockMax, ss.expertTokenBlockMax, "expertTokenBlockMax")
        s.intermediateVariance = try splice(st.intermediateVariance, ss.intermediateVariance, "intermediateVariance")
        s.intermediateTieBias = try splice(st.intermediateTieBias, ss.intermediateTieBias, "intermediateTieBias")
        s.slotExperts = try splice(st.slotExperts, ss.slotExperts, "slotExperts")
        s.ambiguousTokens = try splice(st.ambiguousTokens, ss.ambiguousTokens, "statistics.ambiguousTokens")
        s.midpointTokens = try splice(st.midpointTokens, ss.midpointTokens, "midpointTokens")
        s.contributions = try splice(st.contributions, ss.contributions, "contributions")
        s.directionVariance = try splice(st.directionVariance, ss.directionVariance, "directionVariance")
        s.directionBias = try splice(st.directionBias, ss.directionBias, "directionBias")
        s.alternatives = try splice(st.alternatives, ss.alternatives, "alternatives")
        r.statistics = s
        return r
    }
}

extension MoEReferenceEngine {
    /// The tokens whose override chooses another set of routed experts than `base`'s top-K (or
    /// is malformed: not K ids), in increasing order.
    public static func changedTokens(_ routing: RoutingOverride, from base: ReferenceResult) -> [Int] {
        let K = base.topK, S = base.slots
        return (0..<Swift.min(base.tokens, routing.ids.count)).filter { t in
            let ids = routing.ids[t]
            return ids.count != K || Set(ids) != Set((0..<K).map { Int(base.topkIds[t * S + $0]) })
        }
    }

    /// `run(inputs: x, tokens: T, routing: routing)` where `base` is this engine's run on `x`
    /// (without an override, or with one): only the tokens whose override changes `base`'s
    /// choice of experts (`changedTokens`) are rerun, as a batch of their own, and spliced into
    /// `base` (`ReferenceResult.replacingTokens`). A token whose override lists `base`'s
    /// experts in another order keeps `base`'s row (a full rerun differs there at most in the
    /// order of the renormalization's K-term sum). `base` itself where no token changes; a full
    /// run where every token does.
    ///
    /// A row's values are the same computation either way, but not always the same bits:
    /// OpenBLAS's result for a row of a GEMM depends on how many rows the call holds (its
    /// kernels treat the rows past the last full block of the M dimension their own way), and
    /// every expert's GEMMs hold other rows in a full rerun than in the free run or a partial
    /// one. The float64 GEMMs' last bits are absorbed by the recipe's fp32/bf16 rounding points
    /// (the `exact` recipe has none: its values differ by 1e-12 relative or less); the float32
    /// GEMMs of the bounds and of the statistical model differ in their last bits (1e-5
    /// relative or less, a full rerun's rows of untouched tokens against the free run's as much
    /// as a partial rerun's rows against a full one's), and so, rarely, does a value that one of
    /// them decides at a threshold (whether an fp8 scale may change, a rounding's flip variance).
    public func run(inputs x: [Double], tokens T: Int, routing: RoutingOverride, replacing base: ReferenceResult) throws -> ReferenceResult {
        let H = layer.config.hidden
        guard T >= 1 else { throw ReferenceError.invalid("tokens must be >= 1, got \(T)") }
        guard x.count == T * H else { throw ReferenceError.invalid("inputs hold \(x.count) values, expected T·H = \(T)·\(H)") }
        guard routing.ids.count == T else { throw ReferenceError.invalid("routing override has \(routing.ids.count) tokens, expected \(T)") }
        guard base.tokens == T, base.hidden == H else {
            throw ReferenceError.invalid("the reference to rerun in has \(base.tokens) tokens of width \(base.hidden), expected \(T) of \(H)")
        }
        let changed = Self.changedTokens(routing, from: base)
        if changed.isEmpty { return base }
        if changed.count == T { return try run(inputs: x, tokens: T, routing: routing) }
        var rows = [Double](repeating: 0, count: changed.count * H)
        rows.withUnsafeMutableBufferPointer { r in x.withUnsafeBufferPointer { xp in
            for (i, t) in changed.enumerated() { (r.baseAddress! + i * H).update(from: xp.baseAddress! + t * H, count: H) }
        } }
        // the sub-batch keeps the contributions where the whole case does (a limit on the case's
        // size), so that its rows model the error as the whole case's rows do
        var engine = self
        if options.keepContributions && !keepsContributions(tokens: T) {
            var o = options
            o.keepContributions = false
            engine = try MoEReferenceEngine(layer: layer, recipe: recipe, options: o)
        }
        let sub = try engine.run(inputs: rows, tokens: changed.count, routing: RoutingOverride(ids: changed.map { routing.ids[$0] }))
        return try base.replacingTokens(changed, with: sub)
    }
}
