import Foundation
#if canImport(Glibc)
import Glibc
#endif
import MoEReference

/// Everything a reference result depends on, as text; the cache's entry name is its SHA-256.
///
/// One `name=value` line per input (see `ReferenceCache` for the list). `ReferenceOptions` is
/// listed field by field through reflection, so an option added later is keyed without a change
/// here. The case's `splitK` is not an input: the reference never sees it (the bound covers any
/// split), so the split-K cases of one layer share one entry.
public struct ReferenceCacheKey: Sendable, Equatable, CustomStringConvertible {
    public let text: String
    /// SHA-256 of `text`, hex.
    public let fileName: String

    public init(text: String) {
        self.text = text
        fileName = SHA256.hash(Array(text.utf8))
    }

    public var description: String { fileName }

    /// How a case's layer is presented to the reference (beside the recipe and options).
    public struct LayerVariant: Sendable, Equatable {
        /// The shared expert left out (`RoutedOnlyLayer`: a kernel that dispatches routed experts only).
        public var routedOnly: Bool
        /// The hidden states as stored (a whole-layer kernel) rather than as the kernel takes them.
        public var storedInputs: Bool
        public init(routedOnly: Bool, storedInputs: Bool) { self.routedOnly = routedOnly; self.storedInputs = storedInputs }
    }

    /// The key of the reference of `source` under `recipe` and `options`; throws where the
    /// case's content or the build cannot be identified (the caller runs uncached).
    public static func make(source: CaseSource, variant: LayerVariant, recipe: Recipe, options: ReferenceOptions,
                            digests: CaseFileDigests) throws -> ReferenceCacheKey {
        let sorted = JSONEncoder()
        sorted.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var lines = [
            "cache=\(ReferenceCache.containerVersion)",
            "codec=\(ReferenceCodec.formatVersion)",
            "moecheck=\(moecheckVersion)",
            "build=\(try BuildIdentity.digest())",
            "openblas=\(BLAS.configuration)",
            "threads=" + (BLAS.configuredThreads.map { "\($0)" } ?? "not pinned"),
        ]
        switch source {
        case let .synthetic(spec):
            lines.append("spec=" + String(decoding: try sorted.encode(spec), as: UTF8.self))
        case let .file(path, prefix):
            lines.append("file=" + (try digests.digest(ofFile: path)))
            let beside = URL(fileURLWithPath: path).deletingLastPathComponent().appendingPathComponent("config.json").path
            if FileManager.default.fileExists(atPath: beside) { lines.append("config.json=" + (try digests.digest(ofFile: beside))) }
            lines.append("prefix=" + (prefix.map { "\"\($0)\"" } ?? "auto"))
        }
        lines.append("layer=\(variant.routedOnly ? "routed-only" : "whole"), inputs \(variant.storedInputs ? "as stored" : "as the kernel takes them")")
        lines.append("recipe=" + String(decoding: try sorted.encode(recipe), as: UTF8.self))
        lines.append("options=" + describeFields(options))
        return ReferenceCacheKey(text: lines.joined(separator: "\n"))
    }

    /// `label: value` of every stored property, in declaration order.
    static func describeFields(_ value: Any) -> String {
        Mirror(reflecting: value).children.map { "\($0.label ?? "?"): \($0.value)" }.joined(separator: ", ")
    }
}

/// The running executable's content digest: results of a rebuilt oracle never mix with an
/// older build's. Computed once per process (XXH-128 of `/proc/self/exe`, tens of milliseconds).
public enum BuildIdentity {
    static let computed: Result<String, Error> = Result {
        let path = "/proc/self/exe"
        let data = try Data(contentsOf: URL(fileURLWithPath: path), options: .alwaysMapped)
        return data.withUnsafeBytes { XXHash64.digest128($0) } + ":\(data.count)"
    }

    public static func digest() throws -> String {
        do { return try computed.get() } catch {
            throw ReferenceCache.CacheProblem("cannot read the running executable to identify the build (\(error))")
        }
    }
}

/// Content digests of case files (XXH-128 over the file, memory-mapped), with a fast path: the
/// digest is recorded under the file's (path, device, inode, size, modification and change
/// times) in the cache's `case-digests/`, and read back while those are unchanged. A file changed
/// less than `settleSeconds` (2) ago is hashed each time (its times might not yet show a second
/// change: file times tick in milliseconds).
public struct CaseFileDigests: Sendable {
    /// Where fast-path records live (nil: always hash).
    public let directory: URL?
    /// A file changed this recently is hashed every time.
    public var settleSeconds: Double
    public init(directory: URL?, settleSeconds: Double = 2) { self.directory = directory; self.settleSeconds = settleSeconds }

    public func digest(ofFile path: String) throws -> String {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw ReferenceCache.CacheProblem("\(path): cannot stat (\(String(cString: strerror(errno))))")
        }
        let modified = Double(st.st_mtim.tv_sec) + Double(st.st_mtim.tv_nsec) * 1e-9
        let changed = Double(st.st_ctim.tv_sec) + Double(st.st_ctim.tv_nsec) * 1e-9
        let settled = Date().timeIntervalSince1970 - Swift.max(modified, changed) > settleSeconds
        let real = URL(fileURLWithPath: path).resolvingSymlinksInPath().path
        let identity = "\(real)|\(st.st_dev)|\(st.st_ino)|\(st.st_size)|\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)|\(st.st_ctim.tv_sec).\(st.st_ctim.tv_nsec)"
        let record = directory?.appendingPathComponent(SHA256.hash(Array(identity.utf8)))
        if settled, let record, let text = try? String(contentsOf: record, encoding: .utf8), text.count == 32 + 1 + String(st.st_size).count {
            return text
        }
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path), options: .alwaysMapped) } catch {
            throw ReferenceCache.CacheProblem("\(path): cannot read to identify the case (\(error))")
        }
        let digest = data.withUnsafeBytes { XXHash64.digest128($0) } + ":\(data.count)"
        if settled, let record { try? ReferenceCache.writeAtomically(Array(digest.utf8), to: record) }
        return digest
    }
}
