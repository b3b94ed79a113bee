import Foundation
import LowPrecision
import MoEReference
import TensorIO

// MARK: - Cases and manifest

/// Why a golden suite could not be loaded, generated or re-run (a case that merely fails its
/// comparison is a `GoldenReport`, not an error).
public enum GoldenError: Error, CustomStringConvertible, Equatable {
    /// A file could not be opened.
    case cannotOpen(String)
    /// A file could not be read.
    case cannotRead(String, why: String)
    /// `manifest.json` is not a golden manifest.
    case notAManifest(String, why: String)
    /// A suite name that `GoldenSuites` does not know.
    case unknownSuite(String, known: [String])
    /// A case names a recipe that `Recipe.named` does not know.
    case unknownRecipe(caseName: String, recipe: String)
    /// A case file's layer differs from the case's spec.
    case configMismatch(caseName: String, file: String, spec: String)

    public var description: String {
        switch self {
        case let .cannotOpen(path): return "cannot open \(path)"
        case let .cannotRead(path, why): return "\(path): \(why)"
        case let .notAManifest(path, why): return "\(path): not a golden manifest: \(why)"
        case let .unknownSuite(name, known): return "unknown golden suite '\(name)' (known: \(known.joined(separator: ", ")))"
        case let .unknownRecipe(caseName, recipe): return "\(caseName): unknown recipe '\(recipe)'"
        case let .configMismatch(caseName, file, spec): return "\(caseName): case file config \(file) != spec \(spec)"
        }
    }
}

/// Version of the golden generator (the case list and file contents). Bump when either changes.
public let goldenGeneratorVersion = "1"

/// One golden case: a generated layer, how its case file is laid out, and the recipe of its expected file.
public struct GoldenCase: Codable, Sendable {
    public var name: String
    public var spec: SyntheticSpec
    public var layout: ExpertLayout
    public var recipe: String
    /// Too large to commit (a real model shape): only the expected file is stored; the case file is
    /// materialized on demand (`moecheck goldens generate --materialize-large`) and the reference
    /// re-run on the layer generated from `spec`.
    public var specOnly: Bool
    public var note: String

    public init(_ name: String, _ spec: SyntheticSpec, layout: ExpertLayout, recipe: String? = nil, specOnly: Bool = false, note: String = "") {
        self.name = name; self.spec = spec; self.layout = layout
        self.recipe = recipe ?? Recipe.default(for: spec.format).name
        self.specOnly = specOnly; self.note = note
    }

    public var fuseShared: Bool { spec.config.fusable }
    public var caseFileName: String { name + ".case.safetensors" }
    public var expectedFileName: String { name + ".expected.safetensors" }
}

public struct GoldenFile: Codable, Sendable, Equatable {
    public var file: String
    public var bytes: Int
    public var sha256: String
}

public struct GoldenManifestEntry: Codable, Sendable {
    public var name: String
    public var family: String
    public var T: Int
    public var H: Int
    public var I: Int
    public var Is: Int
    public var E: Int
    public var K: Int
    public var renormalize: Bool
    public var weight_dtype: String
    public var fp8_format: String?
    public var layout: String
    public var recipe: String
    public var shared_fused: Bool
    public var seed: UInt64
    public var routing: String
    public var inputs: String
    public var scales: String
    public var spec: SyntheticSpec
    public var spec_only: Bool
    public var ambiguous_tokens: Int
    public var max_bound: Double
    public var note: String
    /// Committed files with their sha256.
    public var files: [GoldenFile]
    /// spec-only cases: the case file `generate --materialize-large` writes (not committed).
    public var materialized_case: GoldenFile?
}

extension GoldenManifestEntry {
    /// The line `moecheck goldens generate` prints for this case.
    public var summaryLine: String {
        let bytes = files.reduce(0) { $0 + $1.bytes }
        return "\(name): T=\(T) H=\(H) I=\(I) Is=\(Is) E=\(E) K=\(K) \(weight_dtype) \(layout) \(recipe) " +
            "\(bytes) bytes\(spec_only ? " (spec-only)" : "")\(ambiguous_tokens > 0 ? ", \(ambiguous_tokens) ambiguous token(s)" : "")"
    }
}

public struct GoldenManifest: Codable, Sendable {
    public var generator: String
    public var generator_version: String
    public var moecheck_version: String
    public var openblas_threads: Int
    public var comparison: String
    public var cases: [GoldenManifestEntry]

    public static func load(_ dir: String) throws -> GoldenManifest {
        let path = (dir as NSString).appendingPathComponent("manifest.json")
        guard let data = FileManager.default.contents(atPath: path) else { throw GoldenError.cannotRead(path, why: "cannot read (no manifest.json in \(dir))") }
        do { return try JSONDecoder().decode(GoldenManifest.self, from: data) } catch {
            throw GoldenError.notAManifest(path, why: "\(error)")
        }
    }

    public func write(_ dir: String) throws {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        var data = try enc.encode(self)
        data.append(0x0A)
        try data.write(to: URL(fileURLWithPath: (dir as NSString).appendingPathComponent("manifest.json")), options: .atomic)
    }
}

/// The golden suites.
public enum GoldenSuites {
    public static let names = ["default", "small"]

    static func q35(_ H: Int, _ I: Int, _ E: Int, _ K: Int) -> MoEConfig {
        MoEConfig(family: .qwen35Moe, hidden: H, intermediate: I, sharedIntermediate: I, experts: E, topK: K)
    }

    /// The committed set (Goldens/).
    public static func defaultSuite() -> [GoldenCase] {
        let next = MoEConfig(family: .qwen3Next, hidden: 200, intermediate: 72, sharedIntermediate: 72, experts: 7, topK: 3)
        let q2 = MoEConfig(family: .qwen2Moe, hidden: 128, intermediate: 32, sharedIntermediate: 64, experts: 6, topK: 2, renormalize: false)
        let q2fp8 = MoEConfig(family: .qwen2Moe, hidden: 256, intermediate: 64, sharedIntermediate: 128, experts: 5, topK: 2, renormalize: false)
        let nextFnuz = MoEConfig(family: .qwen3Next, hidden: 256, intermediate: 128, sharedIntermediate: 128, experts: 4, topK: 2)
        return [
            GoldenCase("qwen3_5_moe_bf16_combined_t17", SyntheticSpec(config: q35(128, 32, 8, 2), format: .bf16, tokens: 17, seed: 401),
                       layout: .combined, note: "T = 17"),
            GoldenCase("qwen3_5_moe_bf16_perexpert_t1", SyntheticSpec(config: q35(192, 48, 6, 2), format: .bf16, tokens: 1, seed: 402),
                       layout: .perExpert, note: "T = 1; H, I not multiples of 128; E = 6"),
            GoldenCase("qwen3_next_fp8fn_perexpert_t33", SyntheticSpec(config: next, format: .fp8e4m3fn, tokens: 33, seed: 403),
                       layout: .perExpert, note: "T = 33; E = 7; H = 200 and I = 72 not multiples of 128 (partial scale blocks and quant groups)"),
            GoldenCase("qwen3_next_fp8fnuz_combined_t8", SyntheticSpec(config: nextFnuz, format: .fp8e4m3fnuz, tokens: 8, seed: 404, routing: .hotExperts),
                       layout: .combined, note: "e4m3fnuz; hot experts"),
            GoldenCase("qwen2_moe_bf16_perexpert_unfusable_t5", SyntheticSpec(config: q2, format: .bf16, tokens: 5, seed: 405),
                       layout: .perExpert, note: "Is = 2I: shared expert not fusable; norm_topk_prob false"),
            GoldenCase("qwen2_moe_fp8fn_combined_unfusable_t3", SyntheticSpec(config: q2fp8, format: .fp8e4m3fn, tokens: 3, seed: 406, inputs: .outliers),
                       layout: .combined, note: "Is = 2I: not fusable; E = 5; outlier channels"),
            GoldenCase("qwen3_5_moe_bf16_allneg_t9", SyntheticSpec(config: q35(128, 32, 8, 2), format: .bf16, tokens: 9, seed: 407, routing: .allNegative),
                       layout: .combined, note: "every router logit shifted by -64"),
            GoldenCase("qwen3_5_moe_bf16_neartie_t16", SyntheticSpec(config: q35(128, 32, 8, 3), format: .bf16, tokens: 16, seed: 408, routing: .nearTies),
                       layout: .perExpert, note: "near-tie routing: some tokens flagged in ambiguous_tokens"),
            GoldenCase("qwen3_5_moe_bf16_exact_t4", SyntheticSpec(config: q35(160, 40, 5, 2), format: .bf16, tokens: 4, seed: 409),
                       layout: .combined, recipe: "exact", note: "exact recipe (float64, no rounding points)"),
            GoldenCase("qwen3_5_moe_bf16_hfbf16_t6", SyntheticSpec(config: q35(128, 32, 8, 2), format: .bf16, tokens: 6, seed: 410),
                       layout: .perExpert, recipe: "hf-bf16", note: "HF transformers eager bf16 recipe"),
            GoldenCase("qwen3_5_moe_fp8fnuz_perexpert_t2", SyntheticSpec(config: q35(256, 128, 4, 2), format: .fp8e4m3fnuz, tokens: 2, seed: 411),
                       layout: .perExpert, note: "e4m3fnuz, per-expert"),
            GoldenCase("qwen3_5_moe_fp8fn_splitk_t4",
                       SyntheticSpec(config: q35(4096, 32, 3, 2), format: .fp8e4m3fn, tokens: 4, seed: 412, inputs: .coherent, scales: .spreadAcrossK),
                       layout: .combined,
                       note: "FP8 split-K accuracy case (FACTS 5): H = 4096 (32 K blocks), block scales spread over 2^16 across K, coherent inputs: fp16-rounded split partials overflow"),
            GoldenCase("qwen3_5_35b_a3b_fp8fn_perexpert_t2",
                       SyntheticSpec(config: q35(2048, 512, 256, 8), format: .fp8e4m3fn, tokens: 2, seed: 413),
                       layout: .perExpert, specOnly: true,
                       note: "real Qwen3.5-35B-A3B shape (H 2048, I 512, E 256, K 8); its case file is 0.75 GiB, so only the expected file is committed (spec-only)"),
        ]
    }

    /// Small cases a unit test regenerates quickly.
    public static func smallSuite() -> [GoldenCase] {
        let names: Set = ["qwen3_5_moe_bf16_perexpert_t1", "qwen3_next_fp8fn_perexpert_t33", "qwen2_moe_bf16_perexpert_unfusable_t5",
                          "qwen3_5_moe_bf16_neartie_t16", "qwen3_5_moe_bf16_exact_t4", "qwen3_5_moe_bf16_hfbf16_t6", "qwen3_next_fp8fnuz_combined_t8"]
        return defaultSuite().filter { names.contains($0.name) }
    }

    public static func suite(_ name: String) throws -> [GoldenCase] {
        switch name {
        case "default": return defaultSuite()
        case "small": return smallSuite()
        default: throw GoldenError.unknownSuite(name, known: names)
        }
    }
}

// MARK: - Generation

/// The expected tensors `goldens verify` compares.
public let goldenComparedTensors = ["output", "bound", "router_logits", "router_logit_bound", "topk_ids", "topk_weights",
                                    "topk_weight_bound", "shared_gate", "shared_gate_bound", "ambiguous_tokens"]

public enum Goldens {
    static func path(_ dir: String, _ file: String) -> String { (dir as NSString).appendingPathComponent(file) }

    /// Runs the reference on a case: on the case file when there is one, else on the layer generated from the spec.
    public static func reference(_ gc: GoldenCase, caseFile: String?) throws -> ReferenceResult {
        guard let recipe = Recipe.named(gc.recipe) else { throw GoldenError.unknownRecipe(caseName: gc.name, recipe: gc.recipe) }
        let options = ReferenceOptions(fuseShared: gc.fuseShared)
        if let caseFile {
            let c = try MoECaseFile(path: caseFile)
            guard c.config == gc.spec.config else { throw GoldenError.configMismatch(caseName: gc.name, file: "\(c.config)", spec: "\(gc.spec.config)") }
            return try MoEReferenceEngine(layer: c, recipe: recipe, options: options).run(inputs: try c.inputs(), tokens: c.tokens)
        }
        let layer = try SyntheticLayer(gc.spec)
        return try MoEReferenceEngine(layer: layer, recipe: recipe, options: options).run(inputs: layer.inputs(), tokens: gc.spec.tokens)
    }

    static func fileEntry(_ dir: String, _ file: String) throws -> GoldenFile {
        let (h, n) = try SHA256.hashFile(path(dir, file))
        return GoldenFile(file: file, bytes: n, sha256: h)
    }

    /// Writes one case's files into `dir` and returns its manifest entry.
    public static func generate(_ gc: GoldenCase, into dir: String, materializeLarge: Bool = false) throws -> GoldenManifestEntry {
        let layer = try SyntheticLayer(gc.spec)
        let meta = ["golden_case": gc.name, "golden_generator_version": goldenGeneratorVersion, "moecheck_version": moecheckVersion]
        var files: [GoldenFile] = []
        var materialized: GoldenFile? = nil
        let casePath = path(dir, gc.caseFileName)
        let result: ReferenceResult
        if gc.specOnly {
            // The case file is only written to learn its hash (and kept with --materialize-large).
            try layer.writeCaseFile(to: casePath, layout: gc.layout, metadata: meta)
            materialized = try fileEntry(dir, gc.caseFileName)
            result = try reference(gc, caseFile: nil)
            if !materializeLarge { try FileManager.default.removeItem(atPath: casePath) }
        } else {
            try layer.writeCaseFile(to: casePath, layout: gc.layout, metadata: meta)
            files.append(try fileEntry(dir, gc.caseFileName))
            result = try reference(gc, caseFile: casePath)
        }
        var extra = meta
        extra["case"] = gc.caseFileName
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        extra["moecheck_spec"] = String(decoding: try enc.encode(gc.spec), as: UTF8.self)
        try result.write(to: path(dir, gc.expectedFileName), extra: extra)
        files.append(try fileEntry(dir, gc.expectedFileName))
        let s = gc.spec, c = s.config
        return GoldenManifestEntry(
            name: gc.name, family: c.family.rawValue, T: s.tokens, H: c.hidden, I: c.intermediate, Is: c.sharedIntermediate,
            E: c.experts, K: c.topK, renormalize: c.renormalize,
            weight_dtype: s.format.dtype.rawValue,
            fp8_format: s.format.fp8?.rawValue,
            layout: gc.layout.rawValue, recipe: gc.recipe, shared_fused: result.sharedFused, seed: s.seed,
            routing: s.routing.rawValue, inputs: s.inputs.rawValue, scales: s.scales.rawValue, spec: s, spec_only: gc.specOnly,
            ambiguous_tokens: result.ambiguousTokens.filter { $0 }.count, max_bound: result.maxBound, note: gc.note,
            files: files, materialized_case: materialized)
    }

    /// Generates a whole suite and its manifest.
    public static func generate(suite cases: [GoldenCase], into dir: String, materializeLarge: Bool = false,
                                progress: (GoldenManifestEntry) -> Void = { _ in }) throws -> GoldenManifest {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var entries: [GoldenManifestEntry] = []
        for gc in cases {
            let e = try generate(gc, into: dir, materializeLarge: materializeLarge)
            entries.append(e)
            progress(e)
        }
        let m = GoldenManifest(generator: "moecheck goldens generate", generator_version: goldenGeneratorVersion, moecheck_version: moecheckVersion,
                               openblas_threads: BLAS.threads, comparison: "bits", cases: entries)
        try m.write(dir)
        return m
    }

    // MARK: Verification

    public struct GoldenReport: Sendable {
        public var name: String
        public var passed: Bool
        /// Every compared tensor has the stored bits.
        public var bitIdentical: Bool
        public var problems: [String]
        public var notes: [String]
        public var seconds: Double
        public var line: String {
            let status = passed ? "PASS" : "FAIL"
            var s = "\(status) \(name): " + (passed ? (bitIdentical ? "bit-identical" : "within bound (not bit-identical)") : problems.joined(separator: "; "))
            if !notes.isEmpty { s += " [" + notes.joined(separator: "; ") + "]" }
            return s + String(format: " (%.2f s)", seconds)
        }
    }

    /// Verifies every case of `manifest` whose name contains `filter`, in order, calling `each`
    /// after every case (`moecheck goldens verify`).
    public static func verify(_ manifest: GoldenManifest, in dir: String, filter: String? = nil, requireBits: Bool,
                              each: (GoldenReport) -> Void = { _ in }) -> [GoldenReport] {
        manifest.cases.filter { e in filter.map { e.name.contains($0) } ?? true }.map { e in
            let r = verify(e, in: dir, requireBits: requireBits)
            each(r)
            return r
        }
    }

    /// Re-runs the reference on one manifest case and compares with the stored tensors.
    /// `requireBits`: any bit difference fails; otherwise differences within the stored bounds pass
    /// (a different CPU's OpenBLAS kernels may sum in another order).
    public static func verify(_ e: GoldenManifestEntry, in dir: String, requireBits: Bool) -> GoldenReport {
        let start = Date()
        var r = GoldenReport(name: e.name, passed: false, bitIdentical: false, problems: [], notes: [], seconds: 0)
        defer { }
        // 1. hashes
        for f in e.files {
            let p = path(dir, f.file)
            guard FileManager.default.fileExists(atPath: p) else { r.problems.append("\(f.file): missing"); continue }
            do {
                let (h, n) = try SHA256.hashFile(p)
                if n != f.bytes { r.problems.append("\(f.file): \(n) bytes, manifest says \(f.bytes)") }
                if h != f.sha256 { r.problems.append("\(f.file): sha256 \(h) != manifest \(f.sha256)") }
            } catch { r.problems.append("\(f.file): \(error)") }
        }
        var caseFile: String? = nil
        let gc = GoldenCase(e.name, e.spec, layout: ExpertLayout(rawValue: e.layout) ?? .perExpert, recipe: e.recipe, specOnly: e.spec_only)
        if e.spec_only {
            if let m = e.materialized_case, FileManager.default.fileExists(atPath: path(dir, m.file)) {
                if let (h, _) = try? SHA256.hashFile(path(dir, m.file)), h != m.sha256 {
                    r.problems.append("\(m.file) (materialized): sha256 \(h) != manifest \(m.sha256)")
                } else {
                    r.notes.append("materialized case file checked")
                }
            }
        } else {
            caseFile = path(dir, gc.caseFileName)
        }
        guard r.problems.isEmpty else { r.seconds = Date().timeIntervalSince(start); return r }
        // 2. the case file is what the spec generates (spec-only: nothing to compare)
        if let caseFile, let f = try? SafetensorsFile(path: caseFile) {
            let stored = f.metadata["moecheck_spec"].flatMap { try? JSONDecoder().decode(SyntheticSpec.self, from: Data($0.utf8)) }
            if stored != e.spec { r.problems.append("case file metadata moecheck_spec differs from the manifest's spec") }
        }
        // 3. re-run the reference and compare
        do {
            let result = try reference(gc, caseFile: caseFile)
            let fresh = Dictionary(uniqueKeysWithValues: result.tensors().map { ($0.0, $0.1) })
            let stored = try SafetensorsFile(path: path(dir, gc.expectedFileName))
            var identical = true
            for name in goldenComparedTensors {
                guard let a = fresh[name] else { r.problems.append("\(name): not produced by the reference"); continue }
                guard stored.contains(name) else { r.problems.append("\(name): missing from \(gc.expectedFileName)"); continue }
                let b = try stored.tensor(name)
                guard a.dtype == b.dtype, a.shape == b.shape else {
                    r.problems.append("\(name): stored \(b.dtype)\(b.shape), regenerated \(a.dtype)\(a.shape)"); continue
                }
                if a.rawBytes.elementsEqual(b.rawBytes) { continue }
                identical = false
                if let p = compareWithinBound(name, fresh: a, stored: b, storedFile: stored, requireBits: requireBits,
                                              outputRounding: result.recipe.output) { r.problems.append(p) }
            }
            r.bitIdentical = identical
        } catch {
            r.problems.append("reference failed: \(error)")
        }
        r.passed = r.problems.isEmpty
        r.seconds = Date().timeIntervalSince(start)
        return r
    }

    /// Describes a difference, or nil when it is acceptable (only without `requireBits`).
    static func compareWithinBound(_ name: String, fresh: Tensor, stored: Tensor, storedFile: SafetensorsFile, requireBits: Bool,
                                   outputRounding: Rounding = .none) -> String? {
        let a = fresh.doubles(), b = stored.doubles()
        var diffs = 0, first = -1, worst = 0.0, worstAt = -1
        for i in 0..<a.count where a[i].bitPattern != b[i].bitPattern && !(a[i].isNaN && b[i].isNaN) {
            diffs += 1; if first < 0 { first = i }
            let d = Swift.abs(a[i] - b[i]); if !(d <= worst) { worst = d; worstAt = i }
        }
        if diffs == 0 { return nil }
        func at(_ i: Int) -> String { "\(stored.position(of: i)): stored \(b[i]), regenerated \(a[i])" }
        let summary = "\(name): \(diffs)/\(a.count) elements differ (first at \(at(first)); largest |diff| \(worst) at \(at(max(worstAt, first))))"
        if requireBits { return summary }
        let boundName: String?
        switch name {
        case "output": boundName = "bound"
        case "router_logits": boundName = "router_logit_bound"
        case "topk_weights": boundName = "topk_weight_bound"
        case "shared_gate": boundName = "shared_gate_bound"
        case "bound", "router_logit_bound", "topk_weight_bound", "shared_gate_bound": boundName = nil
        default: return summary // ids and flags must match exactly
        }
        if let boundName {
            guard let bt = try? storedFile.tensor(boundName) else { return summary }
            let bound = bt.doubles()
            for i in 0..<a.count where !(Swift.abs(a[i] - b[i]) <= bound[i] + 0x1p-50 * Swift.abs(b[i])) {
                return "\(name): regenerated value outside the stored bound at \(at(i)), bound \(bound[i])"
            }
            return nil
        }
        // Bounds themselves (fp32 sums of |a||b|): relative 1e-4. The output's bound is an
        // interval rounded to the output format (DESIGN §3: [round(v−r), round(v+r)]), a step
        // function of v and r: a last-bit difference in either (another CPU's BLAS) may move an
        // end by one step of the format, so up to two steps at that magnitude are allowed too.
        let format = name == "bound" ? outputRounding.format : nil
        let outputValues = format == nil ? nil : (try? storedFile.tensor("output"))?.doubles()
        for i in 0..<a.count {
            var allowed = 1e-4 * Swift.abs(b[i])
            if let f = format, let out = outputValues, i < out.count {
                allowed += 2 * f.ulp(of: Swift.abs(out[i]) + Swift.max(a[i], b[i]))
            }
            if !(Swift.abs(a[i] - b[i]) <= allowed) {
                return "\(name): regenerated bound differs by more than \(outputValues == nil ? "1e-4 relative" : "1e-4 relative + 2 output-format steps") at \(at(i))"
            }
        }
        return nil
    }
}
