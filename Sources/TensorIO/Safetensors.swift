import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A safetensors file opened by memory-mapping it: tensors are views into the mapping, so a
/// multi-gigabyte checkpoint shard is opened without reading it into memory.
///
/// Layout: 8-byte little-endian header length `N`, `N` bytes of JSON
/// (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`),
/// then the data region; offsets are relative to the data region. Opening validates everything
/// the format promises — header within the file, valid JSON, known dtypes, non-negative shapes,
/// byte lengths that match shapes, offsets inside the data region that cover it with neither
/// overlap nor gap — and reports the first violation with the file and tensor named.
public final class SafetensorsFile: @unchecked Sendable {
    public let path: String
    public let metadata: [String: String]
    /// Tensor names in file (offset) order.
    public let names: [String]
    private let entries: [String: Entry]
    private let storage: ByteStorage
    private let dataStart: Int

    struct Entry {
        let dtype: DType
        let shape: [Int]
        let begin: Int
        let end: Int
    }

    /// Largest JSON header accepted (the reference implementation's limit is 100 MB).
    public static let maximumHeaderBytes = 100_000_000

    public init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else {
            throw TensorIOError(file: path, "cannot open: \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw TensorIOError(file: path, "cannot stat: \(String(cString: strerror(errno)))") }
        if (st.st_mode & S_IFMT) == S_IFDIR { throw TensorIOError(file: path, "is a directory, not a safetensors file") }
        let size = Int(st.st_size)
        guard size >= 8 else {
            throw TensorIOError(file: path, "truncated: \(size) bytes, shorter than the 8-byte header length")
        }
        guard let map = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), map != MAP_FAILED else {
            throw TensorIOError(file: path, "cannot map \(size) bytes: \(String(cString: strerror(errno)))")
        }
        let storage = ByteStorage(base: UnsafeRawPointer(map), count: size, release: { munmap(map, size) })
        self.storage = storage
        let headerLength = UInt64(littleEndian: storage.base.loadUnaligned(as: UInt64.self))
        guard headerLength <= UInt64(size - 8) else {
            throw TensorIOError(file: path, "header length \(headerLength) runs past the end of the \(size)-byte file (truncated or not safetensors)")
        }
        guard headerLength <= UInt64(Self.maximumHeaderBytes) else {
            throw TensorIOError(file: path, "header length \(headerLength) exceeds the \(Self.maximumHeaderBytes)-byte limit")
        }
        let n = Int(headerLength)
        dataStart = 8 + n
        let headerData = Data(bytes: storage.base + 8, count: n)
        let json: Any
        do {
            json = try JSONSerialization.jsonObject(with: headerData, options: [])
        } catch {
            throw TensorIOError(file: path, "header is not valid JSON (\(n) bytes): \(error.localizedDescription)")
        }
        guard let object = json as? [String: Any] else {
            throw TensorIOError(file: path, "header JSON is not an object")
        }
        var metadata: [String: String] = [:]
        var entries: [String: Entry] = [:]
        let dataSize = size - dataStart
        for (name, value) in object {
            if name == "__metadata__" {
                metadata = try Self.parseMetadata(value, path: path)
            } else {
                entries[name] = try Self.parseEntry(name, value, dataSize: dataSize, path: path)
            }
        }
        self.metadata = metadata
        self.entries = entries
        self.names = try Self.checkCoverage(entries, dataSize: dataSize, path: path)
    }

    /// `__metadata__`: an object of strings.
    static func parseMetadata(_ value: Any, path: String) throws -> [String: String] {
        guard let m = value as? [String: Any] else {
            throw TensorIOError(file: path, "__metadata__ is not an object of strings")
        }
        var metadata: [String: String] = [:]
        for (k, v) in m {
            guard let s = v as? String else {
                throw TensorIOError(file: path, "__metadata__ key '\(k)' is not a string")
            }
            metadata[k] = s
        }
        return metadata
    }

    /// One tensor's header entry: a known dtype, a shape of non-negative integers, and
    /// `data_offsets` inside the data region holding exactly the shape's bytes.
    static func parseEntry(_ name: String, _ value: Any, dataSize: Int, path: String) throws -> Entry {
        guard let e = value as? [String: Any] else {
            throw TensorIOError(file: path, tensor: name, "header entry is not an object")
        }
        guard let dtypeName = e["dtype"] as? String else {
            throw TensorIOError(file: path, tensor: name, "missing 'dtype'")
        }
        guard let dtype = DType(rawValue: dtypeName) else {
            throw TensorIOError(file: path, tensor: name,
                                "unknown dtype '\(dtypeName)' (supported: \(DType.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        guard let shapeAny = e["shape"] as? [Any] else {
            throw TensorIOError(file: path, tensor: name, "missing or non-array 'shape'")
        }
        var shape: [Int] = []
        for d in shapeAny {
            guard let n = d as? NSNumber, let v = Int(exactly: n.doubleValue), v >= 0 else {
                throw TensorIOError(file: path, tensor: name, "shape \(shapeAny) has a dimension that is not a non-negative integer")
            }
            shape.append(v)
        }
        guard let offs = e["data_offsets"] as? [Any], offs.count == 2,
              let b = (offs[0] as? NSNumber).flatMap({ Int(exactly: $0.doubleValue) }),
              let en = (offs[1] as? NSNumber).flatMap({ Int(exactly: $0.doubleValue) }) else {
            throw TensorIOError(file: path, tensor: name, "'data_offsets' must be two integers")
        }
        guard b >= 0, en >= b else {
            throw TensorIOError(file: path, tensor: name, "data_offsets [\(b), \(en)] are not an ascending non-negative range")
        }
        guard en <= dataSize else {
            throw TensorIOError(file: path, tensor: name,
                                "data_offsets [\(b), \(en)] run past the \(dataSize)-byte data region (file truncated?)")
        }
        var elements = 1
        for d in shape {
            let (m, overflow) = elements.multipliedReportingOverflow(by: d)
            guard !overflow else { throw TensorIOError(file: path, tensor: name, "shape \(shape) overflows") }
            elements = m
        }
        let (expected, bytesOverflow) = elements.multipliedReportingOverflow(by: dtype.byteSize)
        guard !bytesOverflow else { throw TensorIOError(file: path, tensor: name, "shape \(shape) of \(dtype) overflows (byte count)") }
        guard expected == en - b else {
            throw TensorIOError(file: path, tensor: name,
                                "shape \(shape) of \(dtype) needs \(expected) bytes but data_offsets [\(b), \(en)] hold \(en - b)")
        }
        return Entry(dtype: dtype, shape: shape, begin: b, end: en)
    }

    /// The data region must be covered exactly: sorted ranges, no overlap, no gap, no tail.
    /// Returns the tensor names in data order.
    static func checkCoverage(_ entries: [String: Entry], dataSize: Int, path: String) throws -> [String] {
        let sorted = entries.sorted { ($0.value.begin, $0.value.end, $0.key) < ($1.value.begin, $1.value.end, $1.key) }
        var cursor = 0
        for (name, e) in sorted {
            if e.begin < cursor {
                throw TensorIOError(file: path, tensor: name, "data_offsets [\(e.begin), \(e.end)] overlap the previous tensor (ends at \(cursor))")
            }
            if e.begin > cursor {
                throw TensorIOError(file: path, tensor: name, "gap of \(e.begin - cursor) bytes before data_offsets [\(e.begin), \(e.end)]")
            }
            cursor = e.end
        }
        if cursor != dataSize {
            throw TensorIOError(file: path, "data region holds \(dataSize) bytes but the tensors cover \(cursor)")
        }
        return sorted.map(\.key)
    }

    public func contains(_ name: String) -> Bool { entries[name] != nil }

    public func dtype(of name: String) -> DType? { entries[name]?.dtype }
    public func shape(of name: String) -> [Int]? { entries[name]?.shape }

    /// The tensor `name`, a view into the mapping (no copy).
    public func tensor(_ name: String) throws -> Tensor {
        guard let e = entries[name] else {
            throw TensorIOError(file: path, tensor: name, "not found")
        }
        return Tensor(dtype: e.dtype, shape: e.shape, storage: storage, byteOffset: dataStart + e.begin)
    }
}

/// Writes safetensors files: tensors in the given order, 8-byte aligned header (padded with
/// spaces, as the reference implementation does), `__metadata__` when non-empty.
public enum SafetensorsWriter {
    public static func write(_ tensors: [(String, Tensor)], metadata: [String: String] = [:], to path: String) throws {
        var seen = Set<String>()
        var header: [String: Any] = [:]
        var offset = 0
        for (name, t) in tensors {
            guard name != "__metadata__", seen.insert(name).inserted else {
                throw TensorIOError(file: path, tensor: name, "duplicate or reserved tensor name")
            }
            header[name] = ["dtype": t.dtype.rawValue, "shape": t.shape, "data_offsets": [offset, offset + t.byteCount]] as [String: Any]
            offset += t.byteCount
        }
        if !metadata.isEmpty { header["__metadata__"] = metadata }
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while (8 + json.count) % 8 != 0 { json.append(0x20) }
        var head = Data(capacity: 8 + json.count)
        var n = UInt64(json.count).littleEndian
        withUnsafeBytes(of: &n) { head.append(contentsOf: $0) }
        head.append(json)
        // streamed from the tensors' own storage into a temporary file renamed into place: no
        // copy of the whole file in memory (a 1.6 GB case file used to be assembled in one Data)
        let tmp = path + ".partial-\(getpid())"
        guard let f = fopen(tmp, "wb") else {
            throw TensorIOError(file: path, "cannot write: \(String(cString: strerror(errno)))")
        }
        func put(_ bytes: UnsafeRawBufferPointer) -> Bool {
            var done = 0
            while done < bytes.count {
                let chunk = Swift.min(bytes.count - done, 64 << 20)
                let w = fwrite(bytes.baseAddress! + done, 1, chunk, f)
                if w == 0 { return false }
                done += w
            }
            return true
        }
        var ok = head.withUnsafeBytes { put($0) }
        for (_, t) in tensors where ok { ok = put(t.rawBytes) }
        let err = errno
        if fclose(f) != 0 { ok = false }
        guard ok, rename(tmp, path) == 0 else {
            let why = String(cString: strerror(ok ? errno : err))
            unlink(tmp)
            throw TensorIOError(file: path, "cannot write: \(why)")
        }
    }
}
