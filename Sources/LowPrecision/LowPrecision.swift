// LowPrecision — the narrow number formats of fused MoE kernels, with nothing above them.
//
// - `SmallFloatFormat`: bf16, fp16, fp32, e4m3fn, e4m3fnuz described by four numbers, and the one
//   round-to-nearest-even routine that serves them all (saturating or not).
// - Codecs: `BFloat16`, `Float16Codec`, `FP8Codec` (bit patterns ↔ values), `FP8Normalization`.
// - Quantizers: `GroupQuantizer` (dynamic per-token 1×128 fp8), `BlockQuantizer` (128×128 tiles).
// - `SplitMix64`: the package's one seeded generator (counter-generated layers, the fuzzer, tests).
//
// Format vocabularies above this module map onto `SmallFloatFormat`: TensorIO's `DType.fp8Format`
// and `WeightFormat.fp8`, MoEReference's `Rounding.format`.
