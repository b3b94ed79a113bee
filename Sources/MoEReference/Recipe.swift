import LowPrecision

/// Where a rounding point rounds to.
public enum Rounding: String, Codable, Sendable, CaseIterable {
    /// Not rounded: the value keeps full precision (float64 in the reference).
    case none
    /// Rounded to binary32 (a kernel keeps it in an fp32 register/buffer).
    case fp32
    /// Rounded to bfloat16.
    case bf16
    /// Rounded to bfloat16 or kept in fp32: the recipe allows either (the reference value is the
    /// bf16 one; the bound also covers the unrounded value).
    case bf16OrFP32 = "bf16-or-fp32"

    public var format: SmallFloatFormat? {
        switch self {
        case .none: return nil
        case .fp32: return .float32
        case .bf16, .bf16OrFP32: return .bfloat16
        }
    }
}

/// How a kernel computes its dynamic fp8 quantization's scaled values `x / scale` or
/// `x · (1/scale)` (docs/error-bounds.md, "fp8 midpoints").
public enum QuantizationArithmetic: String, Codable, Sendable, CaseIterable {
    /// Correctly rounded binary32 exactly as the recipe's `scaleConvention` says (IEEE division
    /// and reciprocal: nvcc and hipcc without fast math, torch's `/` and `reciprocal`): the
    /// kernel's codes equal the reference's, those whose scaled value sits on a rounding midpoint
    /// included, so the statistical tier treats them as known.
    case exact
    /// The division or reciprocal may be off by a few ulp (Triton's fp32 `/` lowers to
    /// `div.full.f32`, ≤ 2 ulp; fast-math builds): a code whose scaled value sits within 2⁻²¹
    /// (relative) of a midpoint may be either, and the statistical tier takes the rigorous
    /// radius as the noise of that token's stage 1 (far less sensitive at H ≥ 2048, where most
    /// tokens have such a code).
    case approximate
}

/// How the weighted sum over a token's slots is accumulated.
public enum CombineMode: String, Codable, Sendable, CaseIterable {
    /// Exactly (float64): the `exact` recipe.
    case exact
    /// In fp32, any order (the sum is bounded, not its order).
    case fp32
    /// In bf16, one rounding per addition in any order (aiter's bf16 atomics, HF `index_add_` on a
    /// bf16 buffer): up to S roundings of partial sums.
    case bf16
    /// In a bf16 buffer that starts at 0, one rounding per addition, the routed contributions in
    /// ascending expert id and the shared expert's last (HF transformers' eager experts: one
    /// `index_add_` per expert into a bf16 buffer, then `+ shared`): the reference adds in the
    /// same order and rounds each partial sum as the kernel does.
    case bf16ExpertOrder = "bf16-expert-order"
    /// The routed contributions summed in fp32 (any order), rounded to bf16 once, then the shared
    /// expert's contribution added in bf16 (HF transformers' `batched_mm`/`grouped_mm`/DeepGEMM
    /// experts and its fine-grained FP8 experts: `weighted.view(T, K, H).sum(1)` or an fp32
    /// `index_add_`, then `.to(bf16) + shared`).
    case fp32RoutedBF16Shared = "fp32-routed-bf16-shared"

    /// Whether the reference simulates the accumulation's bf16 roundings in the kernel's order.
    public var simulatesOrder: Bool { self == .bf16ExpertOrder || self == .fp32RoutedBF16Shared }
}

/// A kernel's numeric recipe: the rounding points of the fused MoE layer that the reference
/// models exactly (DESIGN §3). Between rounding points the reference computes in float64; the
/// error a correct kernel can make there (fp32 accumulation, `expf`, reordering) is covered by the
/// per-element bound. A recipe is data, so a kernel library can declare its own through the C ABI.
public struct Recipe: Codable, Sendable, Equatable, CustomStringConvertible {
    public var name: String
    /// Unit roundoff of the kernel's accumulators (2^-24 for fp32, 2^-53 for the `exact` recipe).
    public var accumulatorUnitRoundoff: Double
    /// Router logits rounded before the softmax (HF bf16 models and sglang: bf16).
    public var routerLogits: Rounding
    /// Routing weights at the multiply (aiter: fp32; HF 4.57/5.24: bf16).
    public var routingWeights: Rounding
    /// Shared gate: `.bf16` means `bf16(sigmoid(bf16(ws·x)))` (sglang fused path).
    public var sharedGate: Rounding
    /// Dynamic per-token 1×128 fp8 activation quantization before stage 1 (fp8 weights only).
    public var activationFP8: Bool
    public var scaleConvention: ScaleConvention
    /// gate and up outputs rounded before the activation (HF eager bf16 rounds each linear).
    public var gateUp: Rounding
    /// silu(gate) rounded before the product (HF eager bf16).
    public var activation: Rounding
    /// silu(gate)·up rounded (aiter: bf16).
    public var intermediate: Rounding
    /// Intermediate requantized to fp8 per 1×128 group before stage 2 (fp8 weights only).
    public var intermediateFP8: Bool
    /// Down-projection output rounded (HF eager bf16).
    public var down: Rounding
    /// Each weighted contribution `w·down` rounded (HF eager bf16).
    public var weighted: Rounding
    public var combine: CombineMode
    /// Final output rounding (the kernel's output buffer).
    public var output: Rounding
    /// Relative error allowed for a kernel's `expf`-based silu/sigmoid evaluation.
    public var transcendentalRelativeError: Double
    /// How the kernel orders a dot product's fp32 additions, as the statistical tier assumes
    /// (nil: `.contiguous`, runs of K in index order; `.any` keeps the Higham–Mary proxy
    /// `√n·u·Σ|t|` for kernels whose order is unknown). The rigorous bound does not depend on it.
    public var accumulation: AccumulationOrder? = nil

    /// How exactly the kernel's fp8 quantizations (activations, and the intermediate's
    /// requantization) follow `scaleConvention`, as the statistical tier assumes (nil: `.exact`).
    /// The rigorous bound allows either code at a midpoint whatever this says.
    public var quantization: QuantizationArithmetic? = nil

    /// `accumulation`, its default filled in.
    public var accumulationOrder: AccumulationOrder { accumulation ?? .contiguous }

    /// `quantization`, its default filled in.
    public var quantizationArithmetic: QuantizationArithmetic { quantization ?? .exact }

    public var description: String { name }

    /// float64 throughout, inputs as stored (fp8 dequantized exactly), nothing rounded.
    public static let exact = Recipe(
        name: "exact", accumulatorUnitRoundoff: 0x1p-53, routerLogits: .none, routingWeights: .none, sharedGate: .none,
        activationFP8: false, scaleConvention: .divide, gateUp: .none, activation: .none, intermediate: .none,
        intermediateFP8: false, down: .none, weighted: .none, combine: .exact, output: .none, transcendentalRelativeError: 0x1p-50)

    /// HF transformers 5.x eager in bf16: every linear's output rounded to bf16, silu and the
    /// product rounded, routing weights cast to bf16, contributions accumulated with `index_add_`
    /// into a bf16 buffer, shared gate `sigmoid` in bf16.
    public static let hfBF16 = Recipe(
        name: "hf-bf16", accumulatorUnitRoundoff: 0x1p-24, routerLogits: .bf16, routingWeights: .bf16, sharedGate: .bf16,
        activationFP8: false, scaleConvention: .divide, gateUp: .bf16, activation: .bf16, intermediate: .bf16,
        intermediateFP8: false, down: .bf16, weighted: .bf16, combine: .bf16, output: .bf16, transcendentalRelativeError: 0x1p-19)

    /// `hf-bf16` with the combine of HF's eager experts simulated exactly: contributions added into
    /// a bf16 buffer in ascending expert id, one rounding each, the shared expert's last.
    public static let hfEagerBF16: Recipe = {
        var r = Recipe.hfBF16
        r.name = "hf-eager-bf16"
        r.combine = .bf16ExpertOrder
        return r
    }()

    /// `hf-bf16` with the combine of HF's `batched_mm`/`grouped_mm` experts simulated exactly: the
    /// routed contributions summed in fp32 and rounded to bf16, then the shared expert's added in bf16.
    public static let hfMMBF16: Recipe = {
        var r = Recipe.hfBF16
        r.name = "hf-mm-bf16"
        r.combine = .fp32RoutedBF16Shared
        return r
    }()

    /// The aiter/sglang fused BF16 path: router logits bf16, fp32 softmax and routing weights,
    /// shared gate `bf16(sigmoid(bf16(ws·x)))`, gate/up fp32, one bf16 rounding of silu·up,
    /// fp32 combine, bf16 output.
    public static let fusedBF16 = Recipe(
        name: "fused-bf16", accumulatorUnitRoundoff: 0x1p-24, routerLogits: .bf16, routingWeights: .fp32, sharedGate: .bf16,
        activationFP8: false, scaleConvention: .multiplyReciprocal, gateUp: .none, activation: .none, intermediate: .bf16,
        intermediateFP8: false, down: .none, weighted: .none, combine: .fp32, output: .bf16, transcendentalRelativeError: 0x1p-19)

    /// Block-scale W8A8 (FP8): as `fused-bf16`, plus dynamic 1×128 fp8 activation quantization
    /// (aiter's multiply-by-reciprocal scale) and the bf16 intermediate requantized per 1×128
    /// group. FP8_MAX follows the weights' format (448 e4m3fn, 240 e4m3fnuz).
    public static let fusedFP8 = Recipe(
        name: "fused-fp8", accumulatorUnitRoundoff: 0x1p-24, routerLogits: .bf16, routingWeights: .fp32, sharedGate: .bf16,
        activationFP8: true, scaleConvention: .multiplyReciprocal, gateUp: .none, activation: .none, intermediate: .bf16,
        intermediateFP8: true, down: .none, weighted: .none, combine: .fp32, output: .bf16, transcendentalRelativeError: 0x1p-19)

    /// FP8 block-scaled weights with unquantized (bf16) activations: fp32 router, bf16 intermediate.
    public static let w8a16 = Recipe(
        name: "w8a16", accumulatorUnitRoundoff: 0x1p-24, routerLogits: .none, routingWeights: .fp32, sharedGate: .fp32,
        activationFP8: false, scaleConvention: .multiplyReciprocal, gateUp: .none, activation: .none, intermediate: .bf16,
        intermediateFP8: false, down: .none, weighted: .none, combine: .fp32, output: .bf16, transcendentalRelativeError: 0x1p-19)

    public static let named: [Recipe] = [.exact, .hfBF16, .hfEagerBF16, .hfMMBF16, .fusedBF16, .fusedFP8, .w8a16]

    public static func named(_ name: String) -> Recipe? { named.first { $0.name == name } }

    /// Whether the recipe can run on weights stored in `format`.
    public func check(weights format: String, isFP8: Bool) -> String? {
        if (activationFP8 || intermediateFP8) && !isFP8 {
            return "recipe '\(name)' quantizes activations to fp8 and needs fp8 weights; the layer stores \(format) (use fused-bf16, hf-bf16 or exact)"
        }
        return nil
    }
}
