import Foundation
import LowPrecision

/// How the routed experts are laid out in a case file.
public enum ExpertLayout: String, Codable, Sendable {
    /// `experts.gate_up_proj [E, 2I, H]` (gate rows first) + `experts.down_proj [E, H, I]`.
    case combined
    /// `experts.{e}.{gate,up,down}_proj.weight`.
    case perExpert = "per-expert"
}

/// One projection matrix `[rows, columns]` inside a tensor (a 2-D tensor, or slab `slab` of a
/// 3-D one), with its optional block-scale tensor.
struct Projection {
    let weightName: String
    let weight: Tensor
    let scale: Tensor?
    let scaleName: String?
    let slab: Int?
    let rows: Int
    let columns: Int
    /// First row of this projection inside the slab.
    let rowStart: Int
    /// Scale-block rows count from this row (0, or I when gate and up are blocked separately).
    let blockOrigin: Int
    /// Scale-block row index that `blockOrigin` maps to.
    let scaleRowStart: Int

    /// The first stored element of the projection when it is plain bf16 (no scale); its rows are
    /// `columns` elements apart.
    var rawBF16: UnsafeRawPointer? {
        guard weight.dtype == .bf16, scale == nil, let base = weight.rawBytes.baseAddress else { return nil }
        let slabRows = weight.shape.count == 3 ? weight.shape[1] : rows
        return base + 2 * ((slab ?? 0) * slabRows * columns + rowStart * columns)
    }

    /// Decodes the projection into `out` (`rows × columns`), dequantizing fp8 with its block
    /// scales; throws on NaN/Inf naming the tensor and element.
    @_specialize(where T == Double)
    @_specialize(where T == Float)
    func decode<T: BinaryFloatingPoint>(into out: UnsafeMutablePointer<T>, file: String) throws {
        let slabRows = weight.shape.count == 3 ? weight.shape[1] : rows
        let base = (slab ?? 0) * slabRows * columns + rowStart * columns
        var finite = true
        if let scale {
            // fp8 codes times their 128×128 block scales, decoded and scaled in one pass
            let sRows = scale.shape[scale.shape.count - 2], sCols = scale.shape[scale.shape.count - 1]
            let sBase = (slab ?? 0) * sRows * sCols
            var rowScales = [T](repeating: 0, count: sCols)
            var loaded = -1
            var largest = 0.0
            precondition(weight.dtype.fp8Format != nil, "block scales are attached to fp8 weights only")
            rowScales.withUnsafeMutableBufferPointer { rs in
                for r in 0..<rows {
                    let br = (rowStart + r - blockOrigin) / 128 + scaleRowStart
                    if br != loaded {
                        let lo = sBase + br * sCols
                        _ = scale.decodeAny(lo..<(lo + sCols), into: rs.baseAddress!)
                        for v in rs { largest = Swift.max(largest, Swift.abs(Double(v))) }
                        loaded = br
                    }
                    let from = base + r * columns
                    finite = weight.decodeScaledFP8(from..<(from + columns), group: 128, scales: rs.baseAddress!, into: out + r * columns) && finite
                }
            }
            // A finite code times a finite scale overflows only if |scale| · FP8_MAX does (the
            // exact product is at most that); scan the output only then.
            if !(largest * 448 <= Double(T.greatestFiniteMagnitude)) {
                finite = finite && allFinite(out, count: rows * columns)
            }
        } else {
            finite = weight.decodeAny(base..<(base + rows * columns), into: out)
        }
        // The slow search only when something is non-finite.
        guard !finite else { return }
        for i in 0..<(rows * columns) where !out[i].isFinite {
            let r = i / columns, c = i % columns
            let value = Double(out[i])
            let which = slab.map { "expert \($0), " } ?? ""
            let text = value.isNaN ? "nan" : "\(value)"   // not "-nan(0x…)": the payload says nothing useful
            throw TensorIOError(file: file, tensor: weightName, "non-finite weight \(text) at \(which)row \(rowStart + r), column \(c)")
        }
    }
}

/// Whether every value is finite: an OR of `(exponent bits) + (lowest exponent bit)`, whose top
/// bit is set only by an all-ones exponent (no branch or early exit, so it vectorizes).
@inline(__always)
func allFinite<T: BinaryFloatingPoint>(_ p: UnsafeMutablePointer<T>, count n: Int) -> Bool {
    if T.self == Float.self {
        let q = UnsafeRawPointer(p).assumingMemoryBound(to: UInt32.self)
        var acc: UInt32 = 0
        for i in 0..<n { acc |= (q[i] & 0x7F80_0000) &+ 0x0080_0000 }
        return acc & 0x8000_0000 == 0
    }
    if T.self == Double.self {
        let q = UnsafeRawPointer(p).assumingMemoryBound(to: UInt64.self)
        var acc: UInt64 = 0
        for i in 0..<n { acc |= (q[i] & 0x7FF0_0000_0000_0000) &+ 0x0010_0000_0000_0000 }
        return acc & 0x8000_0000_0000_0000 == 0
    }
    for i in 0..<n where !p[i].isFinite { return false }
    return true
}

/// A MoE case file: one layer in HF checkpoint naming plus (optionally) its input
/// `hidden_states [T, H]` — DESIGN.md §4. The prefix (`model.layers.N.mlp.`) is found from the
/// key ending in `mlp.gate.weight`; the config comes from `__metadata__["config"]` or a
/// `config.json` beside the file. Opening validates every shape against the config.
public final class MoECaseFile: GenericDecodingLayerSource, KernelLayerSource {
    public let path: String
    public let file: SafetensorsFile
    public let prefix: String
    public let config: MoEConfig
    public let layout: ExpertLayout
    public let weightFormat: WeightFormat
    /// Where the config was read from.
    public let configSource: String
    /// The HF config object as read (what a Python adapter gets as `layer.config`).
    public let configObject: [String: Any]
    /// `hidden_states [T, H]` when the file has inputs.
    public let hiddenStates: Tensor?
    let router: Tensor
    let sharedGate: Tensor?
    let gateProjections: [Projection]   // index e; E = shared when present
    let upProjections: [Projection]
    let downProjections: [Projection]

    public var name: String { URL(fileURLWithPath: path).lastPathComponent }

    /// Opens `path` and validates it, in this order: the layer prefix, the config, the inputs,
    /// the router and shared gate, the routed experts (either layout) and the shared expert, one
    /// storage format, the fp8 block size, then finite router and shared-gate weights. The first
    /// problem throws a `TensorIOError` naming the file and the tensor.
    public init(path: String, prefix requestedPrefix: String? = nil) throws {
        self.path = path
        let file = try SafetensorsFile(path: path)
        self.file = file
        prefix = try CaseFileReader.findPrefix(in: file, path: path, requested: requestedPrefix)
        let (configObject, source) = try CaseFileReader.readConfigObject(file: file, path: path)
        config = try MoEConfig.fromHuggingFace(configObject, file: source == "__metadata__" ? path : source)
        configSource = source
        self.configObject = configObject
        let reader = CaseFileReader(file: file, path: path, prefix: prefix, config: config)
        hiddenStates = try reader.hiddenStates()
        (router, sharedGate) = try reader.routerAndSharedGate()
        let experts = try reader.experts()
        layout = experts.layout
        gateProjections = experts.gates
        upProjections = experts.ups
        downProjections = experts.downs
        weightFormat = try reader.commonFormat(experts.gates + experts.ups + experts.downs, configObject: configObject)
        try reader.expectFiniteGates(router: router, sharedGate: sharedGate)
    }

    public var tokens: Int { hiddenStates?.shape[0] ?? 0 }

    public func routerWeight() throws -> [Double] { router.doubles() }

    public func sharedGateWeight() throws -> [Double]? { sharedGate?.doubles() }


    @_specialize(where T == Double)
    @_specialize(where T == Float)
    public func gateUp<T: BinaryFloatingPoint>(_ e: Int, into out: UnsafeMutablePointer<T>) throws {
        try checkExpert(e)
        let g = gateProjections[e]
        try g.decode(into: out, file: path)
        try upProjections[e].decode(into: out + g.rows * g.columns, file: path)
    }

    public func rawBF16(expert e: Int, _ projection: ExpertProjection) -> UnsafeRawPointer? {
        guard e >= 0, e < gateProjections.count else { return nil }
        let p: Projection
        switch projection {
        case .gate: p = gateProjections[e]
        case .up: p = upProjections[e]
        case .down: p = downProjections[e]
        }
        return p.rawBF16
    }

    @_specialize(where T == Double)
    @_specialize(where T == Float)
    public func down<T: BinaryFloatingPoint>(_ e: Int, into out: UnsafeMutablePointer<T>) throws {
        try checkExpert(e)
        try downProjections[e].decode(into: out, file: path)
    }

    private func checkExpert(_ e: Int) throws {
        guard e >= 0, e < gateProjections.count else {
            throw TensorIOError(file: path, "expert \(e) out of range 0..<\(gateProjections.count)")
        }
    }

    /// Input rows as `Double` `[T, H]`.
    public func inputs() throws -> [Double] {
        guard let x = hiddenStates else {
            throw TensorIOError(file: path, tensor: "hidden_states", "missing required tensor: the case has no inputs")
        }
        return x.doubles()
    }

    /// Storage dtypes by role, for reports.
    public var dtypeSummary: [String: String] {
        var d: [String: String] = ["router": router.dtype.rawValue, "experts": weightFormat.rawValue]
        if let x = hiddenStates { d["hidden_states"] = x.dtype.rawValue }
        if let sg = sharedGate { d["shared_expert_gate"] = sg.dtype.rawValue }
        if let s = gateProjections.first?.scale { d["scales"] = s.dtype.rawValue }
        return d
    }

    /// Stored bytes of one projection's rows (bf16 or fp8 codes), never converted.
    func rowBytes(_ p: Projection) -> [UInt8] {
        let esize = p.weight.dtype.byteSize
        let slabRows = p.weight.shape.count == 3 ? p.weight.shape[1] : p.rows
        let src = ((p.slab ?? 0) * slabRows + p.rowStart) * p.columns * esize
        return Array(UnsafeRawBufferPointer(rebasing: p.weight.rawBytes[src..<(src + p.rows * p.columns * esize)]))
    }

    /// The block scales of a projection's own rows, `blockRows` rows of `⌈columns/128⌉`.
    func rowScales(_ p: Projection, blockRows: Int) -> [Float] {
        guard let s = p.scale else { return [] }
        let sCols = s.shape[s.shape.count - 1], sRows = s.shape[s.shape.count - 2]
        var out = [Float](), row = [Double](repeating: 0, count: sCols)
        out.reserveCapacity(blockRows * sCols)
        for br in 0..<blockRows {
            let srcRow = (p.rowStart - p.blockOrigin) / 128 + p.scaleRowStart + br
            let base = (p.slab ?? 0) * sRows * sCols + srcRow * sCols
            row.withUnsafeMutableBufferPointer { _ = s.decode(base..<(base + sCols), into: $0.baseAddress!) }
            out += row.map { Float($0) }
        }
        return out
    }

    func kernelFormat() throws {
        guard weightFormat == .bf16 || weightFormat.fp8 != nil else {
            throw TensorIOError(file: path, "kernel weights must be BF16 or FP8; this case stores \(weightFormat.rawValue)")
        }
    }

    public func gateUpBytes(expert e: Int) throws -> (bytes: [UInt8], scales: [Float]) {
        try checkExpert(e)
        try kernelFormat()
        let g = gateProjections[e], u = upProjections[e]
        guard weightFormat.fp8 != nil else { return (rowBytes(g) + rowBytes(u), []) }
        let si = (config.intermediate(ofExpert: e) + 127) / 128
        if u.blockOrigin == 0 && u.rowStart % 128 != 0 && u.scale != nil && g.slab != nil {
            throw TensorIOError(file: path, tensor: u.scaleName,
                                "gate_up scales blocked across the gate/up boundary (I=\(u.rowStart) not a multiple of 128) cannot be laid out per half for a kernel")
        }
        // combined blocking with I % 128 == 0 is the same as per half: the up rows start a block
        return (rowBytes(g) + rowBytes(u), rowScales(g, blockRows: si) + rowScales(u, blockRows: si))
    }

    public func downBytes(expert e: Int) throws -> (bytes: [UInt8], scales: [Float]) {
        try checkExpert(e)
        try kernelFormat()
        let d = downProjections[e]
        return (rowBytes(d), rowScales(d, blockRows: (config.hidden + 127) / 128))
    }

    /// A bf16 tensor's bits, or an error naming it when a value is not exactly a bf16 (the C
    /// ABI takes bf16 router weights, shared gate and hidden states).
    func exactBF16(_ t: Tensor, _ name: String) throws -> [UInt16] {
        if t.dtype == .bf16 { return t.rawBytes.withMemoryRebound(to: UInt16.self) { Array($0) } }
        let values = t.doubles()
        var bits = [UInt16](repeating: 0, count: values.count)
        for (i, v) in values.enumerated() {
            let b = BFloat16.bits(Float(v))
            guard Double(BFloat16.float(b)) == v else {
                throw TensorIOError(file: path, tensor: name, "\(t.position(of: i)) = \(v) is not exactly a bfloat16; kernels take bf16 here — store the tensor as BF16 (the value the kernel would see is \(BFloat16.float(b)))")
            }
            bits[i] = b
        }
        return bits
    }

    public func inputsBF16() throws -> [UInt16] {
        guard let x = hiddenStates else {
            throw TensorIOError(file: path, tensor: "hidden_states", "missing required tensor: the case has no inputs")
        }
        return try exactBF16(x, "hidden_states")
    }

    public func routerBF16() throws -> [UInt16] { try exactBF16(router, prefix + "gate.weight") }

    public func sharedGateBF16() throws -> [UInt16]? { try sharedGate.map { try exactBF16($0, prefix + "shared_expert_gate.weight") } }

    /// The case file itself: the worker of a Python adapter opens it in place.
    public func caseFile(in directory: String) throws -> CaseFileLocation {
        guard hiddenStates != nil else {
            throw TensorIOError(file: path, tensor: "hidden_states", "missing required tensor: the case has no inputs")
        }
        let json = try JSONSerialization.data(withJSONObject: configObject, options: [.sortedKeys])
        return CaseFileLocation(path: URL(fileURLWithPath: path).standardizedFileURL.path, prefix: prefix,
                                inputsPath: URL(fileURLWithPath: path).standardizedFileURL.path, configJSON: String(decoding: json, as: UTF8.self))
    }
}

/// Expert weights in the kernel layout of `Kernels/include/moe_kernels.h` (raw bf16 / fp8 bytes).
public struct FusedWeights: Sendable {
    public let format: WeightFormat
    public let slots: Int
    public let hidden: Int
    public let intermediate: Int
    public let w13: [UInt8]
    public let w2: [UInt8]
    public let w13Scale: [Float]
    public let w2Scale: [Float]

    public init(format: WeightFormat, slots: Int, hidden: Int, intermediate: Int, w13: [UInt8], w2: [UInt8], w13Scale: [Float], w2Scale: [Float]) {
        self.format = format; self.slots = slots; self.hidden = hidden; self.intermediate = intermediate
        self.w13 = w13; self.w2 = w2; self.w13Scale = w13Scale; self.w2Scale = w2Scale
    }
}

/// The validation steps of `MoECaseFile.init`, one function each; every failure is a
/// `TensorIOError` naming the file and the tensor.
struct CaseFileReader {
    let file: SafetensorsFile
    let path: String
    let prefix: String
    let config: MoEConfig

    /// The requested prefix (which must have `gate.weight`), else the key ending in
    /// "mlp.gate.weight" (exactly one), else "" for a bare "gate.weight".
    static func findPrefix(in file: SafetensorsFile, path: String, requested: String?) throws -> String {
        if let p = requested {
            guard file.contains(p + "gate.weight") else {
                throw TensorIOError(file: path, tensor: p + "gate.weight", "not found (prefix '\(p)' given)")
            }
            return p
        }
        let candidates = file.names.filter { $0.hasSuffix("mlp.gate.weight") }
        if candidates.count > 1 {
            throw TensorIOError(file: path, "several MoE layers (\(candidates.prefix(4).joined(separator: ", "))…); choose one with --prefix")
        }
        if let c = candidates.first { return String(c.dropLast("gate.weight".count)) }
        if file.contains("gate.weight") { return "" }
        throw TensorIOError(file: path, tensor: "*mlp.gate.weight", "missing required tensor: no router weight (a key ending in 'mlp.gate.weight') — is this an MoE layer?")
    }

    /// The HF config object and where it came from: `__metadata__["config"]`, else a
    /// `config.json` beside the file.
    static func readConfigObject(file: SafetensorsFile, path: String) throws -> ([String: Any], String) {
        if let text = file.metadata["config"] {
            guard let data = text.data(using: .utf8), let o = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
                throw TensorIOError(file: path, "__metadata__['config'] is not a JSON object")
            }
            return (o, "__metadata__")
        }
        let beside = URL(fileURLWithPath: path).deletingLastPathComponent().appendingPathComponent("config.json").path
        guard FileManager.default.fileExists(atPath: beside) else {
            throw TensorIOError(file: path, "no config: neither __metadata__['config'] nor a config.json beside the file")
        }
        guard let data = FileManager.default.contents(atPath: beside),
              let o = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw TensorIOError(file: beside, "is not a JSON object")
        }
        return (o, beside)
    }

    var routerName: String { prefix + "gate.weight" }
    var sharedGateName: String { prefix + "shared_expert_gate.weight" }

    func need(_ name: String) throws -> Tensor {
        guard file.contains(name) else { throw TensorIOError(file: path, tensor: name, "missing required tensor") }
        return try file.tensor(name)
    }

    func expectShape(_ t: Tensor, _ name: String, _ shape: [Int], _ what: String) throws {
        guard t.shape == shape else {
            throw TensorIOError(file: path, tensor: name, "shape \(t.shape) disagrees with the config: expected \(shape) (\(what))")
        }
    }

    func expectFloat(_ t: Tensor, _ name: String) throws {
        guard t.dtype.isFloatingPoint else { throw TensorIOError(file: path, tensor: name, "dtype \(t.dtype) is not a floating-point type") }
    }

    /// `hidden_states [T, H]`, T >= 1, floating point, every value finite; nil when absent.
    func hiddenStates() throws -> Tensor? {
        guard file.contains("hidden_states") else { return nil }
        let x = try file.tensor("hidden_states")
        guard x.shape.count == 2, x.shape[1] == config.hidden, x.shape[0] >= 1 else {
            throw TensorIOError(file: path, tensor: "hidden_states", "shape \(x.shape) disagrees with the config: expected [T, \(config.hidden)] with T >= 1")
        }
        try expectFloat(x, "hidden_states")
        if let bad = x.firstNonFinite() {
            throw TensorIOError(file: path, tensor: "hidden_states", "non-finite input \(bad.value) at \(x.position(of: bad.index))")
        }
        return x
    }

    /// The router `[E, H]` and, when the layer has a shared expert, its gate `[1, H]` or `[H]`.
    func routerAndSharedGate() throws -> (Tensor, Tensor?) {
        let H = config.hidden
        let router = try need(routerName)
        try expectShape(router, routerName, [config.experts, H], "[num_experts, hidden_size]")
        try expectFloat(router, routerName)
        guard config.sharedIntermediate > 0 else { return (router, nil) }
        let sg = try need(sharedGateName)
        guard sg.shape == [1, H] || sg.shape == [H] else {
            throw TensorIOError(file: path, tensor: sharedGateName, "shape \(sg.shape) disagrees with the config: expected [1, \(H)]")
        }
        try expectFloat(sg, sharedGateName)
        return (router, sg)
    }

    /// Router and shared-gate weights must be finite (small: checked eagerly).
    func expectFiniteGates(router: Tensor, sharedGate: Tensor?) throws {
        if let bad = router.firstNonFinite() {
            throw TensorIOError(file: path, tensor: routerName, "non-finite weight \(bad.value) at \(router.position(of: bad.index))")
        }
        if let sg = sharedGate, let bad = sg.firstNonFinite() {
            throw TensorIOError(file: path, tensor: sharedGateName, "non-finite weight \(bad.value) at \(sg.position(of: bad.index))")
        }
    }

    /// The block scales of an fp8 weight (nil for other formats): "<...>.weight_scale_inv" beside
    /// "<...>.weight"; for the combined 3-D tensors "<prefix>experts.gate_up_proj_scale_inv".
    func scale(for weightName: String, weight: Tensor, rows: Int, columns: Int, slabs: Int?) throws -> (Tensor?, String?) {
        guard weight.dtype.fp8Format != nil else { return (nil, nil) }
        let name = weightName + "_scale_inv"
        guard file.contains(name) else {
            throw TensorIOError(file: path, tensor: name, "missing required tensor: fp8 weight '\(weightName)' needs its block scales")
        }
        let s = try file.tensor(name)
        try expectFloat(s, name)
        if let bad = s.firstNonFinite() {
            throw TensorIOError(file: path, tensor: name, "non-finite scale \(bad.value) at \(s.position(of: bad.index))")
        }
        let cols = (columns + 127) / 128
        let rowsA = (rows + 127) / 128
        if let slabs {
            // combined gate_up may be blocked over all 2I rows or per half (sglang layout)
            let halves = weightName.hasSuffix("experts.gate_up_proj") ? 2 * ((config.intermediate + 127) / 128) : rowsA
            guard s.shape.count == 3, s.shape[0] == slabs, s.shape[2] == cols, s.shape[1] == rowsA || s.shape[1] == halves else {
                throw TensorIOError(file: path, tensor: name, "shape \(s.shape) disagrees with the config: expected [\(slabs), \(rowsA), \(cols)]")
            }
        } else {
            guard s.shape == [rowsA, cols] else {
                throw TensorIOError(file: path, tensor: name, "shape \(s.shape) disagrees with the config: expected [\(rowsA), \(cols)] (ceil(out/128), ceil(in/128))")
            }
        }
        return (s, name)
    }

    /// gate, up and down of one expert stored as three 2-D tensors under `base`.
    func perExpert(_ base: String, inter: Int) throws -> (Projection, Projection, Projection) {
        let H = config.hidden
        var out: [Projection] = []
        for (proj, rows, cols) in [("gate_proj", inter, H), ("up_proj", inter, H), ("down_proj", H, inter)] {
            let n = base + proj + ".weight"
            let w = try need(n)
            try expectShape(w, n, [rows, cols], proj == "down_proj" ? "[hidden_size, intermediate]" : "[intermediate, hidden_size]")
            try expectFloat(w, n)
            let (s, sn) = try scale(for: n, weight: w, rows: rows, columns: cols, slabs: nil)
            out.append(Projection(weightName: n, weight: w, scale: s, scaleName: sn, slab: nil, rows: rows, columns: cols,
                                  rowStart: 0, blockOrigin: 0, scaleRowStart: 0))
        }
        return (out[0], out[1], out[2])
    }

    struct Experts {
        var layout: ExpertLayout
        var gates: [Projection] = [], ups: [Projection] = [], downs: [Projection] = []
        mutating func append(_ p: (Projection, Projection, Projection)) { gates.append(p.0); ups.append(p.1); downs.append(p.2) }
    }

    /// The routed experts in either layout, then the shared expert (index E) when present.
    func experts() throws -> Experts {
        let combinedName = prefix + "experts.gate_up_proj"
        var out: Experts
        if file.contains(combinedName) {
            out = try combinedExperts(combinedName)
        } else {
            guard file.contains(prefix + "experts.0.gate_proj.weight") else {
                throw TensorIOError(file: path, tensor: combinedName,
                                    "missing required tensor: routed experts found in neither layout ('\(combinedName)' nor '\(prefix)experts.0.gate_proj.weight')")
            }
            out = Experts(layout: .perExpert)
            for e in 0..<config.experts { out.append(try perExpert(prefix + "experts.\(e).", inter: config.intermediate)) }
        }
        if config.sharedIntermediate > 0 { out.append(try perExpert(prefix + "shared_expert.", inter: config.sharedIntermediate)) }
        return out
    }

    /// `experts.gate_up_proj [E, 2I, H]` (gate rows first) and `experts.down_proj [E, H, I]`.
    func combinedExperts(_ combinedName: String) throws -> Experts {
        let H = config.hidden, I = config.intermediate, E = config.experts
        let gu = try file.tensor(combinedName)
        try expectShape(gu, combinedName, [E, 2 * I, H], "[num_experts, 2*moe_intermediate_size, hidden_size]")
        try expectFloat(gu, combinedName)
        let dn = prefix + "experts.down_proj"
        let d = try need(dn)
        try expectShape(d, dn, [E, H, I], "[num_experts, hidden_size, moe_intermediate_size]")
        try expectFloat(d, dn)
        let (gs, gsn) = try scale(for: combinedName, weight: gu, rows: 2 * I, columns: H, slabs: E)
        let (ds, dsn) = try scale(for: dn, weight: d, rows: H, columns: I, slabs: E)
        let separate = try gateUpBlockedPerHalf(gs, gsn)
        var out = Experts(layout: .combined)
        for e in 0..<E {
            out.append((Projection(weightName: combinedName, weight: gu, scale: gs, scaleName: gsn, slab: e, rows: I, columns: H,
                                   rowStart: 0, blockOrigin: 0, scaleRowStart: 0),
                        Projection(weightName: combinedName, weight: gu, scale: gs, scaleName: gsn, slab: e, rows: I, columns: H,
                                   rowStart: I, blockOrigin: separate ? I : 0, scaleRowStart: separate ? (I + 127) / 128 : 0),
                        Projection(weightName: dn, weight: d, scale: ds, scaleName: dsn, slab: e, rows: H, columns: I,
                                   rowStart: 0, blockOrigin: 0, scaleRowStart: 0)))
        }
        return out
    }

    /// Whether the combined gate_up scales block gate and up separately (sglang's 2·ceil(I/128)
    /// rows) rather than over all 2I rows (DESIGN §4's ceil(2I/128)); the shapes coincide when
    /// I mod 128 is 0 or > 64, where the file's `__metadata__["gate_up_scale_blocking"]`
    /// ("per-half" | "combined") decides and "combined" is assumed without it.
    func gateUpBlockedPerHalf(_ gs: Tensor?, _ gsn: String?) throws -> Bool {
        let H = config.hidden, I = config.intermediate, E = config.experts
        let blocking = file.metadata["gate_up_scale_blocking"]
        if let blocking, blocking != "per-half" && blocking != "combined" {
            throw TensorIOError(file: path, "__metadata__ gate_up_scale_blocking is '\(blocking)'; expected 'per-half' or 'combined'")
        }
        if let gs, blocking == "per-half" && gs.shape[1] != 2 * ((I + 127) / 128) {
            throw TensorIOError(file: path, tensor: gsn, "shape \(gs.shape) disagrees with gate_up_scale_blocking 'per-half': expected [\(E), \(2 * ((I + 127) / 128)), \((H + 127) / 128)]")
        }
        return gs.map { blocking == "per-half" || (blocking == nil && $0.shape[1] != (2 * I + 127) / 128) } ?? false
    }

    /// The one storage format of every projection; fp8 needs 128×128 blocks.
    func commonFormat(_ projections: [Projection], configObject: [String: Any]) throws -> WeightFormat {
        let formats = Set(projections.map { WeightFormat(dtype: $0.weight.dtype) })
        guard formats.count == 1, let format = formats.first else {
            throw TensorIOError(file: path, "expert projections mix storage formats \(formats.map(\.rawValue).sorted()); MoECheck needs one format per layer")
        }
        if format.fp8 != nil, let q = configObject["quantization_config"] as? [String: Any],
           let block = q["weight_block_size"] as? [Int], block != [128, 128] {
            throw TensorIOError(file: path, "unsupported quantization_config weight_block_size \(block): only [128, 128] block scales are supported")
        }
        return format
    }
}
