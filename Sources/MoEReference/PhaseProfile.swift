import Foundation

/// Where the reference's time goes, by phase: set `MOECHECK_PROFILE=1` and every
/// `MoEReferenceEngine.run` prints to stderr, per phase, its wall time (phases on the calling
/// thread) or the CPU time its calls took on their threads summed (per-expert phases, which run
/// on several workers at once), then a digest of every array of the result, statistics included
/// (before/after comparisons of an optimization: equal digests, equal bits). Measurements only:
/// off, each phase costs one load of a flag.
enum PhaseProfile {
    static let enabled = ProcessInfo.processInfo.environment["MOECHECK_PROFILE"] == "1"

    private static let lock = NSLock()
    nonisolated(unsafe) private static var totals: [String: (seconds: Double, calls: Int)] = [:]
    nonisolated(unsafe) private static var order: [String] = []

    /// Runs `body`, adding its time to `phase`: the calling thread's CPU time (`cpu`, for
    /// phases that run on several threads at once), else the wall time.
    @inline(__always)
    static func measure<T>(_ phase: String, cpu: Bool = false, _ body: () throws -> T) rethrows -> T {
        guard enabled else { return try body() }
        let start = cpu ? threadCPUSeconds() : wallSeconds()
        defer { add(phase, (cpu ? threadCPUSeconds() : wallSeconds()) - start) }
        return try body()
    }

    /// The clock for `stop` (0 when off), for a phase that is not one closure.
    @inline(__always)
    static func start(cpu: Bool = false) -> Double { enabled ? (cpu ? threadCPUSeconds() : wallSeconds()) : 0 }

    @inline(__always)
    static func stop(_ phase: String, since start: Double, cpu: Bool = false) {
        if enabled { add(phase, (cpu ? threadCPUSeconds() : wallSeconds()) - start) }
    }

    private static func add(_ phase: String, _ seconds: Double) {
        lock.lock()
        if totals[phase] == nil { order.append(phase) }
        totals[phase, default: (0, 0)].seconds += seconds
        totals[phase, default: (0, 0)].calls += 1
        lock.unlock()
    }

    /// Prints the phases measured since the last report (in the order first seen) and clears them.
    static func report(_ title: String, digest: [(String, UInt64)]) {
        guard enabled else { return }
        lock.lock()
        var lines = ["profile: \(title)"]
        for p in order {
            let t = totals[p]!
            lines.append("profile:   " + p.padding(toLength: 48, withPad: " ", startingAt: 0) + String(format: "%9.3f s  %7d call(s)", t.seconds, t.calls))
        }
        totals = [:]
        order = []
        lock.unlock()
        for (name, d) in digest { lines.append("profile:   digest " + name.padding(toLength: 41, withPad: " ", startingAt: 0) + String(format: "%016llx", d)) }
        FileHandle.standardError.write(Data((lines.joined(separator: "\n") + "\n").utf8))
    }

    static func wallSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
    }

    static func threadCPUSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
    }

    /// FNV-1a over the bit patterns of `values` (nil and empty arrays differ).
    static func digest<T: BinaryFloatingPoint>(_ values: [T]?) -> UInt64 {
        guard let values else { return 0 }
        var h: UInt64 = 0xcbf2_9ce4_8422_2325 ^ UInt64(values.count)
        values.withUnsafeBytes { raw in
            for b in raw { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01b3 }
        }
        return h
    }

    static func digest(_ values: [Bool]) -> UInt64 { digest(values.map { $0 ? 1.0 : 0.0 }) }
    static func digest(_ values: [Int32]) -> UInt64 { digest(values.map { Double($0) }) }
}

extension ReferenceResult {
    /// `PhaseProfile.digest` of every array of the result and of its statistics.
    var profileDigest: [(String, UInt64)] {
        var d: [(String, UInt64)] = [
            ("output", PhaseProfile.digest(output)), ("bound", PhaseProfile.digest(bound)),
            ("routerLogits", PhaseProfile.digest(routerLogits)), ("routerLogitBound", PhaseProfile.digest(routerLogitBound)),
            ("topkIds", PhaseProfile.digest(topkIds)), ("topkWeights", PhaseProfile.digest(topkWeights)),
            ("topkWeightBound", PhaseProfile.digest(topkWeightBound)), ("sharedGate", PhaseProfile.digest(sharedGate)),
            ("sharedGateBound", PhaseProfile.digest(sharedGateBound)), ("ambiguousTokens", PhaseProfile.digest(ambiguousTokens)),
            ("routerTolerance", PhaseProfile.digest(routerTolerance)), ("intermediate", PhaseProfile.digest(intermediate)),
            ("intermediateBound", PhaseProfile.digest(intermediateBound)),
        ]
        if let s = statistics {
            d += [
                ("elementVariance", PhaseProfile.digest(s.elementVariance)), ("outputFlipVariance", PhaseProfile.digest(s.outputFlipVariance)),
                ("outputTieBias", PhaseProfile.digest(s.outputTieBias)), ("tieNorm", PhaseProfile.digest(s.tieNorm)),
                ("directionBias", PhaseProfile.digest(s.directionBias)), ("excludedTokens", PhaseProfile.digest(s.excludedTokens)),
                ("expertTokenVariance", PhaseProfile.digest(s.expertTokenVariance)),
                ("routerTokenVariance", PhaseProfile.digest(s.routerTokenVariance)),
                ("intermediateVariance", PhaseProfile.digest(s.intermediateVariance)),
                ("intermediateTieBias", PhaseProfile.digest(s.intermediateTieBias)), ("slotExperts", PhaseProfile.digest(s.slotExperts)),
                ("contributions", PhaseProfile.digest(s.contributions)), ("ambiguousTokens(stat)", PhaseProfile.digest(s.ambiguousTokens)),
                ("midpointTokens", PhaseProfile.digest(s.midpointTokens)), ("directionVariance", PhaseProfile.digest(s.directionVariance)),
                ("alternatives", PhaseProfile.digest(s.alternatives)),
            ]
        }
        return d
    }
}
