import ArgumentParser
import Foundation
import MoEReference
import MoEVerify
import TensorIO

struct Judge: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Judge an output you computed any way you like against the reference of a case file.",
        discussion: """
        The case file holds the layer and its hidden_states (a checkpoint layer, an exported catalogue or fuzz case, a golden). \
        --output is a safetensors file with the layer output [T, H] (the tensor named 'output', or its only float tensor), in any \
        float dtype. With --routing (tensors topk_ids and topk_weights [T, S], S = K or K+1 with the shared expert fused as id E) \
        the router is judged and tokens whose experts a correct kernel may pick either way are teacher-forced; without it those \
        tokens are left out. Same verdict, bounds and statistical tier as `verify`. Exit code 1 when the output fails.
        """)

    @Option(name: .customLong("case"), help: ArgumentHelp("The case file (layer + hidden_states).", valueName: "FILE"))
    var caseFile: String

    @Option(help: ArgumentHelp("The output to judge: safetensors with 'output' [T, H].", valueName: "FILE"))
    var output: String

    @Option(help: ArgumentHelp("The kernel's routing: safetensors with topk_ids and topk_weights [T, S].", valueName: "FILE"))
    var routing: String?

    @OptionGroup var recipe: RecipeOptions

    @OptionGroup var layerPrefix: LayerPrefixOption

    @OptionGroup var report: JSONOutputOption

    @OptionGroup var tier: TierOptions

    @OptionGroup var blas: BLASOptions

    func run() throws {
        blas.apply()
        let vc = try failing("judge") { try VerifyCase(file: caseFile, prefix: layerPrefix.prefix) }
        let format = try failing("judge") { try vc.openLayer().weightFormat }
        let given = try failing("judge") { try recipe.resolved() }
        let r = given ?? Recipe.default(for: format)
        if given == nil { print("judge: no --recipe given: judging against \(r.name), the default for \(format.rawValue) weights (README, Recipes)") }
        let kernel = RecordedKernel(output: output, routing: routing, recipe: r)
        let verifier = CaseVerifier(kernel: kernel, rigorousOnly: tier.rigorousOnly)
        let result = verifier.verify(vc)
        print(result.line)
        try report.write([result])
        print("\(result.passed ? 1 : 0) passed, \(result.passed ? 0 : 1) failed")
        if !result.passed { throw ExitCode(1) }
    }
}

struct Cases: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Case files for kernels outside MoECheck.",
        subcommands: [Export.self])

    struct Export: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write catalogue or fuzz cases as ordinary case files (HF naming, config and hidden_states inside).",
            discussion: """
            Each case becomes DIR/NAME.safetensors in the combined expert layout with __metadata__ config (the HF config dict), \
            moecheck_spec (how to regenerate it) and moecheck_case (split_k, fused): check your kernel on them in any language, \
            then `moecheck judge --case DIR/NAME.safetensors --output YOUR_OUTPUT.safetensors`.
            """)

        @Option(help: "A suite: \(Catalogue.suites.joined(separator: ", ")).")
        var suite: String?

        @Option(help: "Export fuzz cases of this seed instead of a suite.")
        var fuzzSeed: UInt64?

        @Option(help: "How many fuzz cases (with --fuzz-seed).")
        var cases: Int = 100

        @OptionGroup var caps: FuzzCapOptions

        @OptionGroup var filter: CaseFilterOption

        @Option(help: ArgumentHelp("Output directory (created).", valueName: "DIR"))
        var out: String

        func validate() throws {
            if (suite == nil) == (fuzzSeed == nil) { throw ValidationError("give --suite NAME or --fuzz-seed S") }
            if cases < 1 { throw ValidationError("--cases must be >= 1") }
        }

        func run() throws {
            var selected: [VerifyCase]
            if let suite {
                selected = try failing("cases export") { try CatalogueRun(suite: suite, filter: filter.filter).cases() }
            } else {
                let lim = FuzzLimits.device.capped(maxTokens: caps.maxTokens, maxExperts: caps.maxExperts, maxHidden: caps.maxHidden, maxCost: caps.maxCost)
                let g = FuzzGenerator(seed: fuzzSeed!, limits: lim, allExperts: true)
                selected = (0..<cases).map { g.makeCase(index: $0) }
                if let f = filter.filter { selected = selected.filter { $0.name.contains(f) } }
            }
            try failing("cases export") {
                try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
                let enc = JSONEncoder()
                enc.outputFormatting = [.sortedKeys]
                for (i, vc) in selected.enumerated() {
                    guard let spec = vc.spec else { continue }
                    let path = (out as NSString).appendingPathComponent(vc.name + ".safetensors")
                    let meta = ["moecheck_case": String(decoding: try enc.encode(["split_k": vc.splitK, "fused": vc.fuseShared ? 1 : 0]), as: UTF8.self)]
                    try SyntheticLayer(spec).writeCaseFile(to: path, layout: .combined, metadata: meta)
                    if stderrIsTerminal { note("cases export: \(i + 1)/\(selected.count) \(vc.name)") }
                }
            }
            print("cases export: \(selected.count) case files in \(out)")
        }
    }
}
