import CMoEKernelABI

// Named Swift mirrors of the constants in Kernels/include/moe_kernels.h (swift-system's named
// errno): code above the bridge switches over these, never over bare 0/1/2. Each raw value is the
// header's; KernelBridgeTests checks every one against the C enum it mirrors.

extension KernelLibrary {
    /// `moe_status`: what every ABI call returns.
    public enum Status: Int32, CaseIterable, Sendable, CustomStringConvertible {
        /// `MOE_OK`, `MOE_ERR_INVALID_ARGUMENT`, `MOE_ERR_DEVICE`, `MOE_ERR_UNSUPPORTED`,
        /// `MOE_ERR_OUT_OF_MEMORY`.
        case ok, invalidArgument, deviceError, unsupported, outOfMemory

        public var description: String {
            switch self {
            case .ok: return "ok"
            case .invalidArgument: return "invalid argument"
            case .deviceError: return "device error"
            case .unsupported: return "unsupported"
            case .outOfMemory: return "out of memory"
            }
        }
    }

    /// `moe_weight_format`: how the projection weights are stored — `MOE_WEIGHTS_BF16`,
    /// `MOE_WEIGHTS_FP8_E4M3FN` (OCP, max 448) and `MOE_WEIGHTS_FP8_E4M3FNUZ` (MI300, max 240),
    /// both fp8 formats with 128×128 block scales.
    public enum WeightFormatCode: Int32, CaseIterable, Sendable {
        case bf16, fp8e4m3fn, fp8e4m3fnuz
    }

    /// `moe_fill_kind`: what `moe_fill_counter` writes — `MOE_FILL_BF16_INT` (bf16 bits of
    /// `m · 2^-param`), `MOE_FILL_FP8_CODE` (an e4m3 code, never NaN or 0x80) and
    /// `MOE_FILL_F32_POW2` (a power-of-two float scale).
    public enum FillKind: Int32, CaseIterable, Sendable {
        case bf16Int, fp8Code, f32Pow2
    }

    /// `moe_recipe`, the rounding points a library declares, with named values.
    public struct DeclaredRecipe: Sendable, Equatable {
        /// `moe_precision`: `MOE_PREC_FP32` (kept in binary32) or `MOE_PREC_BF16` (rounded to bf16).
        public enum Precision: Int32, CaseIterable, Sendable { case fp32, bf16 }

        public var routerLogits: Precision?
        public var routingWeights: Precision?
        public var sharedGate: Precision?
        /// x quantized per token per 1×128 group to the weights' fp8.
        public var activationFP8: Bool

        /// `moe_scale_convention`: `MOE_SCALE_DIVIDE` (`x / scale`) or
        /// `MOE_SCALE_MULTIPLY_RECIPROCAL` (`x * (1 / scale)`).
        public enum ScaleConvention: Int32, CaseIterable, Sendable { case divide, multiplyReciprocal }

        public var activationScale: ScaleConvention?

        /// `moe_intermediate`: `MOE_INTER_BF16` (`silu(gate)·up` rounded to bf16) or
        /// `MOE_INTER_FP8_GROUP128` (then requantized to fp8 per 1×128 group).
        public enum Intermediate: Int32, CaseIterable, Sendable { case bf16, fp8Group128 }

        public var intermediate: Intermediate?
        public var combine: Precision?
        public var output: Precision?

        /// The named view of `r`; a field with a value the header does not name is nil.
        public init(_ r: moe_recipe) {
            routerLogits = Precision(rawValue: r.router_logits)
            routingWeights = Precision(rawValue: r.routing_weights)
            sharedGate = Precision(rawValue: r.shared_gate)
            activationFP8 = r.activation_fp8 != 0
            activationScale = ScaleConvention(rawValue: r.activation_scale)
            intermediate = Intermediate(rawValue: r.intermediate)
            combine = Precision(rawValue: r.combine)
            output = Precision(rawValue: r.output)
        }
    }

    /// The recipe the library declares for `format`, with named values.
    public func declaredRecipe(for format: WeightFormatCode) throws -> DeclaredRecipe {
        DeclaredRecipe(try declaredRecipe(weightFormat: format.rawValue))
    }

    /// `MOE_ABI_VERSION`: the ABI this bridge speaks.
    public static let abiVersion = Int32(MOE_ABI_VERSION)

    /// Fills `dst` with counter-generated data of `kind` (see `fillCounter(_:kind:count:seed:stream:offset:param:)`).
    public func fillCounter(_ dst: DeviceBuffer, kind: FillKind, count: Int, seed: UInt64, stream: UInt64, offset: Int, param: Int32) throws {
        try fillCounter(dst, kind: kind.rawValue, count: count, seed: seed, stream: stream, offset: offset, param: param)
    }

    /// Selects a fault of a FAULTS=1 build by its name.
    public func setFault(_ fault: KernelFault) throws { try setFault(fault.rawValue) }
}

/// The faults a FAULTS=1 kernel build injects, by the names `moe_set_fault` takes
/// (`k_fault_names` in Kernels/src/moe_api.hip, `MOE_FAULT_*` in Kernels/src/moe_device.h), in
/// the build's order. Names starting with `benign_` are variants a correct verifier must accept;
/// the others are bugs it must catch. The CPU model kernel knows the same names.
public enum KernelFault: String, CaseIterable, Sendable, Codable, CustomStringConvertible {
    case splitKWorkspaceNotZeroed = "splitk_workspace_not_zeroed"
    case splitKBF16Partials = "splitk_bf16_partials"
    case splitKFP16Partials = "splitk_fp16_partials"
    case wrongKBlockScale = "wrong_kblock_scale"
    case sharedSlotDropped = "shared_slot_dropped"
    case sharedGateNoSigmoid = "shared_gate_no_sigmoid"
    case sharedInRenormalization = "shared_in_renormalization"
    case sharedIdEMinus1 = "shared_id_e_minus_1"
    case paddingExpertZero = "padding_expert_zero"
    case lastPartialMTileSkipped = "last_partial_m_tile_skipped"
    case fnuzAsFn = "fnuz_as_fn"
    case renormalizeIgnored = "renormalize_ignored"
    case benignReverseAccumulation = "benign_reverse_accumulation"
    case benignTieOrderHigh = "benign_tie_order_high"
    case benignFP32SharedGate = "benign_fp32_shared_gate"
    // precision faults: inside a worst-case bound on ordinary data (the statistical tier's)
    case fp8Accumulation14Bit = "fp8_accumulation_14bit"
    case intermediateRoundedTwice = "intermediate_rounded_twice"
    case expertScaled1p2m6 = "expert_scaled_1p2m6"
    case splitKBF16AfterAtomic = "splitk_bf16_after_atomic"

    public var description: String { rawValue }

    /// The prefix that marks a benign variant.
    public static let benignPrefix = "benign_"

    /// Whether a fault name is a benign variant (`benign_…`): any name, so a third-party build's
    /// own variants are judged by the same rule.
    public static func isBenign(_ name: String) -> Bool { name.hasPrefix(benignPrefix) }

    /// A variant a correct verifier must accept.
    public var isBenign: Bool { Self.isBenign(rawValue) }

    /// The faults a verifier must detect, in build order.
    public static var harmful: [KernelFault] { allCases.filter { !$0.isBenign } }

    /// The variants a verifier must accept, in build order.
    public static var benign: [KernelFault] { allCases.filter(\.isBenign) }
}
