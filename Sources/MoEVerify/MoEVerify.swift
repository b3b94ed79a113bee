// MoEVerify — judging kernels against the reference.
//
// - Verdicts and the stage-by-stage `CaseVerifier` over a `KernelUnderTest` (a GPU
//   `DeviceKernel`, the `CPUModelKernel` with CPU fault models, the float32 self-check).
// - Case sources: `Catalogue` (named suites), `Fuzz` (generator, shrinker, campaigns),
//   `Goldens` (generate / verify committed tensors; `SHA256`), `FaultMatrix`.
// - The logic behind every `moecheck` command, callable from tests: `KernelSelection`,
//   `CatalogueRun`, `FuzzLimits.capped`, `FaultMatrix.summaryLine`, `ReferenceBenchmark`,
//   `JSONReport` (CommandSupport.swift, ReferenceBenchmark.swift).
// - Errors are typed: `VerifyError`, `GoldenError`, `ReferenceBenchmark.Failure`.
