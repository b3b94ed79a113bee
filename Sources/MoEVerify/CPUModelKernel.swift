import Foundation
#if canImport(Glibc)
import Glibc
#endif
import KernelBridge
import LowPrecision
import MoEReference
import TensorIO

/// A CPU model of a fused MoE kernel with the same recipe as `Kernels/` (binary32 arithmetic,
/// bf16 logits, `bf16(sigmoid(bf16(ws·x)))` shared gate, fp8 1×128 activation quantization with
/// aiter's reciprocal scale, split-K partial sums, bf16 intermediate, fp32 combine, bf16 output),
/// into which the same faults as the GPU fault build can be injected by name. It lets the
/// verification and fault-matrix machinery run — and be tested — on a machine without a GPU.
/// It is a model: the GPU fault build is the real thing (`moecheck faults --kernels`).
public final class CPUModelKernel: KernelUnderTest {
    /// Harmful faults, each modelled on a real bug (FACTS §5–§6, §8; Kernels/README.md): the
    /// names of the GPU fault build (`KernelFault`), so the CPU models and the build never drift.
    public static let harmfulFaults = KernelFault.harmful.map(\.rawValue)
    /// Variants a correct checker must accept.
    public static let benignVariants = KernelFault.benign.map(\.rawValue)

    public var fault: String?
    public var name: String { "cpu-model" + (fault.map { "[\($0)]" } ?? "") }
    public var device: String { "CPU (Swift model of the Kernels/ recipe)" }

    public init(fault: String? = nil) throws {
        if let fault, !(Self.harmfulFaults + Self.benignVariants).contains(fault) {
            throw VerifyError.usage("unknown fault '\(fault)' (known: \((Self.harmfulFaults + Self.benignVariants).joined(separator: ", ")))")
        }
        self.fault = fault
    }

    func on(_ f: String) -> Bool { fault == f }

    public func recipe(for format: WeightFormat) throws -> Recipe {
        Recipe.default(for: format)
    }

    /// Align block (rows per expert block), as in Kernels/.
    static let block = 32

    struct Weights {
        let bf16_13: [UInt8]   // bf16 layers: [slots, 2I, H] bf16 bits as stored (widened at use: no float copy of the layer)
        let bf16_2: [UInt8]    // [slots, H, I]
        let codes13: [UInt8], codes2: [UInt8]
        let s13: [Float], s2: [Float]
        let fp8: FP8Codec?
    }

    func weights(_ layer: KernelLayerSource, fuse: Bool) throws -> Weights {
        let kw = try layer.kernelWeights(fuseShared: fuse)
        if let f = layer.weightFormat.fp8 {
            // fnuz_as_fn: fnuz bytes decoded with the fn table, scales not adjusted (values doubled)
            let codec = (on("fnuz_as_fn") && f == .e4m3fnuz) ? FP8Codec.e4m3fn : FP8Codec.codec(for: f)
            return Weights(bf16_13: [], bf16_2: [], codes13: kw.w13, codes2: kw.w2, s13: kw.w13Scale, s2: kw.w2Scale, fp8: codec)
        }
        return Weights(bf16_13: kw.w13, bf16_2: kw.w2, codes13: [], codes2: [], s13: [], s2: [], fp8: nil)
    }

    // MARK: router

    func router(_ layer: KernelLayerSource, fuse: Bool, x: [Float]) throws -> (logits: [Float], ids: [Int32], weights: [Float], gate: [Float]) {
        let c = layer.config, T = layer.tokens, H = c.hidden, E = c.experts, K = c.topK
        let S = K + (fuse ? 1 : 0)
        let wg = try layer.routerBF16().map { BFloat16.float($0) }
        let ws = try layer.sharedGateBF16()?.map { BFloat16.float($0) }
        var logits = [Float](repeating: 0, count: T * E), ids = [Int32](repeating: 0, count: T * S)
        var weights = [Float](repeating: 0, count: T * S), gates = [Float](repeating: 0, count: T)
        let renormalize = c.renormalize && !on("renormalize_ignored")
        for t in 0..<T {
            for e in 0..<E {
                var acc: Float = 0
                for h in 0..<H { acc += x[t * H + h] * wg[e * H + h] }
                logits[t * E + e] = BFloat16.round(acc)
            }
            let row = Array(logits[(t * E)..<((t + 1) * E)])
            let mx = row.max()!
            let p = row.map { expf($0 - mx) }
            let sum = p.reduce(0, +)
            let prob = p.map { $0 / sum }
            let highTies = on("benign_tie_order_high")
            let order = (0..<E).sorted { prob[$0] != prob[$1] ? prob[$0] > prob[$1] : (highTies ? $0 > $1 : $0 < $1) }
            let chosen = Array(order.prefix(K))
            var g: Float = 0
            if fuse, let ws {
                var dot: Float = 0
                for h in 0..<H { dot += x[t * H + h] * ws[h] }
                if on("shared_gate_no_sigmoid") { g = BFloat16.round(dot) }
                else if on("benign_fp32_shared_gate") { g = 1 / (1 + expf(-dot)) }
                else { g = BFloat16.round(1 / (1 + expf(-BFloat16.round(dot)))) }
            }
            var denom: Float = renormalize ? chosen.reduce(0) { $0 + prob[$1] } : 1
            if on("shared_in_renormalization") && fuse { denom += g }
            for (s, e) in chosen.enumerated() {
                ids[t * S + s] = Int32(e)
                weights[t * S + s] = prob[e] / denom
            }
            if fuse {
                ids[t * S + K] = Int32(on("shared_id_e_minus_1") ? E - 1 : E)
                weights[t * S + K] = on("shared_slot_dropped") ? 0 : (on("shared_in_renormalization") ? g / denom : g)
                gates[t] = g
            }
        }
        return (logits, ids, weights, gates)
    }

    // MARK: experts

    /// Group-quantizes `v` (fp8 recipe) the way the kernel does; returns codes and scales.
    func quantize(_ v: [Float], codec: FP8Codec) -> ([UInt8], [Float]) {
        let q = GroupQuantizer(format: codec.format, convention: .multiplyReciprocal)
        var codes = [UInt8](repeating: 0, count: v.count), scales = [Float](repeating: 0, count: q.groupCount(v.count))
        v.withUnsafeBufferPointer { r in codes.withUnsafeMutableBufferPointer { cb in scales.withUnsafeMutableBufferPointer { s in
            q.quantize(row: r, codes: cb, scales: s)
        } } }
        return (codes, scales)
    }

    /// One dot product of a row of a [rows, K] matrix of slot `slot` with an activation, the
    /// kernel's way: bf16 plain fp32; fp8 block-scaled per 128 K-block with `splits` partials.
    func dot(_ w: Weights, matrixIsW13: Bool, slot: Int, row: Int, rows: Int, k: Int, act: [Float], actCodes: [UInt8], actScales: [Float],
             splits: Int, reverse: Bool, garbage: Float) -> Float {
        dot4(w, matrixIsW13: matrixIsW13, slot: slot, rows: SIMD4(repeating: row), rowCount: rows, k: k, act: act, actCodes: actCodes,
             actScales: actScales, splits: splits, reverse: reverse, garbage: garbage)[0]
    }

    /// `dot` of four rows at once, one per SIMD lane. Lane arithmetic is IEEE binary32 element by
    /// element, in `dot`'s order, so each lane's result is the bits a one-row `dot` gives; the
    /// four independent sums only keep the CPU's adders busy.
    func dot4(_ w: Weights, matrixIsW13: Bool, slot: Int, rows r: SIMD4<Int>, rowCount rows: Int, k: Int, act: [Float], actCodes: [UInt8],
              actScales: [Float], splits: Int, reverse: Bool, garbage: Float) -> SIMD4<Float> {
        let base = (slot &* rows &+ r) &* k
        if w.fp8 == nil {
            let m = matrixIsW13 ? w.bf16_13 : w.bf16_2
            var acc = SIMD4<Float>(repeating: 0)
            m.withUnsafeBytes { raw in
                let mp = raw.bindMemory(to: UInt16.self)
                act.withUnsafeBufferPointer { ap in
                    precondition(base.min() >= 0 && base.max() + k <= mp.count && k <= ap.count)
                    let m0 = mp.baseAddress! + base[0], m1 = mp.baseAddress! + base[1], m2 = mp.baseAddress! + base[2], m3 = mp.baseAddress! + base[3]
                    @inline(__always) func wv(_ i: Int) -> SIMD4<Float> {
                        SIMD4(BFloat16.float(m0[i]), BFloat16.float(m1[i]), BFloat16.float(m2[i]), BFloat16.float(m3[i]))
                    }
                    if reverse {
                        for i in stride(from: k - 1, through: 0, by: -1) { acc += SIMD4(repeating: ap[i]) * wv(i) }
                    } else {
                        for i in 0..<k { acc += SIMD4(repeating: ap[i]) * wv(i) }
                    }
                }
            }
            return acc
        }
        let codec = w.fp8!
        let codes = matrixIsW13 ? w.codes13 : w.codes2
        let scales = matrixIsW13 ? w.s13 : w.s2
        let kb = (k + 127) / 128
        let rowBlocks = matrixIsW13 ? 2 * ((rows / 2 + 127) / 128) : (rows + 127) / 128
        let half = rows / 2
        func blockRow(_ row: Int) -> Int { matrixIsW13 ? (row < half ? row / 128 : (half + 127) / 128 + (row - half) / 128) : row / 128 }
        let sBase = (slot &* rowBlocks &+ SIMD4(blockRow(r[0]), blockRow(r[1]), blockRow(r[2]), blockRow(r[3]))) &* kb
        @inline(__always) func lanes(_ v: SIMD4<Float>, _ f: (Float) -> Float) -> SIMD4<Float> { SIMD4(f(v[0]), f(v[1]), f(v[2]), f(v[3])) }
        // Blocks are summed in K order into one partial per split, and the partials in split order
        // (with one split, that is one partial); split-K adds each partial into a workspace the
        // kernel zeroes, where the split-K faults act.
        let perSplit = (kb + splits - 1) / splits
        let splitK = splits > 1 && matrixIsW13
        let wrongScale = matrixIsW13 && on("wrong_kblock_scale")
        let bf16Partials = splitK && on("splitk_bf16_partials"), fp16Partials = splitK && on("splitk_fp16_partials")
        var acc = SIMD4<Float>(repeating: (splitK && perSplit == 1 && on("splitk_workspace_not_zeroed")) ? garbage : 0)
        // fp8_accumulation_14bit: the running sums kept in ~14 significant bits (a tensor core's
        // internal accumulator), rounded every 32 K as the GPU fault build does, never promoted to fp32
        let low = on("fp8_accumulation_14bit")
        precondition(base.min() >= 0 && base.max() + k <= codes.count && k <= actCodes.count, "dot4: rows outside the weights")
        codes.withUnsafeBufferPointer { cp in actCodes.withUnsafeBufferPointer { ap in codec.table.withUnsafeBufferPointer { value in
            let c0 = cp.baseAddress! + base[0], c1 = cp.baseAddress! + base[1], c2 = cp.baseAddress! + base[2], c3 = cp.baseAddress! + base[3]
            var b0 = 0
            while b0 < kb {
                let b1 = Swift.min(kb, b0 + perSplit)
                var p = SIMD4<Float>(repeating: 0)
                for b in b0..<b1 {
                    var partial = SIMD4<Float>(repeating: 0)
                    let end = Swift.min(k, (b + 1) * 128)
                    for i in (b * 128)..<end {
                        let wv = SIMD4(value[Int(c0[i])], value[Int(c1[i])], value[Int(c2[i])], value[Int(c3[i])])
                        partial += SIMD4(repeating: value[Int(ap[i])]) * wv
                        if low && ((i + 1) % 32 == 0 || i == end - 1) { partial = lanes(partial, Self.round14) }
                    }
                    let aScale = wrongScale ? actScales[(b + 1) % kb] : actScales[b]
                    p += (SIMD4(repeating: aScale) * SIMD4(scales[sBase[0] + b], scales[sBase[1] + b], scales[sBase[2] + b], scales[sBase[3] + b])) * partial
                    if low { p = lanes(p, Self.round14) }
                }
                if bf16Partials { p = lanes(p, BFloat16.round) }
                else if fp16Partials { p = lanes(p) { Float(SmallFloatFormat.float16.round(Double($0))) } }
                acc += p
                if low { acc = lanes(acc, Self.round14) }
                b0 = b1
            }
        } } }
        // splitk_bf16_after_atomic: the fp32 workspace sum rounded to bf16 before silu·up
        if splitK && on("splitk_bf16_after_atomic") { acc = lanes(acc, BFloat16.round) }
        return acc
    }

    /// Rounds to 14 significant bits, nearest even (a tensor core's reduced accumulator).
    static func round14(_ x: Float) -> Float {
        let b = x.bitPattern
        return Float(bitPattern: (b &+ 0x1FF &+ ((b >> 10) & 1)) & ~0x3FF)
    }

    func experts(_ layer: KernelLayerSource, w: Weights, x: [Float], ids: [Int32], weights: [Float], S: Int, splits: Int, garbage: Float)
        -> (intermediate: [Double], output: [Double]) {
        let c = layer.config, T = layer.tokens, H = c.hidden, I = c.intermediate
        var inter = [Double](repeating: 0, count: T * S * I)
        var y = [Float](repeating: 0, count: T * S * H)
        var skipped = Set<Int>()
        if on("last_partial_m_tile_skipped") {
            // the pairs in each expert's last, partially filled block
            var byExpert: [Int32: [Int]] = [:]
            for p in 0..<(T * S) { byExpert[ids[p], default: []].append(p) }
            for (_, pairs) in byExpert where pairs.count % Self.block != 0 {
                for p in pairs.suffix(pairs.count % Self.block) { skipped.insert(p) }
            }
        }
        // each token's activations (fp8: quantized per 1×128 group, as the kernel does)
        let tokens = (0..<T).map { t -> (x: [Float], codes: [UInt8], scales: [Float]) in
            let xt = Array(x[(t * H)..<((t + 1) * H)])
            let (xc, xs) = w.fp8.map { _ in quantize(xt, codec: FP8Codec.codec(for: layer.weightFormat.fp8!)) } ?? ([], [])
            return (xt, xc, xs)
        }
        let lowestExpert = Int(ids.min() ?? 0)
        let twice = on("intermediate_rounded_twice")
        // (token, slot) pairs are independent, as on a GPU: they run on every core, each with the
        // arithmetic, in the order, of a serial run (the results are the same bits)
        inter.withUnsafeMutableBufferPointer { interOut in
            y.withUnsafeMutableBufferPointer { yOut in
                DispatchQueue.concurrentPerform(iterations: T * S) { p in
                    let (xt, xc, xs) = tokens[p / S]
                    let e = Int(ids[p])
                    var h = [Float](repeating: 0, count: I)
                    // gate and up of intermediate columns i and i + 1 in one four-row pass
                    for i in stride(from: 0, to: I, by: 2) {
                        let j = Swift.min(i + 1, I - 1)
                        let gu = dot4(w, matrixIsW13: true, slot: e, rows: SIMD4(i, I + i, j, I + j), rowCount: 2 * I, k: H, act: xt, actCodes: xc,
                                      actScales: xs, splits: splits, reverse: false, garbage: garbage)
                        for lane in stride(from: 0, to: j > i ? 4 : 2, by: 2) {
                            let column = i + lane / 2, g = gu[lane], u = gu[lane + 1]
                            let silu = g / (1 + expf(-g))
                            h[column] = twice ? BFloat16.round(BFloat16.round(silu) * u) : BFloat16.round(silu * u)
                            interOut[p * I + column] = Double(h[column])
                        }
                    }
                    if skipped.contains(p) { return }
                    let (hc, hs) = w.fp8.map { _ in quantize(h, codec: FP8Codec.codec(for: layer.weightFormat.fp8!)) } ?? ([], [])
                    // expert_scaled_1p2m6: the lowest used expert (the first align block's) computes its output × (1 + 2^-6)
                    let scale: Float = on("expert_scaled_1p2m6") && e == lowestExpert ? 1 + 0x1p-6 : 1
                    for o in stride(from: 0, to: H, by: 4) {
                        let rows = SIMD4(o, Swift.min(o + 1, H - 1), Swift.min(o + 2, H - 1), Swift.min(o + 3, H - 1))
                        let d = dot4(w, matrixIsW13: false, slot: e, rows: rows, rowCount: H, k: I, act: h, actCodes: hc, actScales: hs,
                                     splits: 1, reverse: on("benign_reverse_accumulation"), garbage: garbage)
                        for lane in 0..<Swift.min(4, H - o) { yOut[p * H + o + lane] = scale * d[lane] }
                    }
                }
            }
        }
        var out = [Double](repeating: 0, count: T * H)
        for t in 0..<T {
            for o in 0..<H {
                var acc: Float = 0
                for s in 0..<S { acc += weights[t * S + s] * y[(t * S + s) * H + o] }
                if on("padding_expert_zero") && t == 0 { acc += y[o] }   // padded rows read pair 0 into token 0
                out[t * H + o] = Double(BFloat16.round(acc))
            }
        }
        return (inter, out)
    }

    public func run(_ vc: VerifyCase, layer: KernelLayerSource, referenceIds: [Int32], referenceWeights: [Float]) throws -> KernelRun {
        let c = layer.config
        let S = c.topK + (vc.fuseShared ? 1 : 0)
        let x = try layer.inputsBF16().map { BFloat16.float($0) }
        let w = try weights(layer, fuse: vc.fuseShared)
        let r = try router(layer, fuse: vc.fuseShared, x: x)
        let splits = layer.weightFormat.fp8 != nil ? vc.splitK : 1
        let staged = experts(layer, w: w, x: x, ids: referenceIds, weights: referenceWeights, S: S, splits: splits, garbage: -2.9e13)
        // Two whole-layer runs; a workspace that is not zeroed holds different garbage each time.
        let t0 = Date()
        let run1 = experts(layer, w: w, x: x, ids: r.ids, weights: r.weights, S: S, splits: splits, garbage: Float(bitPattern: 0xD5D5_D5D5))
        let forwardMs = Date().timeIntervalSince(t0) * 1000 // the expert stage of one whole-layer run (the router ran once, above)
        let run2 = experts(layer, w: w, x: x, ids: r.ids, weights: r.weights, S: S, splits: splits, garbage: 1.0e4)
        return KernelRun(routing: KernelRouting(logits: r.logits, ids: r.ids, weights: r.weights.map(Double.init), slots: S), alignProblems: [],
                         intermediate: staged.intermediate, stagedOutput: staged.output, forwardOutputs: [run1.output, run2.output],
                         forwardMilliseconds: forwardMs)
    }
}
