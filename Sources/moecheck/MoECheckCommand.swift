import ArgumentParser
import MoEReference

/// `moecheck`: the command-line tool. Thin: every subcommand maps its options onto library
/// calls (MoEVerify, MoEReference, TensorIO) that the tests call directly.
@main
struct MoECheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "moecheck",
        abstract: "Prove fused Mixture-of-Experts kernels correct against a float64 reference with rigorous per-element bounds.",
        version: moecheckVersion,
        subcommands: [Inspect.self, Reference.self, GoldensCommand.self, Verify.self, Judge.self, Cases.self, Fuzz.self, Faults.self, SensitivityCommand.self, Bench.self]
    )
}
