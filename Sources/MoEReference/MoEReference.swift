// MoEReference — the oracle: the fused MoE layer in float64 with every rounding point of a
// kernel's recipe, and a rigorous per-element error bound (DESIGN §3).
//
// - `Recipe` (the rounding points; `Recipe.default(for:)` in RecipeDefaults.swift is the one
//   default-recipe rule: fused-fp8 for fp8 weights, fused-bf16 otherwise) and `MoEReferenceEngine`.
// - `CounterGenerator` and `SyntheticLayer`: test layers as a pure function of (seed, stream,
//   index) through LowPrecision's `SplitMix64`, identical on a GPU (`moe_fill_counter`).
// - Result files, and `BLAS` (the one place the cblas symbols and the thread count are set).
