import Foundation
#if canImport(Glibc)
import Glibc
#endif
import MoEReference
import TensorIO

/// A kernel written in Python: an adapter file with `RECIPE`, `forward(layer, x)` and optionally
/// `route(layer, x)` (docs/python-adapters.md), run by one long-lived worker in the user's
/// Python so it imports torch, triton, aiter, vLLM… from the user's environment.
///
/// Each case's layer reaches the worker as a case file (a user's file in place; a synthetic
/// layer written once under a memory-backed scratch directory), the outputs come back as raw
/// float files. The adapter's forward runs twice (run-to-run variation); with `route` the
/// router stage is judged and ambiguous tokens are teacher-forced, without it the whole layer
/// is judged forward-only. A worker that dies is restarted on the next case; one that hangs is
/// killed after `caseTimeout` seconds.
public final class PythonKernel: WholeLayerKernel {
    public let adapterPath: String
    public let python: String
    public let caseTimeout: Double
    /// A helper-level mutant the worker switches on for every run (`moecheck faults --python`).
    public var mutant: String?
    /// Workers started after one died or hung.
    public private(set) var restarts = 0
    /// The adapter's `MUTANTS`: the helper-level mutants it supports.
    public private(set) var mutants: [String] = []
    public private(set) var hasRoute = false
    /// The weight formats the adapter takes (`FORMATS`; default: fp8 for an fp8 recipe, else bf16).
    public private(set) var formats: [WeightFormat] = [.bf16]
    /// The adapter's CONSTRAINTS (docs/python-adapters.md): fuzz draws only layers whose H, I and
    /// Is are multiples of `shapeMultiple`, and (`fusedSharedOnly`) whose shared expert fuses.
    public private(set) var shapeMultiple = 1
    public private(set) var fusedSharedOnly = false
    /// Whether each mutant changed anything, per case name (the worker's `mutant_applied`).
    public private(set) var mutantAppliedOn: [String: [String: Bool]] = [:]
    /// The device the adapter's framework reports (at hello; updated by the first run, as an
    /// adapter that imports torch lazily has not chosen one at hello).
    public private(set) var device: String = "?"
    var pythonVersion = "?"
    public var name: String { adapterName + (mutant.map { "[\($0)]" } ?? "") }
    private var adapterName: String
    private var declared: Any = "fused-bf16"
    private var versions: String = ""
    private var worker: PythonWorker?
    private let script: String
    private let scratch: String
    private let echoStderr: Bool
    private var nextID = 0
    /// The generated case file this adapter's last case used (claimed in `SharedCaseFiles`).
    private var lastSynthetic: String?

    /// Starts the worker and reads the adapter's declarations; throws a `PythonAdapterError`
    /// (import error, missing `forward`/`RECIPE`, Python not found) naming the adapter.
    public init(adapter: String, python: String? = nil, caseTimeout: Double = 120, echoStderr: Bool = false) throws {
        signal(SIGPIPE, SIG_IGN) // a dead worker must be an error, not the end of this process
        guard FileManager.default.fileExists(atPath: adapter) else { throw PythonAdapterError.setup("\(adapter): no such adapter file") }
        adapterPath = URL(fileURLWithPath: adapter).standardizedFileURL.path
        self.python = python ?? ProcessInfo.processInfo.environment["MOECHECK_PYTHON"] ?? "python3"
        self.caseTimeout = caseTimeout
        self.echoStderr = echoStderr
        script = try PythonWorker.locateScripts() + "/moecheck_worker.py"
        scratch = try PythonWorker.scratchDirectory()
        adapterName = URL(fileURLWithPath: adapter).deletingPathExtension().lastPathComponent
        SharedCaseFiles.shared.retain()
        try start()
    }

    deinit {
        worker?.stop(force: false)
        PythonWorker.removeScratch(scratch)
        SharedCaseFiles.shared.release(last: lastSynthetic)
    }

    private func start() throws {
        let w = try PythonWorker(python: python, adapter: adapterPath, script: script, timeout: Swift.max(caseTimeout, 60), echoStderr: echoStderr)
        let h = w.hello
        if let n = h["name"] as? String, !n.isEmpty { adapterName = n }
        declared = h["recipe"] ?? "fused-bf16"
        hasRoute = h["has_route"] as? Bool ?? false
        mutants = h["mutants"] as? [String] ?? []
        if let f = h["formats"] as? [String] {
            formats = try f.map { name in
                guard let w = WeightFormat(rawValue: name) else {
                    throw PythonAdapterError.adapter(adapter: adapterPath, kind: "contract", message: "FORMATS: unknown format '\(name)' (known: \(WeightFormat.allCases.map(\.rawValue).joined(separator: ", ")))", traceback: "")
                }
                return w
            }
        } else {
            let r = try recipe(for: .bf16)
            formats = r.activationFP8 || r.intermediateFP8 ? [.fp8e4m3fn, .fp8e4m3fnuz] : [.bf16]
        }
        if let c = h["constraints"] as? [String: Any] {
            shapeMultiple = (c["multiple_of"] as? Int) ?? 1
            fusedSharedOnly = (c["fused_shared_expert"] as? Bool) ?? false
        }
        pythonVersion = h["python"] as? String ?? "?"
        device = (h["device"] as? String).map { "\($0) via Python \(pythonVersion)" } ?? "Python"
        if let v = h["versions"] as? [String: Any] {
            versions = v.keys.sorted().compactMap { k in (v[k] as? String).map { "\(k) \($0)" } }.joined(separator: ", ")
        }
        worker = w
    }

    /// The libraries the worker imported, for reports ("numpy 2.1, torch 2.11…").
    public var libraryVersions: String { versions }

    public func recipe(for format: WeightFormat) throws -> Recipe {
        try Recipe.fromJSONValue(declared, origin: "\(adapterPath): RECIPE")
    }

    /// Stops the worker (the next case starts a new one).
    public func shutdown() { worker?.stop(force: false); worker = nil }

    public func run(_ vc: VerifyCase, layer: KernelLayerSource, referenceIds: [Int32], referenceWeights: [Float]) throws -> KernelRun {
        let started = Date()
        if worker == nil {
            try start()
            restarts += 1
        }
        guard let worker else { throw PythonAdapterError.setup("no worker") }
        guard formats.contains(layer.weightFormat) else {
            throw PythonAdapterError.caseFailed(case: vc.name, kind: "format", message: "the adapter takes \(formats.map(\.rawValue).joined(separator: ", ")) weights (FORMATS), this case stores \(layer.weightFormat.rawValue)", traceback: "")
        }
        let (location, claimed) = try SharedCaseFiles.shared.location(of: layer, replacing: lastSynthetic)
        lastSynthetic = claimed
        let materialized = Date().timeIntervalSince(started)
        nextID += 1
        let id = nextID
        guard let config = try JSONSerialization.jsonObject(with: Data(location.configJSON.utf8)) as? [String: Any] else {
            throw PythonAdapterError.protocolViolation("layer config is not a JSON object")
        }
        let request: [String: Any] = [
            "op": "run", "id": id, "case": vc.name,
            "layer": ["key": location.path + "#" + location.prefix, "file": location.path, "prefix": location.prefix, "config": config] as [String: Any],
            "x": ["file": location.inputsPath, "tensor": location.inputsTensor],
            "route": hasRoute, "repeats": 2, "out_dir": scratch, "mutant": mutant as Any? ?? NSNull(),
        ]
        let sent = Date()
        let reply: [String: Any]
        do {
            reply = try worker.request(request, caseName: vc.name, timeout: caseTimeout)
        } catch let e as PythonAdapterError {
            if case .protocolViolation = e {} else { self.worker = nil } // died or hung: restart on the next case
            throw e
        }
        let roundTrip = Date().timeIntervalSince(sent)
        guard reply["ok"] as? Bool == true else {
            throw PythonAdapterError.caseFailed(case: vc.name, kind: reply["error"] as? String ?? "error", message: reply["message"] as? String ?? "\(reply)",
                                                traceback: reply["traceback"] as? String ?? "")
        }
        guard reply["id"] as? Int == id else { throw PythonAdapterError.protocolViolation("reply for request \(reply["id"] ?? "nil"), expected \(id)") }
        if let d = reply["device"] as? String, !device.hasPrefix(d + " ") { device = "\(d) via Python \(pythonVersion)" }
        if let mutant { mutantAppliedOn[mutant, default: [:]][vc.name] = reply["mutant_applied"] as? Bool ?? true }
        let T = layer.tokens, H = layer.config.hidden
        let readStart = Date()
        guard let outputs = reply["outputs"] as? [[String: Any]], !outputs.isEmpty else {
            throw PythonAdapterError.protocolViolation("run reply without outputs")
        }
        var forwards: [[Double]] = []
        for o in outputs {
            guard let file = o["file"] as? String, let dtype = o["dtype"] as? String else { throw PythonAdapterError.protocolViolation("output entry \(o)") }
            forwards.append(try Self.readRaw(file, dtype: dtype, count: T * H, what: "output of case \(vc.name)"))
        }
        var routing: KernelRouting? = nil
        if let r = reply["route"] as? [String: Any], let idsFile = r["ids"] as? String, let wFile = r["weights"] as? String, let S = r["slots"] as? Int {
            let ids = try Self.readRaw(idsFile, dtype: "int32", count: T * S, what: "route ids of case \(vc.name)").map { Int32($0) }
            let weights = try Self.readRaw(wFile, dtype: "float64", count: T * S, what: "route weights of case \(vc.name)")
            routing = KernelRouting(logits: nil, ids: ids, weights: weights, slots: S)
        }
        let read = Date().timeIntervalSince(readStart)
        let forwardMs = (reply["forward_ms"] as? [Double]) ?? []
        let routeMs = reply["route_ms"] as? Double ?? 0
        var run = KernelRun(routing: routing, alignProblems: nil, intermediate: nil, stagedOutput: nil, forwardOutputs: forwards,
                            forwardMilliseconds: forwardMs.first ?? 0)
        let kernelSeconds = (forwardMs.reduce(0, +) + routeMs) / 1000
        run.overhead = ["write_case": materialized, "read_outputs": read, "worker_round_trip": Swift.max(0, roundTrip - kernelSeconds)]
        if let w = reply["worker_ms"] as? [String: Double] { for (k, v) in w { run.overhead["worker_" + k] = v / 1000 } }
        run.overhead["case_bytes"] = Set([location.path, location.inputsPath]).reduce(0.0) { sum, p in
            sum + ((try? FileManager.default.attributesOfItem(atPath: p)[.size] as? NSNumber)??.doubleValue ?? 0)
        }
        // The worker memory-maps the layer; the adapter's first forward builds and uploads its
        // weights (cached per layer by the helper), the second reuses them: the difference is the
        // tensor transfer into the kernel's framework.
        if forwardMs.count >= 2 { run.overhead["first_forward_extra"] = Swift.max(0, forwardMs[0] - forwardMs[1]) / 1000 }
        return run
    }

    /// Reads a raw little-endian file of `count` values and removes it.
    static func readRaw(_ path: String, dtype: String, count: Int, what: String) throws -> [Double] {
        guard let data = FileManager.default.contents(atPath: path) else { throw PythonAdapterError.protocolViolation("\(what): cannot read \(path)") }
        defer { try? FileManager.default.removeItem(atPath: path) }
        let size: Int
        switch dtype {
        case "float32", "int32": size = 4
        case "float64": size = 8
        default: throw PythonAdapterError.protocolViolation("\(what): unknown dtype \(dtype)")
        }
        guard data.count == count * size else {
            throw PythonAdapterError.protocolViolation("\(what): \(path) holds \(data.count) bytes, expected \(count) × \(size)")
        }
        return data.withUnsafeBytes { raw -> [Double] in
            switch dtype {
            case "float32": return raw.bindMemory(to: Float.self).map { Double($0) }
            case "int32": return raw.bindMemory(to: Int32.self).map { Double($0) }
            default: return raw.bindMemory(to: Double.self).map { $0 }
            }
        }
    }
}

/// Generated layers written as case files for the workers, shared by every adapter of the
/// process: with several adapters on one case (`verify --python A --python B`) the layer is
/// generated and written once, not once per adapter. Each adapter claims the file of its last
/// case; a file no adapter claims is removed (one generated layer per adapter at most in
/// memory, as before, and fewer when they share); the directory goes with the last adapter.
final class SharedCaseFiles: @unchecked Sendable {
    static let shared = SharedCaseFiles()
    private let lock = NSLock()
    private var directory: String?
    private var claims: [String: Int] = [:]
    private var users = 0

    func retain() { lock.lock(); users += 1; lock.unlock() }

    /// An adapter is gone: its claim on `last` ends, and the directory with the last adapter.
    func release(last: String?) {
        lock.lock()
        defer { lock.unlock() }
        if let last { unclaim(last) }
        users -= 1
        if users <= 0, let d = directory {
            PythonWorker.removeScratch(d)
            directory = nil
            claims = [:]
        }
    }

    private func unclaim(_ path: String) {
        guard let n = claims[path] else { return }
        if n <= 1 { claims[path] = nil; try? FileManager.default.removeItem(atPath: path) } else { claims[path] = n - 1 }
    }

    /// The layer's case file — the file itself for a case file, else one generated here and
    /// claimed — and the adapter's claim on `previous` (its last generated file) given up.
    /// Returns the location and the path now claimed (nil for a user's case file).
    func location(of layer: KernelLayerSource, replacing previous: String?) throws -> (CaseFileLocation, String?) {
        lock.lock()
        defer { lock.unlock() }
        if directory == nil { directory = try PythonWorker.scratchDirectory() }
        let dir = directory!
        let location = try layer.caseFile(in: dir)
        let generated = location.path.hasPrefix(dir + "/")
        if generated { claims[location.path, default: 0] += 1 }
        if let previous { unclaim(previous) }
        return (location, generated ? location.path : nil)
    }
}
