import Foundation
#if canImport(Glibc)
import Glibc
#endif
import MoEReference

/// A content-addressed on-disk cache of reference results (`verify` and `fuzz`; `--cache DIR`,
/// `--no-cache`, `--cache-max-bytes`).
///
/// **Key.** Everything a reference result depends on, as text (`ReferenceCacheKey`): the cache
/// and codec format versions, moecheck's version and a digest of the running executable (a
/// rebuilt oracle never reads an older one's results), OpenBLAS's configuration and pinned thread
/// count, the case's content (a synthetic spec's JSON; a case file's content digest, its
/// `config.json` beside it and the prefix), the layer variant the kernel is judged on (routed
/// experts only, stored or kernel inputs), the full recipe JSON and every `ReferenceOptions`
/// field. An entry's file name is the key's SHA-256; the entry also holds the key and is used
/// only when it matches. Teacher-forced reruns (a routing override) are never cached.
///
/// **Entries.** `<dir>/references/v<N>/<2 hex>/<64 hex>.ref`: a magic, the container version,
/// the key, the `ReferenceCodec` payload and an XXH64 checksum of all of it. A write goes to a
/// temporary file in the same directory, is fsynced and renamed over the name, so a reader
/// sees a whole entry or none, also with several shards writing at once; an entry that is short,
/// fails its checksum or does not decode is counted as corrupt, removed and recomputed.
///
/// **Size.** After the first store and whenever this process has written a tenth of the cap
/// since its last scan, the least recently used entries (modification time, touched on every
/// hit) are removed until the whole is at most 90 % of `maxBytes`: one process keeps the cache
/// under the cap; n shards writing at once may overshoot it by up to n tenths between scans. An
/// entry over half the cap is not stored. Temporary files older than an hour (a killed writer)
/// are removed by the scan.
public final class ReferenceCache: @unchecked Sendable {
    /// Version of the entry container and directory layout (part of every key and the path).
    public static let containerVersion = 1
    static let magic = Array("MOECHKRC".utf8)
    public static let defaultMaxBytes = 2 << 30

    /// The cache's root (`--cache`), and where its entries and case-file digests live.
    public let root: URL
    let entries: URL
    let fileDigests: URL
    public let maxBytes: Int

    /// What the cache did in this process.
    public struct Counters: Sendable, Equatable {
        public var hits = 0, misses = 0, stores = 0, corrupt = 0, evicted = 0, tooLarge = 0, writeFailures = 0
        public var bytesRead = 0, bytesWritten = 0
        public init() {}
    }
    public var counters: Counters { sync { state.counters } }

    struct State {
        var counters = Counters()
        var bytesSinceScan = 0
        var scanned = false
        var warned = false
    }
    private var state = State()
    private let lock = NSLock()

    private func sync<T>(_ body: () throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }

    /// Case files' content digests, with their fast-path records in this cache.
    public var caseDigests: CaseFileDigests { CaseFileDigests(directory: fileDigests) }
    /// Where warnings go (a cache that cannot be used never stops a run).
    let warn: @Sendable (String) -> Void

    /// `$XDG_CACHE_HOME/moecheck`, else `~/.cache/moecheck`.
    public static var defaultDirectory: String {
        let env = ProcessInfo.processInfo.environment
        if let xdg = env["XDG_CACHE_HOME"], xdg.hasPrefix("/") { return (xdg as NSString).appendingPathComponent("moecheck") }
        let home = env["HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? NSHomeDirectory()
        return (home as NSString).appendingPathComponent(".cache/moecheck")
    }

    /// Opens (creating) the cache at `directory`; nil, after one warning naming the directory and
    /// the problem, where it cannot be created or written (the run goes on uncached).
    public static func open(directory: String, maxBytes: Int = defaultMaxBytes,
                            warn: @escaping @Sendable (String) -> Void) -> ReferenceCache? {
        let root = URL(fileURLWithPath: directory)
        let cache = ReferenceCache(root: root, maxBytes: maxBytes, warn: warn)
        do {
            try FileManager.default.createDirectory(at: cache.entries, withIntermediateDirectories: true)
            try FileManager.default.createDirectory(at: cache.fileDigests, withIntermediateDirectories: true)
            guard access(cache.entries.path, W_OK | X_OK) == 0 else { throw CacheProblem("not writable") }
        } catch {
            warn("reference cache \(directory): cannot be used (\(Self.reason(error))); running without the cache")
            return nil
        }
        return cache
    }

    init(root: URL, maxBytes: Int, warn: @escaping @Sendable (String) -> Void) {
        self.root = root
        self.maxBytes = Swift.max(1, maxBytes)
        self.entries = root.appendingPathComponent("references/v\(Self.containerVersion)")
        self.fileDigests = root.appendingPathComponent("case-digests")
        self.warn = warn
    }

    struct CacheProblem: Error, CustomStringConvertible {
        let description: String
        init(_ d: String) { description = d }
    }

    static func reason(_ error: Error) -> String {
        if let e = error as? CocoaError, let u = e.underlying as? POSIXError { return u.localizedDescription }
        return "\(error)"
    }

    /// Warns once per process about a write that failed, then stays quiet.
    func warnOnce(_ s: String) {
        let first = sync { () -> Bool in
            defer { state.warned = true }
            return !state.warned
        }
        if first { warn(s) }
    }

    func path(for key: ReferenceCacheKey) -> URL {
        let name = key.fileName
        return entries.appendingPathComponent(String(name.prefix(2))).appendingPathComponent(name + ".ref")
    }

    // MARK: lookup

    /// The result stored under `key`, or nil (a miss; a corrupt entry is removed and counted).
    /// A hit touches the entry's times (LRU).
    public func lookup(_ key: ReferenceCacheKey) -> ReferenceResult? {
        let url = path(for: key)
        let fd = Glibc.open(url.path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            sync { state.counters.misses += 1 }
            return nil
        }
        defer { close(fd) }
        do {
            let bytes = try Self.readAll(fd)
            let result = try Self.decodeEntry(bytes, key: key)
            _ = futimens(fd, nil)
            sync { state.counters.hits += 1; state.counters.bytesRead += bytes.count }
            return result
        } catch {
            unlink(url.path)
            sync { state.counters.corrupt += 1; state.counters.misses += 1 }
            warn("reference cache: \(url.path): \(Self.reason(error)); removed, recomputing")
            return nil
        }
    }

    static func readAll(_ fd: Int32) throws -> [UInt8] {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw CacheProblem("cannot stat: \(String(cString: strerror(errno)))") }
        let size = Int(st.st_size)
        var bytes = [UInt8](repeating: 0, count: size)
        var done = 0
        try bytes.withUnsafeMutableBytes { buffer in
            while done < size {
                let n = pread(fd, buffer.baseAddress! + done, size - done, off_t(done))
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw CacheProblem("short read at byte \(done) of \(size)") }
                done += n
            }
        }
        return bytes
    }

    /// The container: magic, version, key, payload, checksum; every length checked against the file.
    static func decodeEntry(_ bytes: [UInt8], key: ReferenceCacheKey) throws -> ReferenceResult {
        try bytes.withUnsafeBytes { raw in
            let n = raw.count
            guard n >= magic.count + 4 + 8 + 8 + 8, Array(raw[0..<magic.count]) == magic else {
                throw CacheProblem("not a reference cache entry (bad magic or shorter than a header: \(n) bytes)")
            }
            func u64(_ at: Int) -> UInt64 { UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: at, as: UInt64.self)) }
            let stored = XXHash64.hash(UnsafeRawBufferPointer(rebasing: raw[0..<(n - 8)]))
            guard stored == u64(n - 8) else { throw CacheProblem("checksum mismatch (torn or corrupted entry)") }
            var at = magic.count
            let version = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: at, as: UInt32.self))
            at += 4
            guard version == containerVersion else { throw CacheProblem("container version \(version), expected \(containerVersion)") }
            let keyLength = Int(clamping: u64(at)); at += 8
            guard keyLength <= n - at - 16 else { throw CacheProblem("key length \(keyLength) past the end") }
            let storedKey = String(decoding: UnsafeRawBufferPointer(rebasing: raw[at..<(at + keyLength)]), as: UTF8.self)
            at += keyLength
            guard storedKey == key.text else { throw CacheProblem("holds another key (a digest collision or a moved file)") }
            let payloadLength = Int(clamping: u64(at)); at += 8
            guard payloadLength == n - at - 8 else { throw CacheProblem("payload length \(payloadLength), the file has \(n - at - 8)") }
            return try ReferenceCodec.decode(UnsafeRawBufferPointer(rebasing: raw[at..<(at + payloadLength)]))
        }
    }

    static func encodeEntry(_ result: ReferenceResult, key: ReferenceCacheKey) throws -> [UInt8] {
        let payload = try ReferenceCodec.encode(result)
        let keyBytes = Array(key.text.utf8)
        var out: [UInt8] = []
        out.reserveCapacity(magic.count + 4 + 16 + keyBytes.count + payload.count + 8)
        out += magic
        withUnsafeBytes(of: UInt32(containerVersion).littleEndian) { out += $0 }
        withUnsafeBytes(of: UInt64(keyBytes.count).littleEndian) { out += $0 }
        out += keyBytes
        withUnsafeBytes(of: UInt64(payload.count).littleEndian) { out += $0 }
        out += payload
        let sum = out.withUnsafeBytes { XXHash64.hash($0) }
        withUnsafeBytes(of: sum.littleEndian) { out += $0 }
        return out
    }

    // MARK: store

    /// Stores `result` under `key` (temporary file, fsync, rename), then keeps the size cap.
    /// A failure to write warns once and leaves the run uncached for that entry.
    public func store(_ result: ReferenceResult, key: ReferenceCacheKey) {
        let bytes: [UInt8]
        do { bytes = try Self.encodeEntry(result, key: key) } catch {
            warnOnce("reference cache: cannot encode the result of \(key.fileName.prefix(12))… (\(error)); not stored")
            return
        }
        guard bytes.count <= maxBytes / 2 else {
            sync { state.counters.tooLarge += 1 }
            return
        }
        let url = path(for: key)
        do {
            try Self.writeAtomically(bytes, to: url)
        } catch {
            sync { state.counters.writeFailures += 1 }
            warnOnce("reference cache: cannot write \(url.path) (\(Self.reason(error))); results are not being stored")
            return
        }
        let scan = sync { () -> Bool in
            state.counters.stores += 1
            state.counters.bytesWritten += bytes.count
            state.bytesSinceScan += bytes.count
            return !state.scanned || state.bytesSinceScan > maxBytes / 10
        }
        if scan { evict() }
    }

    /// Writes `bytes` to a temporary file beside `url`, fsyncs it and renames it to `url`.
    static func writeAtomically(_ bytes: [UInt8], to url: URL) throws {
        let dir = url.deletingLastPathComponent()
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let tmp = dir.appendingPathComponent(".tmp-\(getpid())-\(UUID().uuidString)")
        let fd = Glibc.open(tmp.path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw CacheProblem("cannot create \(tmp.lastPathComponent): \(String(cString: strerror(errno)))") }
        var ok = false
        defer {
            close(fd)
            if !ok { unlink(tmp.path) }
        }
        try bytes.withUnsafeBytes { buffer in
            var done = 0
            while done < buffer.count {
                let n = Glibc.write(fd, buffer.baseAddress! + done, buffer.count - done)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw CacheProblem("write failed after \(done) of \(buffer.count) bytes: \(String(cString: strerror(errno)))") }
                done += n
            }
        }
        guard fsync(fd) == 0 else { throw CacheProblem("fsync failed: \(String(cString: strerror(errno)))") }
        guard rename(tmp.path, url.path) == 0 else { throw CacheProblem("rename failed: \(String(cString: strerror(errno)))") }
        ok = true
    }

    // MARK: size cap

    /// One entry on disk.
    struct Entry {
        let path: String
        let bytes: Int
        let modified: Double
    }

    /// Every entry and temporary file under `entries` (with the temporary files' paths apart).
    func scan() -> (entries: [Entry], temporaries: [Entry]) {
        var found: [Entry] = [], temporaries: [Entry] = []
        let fm = FileManager.default
        guard let shards = try? fm.contentsOfDirectory(atPath: entries.path) else { return ([], []) }
        for shard in shards {
            let dir = (entries.path as NSString).appendingPathComponent(shard)
            guard let names = try? fm.contentsOfDirectory(atPath: dir) else { continue }
            for name in names {
                let p = (dir as NSString).appendingPathComponent(name)
                var st = stat()
                guard lstat(p, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }
                let e = Entry(path: p, bytes: Int(st.st_size), modified: Double(st.st_mtim.tv_sec) + Double(st.st_mtim.tv_nsec) * 1e-9)
                if name.hasPrefix(".tmp-") { temporaries.append(e) } else if name.hasSuffix(".ref") { found.append(e) }
            }
        }
        return (found, temporaries)
    }

    /// Removes the least recently used entries until the cache holds at most 90 % of the cap,
    /// and temporary files older than an hour.
    public func evict() {
        let (found, temporaries) = scan()
        let now = Date().timeIntervalSince1970
        for t in temporaries where now - t.modified > 3600 { unlink(t.path) }
        var total = found.reduce(0) { $0 + $1.bytes }
        var removed = 0
        if total > maxBytes {
            let target = maxBytes / 10 * 9
            for e in found.sorted(by: { $0.modified < $1.modified }) where total > target {
                if unlink(e.path) == 0 || errno == ENOENT { total -= e.bytes; removed += 1 }
            }
        }
        sync {
            state.scanned = true
            state.bytesSinceScan = 0
            state.counters.evicted += removed
        }
    }

    /// Bytes of every entry now on disk.
    public var entryBytes: Int { scan().entries.reduce(0) { $0 + $1.bytes } }
}

extension ReferenceCache.Counters {
    /// `"reference cache DIR: N hits, M misses (K stored, X MB written), …"`.
    public func line(directory: String) -> String {
        var s = "reference cache \(directory): \(hits) hit(s), \(misses) miss(es)"
        s += String(format: " (%d stored, %.1f MB written, %.1f MB read)", stores, Double(bytesWritten) / 1e6, Double(bytesRead) / 1e6)
        if corrupt > 0 { s += ", \(corrupt) corrupt entr\(corrupt == 1 ? "y" : "ies") recomputed" }
        if evicted > 0 { s += ", \(evicted) evicted" }
        if tooLarge > 0 { s += ", \(tooLarge) result(s) over half the cap not stored" }
        if writeFailures > 0 { s += ", \(writeFailures) write failure(s)" }
        return s
    }
}

/// Parses a byte size: an integer with an optional K, M, G or T suffix (powers of 1024; `B`,
/// `iB` allowed after it), e.g. `2G`, `512MiB`, `1000000`.
public func parseByteSize(_ text: String) -> Int? {
    var s = text.trimmingCharacters(in: .whitespaces).uppercased()
    if s.hasSuffix("IB") { s.removeLast(2) } else if s.hasSuffix("B") { s.removeLast() }
    var multiplier = 1
    if let last = s.last, let power = ["K": 1, "M": 2, "G": 3, "T": 4][String(last)] {
        multiplier = 1 << (10 * power)
        s.removeLast()
    }
    guard let v = Double(s), v.isFinite, v > 0, v * Double(multiplier) < 9e18 else { return nil }
    return Int(v * Double(multiplier))
}
