import KernelBridge
import MoEReference
import TensorIO

// Between the ABI's named codes (KernelBridge) and MoECheck's own vocabulary (TensorIO's
// WeightFormat, MoEReference's Rounding): the one place each mapping is written.

extension KernelLibrary.WeightFormatCode {
    /// The ABI code of a layer's weight format: bf16 for the non-fp8 formats (the kernels take
    /// bf16 weights; f32/f64 case files are rounded to bf16 before upload).
    public init(_ format: WeightFormat) {
        switch format {
        case .fp8e4m3fn: self = .fp8e4m3fn
        case .fp8e4m3fnuz: self = .fp8e4m3fnuz
        case .f64, .f32, .bf16: self = .bf16
        }
    }
}

extension KernelLibrary.DeclaredRecipe.Precision {
    /// The recipe's rounding point: `.bf16` or `.fp32`.
    public var rounding: Rounding {
        switch self {
        case .fp32: return .fp32
        case .bf16: return .bf16
        }
    }
}
