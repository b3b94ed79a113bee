import Foundation
#if canImport(Glibc)
import Glibc
#endif
import MoEReference

/// Why a Python adapter's worker could not give an answer. Every case names the adapter and,
/// where one ran, the case; the worker's own last stderr lines are attached.
public enum PythonAdapterError: Error, CustomStringConvertible {
    /// The worker script or the Python executable was not found.
    case setup(String)
    /// The adapter failed to import or breaks the contract (no `forward`, no `RECIPE`).
    case adapter(adapter: String, kind: String, message: String, traceback: String)
    /// The adapter raised, or returned a wrong shape/dtype, on one case.
    case caseFailed(case: String, kind: String, message: String, traceback: String)
    /// The worker exited; it is restarted for the next case.
    case died(case: String, status: String, stderr: String)
    /// The worker gave no answer within the case timeout; it was killed and is restarted.
    case timedOut(case: String, seconds: Double, stderr: String)
    /// The worker answered something that is not the protocol.
    case protocolViolation(String)

    public var description: String {
        func tail(_ s: String) -> String { s.isEmpty ? "" : "\n" + s.split(separator: "\n", omittingEmptySubsequences: false).suffix(12).map { "      | " + $0 }.joined(separator: "\n") }
        switch self {
        case let .setup(m): return "python adapter: \(m)"
        case let .adapter(a, k, m, tb): return "python adapter \(a): \(k) error: \(m)\(tail(tb))"
        case let .caseFailed(c, k, m, tb): return "adapter \(k == "exception" ? "raised" : "returned a bad result (\(k))") on case \(c): \(m)\(tail(tb))"
        case let .died(c, status, err): return "the adapter's worker died (\(status)) on case \(c); restarted for the next case\(tail(err))"
        case let .timedOut(c, s, err): return String(format: "the adapter gave no answer on case %@ within %.0f s (--case-timeout); its worker was killed and is restarted", c, s) + tail(err)
        case let .protocolViolation(m): return "python adapter: protocol: \(m)"
        }
    }
}

/// Reads newline-terminated lines from a file descriptor on its own thread; `next(timeout:)`
/// waits for one. Keeps a bounded tail when used for stderr.
final class LineReader: @unchecked Sendable {
    private let lock = NSLock()
    private let available = DispatchSemaphore(value: 0)
    private var lines: [String] = []
    private var partial = Data()
    private(set) var ended = false
    private let keepTail: Int?
    private let echo: Bool
    private var tailLines: [String] = []

    /// `keepTail`: remember only the last n lines (stderr), never block on them.
    init(fd: Int32, keepTail: Int? = nil, echo: Bool = false) {
        self.keepTail = keepTail
        self.echo = echo
        let thread = Thread { [self] in self.loop(fd) }
        thread.stackSize = 1 << 20
        thread.start()
    }

    private func loop(_ fd: Int32) {
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            if echo { _ = buffer.withUnsafeBytes { write(2, $0.baseAddress, n) } }
            lock.lock()
            partial.append(contentsOf: buffer[0..<n])
            while let nl = partial.firstIndex(of: 10) {
                let line = String(decoding: partial[partial.startIndex..<nl], as: UTF8.self)
                partial.removeSubrange(partial.startIndex...nl)
                if let k = keepTail {
                    tailLines.append(line)
                    if tailLines.count > k { tailLines.removeFirst(tailLines.count - k) }
                } else {
                    lines.append(line)
                    available.signal()
                }
            }
            lock.unlock()
        }
        close(fd)
        lock.lock()
        if !partial.isEmpty, keepTail != nil { tailLines.append(String(decoding: partial, as: UTF8.self)) }
        ended = true
        lock.unlock()
        available.signal()
    }

    /// The next line, or nil at end of stream or after `timeout` seconds (`ended` tells which).
    func next(timeout: Double) -> String? {
        let deadline = DispatchTime.now() + timeout
        while true {
            lock.lock()
            if !lines.isEmpty { let l = lines.removeFirst(); lock.unlock(); return l }
            if ended { lock.unlock(); return nil }
            lock.unlock()
            if available.wait(timeout: deadline) == .timedOut { return nil }
        }
    }

    var isEnded: Bool { lock.lock(); defer { lock.unlock() }; return ended }

    /// The last lines kept (stderr).
    var tail: String { lock.lock(); defer { lock.unlock() }; return tailLines.joined(separator: "\n") }
}

/// One long-lived Python process running `python/moecheck_worker.py ADAPTER.py`: requests
/// and replies are JSON lines (docs/python-adapters.md), tensors travel as files in a
/// memory-backed directory (`/dev/shm` where there is one).
final class PythonWorker {
    let python: String
    let adapter: String
    let script: String
    private let process = Process()
    private let toWorker: FileHandle
    private let replies: LineReader
    private let stderrTail: LineReader
    /// The hello reply.
    private(set) var hello: [String: Any] = [:]

    /// Starts the worker and waits (at most `timeout` s) for its hello.
    init(python: String, adapter: String, script: String, timeout: Double, echoStderr: Bool) throws {
        self.python = python
        self.adapter = adapter
        self.script = script
        let stdin = Pipe(), stdout = Pipe(), stderr = Pipe()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = [python, "-u", script, adapter]
        var env = ProcessInfo.processInfo.environment
        let dir = (script as NSString).deletingLastPathComponent
        env["PYTHONPATH"] = [dir, env["PYTHONPATH"]].compactMap { $0 }.filter { !$0.isEmpty }.joined(separator: ":")
        env["PYTHONUNBUFFERED"] = "1"
        for (k, v) in Self.threadEnvironment(env, blasThreads: BLAS.threads) { env[k] = v }
        process.environment = env
        process.standardInput = stdin
        process.standardOutput = stdout
        process.standardError = stderr
        do { try process.run() } catch {
            throw PythonAdapterError.setup("cannot start '\(python)' (--python-exe): \(error)")
        }
        toWorker = stdin.fileHandleForWriting
        replies = LineReader(fd: dup(stdout.fileHandleForReading.fileDescriptor))
        stderrTail = LineReader(fd: dup(stderr.fileHandleForReading.fileDescriptor), keepTail: 40, echo: echoStderr)
        try? stdout.fileHandleForReading.close()
        try? stderr.fileHandleForReading.close()
        guard let line = replies.next(timeout: timeout) else {
            let status = stop(force: true)
            let err = stderrTail.tail
            if err.contains("No such file") && err.contains(python) || status.contains("127") {
                throw PythonAdapterError.setup("cannot run '\(python)' (--python-exe / MOECHECK_PYTHON): \(err.isEmpty ? status : err)")
            }
            throw PythonAdapterError.adapter(adapter: adapter, kind: "startup", message: replies.isEnded ? "the worker exited (\(status)) before saying hello"
                                             : "no hello within \(Int(timeout)) s", traceback: err)
        }
        let reply = try Self.decode(line)
        guard reply["ok"] as? Bool == true else {
            _ = stop(force: false)
            throw PythonAdapterError.adapter(adapter: adapter, kind: reply["error"] as? String ?? "startup",
                                             message: reply["message"] as? String ?? line, traceback: reply["traceback"] as? String ?? stderrTail.tail)
        }
        hello = reply
    }

    deinit { _ = stop(force: false) }

    static func decode(_ line: String) throws -> [String: Any] {
        guard let data = line.data(using: .utf8), let o = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw PythonAdapterError.protocolViolation("not a JSON object: \(line.prefix(200))")
        }
        return o
    }

    var stderr: String { stderrTail.tail }

    /// The worker's exit status in words, once it has exited.
    var status: String {
        guard !process.isRunning else { return "running" }
        return process.terminationReason == .uncaughtSignal ? "killed by signal \(process.terminationStatus)" : "exit code \(process.terminationStatus)"
    }

    /// Sends one request and waits for its reply. Throws `died`/`timedOut` naming `caseName`.
    func request(_ object: [String: Any], caseName: String, timeout: Double) throws -> [String: Any] {
        let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) + Data([10])
        do { try toWorker.write(contentsOf: data) } catch {
            _ = stop(force: true)
            throw PythonAdapterError.died(case: caseName, status: status, stderr: stderrTail.tail)
        }
        guard let line = replies.next(timeout: timeout) else {
            if replies.isEnded {
                process.waitUntilExit()
                throw PythonAdapterError.died(case: caseName, status: status, stderr: stderrTail.tail)
            }
            _ = stop(force: true)
            throw PythonAdapterError.timedOut(case: caseName, seconds: timeout, stderr: stderrTail.tail)
        }
        return try Self.decode(line)
    }

    /// Ends the worker: `quit` (or SIGKILL when `force`), waiting at most 5 s. Returns its status.
    @discardableResult
    func stop(force: Bool) -> String {
        guard process.isRunning else { return status }
        if !force {
            try? toWorker.write(contentsOf: Data("{\"op\":\"quit\"}\n".utf8))
            try? toWorker.close()
            let deadline = Date().addingTimeInterval(5)
            while process.isRunning && Date() < deadline { usleep(10_000) }
        }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        return status
    }

    /// CPU threads of the worker's own libraries (torch's intra-op pool, NumPy's BLAS, OpenMP):
    /// `MOECHECK_WORKER_THREADS`, else this process's OpenBLAS thread count — so a campaign of
    /// n shards × t threads does not start workers that each spin up a pool as wide as the
    /// machine. Variables the user set are kept.
    static func threadEnvironment(_ env: [String: String], blasThreads: Int) -> [String: String] {
        let n = env["MOECHECK_WORKER_THREADS"].flatMap { Int($0) }.map { Swift.max(1, $0) } ?? Swift.max(1, blasThreads)
        var out = ["MOECHECK_WORKER_THREADS": String(n)]
        for k in ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"] where env[k] == nil { out[k] = String(n) }
        return out
    }

    /// The directory holding `moecheck_worker.py`: `$MOECHECK_PYTHON_DIR`, else `python/` next
    /// to the executable or in `../share/moecheck/`, else `python/` in the working directory, else
    /// the source tree this binary was built from.
    static func locateScripts() throws -> String {
        let fm = FileManager.default
        var candidates: [String] = []
        if let d = ProcessInfo.processInfo.environment["MOECHECK_PYTHON_DIR"] { candidates.append(d) }
        let exe = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
        candidates.append(exe.appendingPathComponent("python").path)
        candidates.append(exe.appendingPathComponent("../share/moecheck/python").standardized.path)
        candidates.append(fm.currentDirectoryPath + "/python")
        let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        candidates.append(source.appendingPathComponent("python").path)
        for c in candidates where fm.fileExists(atPath: c + "/moecheck_worker.py") { return c }
        throw PythonAdapterError.setup("moecheck_worker.py not found (looked in \(candidates.joined(separator: ", "))); set MOECHECK_PYTHON_DIR to the repository's python/ folder")
    }

    /// A fresh directory for tensor files: under /dev/shm when it is writable, else the temp dir.
    static func scratchDirectory() throws -> String {
        let base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : NSTemporaryDirectory()
        var template = Array("\(base)/moecheck-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw PythonAdapterError.setup("cannot create a scratch directory in \(base)") }
        let dir = String(cString: p)
        scratchLock.lock(); scratchDirectories.insert(dir); scratchLock.unlock()
        return dir
    }

    nonisolated(unsafe) private static var scratchDirectories = Set<String>()
    private static let scratchLock = NSLock()

    /// Removes a scratch directory made by `scratchDirectory`.
    static func removeScratch(_ dir: String) {
        try? FileManager.default.removeItem(atPath: dir)
        scratchLock.lock(); scratchDirectories.remove(dir); scratchLock.unlock()
    }

    /// Removes every scratch directory still there (a process stopped by a signal: the case
    /// files in /dev/shm are memory).
    static func removeAllScratch() {
        scratchLock.lock()
        let all = scratchDirectories
        scratchDirectories = []
        scratchLock.unlock()
        for d in all { try? FileManager.default.removeItem(atPath: d) }
    }
}

/// The Python adapters' scratch directories (case files and outputs in /dev/shm).
public enum PythonScratch {
    /// Removes every one still there: for a process about to exit on a signal.
    public static func removeAll() { PythonWorker.removeAllScratch() }
}
