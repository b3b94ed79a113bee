import CMoEKernelABI
import Foundation
import KernelBridge
import LowPrecision
import MoEReference
import TensorIO

/// A kernel's routing of one case: what its router stage (or an adapter's `route`) produced.
public struct KernelRouting: Sendable {
    /// Router logits `[T, E]`, when the kernel exposes them.
    public var logits: [Float]?
    /// `[T, slots]` expert ids and routing weights; slots = K, or K + 1 with the shared expert
    /// fused as id E in slot K.
    public var ids: [Int32]
    public var weights: [Double]
    public var slots: Int

    public init(logits: [Float]?, ids: [Int32], weights: [Double], slots: Int) {
        self.logits = logits; self.ids = ids; self.weights = weights; self.slots = slots
    }
}

/// What one kernel produced for one case, stage by stage; a stage the kernel does not expose
/// is nil and is not judged.
public struct KernelRun: Sendable {
    /// The kernel's own routing.
    public var routing: KernelRouting?
    /// Problems found in the align stage's output (empty when it is consistent; nil: no align stage).
    public var alignProblems: [String]?
    /// Stage 1 with the reference's ids: bf16 intermediate `[T·S, I]`.
    public var intermediate: [Double]?
    /// Stages 1+2 with the reference's ids and weights: output `[T, H]`.
    public var stagedOutput: [Double]?
    /// The whole layer (kernel's own routing), run twice (on poisoned buffers where the kernel has buffers).
    public var forwardOutputs: [[Double]]
    /// Milliseconds of the first whole-layer run (device time where the kernel measures it).
    public var forwardMilliseconds: Double
    /// Where the rest of the case's time went, seconds by phase (worker transfers, conversion…).
    public var overhead: [String: Double] = [:]

    public init(routing: KernelRouting?, alignProblems: [String]?, intermediate: [Double]?, stagedOutput: [Double]?,
                forwardOutputs: [[Double]], forwardMilliseconds: Double) {
        self.routing = routing; self.alignProblems = alignProblems; self.intermediate = intermediate; self.stagedOutput = stagedOutput
        self.forwardOutputs = forwardOutputs; self.forwardMilliseconds = forwardMilliseconds
    }
}

/// A fused MoE implementation under test: a GPU kernel library through the C ABI, a Python
/// adapter, a recorded output, or a CPU model of one (with or without an injected fault) so the
/// whole machinery runs without a GPU.
public protocol KernelUnderTest: AnyObject {
    var name: String { get }
    /// Where it runs, for reports.
    var device: String { get }
    /// The recipe the kernel declares for this weight format.
    func recipe(for format: WeightFormat) throws -> Recipe
    /// Runs every stage of `verifyCase` it has on `layer`; `referenceIds`/`referenceWeights`
    /// (`[T, S]`) drive the teacher-forced stages.
    func run(_ verifyCase: VerifyCase, layer: KernelLayerSource, referenceIds: [Int32], referenceWeights: [Float]) throws -> KernelRun
}

extension Recipe {
    /// The recipe a kernel declares through the C ABI (`moe_recipe`).
    public static func declared(router: Int32, routingWeights: Int32, sharedGate: Int32, activationFP8: Int32, activationScale: Int32,
                                intermediate: Int32, combine: Int32, output: Int32, libraryName: String) -> Recipe {
        func prec(_ v: Int32) -> Rounding { v == 1 ? .bf16 : .fp32 }
        var r = Recipe.fusedBF16
        r.name = "declared by \(libraryName)"
        r.routerLogits = router == 1 ? .bf16 : .none
        r.routingWeights = prec(routingWeights)
        r.sharedGate = sharedGate == 1 ? .bf16 : .none
        r.activationFP8 = activationFP8 != 0
        r.scaleConvention = activationScale == 1 ? .multiplyReciprocal : .divide
        r.intermediate = .bf16
        r.intermediateFP8 = intermediate == 1
        r.combine = combine == 1 ? .bf16 : .fp32
        r.output = prec(output)
        return r
    }
}

/// bf16 bits → Double.
@inline(__always)
func bf16Values(_ bits: [UInt16]) -> [Double] { bits.map { Double(BFloat16.float($0)) } }

/// Checks the align stage's output: every (token, slot) pair exactly once, in a block of its
/// expert, padding with the sentinel, unused blocks marked −1.
func checkAlign(ids: [Int32], tokens T: Int, slots S: Int, experts: Int, block: Int, sorted: [Int32], blockExperts: [Int32], padded: Int) -> [String] {
    var problems: [String] = []
    let sentinel = Int32(T * S)
    if padded < 0 || padded > sorted.count || padded % block != 0 {
        return ["padded_count \(padded) is not a multiple of the block size \(block) within the capacity \(sorted.count)"]
    }
    var seen = [Int](repeating: 0, count: T * S)
    for i in 0..<padded {
        let p = sorted[i], b = i / block
        let e = blockExperts[b]
        if i % block == 0 && (e < 0 || Int(e) >= experts) {
            problems.append("used block \(b) has expert id \(e) outside 0..<\(experts)")
        }
        if p == sentinel { continue }
        guard p >= 0, p < sentinel else { problems.append("sorted entry \(i) = \(p) is neither a pair index nor the sentinel \(sentinel)"); continue }
        seen[Int(p)] += 1
        if ids[Int(p)] != e { problems.append("pair \(p) (token \(p / Int32(S)), slot \(p % Int32(S)), expert \(ids[Int(p)])) sits in block \(b) of expert \(e)") }
        if problems.count > 5 { break }
    }
    for (p, n) in seen.enumerated() where n != 1 {
        problems.append("pair \(p) (token \(p / S), slot \(p % S)) appears \(n) times")
        if problems.count > 8 { break }
    }
    // The header's layout: used blocks in ascending expert id, each expert's run of pairs
    // followed by its padding, which fills no more than the run's last block.
    var layout: [String] = []
    let used = padded / block
    for b in 0..<used where layout.count < 3 {
        let e = blockExperts[b]
        if b > 0 && e < blockExperts[b - 1] {
            layout.append("block \(b) has expert \(e) after block \(b - 1) of expert \(blockExperts[b - 1]): blocks must come in ascending expert id")
        }
        let entries = sorted[(b * block)..<((b + 1) * block)]
        guard let first = entries.firstIndex(of: sentinel) else { continue }
        if first == b * block {
            layout.append("block \(b) of expert \(e) holds only padding: an expert's run is padded to the next block multiple, no further")
        } else if entries[first...].contains(where: { $0 != sentinel }) {
            layout.append("block \(b) of expert \(e) has a pair after the sentinel padding at entry \(first): padding must end the expert's run")
        } else if b + 1 < used && blockExperts[b + 1] == e {
            layout.append("block \(b) of expert \(e) is padded but expert \(e)'s run continues in block \(b + 1): padding must end the run")
        }
    }
    problems += layout
    for b in (padded / block)..<blockExperts.count where blockExperts[b] != -1 {
        problems.append("unused block \(b) has expert id \(blockExperts[b]) instead of -1")
        break
    }
    return problems
}

/// A kernel library on a GPU, through `KernelBridge`.
public final class DeviceKernel: KernelUnderTest {
    public let library: KernelLibrary
    public let device: String
    public var name: String { library.libraryName }
    /// Generate expert weights on the device (`moe_fill_counter`) when the library can.
    public var generateOnDevice: Bool

    public init(library: KernelLibrary, device index: Int = 0) throws {
        self.library = library
        let n = try library.deviceCount()
        guard n > 0 else { throw VerifyError.failed("\(library.path): no GPU device found (moe_device_count = 0)") }
        guard index < n else { throw VerifyError.usage("device \(index) requested, \(n) present") }
        try library.setDevice(index)
        device = try library.deviceName(index)
        generateOnDevice = library.canFillCounter
    }

    public func recipe(for format: WeightFormat) throws -> Recipe {
        let r = try library.declaredRecipe(weightFormat: Self.abiFormat(format))
        return Recipe.declared(router: r.router_logits, routingWeights: r.routing_weights, sharedGate: r.shared_gate,
                               activationFP8: r.activation_fp8, activationScale: r.activation_scale, intermediate: r.intermediate,
                               combine: r.combine, output: r.output, libraryName: library.libraryName)
    }

    static func abiFormat(_ f: WeightFormat) -> Int32 {
        switch f {
        case .fp8e4m3fn: return 1
        case .fp8e4m3fnuz: return 2
        default: return 0
        }
    }

    /// Device-resident weights of one case.
    final class Resident {
        let w13: DeviceBuffer, w2: DeviceBuffer
        let s13: DeviceBuffer?, s2: DeviceBuffer?
        let router: DeviceBuffer, sharedGate: DeviceBuffer?
        init(w13: DeviceBuffer, w2: DeviceBuffer, s13: DeviceBuffer?, s2: DeviceBuffer?, router: DeviceBuffer, sharedGate: DeviceBuffer?) {
            self.w13 = w13; self.w2 = w2; self.s13 = s13; self.s2 = s2; self.router = router; self.sharedGate = sharedGate
        }
        var abi: moe_weights {
            moe_weights(w13: UnsafeRawPointer(w13.pointer), w2: UnsafeRawPointer(w2.pointer),
                        w13_scale: s13.map { UnsafePointer($0.pointer.assumingMemoryBound(to: Float.self)) },
                        w2_scale: s2.map { UnsafePointer($0.pointer.assumingMemoryBound(to: Float.self)) },
                        router: UnsafeRawPointer(router.pointer), shared_gate: sharedGate.map { UnsafeRawPointer($0.pointer) })
        }
    }

    func upload(_ layer: KernelLayerSource, fuseShared: Bool) throws -> Resident {
        let c = layer.config, H = c.hidden, I = c.intermediate
        let slots = c.experts + (fuseShared ? 1 : 0)
        let esize = layer.weightFormat == .bf16 ? 2 : 1
        let fp8 = layer.weightFormat.fp8 != nil
        let si = (I + 127) / 128, sh = (H + 127) / 128
        let w13 = try library.allocate(slots * 2 * I * H * esize)
        let w2 = try library.allocate(slots * H * I * esize)
        let s13 = fp8 ? try library.allocate(slots * 2 * si * sh * 4) : nil
        let s2 = fp8 ? try library.allocate(slots * sh * si * 4) : nil
        if generateOnDevice, let layer = layer as? SyntheticLayer, layer.spec.scales == .counter {
            let seed = layer.spec.seed
            let kind: Int32 = fp8 ? 1 : 0
            try library.fillCounter(w13, kind: kind, count: slots * 2 * I * H, seed: seed, stream: SyntheticLayer.w13Stream, offset: 0,
                                    param: Int32(SyntheticLayer.bf16Param(H)))
            try library.fillCounter(w2, kind: kind, count: slots * H * I, seed: seed, stream: SyntheticLayer.w2Stream, offset: 0,
                                    param: Int32(SyntheticLayer.bf16Param(I)))
            if let s13, let s2 {
                try library.fillCounter(s13, kind: 2, count: slots * 2 * si * sh, seed: seed, stream: SyntheticLayer.w13ScaleStream, offset: 0,
                                        param: Int32(SyntheticLayer.fp8Param(H)))
                try library.fillCounter(s2, kind: 2, count: slots * sh * si, seed: seed, stream: SyntheticLayer.w2ScaleStream, offset: 0,
                                        param: Int32(SyntheticLayer.fp8Param(I)))
            }
            // The device generator must reproduce the host's bits: check the last expert slot.
            let last = slots - 1
            let (hostBytes, hostScales) = layer.gateUpBytes(expert: last)
            let n = 2 * I * H * esize
            if try w13.download(UInt8.self, count: n, offset: last * n) != hostBytes {
                throw VerifyError.failed("moe_fill_counter: device-generated w13 of slot \(last) differs from the host generator")
            }
            if let s13 {
                if try s13.download(Float.self, count: 2 * si * sh, offset: last * 2 * si * sh) != hostScales {
                    throw VerifyError.failed("moe_fill_counter: device-generated w13 scales of slot \(last) differ from the host generator")
                }
            }
        } else {
            let kw = try layer.kernelWeights(fuseShared: fuseShared)
            try w13.upload(kw.w13)
            try w2.upload(kw.w2)
            if let s13, let s2 { try s13.upload(kw.w13Scale); try s2.upload(kw.w2Scale) }
        }
        let router = try library.allocate(c.experts * H * 2)
        try router.upload(try layer.routerBF16())
        var sg: DeviceBuffer? = nil
        if fuseShared, let g = try layer.sharedGateBF16() {
            sg = try library.allocate(H * 2)
            try sg!.upload(g)
        }
        return Resident(w13: w13, w2: w2, s13: s13, s2: s2, router: router, sharedGate: sg)
    }

    public func run(_ vc: VerifyCase, layer: KernelLayerSource, referenceIds: [Int32], referenceWeights: [Float]) throws -> KernelRun {
        let c = layer.config, T = layer.tokens, H = c.hidden, E = c.experts, I = c.intermediate
        let S = c.topK + (vc.fuseShared ? 1 : 0)
        var problem = moe_problem(tokens: Int64(T), hidden: Int64(H), intermediate: Int64(I), experts: Int32(E), top_k: Int32(c.topK),
                                  renormalize: c.renormalize ? 1 : 0, fuse_shared: vc.fuseShared ? 1 : 0,
                                  weight_format: Self.abiFormat(layer.weightFormat), split_k: Int32(vc.splitK))
        problem.split_k = Int32(vc.splitK)
        let resident = try upload(layer, fuseShared: vc.fuseShared)
        let weights = resident.abi
        let x = try library.allocate(T * H * 2)
        try x.upload(try layer.inputsBF16())
        let wsBytes = try library.workspaceSize(problem)
        let workspace = try library.allocate(wsBytes)
        let block = library.alignBlockSize
        guard block > 0 else { throw VerifyError.failed("moe_align_block_size returned \(block)") }
        var capacity = T * S + (E + 1) * (block - 1)
        capacity = (capacity + block - 1) / block * block

        // router
        let logits = try library.allocate(T * E * 4), ids = try library.allocate(T * S * 4)
        let tw = try library.allocate(T * S * 4), gate = try library.allocate(T * 4)
        for b in [logits, ids, tw, gate, workspace] { try library.memset(b, byte: 0xFF) }
        try library.router(problem, weights, x: x, logits: logits, ids: ids, topkWeights: tw, sharedGate: vc.fuseShared ? gate : nil)
        try library.synchronize()
        let kLogits = try logits.download(Float.self, count: T * E)
        let kIds = try ids.download(Int32.self, count: T * S)
        let kWeights = try tw.download(Float.self, count: T * S)

        // align with the reference's ids
        try ids.upload(referenceIds)
        try tw.upload(referenceWeights)
        let sorted = try library.allocate(capacity * 4), blocks = try library.allocate(capacity / block * 4), padded = try library.allocate(4)
        for b in [sorted, blocks, padded] { try library.memset(b, byte: 0xD5) }
        try library.align(problem, ids: ids, sortedPairs: sorted, blockExperts: blocks, paddedCount: padded)
        try library.synchronize()
        let paddedCount = Int(try padded.download(Int32.self, count: 1)[0])
        let alignProblems = checkAlign(ids: referenceIds, tokens: T, slots: S, experts: E + (vc.fuseShared ? 1 : 0), block: block,
                                       sorted: try sorted.download(Int32.self, count: capacity),
                                       blockExperts: try blocks.download(Int32.self, count: capacity / block), padded: paddedCount)
        // stage 1, stage 2 on poisoned buffers
        let inter = try library.allocate(T * S * I * 2)
        let out = try library.allocate(T * H * 2)
        try library.memset(inter, byte: 0xFF)
        try library.memset(out, byte: 0xFF)
        try library.memset(workspace, byte: 0xD5)
        try library.stage1(problem, weights, x: x, ids: ids, sortedPairs: sorted, blockExperts: blocks, paddedCount: padded,
                           intermediate: inter, workspace: workspace)
        try library.synchronize()
        let kInter = bf16Values(try inter.download(UInt16.self, count: T * S * I))
        try library.memset(workspace, byte: 0xFF)
        try library.stage2(problem, weights, intermediate: inter, ids: ids, topkWeights: tw, sortedPairs: sorted, blockExperts: blocks,
                           paddedCount: padded, output: out, workspace: workspace)
        try library.synchronize()
        let staged = bf16Values(try out.download(UInt16.self, count: T * H))

        // whole layer, twice, each on freshly poisoned output and workspace
        var forwards: [[Double]] = []
        var ms = 0.0
        for (i, poison) in [UInt8(0xFF), 0xD5].enumerated() {
            try library.memset(out, byte: poison)
            try library.memset(workspace, byte: poison)
            try library.synchronize()
            try library.timerBegin()
            try library.forward(problem, weights, x: x, output: out, workspace: workspace)
            let t = try library.timerEnd()
            try library.synchronize()
            if i == 0 { ms = t }
            forwards.append(bf16Values(try out.download(UInt16.self, count: T * H)))
        }
        return KernelRun(routing: KernelRouting(logits: kLogits, ids: kIds, weights: kWeights.map(Double.init), slots: S), alignProblems: alignProblems,
                         intermediate: kInter, stagedOutput: staged, forwardOutputs: forwards, forwardMilliseconds: ms)
    }
}

/// A kernel that runs the whole MoE block, the shared expert included even when it cannot fuse
/// (a Python adapter around a model's block, a recorded output): the reference then models
/// the whole layer for unfused cases too, where a C ABI kernel dispatches the routed experts alone.
public protocol WholeLayerKernel: KernelUnderTest {}
