import CFastGEMM
import COpenBLAS
import Foundation

/// The OpenBLAS calls the reference makes; nothing else touches the C symbols.
public enum BLAS {
    /// The kernel family OpenBLAS picked for this CPU at load time (`openblas_get_corename`).
    public static var coreName: String { String(cString: openblas_get_corename()) }

    /// OpenBLAS families without AVX2 kernels (lower case), which an OpenBLAS older than the CPU
    /// falls back to when it does not know the CPU's model.
    static let preAVX2Cores: Set<String> = ["prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "sandybridge",
                                            "barcelona", "opteron", "opteron(sse3)", "bulldozer", "piledriver", "steamroller",
                                            "bobcat", "katmai", "coppermine", "northwood", "banias", "unknown"]

    /// The family to force (`OPENBLAS_CORETYPE`) where OpenBLAS fell back to one without AVX2
    /// kernels on a CPU that has AVX2 and FMA, else nil. Debian 12's OpenBLAS 0.3.21 runs the
    /// H200 host's Xeon as Prescott (SSE3): on that host the reference of a 397B-TP8 T = 256 case
    /// took 3.6–3.8 s under Prescott, 3.2–3.3 s as Haswell and 3.0–3.2 s as SkylakeX (16
    /// threads, 2026-12-03). Haswell's kernels run on every AVX2+FMA CPU.
    public static func upgradedCore(current: String, cpuPath: Int32) -> String? {
        guard preAVX2Cores.contains(current.lowercased()), cpuPath >= Int32(MC_PATH_AVX2) else { return nil }
        return "Haswell"
    }

    /// Set by the tool when it forced the core (printed where the thread count is).
    nonisolated(unsafe) public static var coreNote: String? = nil

    /// `upgradedCore` for this process's OpenBLAS and CPU.
    public static var upgradedCore: String? { upgradedCore(current: coreName, cpuPath: mc_gemm_best_path()) }

    /// Pins OpenBLAS's thread count (recorded in every output's metadata). While engines run
    /// BLAS calls (`withThreads`) the new count applies once they are done.
    public static func setThreads(_ n: Int) {
        phase.lock()
        base = n
        settings += 1
        if holders == 0 { openblas_set_num_threads(Int32(n)) }
        phase.unlock()
    }

    /// The pinned thread count (not the count OpenBLAS holds while an engine runs its experts one
    /// thread each: that is `withThreads`'s business).
    public static var threads: Int {
        phase.lock()
        defer { phase.unlock() }
        return base
    }

    /// How many times `setThreads` was called in this process (tests: whether the count may have
    /// changed while something ran).
    public static var settingsMade: Int {
        phase.lock()
        defer { phase.unlock() }
        return settings
    }

    // OpenBLAS's thread count is global, and its results depend on it (a multi-threaded sgemm
    // may round differently from a single-threaded one). Engines running concurrently (the
    // pipeline's cases in flight) therefore share it by phases: every BLAS call runs inside
    // `withThreads(n)`, calls with the same n may overlap, a call with another n waits until
    // they are done. So each call sees the count it sees when engines run one at a time, and
    // results are the same bits either way.
    private static let phase = NSCondition()
    nonisolated(unsafe) private static var base = Int(openblas_get_num_threads())
    nonisolated(unsafe) private static var mode = 0
    nonisolated(unsafe) private static var holders = 0
    nonisolated(unsafe) private static var waiting = 0
    nonisolated(unsafe) private static var settings = 0

    /// Runs `body` with OpenBLAS at `n` threads, beside other bodies of the same `n` (newcomers
    /// queue behind a body waiting for another count, so no phase starves).
    public static func withThreads<T>(_ n: Int, _ body: () throws -> T) rethrows -> T {
        phase.lock()
        if !(holders == 0 || (mode == n && waiting == 0)) {
            waiting += 1
            while !(holders == 0 || mode == n) { phase.wait() }
            waiting -= 1
        }
        if holders == 0 {
            mode = n
            if Int(openblas_get_num_threads()) != n { openblas_set_num_threads(Int32(n)) }
        }
        holders += 1
        phase.unlock()
        defer {
            phase.lock()
            holders -= 1
            if holders == 0 {
                if base != mode { openblas_set_num_threads(Int32(base)) }
                phase.broadcast()
            }
            phase.unlock()
        }
        return try body()
    }

    /// `withThreads` at the pinned count: the engine's BLAS calls outside its expert batches.
    public static func withPinnedThreads<T>(_ body: () throws -> T) rethrows -> T {
        try withThreads(threads, body)
    }

    /// OpenBLAS's build configuration and the core its kernels were chosen for, e.g.
    /// `OpenBLAS 0.3.26 DYNAMIC_ARCH NO_AFFINITY Zen MAX_THREADS=64 (core Zen)`: part of the
    /// reference cache's key (another library or core may round differently).
    /// Read once: `openblas_get_config` rebuilds its answer in a static buffer on every call,
    /// so concurrent callers (cases in flight computing cache keys) could read a torn string.
    public static let configuration: String = {
        let config = openblas_get_config().map { String(cString: $0) } ?? "unknown"
        let core = openblas_get_corename().map { String(cString: $0) } ?? "unknown"
        return "\(config) (core \(core))"
    }()

    /// The environment variable that sets the thread count when no option does.
    public static let threadsEnvironmentVariable = "MOECHECK_BLAS_THREADS"

    /// The thread count given by `MOECHECK_BLAS_THREADS`, if set to an integer.
    public static var environmentThreads: Int? {
        ProcessInfo.processInfo.environment[threadsEnvironmentVariable].flatMap(Int.init)
    }

    /// Pins the thread count: `requested` (a command-line option) if given, else
    /// `MOECHECK_BLAS_THREADS`, else `fallback` (default: the CPUs this process may use); at least 1.
    public static func configureThreads(requested: Int?, fallback: Int? = nil) {
        let n = Swift.max(1, requested ?? environmentThreads ?? fallback ?? usableCPUs)
        configuredThreads = n
        setThreads(n)
    }

    /// The count the last `configureThreads` pinned (nil: none in this process). Unlike
    /// `threads`, it does not change while an engine runs its experts one thread each, so the
    /// reference cache keys on it.
    public private(set) static var configuredThreads: Int?

    /// The CPUs this process may use: its affinity mask (taskset, a container's cpuset), capped
    /// by a cgroup CPU quota rounded up (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`); at least 1.
    public static var usableCPUs: Int {
        var n = ProcessInfo.processInfo.activeProcessorCount
        // the affinity mask as Linux reports it: "Cpus_allowed:\tff,ffffffff" (hex words)
        if let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
           let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Cpus_allowed:") }) {
            let hex = line.dropFirst("Cpus_allowed:".count).filter { $0.isHexDigit }
            let count = hex.reduce(0) { $0 + (Int(String($1), radix: 16) ?? 0).nonzeroBitCount }
            if count > 0 { n = count }
        }
        if let quota = cgroupQuota() { n = Swift.min(n, quota) }
        return Swift.max(1, n)
    }

    /// CPUs allowed by a cgroup quota, rounded up; nil without one.
    static func cgroupQuota() -> Int? {
        func read(_ path: String) -> String? {
            (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        var quota: Double? = nil, period: Double? = nil
        if let v2 = read("/sys/fs/cgroup/cpu.max") {
            let parts = v2.split(separator: " ")
            if parts.count == 2 { quota = Double(parts[0]); period = Double(parts[1]) }
        } else if let q = read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), let p = read("/sys/fs/cgroup/cpu/cpu.cfs_period_us") {
            quota = Double(q); period = Double(p)
        }
        guard let quota, let period, quota > 0, period > 0 else { return nil }
        return Swift.max(1, Int((quota / period).rounded(.up)))
    }

    /// `C[m,n] = A[m,k] · B[n,k]ᵀ` in float64, all row-major.
    static func gemmABt(_ a: UnsafePointer<Double>, _ b: UnsafePointer<Double>, _ c: UnsafeMutablePointer<Double>, m: Int, n: Int, k: Int) {
        guard m > 0, n > 0 else { return }
        if k == 0 { c.update(repeating: 0, count: m * n); return }
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(n), Int32(k), 1, a, Int32(k), b, Int32(k), 0, c, Int32(n))
    }

    /// `C[m,n] = A[m,k] · B[n,k]ᵀ` in float32, all row-major (bounds on non-negative data).
    static func sgemmABt(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>, m: Int, n: Int, k: Int) {
        guard m > 0, n > 0 else { return }
        if k == 0 { c.update(repeating: 0, count: m * n); return }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(n), Int32(k), 1, a, Int32(k), b, Int32(k), 0, c, Int32(n))
    }

    /// `C[m,n] = A[m, k0..<k0+k] · B[n, k0..<k0+k]ᵀ` in float32: a column block of A (row length
    /// `lda`) against the same columns of B (row length `ldb`).
    static func sgemmABtBlock(_ a: UnsafePointer<Float>, lda: Int, _ b: UnsafePointer<Float>, ldb: Int, _ c: UnsafeMutablePointer<Float>,
                              m: Int, n: Int, k0: Int, k: Int) {
        guard m > 0, n > 0 else { return }
        if k == 0 { c.update(repeating: 0, count: m * n); return }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(n), Int32(k), 1, a + k0, Int32(lda), b + k0, Int32(ldb), 0, c, Int32(n))
    }

    /// `C[m,n] = A[m,k] · B[k,n]` in float32, all row-major (the statistical model's projections).
    static func sgemmAB(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>, m: Int, n: Int, k: Int) {
        guard m > 0, n > 0 else { return }
        if k == 0 { c.update(repeating: 0, count: m * n); return }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(m), Int32(n), Int32(k), 1, a, Int32(k), b, Int32(n), 0, c, Int32(n))
    }
}
