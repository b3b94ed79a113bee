import ArgumentParser
import Foundation
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

    static func main() {
        upgradeOpenBLASCore()
        main(nil)
    }

    /// OpenBLAS picks its kernels when it is loaded, before any of our code runs: where it fell
    /// back to a family without AVX2 kernels on an AVX2 CPU (`BLAS.upgradedCore`), the process
    /// runs itself again with `OPENBLAS_CORETYPE` set, once. The variable is then removed again,
    /// so Python workers and other children keep their own libraries' choice. Nothing happens when
    /// `OPENBLAS_CORETYPE` is already set (the user's choice) or `MOECHECK_KEEP_BLAS_CORE=1`.
    static func upgradeOpenBLASCore() {
        let env = ProcessInfo.processInfo.environment
        let marker = "MOECHECK_BLAS_CORE_UPGRADED"
        if let from = env[marker] {
            unsetenv(marker)
            unsetenv("OPENBLAS_CORETYPE")
            BLAS.coreNote = "OpenBLAS core \(BLAS.coreName) (forced: the library took this CPU for \(from))"
            return
        }
        guard env["OPENBLAS_CORETYPE"] == nil, env["MOECHECK_KEEP_BLAS_CORE"] != "1", let core = BLAS.upgradedCore else { return }
        setenv("OPENBLAS_CORETYPE", core, 1)
        setenv(marker, BLAS.coreName, 1)
        execv("/proc/self/exe", CommandLine.unsafeArgv)
        // exec failed (no /proc): go on with the library's choice
        unsetenv("OPENBLAS_CORETYPE")
        unsetenv(marker)
    }
}
