import Foundation
import Testing
import MoECheckTestSupport

// Running the built `moecheck` executable for the end-to-end tests (STYLE: "End-to-end tests run
// the built executable and check its output and exit code").

/// What one run of the tool did.
struct ToolRun: CustomStringConvertible {
    let arguments: [String]
    /// The exit status, when the process exited (nil when a signal ended it).
    let exitStatus: Int32?
    /// The signal that ended the process, if one did.
    let signal: Int32?
    let stdout: String
    let stderr: String
    var output: String { stdout + stderr }

    var description: String {
        let how = exitStatus.map { "exit \($0)" } ?? "killed by signal \(signal ?? -1)"
        return "moecheck \(arguments.joined(separator: " ")) → \(how)\n--- stdout ---\n\(stdout.suffix(3000))\n--- stderr ---\n\(stderr.suffix(3000))"
    }
}

enum MoECheckTool {
    /// Why the end-to-end suites are skipped when the executable is missing.
    static let missingReason = "the moecheck executable was not found next to the test runner or under .build*/release (MOECHECK_BIN overrides)"

    /// The `moecheck` executable built with the tests: next to the test runner (the build
    /// products directory), else in a scratch path under the repository (`.build-bt`, `.build`),
    /// release before debug. `MOECHECK_BIN` overrides.
    static let executable: String? = {
        let fm = FileManager.default
        var candidates: [String] = []
        if let env = ProcessInfo.processInfo.environment["MOECHECK_BIN"], !env.isEmpty { candidates.append(env) }
        var productDirectories: [URL] = []
        if let exe = Bundle.main.executableURL { productDirectories.append(exe.deletingLastPathComponent()) }
        productDirectories.append(Bundle.main.bundleURL)
        productDirectories.append(Bundle.main.bundleURL.deletingLastPathComponent())
        if let arg0 = CommandLine.arguments.first {
            productDirectories.append(URL(fileURLWithPath: arg0).resolvingSymlinksInPath().deletingLastPathComponent())
        }
        // an .xctest bundle directory (macOS) sits inside the products directory too
        for d in productDirectories {
            candidates.append(d.appendingPathComponent("moecheck").path)
            candidates.append(d.deletingLastPathComponent().appendingPathComponent("moecheck").path)
        }
        for scratch in [".build-bt", ".build"] {
            for config in ["release", "debug"] {
                candidates.append(repositoryRoot.appendingPathComponent("\(scratch)/\(config)/moecheck").path)
            }
        }
        return candidates.first { fm.isExecutableFile(atPath: $0) && !isDirectory($0) }
    }()

    static var isAvailable: Bool { executable != nil }

    /// `XDG_CACHE_HOME` of every run (the default reference cache lives under it): one scratch
    /// directory for all test runs, kept small by the cache's own size cap.
    static let cacheHome = FileManager.default.temporaryDirectory.appendingPathComponent("moecheck-tests-xdg-cache")

    private static func isDirectory(_ path: String) -> Bool {
        var d: ObjCBool = false
        return FileManager.default.fileExists(atPath: path, isDirectory: &d) && d.boolValue
    }

    /// Runs the tool with `arguments` in `directory`; stdout and stderr go to files (no pipe can
    /// fill up). `environment` entries are added to (or, with nil, removed from) the test's own.
    /// `launcher` (e.g. `["/usr/bin/taskset", "-c", "0"]`) runs the tool through another program.
    static func run(_ arguments: [String], environment: [String: String?] = [:], in directory: URL? = nil,
                    timeout: TimeInterval = 120, launcher: [String] = []) throws -> ToolRun {
        guard let executable else { throw ToolMissing() }
        let dir = try TemporaryDirectory("run")
        let out = dir.path("stdout"), err = dir.path("stderr")
        _ = FileManager.default.createFile(atPath: out, contents: nil)
        _ = FileManager.default.createFile(atPath: err, contents: nil)
        let outHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: out))
        let errHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: err))
        let p = Process()
        if let first = launcher.first {
            p.executableURL = URL(fileURLWithPath: first)
            p.arguments = Array(launcher.dropFirst()) + [executable] + arguments
        } else {
            p.executableURL = URL(fileURLWithPath: executable)
            p.arguments = arguments
        }
        var env = ProcessInfo.processInfo.environment
        env["MOECHECK_BLAS_THREADS"] = "1"
        // the reference cache goes to this test process's scratch directory, never ~/.cache
        env["XDG_CACHE_HOME"] = cacheHome.path
        for (k, v) in environment { env[k] = v }
        p.environment = env
        if let directory { p.currentDirectoryURL = directory }
        p.standardOutput = outHandle
        p.standardError = errHandle
        p.standardInput = FileHandle.nullDevice
        try p.run()
        let deadline = Date().addingTimeInterval(timeout)
        while p.isRunning && Date() < deadline { usleep(20_000) }
        if p.isRunning {
            p.terminate()
            p.waitUntilExit()
        }
        p.waitUntilExit()
        try? outHandle.close()
        try? errHandle.close()
        let stdout = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        let stderr = (try? String(contentsOfFile: err, encoding: .utf8)) ?? ""
        let exited = p.terminationReason == .exit
        return ToolRun(arguments: arguments, exitStatus: exited ? p.terminationStatus : nil,
                       signal: exited ? nil : p.terminationStatus, stdout: stdout, stderr: stderr)
    }

    struct ToolMissing: Error, CustomStringConvertible {
        var description: String { "the moecheck executable was not found next to the tests (build it with swift build -c release)" }
    }
}
