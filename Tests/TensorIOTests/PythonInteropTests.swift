import Foundation
import Testing
import TensorIO
import MoECheckTestSupport

/// Whether `python3 -c "import safetensors, ml_dtypes"` succeeds.
let pythonInteropAvailable: Bool = {
    guard let r = try? runProcess("/usr/bin/env", ["python3", "-c", "import safetensors, ml_dtypes"]) else { return false }
    return r.status == 0
}()

/// Runs a process to completion; stdout and stderr together.
func runProcess(_ executable: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = arguments
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    try p.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}


/// A JSON value whose numbers keep their text: Foundation's JSONSerialization on Linux does not
/// round every decimal to the nearest Double (it read Python's "0.10000000149011612" one ulp
/// off), while `Double(String)` does.
indirect enum JSONValue {
    case number(String), string(String), bool(Bool), null
    case array([JSONValue]), object([(String, JSONValue)])

    subscript(key: String) -> JSONValue? {
        if case .object(let members) = self { return members.first { $0.0 == key }?.1 }
        return nil
    }
    var array: [JSONValue]? { if case .array(let a) = self { return a }; return nil }
    var string: String? { if case .string(let s) = self { return s }; return nil }
    var numberText: String? { if case .number(let n) = self { return n }; return nil }
    var double: Double? { numberText.flatMap { Double($0) } }
    var int: Int? { numberText.flatMap { Int($0) } }
    var members: [(String, JSONValue)] { if case .object(let m) = self { return m }; return [] }

    struct ParseError: Error, CustomStringConvertible { let offset: Int; var description: String { "JSON syntax error at byte \(offset)" } }

    static func parse(_ data: Data) throws -> JSONValue {
        let bytes = [UInt8](data)
        var i = 0
        func ws() { while i < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[i]) { i += 1 } }
        func fail() -> ParseError { ParseError(offset: i) }
        func literal(_ s: String) throws { for b in s.utf8 { guard i < bytes.count, bytes[i] == b else { throw fail() }; i += 1 } }
        func hex4() throws -> UInt32 {
            guard i + 4 <= bytes.count, let v = UInt32(String(decoding: bytes[i..<(i + 4)], as: UTF8.self), radix: 16) else { throw fail() }
            i += 4
            return v
        }
        func string() throws -> String {
            guard bytes[i] == 0x22 else { throw fail() }
            i += 1
            var out = [UInt8]()
            while true {
                guard i < bytes.count else { throw fail() }
                let b = bytes[i]; i += 1
                if b == 0x22 { break }
                if b != 0x5C { out.append(b); continue }
                guard i < bytes.count else { throw fail() }
                let e = bytes[i]; i += 1
                switch e {
                case 0x22, 0x5C, 0x2F: out.append(e)
                case 0x62: out.append(0x08)
                case 0x66: out.append(0x0C)
                case 0x6E: out.append(0x0A)
                case 0x72: out.append(0x0D)
                case 0x74: out.append(0x09)
                case 0x75:
                    var u = try hex4()
                    if (0xD800..<0xDC00).contains(u) {
                        try literal("\\u")
                        let lo = try hex4()
                        u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00)
                    }
                    guard let scalar = Unicode.Scalar(u) else { throw fail() }
                    out += Array(String(Character(scalar)).utf8)
                default: throw fail()
                }
            }
            return String(decoding: out, as: UTF8.self)
        }
        func value() throws -> JSONValue {
            ws()
            guard i < bytes.count else { throw fail() }
            switch bytes[i] {
            case 0x7B:
                i += 1; var m: [(String, JSONValue)] = []
                ws()
                if bytes[i] == 0x7D { i += 1; return .object(m) }
                while true {
                    ws(); let k = try string(); ws()
                    try literal(":")
                    m.append((k, try value())); ws()
                    if bytes[i] == 0x2C { i += 1; continue }
                    try literal("}"); return .object(m)
                }
            case 0x5B:
                i += 1; var a: [JSONValue] = []
                ws()
                if bytes[i] == 0x5D { i += 1; return .array(a) }
                while true {
                    a.append(try value()); ws()
                    if bytes[i] == 0x2C { i += 1; continue }
                    try literal("]"); return .array(a)
                }
            case 0x22: return .string(try string())
            case 0x74: try literal("true"); return .bool(true)
            case 0x66: try literal("false"); return .bool(false)
            case 0x6E: try literal("null"); return .null
            default:
                let start = i
                while i < bytes.count, "+-0123456789.eE".utf8.contains(bytes[i]) { i += 1 }
                guard i > start else { throw fail() }
                return .number(String(decoding: bytes[start..<i], as: UTF8.self))
            }
        }
        let v = try value()
        ws()
        guard i == bytes.count else { throw fail() }
        return v
    }
}

/// Files exchanged with scripts/safetensors_interop.py (schema in that script's docstring:
/// `{name: {"dtype", "shape", "values", "bits"}}`, `"__metadata__"` optional).
@Suite("Safetensors interop with Python", .tags(.python), .enabled(if: pythonInteropAvailable, "python3 with safetensors and ml_dtypes is not installed"))
struct PythonInteropTests {
    static let script = packagePath("scripts/safetensors_interop.py")

    /// The element at `i` as an unsigned bit pattern.
    static func bits(_ t: Tensor, _ i: Int) -> UInt64 {
        let p = t.rawBytes.baseAddress! + i * t.dtype.byteSize
        var v: UInt64 = 0
        for b in 0..<t.dtype.byteSize { v |= UInt64(p.load(fromByteOffset: b, as: UInt8.self)) << (8 * UInt64(b)) }
        return v
    }

    /// The bit pattern of the JSON number `text` stored as `dtype`, when exactly representable.
    static func bits(ofValue text: String, _ dtype: DType) -> UInt64? {
        switch dtype {
        case .f64: return Double(text)?.bitPattern
        case .f32: return Double(text).flatMap { d in Float(exactly: d).map { UInt64($0.bitPattern) } }
        case .i64: return Int64(text).map { UInt64(bitPattern: $0) }
        case .i32: return Int32(text).map { UInt64(UInt32(bitPattern: $0)) }
        case .u8: return UInt8(text).map(UInt64.init)
        default: return nil
        }
    }

    @Test("Swift reads the file Python wrote, bit for bit")
    func swiftReadsPython() throws {
        try #require(FileManager.default.fileExists(atPath: Self.script), "\(Self.script) does not exist")
        try withScratchDirectory { dir in
            let r = try runProcess("/usr/bin/env", ["python3", Self.script, "write", dir.path])
            try #require(r.status == 0, "\(Self.script) write \(dir.path) failed (\(r.status)): \(r.output)")
            let stPath = dir.appendingPathComponent("python_written.safetensors").path
            let jsPath = dir.appendingPathComponent("python_written.json").path
            let json = try JSONValue.parse(Data(contentsOf: URL(fileURLWithPath: jsPath)))
            let file = try SafetensorsFile(path: stPath)
            let want = json.members.filter { $0.0 != "__metadata__" }
            if let meta = json["__metadata__"] {
                let m = Dictionary(uniqueKeysWithValues: meta.members.map { ($0.0, $0.1.string ?? "<not a string>") })
                #expect(file.metadata == m, "\(stPath): __metadata__ \(file.metadata) != \(m)")
            }
            #expect(Set(file.names) == Set(want.map(\.0)), "\(stPath): names \(file.names.sorted()) vs JSON \(want.map(\.0).sorted())")
            let dtypes = Set(want.compactMap { $0.1["dtype"]?.string })
            #expect(dtypes.isSuperset(of: ["F64", "F32", "F16", "BF16", "I64", "I32", "U8", "F8_E4M3"]),
                    "\(jsPath): the Python file does not cover every dtype (has \(dtypes.sorted()))")
            for (name, d) in want {
                let t = try file.tensor(name)
                #expect(t.dtype.rawValue == d["dtype"]?.string, "\(stPath): tensor \(name): dtype \(t.dtype), JSON \(d["dtype"]?.string ?? "-")")
                let shape = d["shape"]?.array?.compactMap(\.int)
                #expect(t.shape == shape, "\(stPath): tensor \(name): shape \(t.shape), JSON \(shape ?? [])")
                let values = d["values"]?.array?.map { $0.numberText ?? "?" }
                if let b = d["bits"]?.array {
                    let got = (0..<t.elementCount).map { Self.bits(t, $0) }
                    let wantBits = b.map { $0.numberText.flatMap { UInt64($0) } ?? UInt64.max }
                    #expect(got == wantBits, "\(stPath): tensor \(name) (\(t.dtype)): bits \(got) differ from the JSON's \(wantBits)")
                    if let values, t.dtype.isFloatingPoint {
                        let wantValues = values.map { Double($0) ?? .nan }
                        #expect(t.doubles() == wantValues, "\(stPath): tensor \(name) (\(t.dtype)): decoded values \(t.doubles()) vs JSON \(wantValues)")
                    }
                } else if let values {
                    #expect(values.count == t.elementCount, "\(stPath): tensor \(name): \(t.elementCount) elements, JSON \(values.count)")
                    for i in 0..<min(values.count, t.elementCount) {
                        let want = Self.bits(ofValue: values[i], t.dtype)
                        #expect(want == Self.bits(t, i), "\(stPath): tensor \(name) (\(t.dtype)) element \(i): bits 0x\(String(Self.bits(t, i), radix: 16)), JSON value \(values[i])")
                    }
                } else {
                    Issue.record("\(jsPath): tensor \(name) has neither bits nor values")
                }
            }
        }
    }

    @Test("Python's safetensors reads the file Swift wrote, bit for bit")
    func pythonReadsSwift() throws {
        try #require(FileManager.default.fileExists(atPath: Self.script), "\(Self.script) does not exist")
        try withScratchDirectory { dir in
            var rng = SeededGenerator(seed: 2024)
            var tensors: [(String, Tensor)] = []
            var entries: [String] = []
            func add(_ name: String, _ t: Tensor, values: Bool) {
                tensors.append((name, t))
                let b = (0..<t.elementCount).map { String(Self.bits(t, $0)) }.joined(separator: ", ")
                var e = #"{"dtype": "\#(t.dtype.rawValue)", "shape": [\#(t.shape.map(String.init).joined(separator: ", "))], "bits": [\#(b)]"#
                if values {
                    let v = t.dtype.isFloatingPoint ? t.doubles().map { "\($0)" } : t.doubles().map { String(Int64($0)) }
                    e += #", "values": [\#(v.joined(separator: ", "))]"#
                }
                entries.append(#""\#(name)": \#(e)}"#)
            }
            for dtype in DType.allCases {
                for shape in [[], [0], [3, 5]] as [[Int]] {
                    // Finite values, chosen by bits: random bytes, non-finite patterns replaced.
                    let n = shape.reduce(1, *)
                    var bytes = [UInt8](repeating: 0, count: n * dtype.byteSize)
                    for i in 0..<n {
                        repeat {
                            for b in 0..<dtype.byteSize { bytes[i * dtype.byteSize + b] = UInt8.random(in: 0...255, using: &rng) }
                        } while !Tensor(dtype: dtype, shape: [1], storage: bytes[(i * dtype.byteSize)..<((i + 1) * dtype.byteSize)].withUnsafeBytes { ByteStorage(copying: $0) }).doubles()[0].isFinite
                    }
                    let t = Tensor(dtype: dtype, shape: shape, storage: bytes.withUnsafeBytes { ByteStorage(copying: $0) })
                    add("\(dtype.rawValue.lowercased())_\(shape.count)d", t, values: dtype != .i64)
                }
            }
            // Non-finite bit patterns travel as bits only.
            add("special_f32", Tensor(bits: [Float.nan.bitPattern, 0x7FC0_1234, Float.infinity.bitPattern, (-Float.infinity).bitPattern], shape: [4], dtype: .f32), values: false)
            add("special_bf16", Tensor(bits: [0x7FC0, 0xFF80, 0x7F80, 0x8000] as [UInt16], shape: [2, 2], dtype: .bf16), values: false)
            add("special_f8_e4m3", Tensor(bits: [0x7F, 0xFF, 0x80] as [UInt8], shape: [3], dtype: .f8e4m3fn), values: false)
            add("special_f8_e4m3fnuz", Tensor(bits: [0x80, 0x00] as [UInt8], shape: [2], dtype: .f8e4m3fnuz), values: false)
            add("model.layers.0.mlp.experts.0.gate_proj.weight", Tensor([0.5, -1], shape: [1, 2], dtype: .bf16), values: true)
            let metadata = ["producer": "swift", "config": #"{"model_type": "qwen3_next", "note": "é✓ \"quoted\""}"#]
            let metaJSON = String(decoding: try JSONSerialization.data(withJSONObject: metadata, options: [.sortedKeys]), as: UTF8.self)
            entries.append(#""__metadata__": \#(metaJSON)"#)

            let stPath = dir.appendingPathComponent("swift_written.safetensors").path
            let jsPath = dir.appendingPathComponent("swift_written.json").path
            try SafetensorsWriter.write(tensors, metadata: metadata, to: stPath)
            try Data(("{\n" + entries.joined(separator: ",\n") + "\n}\n").utf8).write(to: URL(fileURLWithPath: jsPath))
            let r = try runProcess("/usr/bin/env", ["python3", Self.script, "check", stPath, jsPath])
            #expect(r.status == 0, "\(Self.script) check \(stPath) failed (\(r.status)):\n\(r.output)")
            #expect(r.output.contains("interop: \(tensors.count) tensors match"), "\(stPath): Python did not report all \(tensors.count) tensors:\n\(r.output)")
        }
    }
}
