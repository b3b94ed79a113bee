import Foundation

/// The repository root (…/Tests/MoECheckTestSupport/Files.swift → …).
public let repositoryRoot: URL = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

/// Path of a file in the package (`Goldens/external/...`, `Kernels/include/...`).
public func packagePath(_ relative: String) -> String {
    repositoryRoot.appendingPathComponent(relative).path
}

/// A fresh scratch file path under the temp directory (not created).
public func scratchFile(_ name: String, prefix: String = "moecheck") -> String {
    FileManager.default.temporaryDirectory.appendingPathComponent("\(prefix)-\(UUID().uuidString)-\(name)").path
}

/// A temporary directory removed when the value goes away.
public final class TemporaryDirectory {
    public let url: URL
    public init(_ label: String) throws {
        let safe = label.filter { $0.isLetter || $0.isNumber || $0 == "-" }
        url = FileManager.default.temporaryDirectory
            .appendingPathComponent("moecheck-\(safe.prefix(40))-\(getpid())-\(UUID().uuidString.prefix(8))", isDirectory: true)
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }
    public func path(_ name: String) -> String { url.appendingPathComponent(name).path }
    deinit { try? FileManager.default.removeItem(at: url) }
}

/// A fresh directory under the system temp directory, removed after `body`.
public func withScratchDirectory<R>(_ label: String = #function, _ body: (URL) throws -> R) throws -> R {
    let dir = try TemporaryDirectory(label)
    return try withExtendedLifetime(dir) { try body(dir.url) }
}

/// The resident set size of this process in bytes (/proc/self/statm, field 2).
public func residentBytes() -> Int? {
    guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return nil }
    let fields = text.split(separator: " ")
    guard fields.count > 1, let pages = Int(fields[1]) else { return nil }
    return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
}
