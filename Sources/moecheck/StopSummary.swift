import Foundation
#if canImport(Glibc)
import Glibc
#endif
import MoEVerify

/// What `verify` has done so far, printed when it is stopped (SIGTERM from `timeout` or a
/// campaign's deadline, SIGINT): the per-kernel time split and counts of the cases that
/// finished, so a stopped shard still says where its time went. The summary lines are the
/// ones a finished run prints, after a `stopped` line; `--json` gets the finished runs' reports;
/// the exit status is 128 + the signal.
final class StopSummary: @unchecked Sendable {
    private let lock = NSLock()
    private let names: [String]
    private var reports: [[CaseReport]]
    private var seconds: [Double]
    private let start = Date()
    private let pipelined: Bool
    private var sources: [DispatchSourceSignal] = []
    /// Writes the finished runs' reports (`--json`) when stopped.
    var writeReports: (([CaseReport]) throws -> Void)?

    /// `names`: each kernel's "name on device"; one kernel: its seconds are the run's wall time.
    init(kernels names: [String], pipelined: Bool) {
        self.names = names
        self.pipelined = pipelined
        reports = Array(repeating: [], count: names.count)
        seconds = Array(repeating: 0, count: names.count)
        for sig in [SIGTERM, SIGINT] {
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { [weak self] in self?.stop(sig) }
            s.resume()
            sources.append(s)
        }
    }

    /// Prints `line` and records the report, under the lock the stop handler prints under.
    func record(kernel i: Int, _ report: CaseReport, seconds secs: Double? = nil, line: String) {
        lock.lock()
        defer { lock.unlock() }
        reports[i].append(report)
        if let secs { seconds[i] += secs }
        print(line)
        fflush(stdout)
    }

    /// The reports so far, per kernel.
    var reportsByKernel: [[CaseReport]] { lock.lock(); defer { lock.unlock() }; return reports }

    /// Each kernel's summary lines (time split, counts) of the cases so far.
    func kernelLines() -> [String] {
        var out: [String] = []
        let wall = Date().timeIntervalSince(start)
        for (i, name) in names.enumerated() {
            let secs = names.count == 1 ? wall : seconds[i]
            let s = CatalogueRunSummary(reports: reports[i], seconds: secs, pipelined: pipelined)
            let tag = names.count == 1 ? "" : "[\(i + 1)] "
            out.append(String(format: "verify: %@%@, %.1f s", tag, name, secs) + s.timeSplit)
            out.append((names.count == 1 ? "" : "  [\(i + 1)] ") + s.countLine)
        }
        return out
    }

    /// The summary lines of the cases so far: each kernel's, then (several kernels) the total count.
    func lines() -> [String] {
        var out = kernelLines()
        if names.count > 1 { out.append(CatalogueRunSummary(reports: reports.flatMap { $0 }, seconds: 0).countLine) }
        return out
    }

    private func stop(_ sig: Int32) {
        lock.lock()
        let done = reports.reduce(0) { $0 + $1.count }
        print(String(format: "verify: stopped by signal %d after %.1f s, %d run(s) finished; the summary of those:", sig, Date().timeIntervalSince(start), done))
        print("verify: " + PeakMemory.line)
        for l in lines() { print(l) }
        if let writeReports {
            do { try writeReports(reports.flatMap { $0 }) } catch { print("verify: the JSON report of the finished runs was not written: \(error)") }
        }
        fflush(stdout)
        PythonScratch.removeAll()
        _exit(128 + sig)
    }
}
