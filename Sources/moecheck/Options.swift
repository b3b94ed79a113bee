import ArgumentParser
import Foundation
import KernelBridge
import MoEReference
import MoEVerify

// Options that several commands share, declared once (swift-argument-parser's @OptionGroup).

/// `--blas-threads`: every numeric command.
struct BLASOptions: ParsableArguments {
    @Option(name: .customLong("blas-threads"), help: "OpenBLAS threads (recorded in outputs). Default: MOECHECK_BLAS_THREADS, else the CPUs this process may use (affinity and cgroup quota; goldens: 1 or the recorded count; bench: 2).")
    var blasThreads: Int?

    /// Pins OpenBLAS's threads: the option, else MOECHECK_BLAS_THREADS, else `fallback` (nil:
    /// the usable CPUs).
    func apply(fallback: Int? = nil) {
        BLAS.configureThreads(requested: blasThreads, fallback: fallback)
        if let n = BLAS.coreNote { note("moecheck: \(n)") }
    }
}

/// `--kernels`: a kernel library implementing the C ABI.
struct KernelLibraryOption: ParsableArguments {
    @Option(help: "Kernel library (.so) implementing Kernels/include/moe_kernels.h (for `faults`: a FAULTS=1 build). Default: $MOECHECK_KERNELS.")
    var kernels: String?

    /// The option, else MOECHECK_KERNELS.
    var path: String? { kernels ?? KernelLibrary.environmentPath }
}

/// `--python ADAPTER.py --python-exe --case-timeout`: a kernel written in Python.
struct PythonAdapterOptions: ParsableArguments {
    @Option(help: ArgumentHelp("A Python kernel adapter (RECIPE, forward(layer, x), optional route): docs/python-adapters.md, adapters/. verify: repeatable, every adapter judged on each case, one reference computed for adapters that declare the same recipe.", valueName: "ADAPTER.py"))
    var python: [String] = []

    @Option(help: "The Python that runs the adapter's worker (its torch, triton, aiter… are used). Default: $MOECHECK_PYTHON or python3.")
    var pythonExe: String?

    @Option(help: "Seconds one case may take in the adapter before its worker is killed and restarted.")
    var caseTimeout: Double = 120

    @Flag(help: "Show the adapter's stderr (prints, warnings) as it runs; otherwise only its last lines on a failure.")
    var pythonEcho = false

    var selection: KernelSelection? { selections.first }

    /// For the commands that judge one kernel (all but verify): at most one adapter, and none
    /// beside another kernel (`otherKernel`: --kernels or the CPU model given too).
    func requireOneKernel(_ command: String, otherKernel: Bool) throws {
        if python.count > 1 { throw ValidationError("\(command) takes one --python adapter (verify takes several)") }
        if !python.isEmpty && otherKernel {
            throw ValidationError("\(command) judges one kernel: give --python or another kernel (--kernels, --cpu-model/--cpu-models), not both (verify takes several)")
        }
    }

    /// Every `--python` adapter, in the order given.
    var selections: [KernelSelection] {
        python.map { .python(adapter: $0, python: pythonExe, caseTimeout: caseTimeout, echo: pythonEcho) }
    }
}

/// `--recipe NAME | --recipe-json FILE`: the rounding points to judge against, instead of the kernel's declared recipe.
struct RecipeOptions: ParsableArguments {
    @Option(help: "Judge against this recipe (\(Recipe.knownNames)) instead of the one the kernel declares.")
    var recipe: String?

    @Option(help: ArgumentHelp("Judge against a recipe given as JSON: a name, or {\"base\": NAME, FIELD: VALUE…} (docs/python-adapters.md).", valueName: "FILE"))
    var recipeJson: String?

    func resolved() throws -> Recipe? { try Recipe.fromOptions(name: recipe, jsonFile: recipeJson) }
}

/// `--kernels --device --fault --cpu-model --python`: which kernel `verify` and `fuzz` judge.
struct KernelOptions: ParsableArguments {
    @OptionGroup var library: KernelLibraryOption

    @OptionGroup var pythonAdapter: PythonAdapterOptions

    @Option(help: "GPU index.")
    var device: Int = 0

    @Option(help: "Select a fault before running: of a FAULTS=1 kernel library, or with --cpu-model a CPU fault model (`moecheck faults` runs the matrix).")
    var fault: String?

    @Flag(help: "Run the CPU model of the kernel recipe instead of a GPU library (no GPU needed; with --fault, a CPU fault model).")
    var cpuModel = false

    /// The CPU model when asked for, else the library (option or MOECHECK_KERNELS), else nil.
    var selection: KernelSelection? {
        if cpuModel { return .cpuModel(fault: fault) }
        if let p = pythonAdapter.selection { return p }
        return library.path.map { .library(path: $0, device: device, fault: fault) }
    }
}

/// `--cache DIR --no-cache --cache-max-bytes --no-pipeline`: how `verify` and `fuzz` get references.
struct ReferenceCacheOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The reference cache: results of the float64 oracle keyed by everything they depend on (case content, recipe, options, this build), reused by later runs and shards. Default: $XDG_CACHE_HOME/moecheck, else ~/.cache/moecheck.", valueName: "DIR"))
    var cache: String?

    @Flag(help: "Compute every reference; read and write no cache.")
    var noCache = false

    @Option(help: ArgumentHelp("Size cap of the reference cache (K, M, G suffixes: powers of 1024); least recently used entries are removed past it.", valueName: "SIZE"))
    var cacheMaxBytes: String = "2G"

    @Flag(help: "One case at a time: each case's reference just before its kernel runs, then its verdict. Default: several cases in flight (--in-flight).")
    var noPipeline = false

    @Option(help: ArgumentHelp("Cases in flight at most: their references computed concurrently on background threads, the kernel run on one thread in the cases' order, each case judged beside the next case's kernel; reports in order, identical to a serial run. Default: the CPUs this process may use, at least 2. Memory: at most this many cases, and at most a quarter of the physical memory (--in-flight-memory) of their estimated footprint (references, kernel outputs, weights), one case always allowed.", valueName: "N"))
    var inFlight: Int?

    @Option(help: ArgumentHelp("Memory budget of the cases in flight (K, M, G suffixes: powers of 1024). Default: a quarter of the physical memory.", valueName: "SIZE"))
    var inFlightMemory: String?

    /// Cases in flight: 1 with --no-pipeline.
    var depth: Int { noPipeline ? 1 : Swift.max(1, inFlight ?? ReferencePipeline.defaultDepth) }
    var memoryBudget: Int { inFlightMemory.flatMap(parseByteSize) ?? ReferencePipeline.defaultMemoryBudget }

    func validate() throws {
        if let inFlight, inFlight < 1 { throw ValidationError("--in-flight must be >= 1") }
        if let m = inFlightMemory, parseByteSize(m) == nil { throw ValidationError("--in-flight-memory: '\(m)' is not a size (e.g. 8G)") }
        if parseByteSize(cacheMaxBytes) == nil { throw ValidationError("--cache-max-bytes: '\(cacheMaxBytes)' is not a size (e.g. 2G, 500M, 1000000)") }
        if noCache && cache != nil { throw ValidationError("--cache and --no-cache exclude each other") }
    }

    /// The cache, or nil with --no-cache or where it cannot be used (a warning on stderr then).
    func open(_ command: String) -> ReferenceCache? {
        if noCache { return nil }
        return ReferenceCache.open(directory: cache ?? ReferenceCache.defaultDirectory, maxBytes: parseByteSize(cacheMaxBytes) ?? ReferenceCache.defaultMaxBytes) {
            note("\(command): \($0)")
        }
    }
}

/// `--rigorous-only`: judge with the per-element bound alone.
struct TierOptions: ParsableArguments {
    @Flag(help: "Judge with the rigorous per-element bound only: the statistical tier (precision: error RMS and per-expert scale tests, docs/error-bounds.md) is still computed and reported, but does not fail a case.")
    var rigorousOnly = false
}

/// `--prefix`: the tensor-name prefix of the layer in a case file.
struct LayerPrefixOption: ParsableArguments {
    @Option(help: "Tensor-name prefix of the layer (default: the key ending in 'mlp.gate.weight').")
    var prefix: String?
}

/// `--filter`: only cases whose name contains a text.
struct CaseFilterOption: ParsableArguments {
    @Option(help: "Only cases whose name contains this text.")
    var filter: String?
}

/// `--json FILE`.
struct JSONOutputOption: ParsableArguments {
    @Option(help: "Write the results as JSON to this file.")
    var json: String?

    /// Writes `value` when `--json` was given.
    func write<T: Encodable>(_ value: T, escapingSlashes: Bool = true) throws {
        if let json { try JSONReport.write(value, to: json, escapingSlashes: escapingSlashes) }
    }
}

/// A failure the tool reports as one line on stderr with exit code 1.
enum ToolFailure: Error, CustomStringConvertible {
    /// A library error met by `command` ("moecheck reference", "fuzz", …).
    case failed(command: String, Error)
    /// No kernel was given; `what` says what to pass.
    case noKernel(command: String, what: String)
    /// `faults` was given a library built without fault injection.
    case noFaults(path: String)

    var description: String {
        switch self {
        case let .failed(command, error): return "\(command): \(error)"
        case let .noKernel(command, what): return "\(command): give \(what)"
        case let .noFaults(path): return "faults: \(path) injects no faults (build it with FAULTS=1)"
        }
    }
}

/// Runs `body`, turning any error other than a `ToolFailure` into one that names `command`.
func failing<T>(_ command: String, _ body: () throws -> T) throws -> T {
    do { return try body() } catch let e as ToolFailure { throw e } catch { throw ToolFailure.failed(command: command, error) }
}

/// Prints to stderr.
func note(_ s: String) {
    FileHandle.standardError.write((s + "\n").data(using: .utf8)!)
}

/// Whether stderr is a terminal (progress lines only then).
let stderrIsTerminal = isatty(2) == 1
