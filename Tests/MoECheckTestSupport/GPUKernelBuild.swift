import Foundation

/// The kernel library the GPU suites run against, found or built once per test process.
///
/// `MOECHECK_KERNELS` (a library path) wins when it is set. Otherwise, on a machine with a GPU
/// and its compiler, `swift test` builds `Kernels/` itself — no environment variable needed:
///
/// - NVIDIA: a GPU is there when `nvidia-smi` lists one; the compiler is `nvcc` on `PATH`, else
///   `$CUDA_HOME/bin/nvcc` or `/usr/local/cuda/bin/nvcc`; the architecture is the GPU's own
///   compute capability (`nvidia-smi --query-gpu=compute_cap`, 9.0 → `sm_90`).
/// - AMD: a GPU is there when `/dev/kfd` exists and `rocminfo` names a `gfx` agent; the compiler
///   is `hipcc` on `PATH`, else `$ROCM_PATH/bin/hipcc` or `/opt/rocm/bin/hipcc`; the architecture
///   is that agent's (`--offload-arch=gfx942`, `gfx950`, …), so the runner's hipcc must know it.
///
/// The build is `make -C Kernels PLATFORM=… IMPL=… FAULTS=1 ARCH=…` (the matrix-core kernels,
/// IMPL=mma, on sm_80+ and every AMD target the MFMA path supports; the FMA kernels elsewhere),
/// into `Kernels/build/<platform>[-mma]/`. Its log is kept at `Kernels/build/swift-test-build.log`.
/// When no GPU or no compiler is found, `unavailableReason` says which, and the GPU suites skip.
public enum GPUKernelBuild {
    public struct Located: Sendable {
        /// The library to test (`libmoekernels.so`).
        public var library: String
        /// The FAULTS=1 build next to it, when there is one.
        public var faultLibrary: String?
        /// How it was found: "MOECHECK_KERNELS" or the make command that built it.
        public var origin: String
    }

    /// The library, or why there is none.
    public static let located: Result<Located, SkipReason> = locate()

    public struct SkipReason: Error, CustomStringConvertible, Sendable {
        public var description: String
    }

    /// Why the GPU suites cannot run here, or nil when they can.
    public static var unavailableReason: String? {
        if case .failure(let r) = located { return r.description }
        return nil
    }

    static func locate() -> Result<Located, SkipReason> {
        let env = ProcessInfo.processInfo.environment
        if let path = env["MOECHECK_KERNELS"], !path.isEmpty {
            let faults = path.replacingOccurrences(of: "libmoekernels.so", with: "libmoekernels_faults.so")
            return .success(Located(library: path, faultLibrary: faults != path && FileManager.default.fileExists(atPath: faults) ? faults : nil,
                                    origin: "MOECHECK_KERNELS"))
        }
        var args: [String]
        var platform: String
        var impl: String
        if let cc = nvidiaComputeCapability() {
            guard let nvcc = findTool("nvcc", under: [env["CUDA_HOME"], env["CUDA_PATH"], "/usr/local/cuda"]) else {
                return .failure(SkipReason(description: "an NVIDIA GPU (compute capability \(cc)) but no nvcc on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin: install the CUDA toolkit or set MOECHECK_KERNELS"))
            }
            let sm = "sm_" + cc.replacingOccurrences(of: ".", with: "")
            platform = "nvidia"
            impl = (Int(cc.split(separator: ".").first ?? "0") ?? 0) >= 8 ? "mma" : "fma"  // bf16 mma.sync needs sm_80
            args = ["PLATFORM=nvidia", "IMPL=\(impl)", "FAULTS=1", "NVCC=\(nvcc)", "ARCH=\(sm)"]
        } else if let gfx = amdArchitecture() {
            guard let hipcc = findTool("hipcc", under: [env["ROCM_PATH"], "/opt/rocm"]) else {
                return .failure(SkipReason(description: "an AMD GPU (\(gfx)) but no hipcc on PATH, in $ROCM_PATH/bin or /opt/rocm/bin: install ROCm's hipcc or set MOECHECK_KERNELS"))
            }
            platform = "amd"
            impl = gfx.hasPrefix("gfx90a") || gfx.hasPrefix("gfx94") || gfx.hasPrefix("gfx95") ? "mma" : "fma"
            args = ["PLATFORM=amd", "IMPL=\(impl)", "FAULTS=1", "HIPCC=\(hipcc)", "ARCH=--offload-arch=\(gfx)"]
        } else {
            return .failure(SkipReason(description: "no GPU here (nvidia-smi lists none, no /dev/kfd with a gfx agent in rocminfo): the GPU suites need one, or MOECHECK_KERNELS naming a library"))
        }
        let kernels = packagePath("Kernels")
        let build = "\(kernels)/build/\(platform)\(impl == "mma" ? "-mma" : "")"
        let log = "\(kernels)/build/swift-test-build.log"
        try? FileManager.default.createDirectory(atPath: "\(kernels)/build", withIntermediateDirectories: true)
        args.append("-j\(max(1, ProcessInfo.processInfo.activeProcessorCount))")
        let command = "make -C Kernels " + args.joined(separator: " ")
        let run = shell(["make", "-C", kernels] + args)
        try? (command + "\n" + run.output).write(toFile: log, atomically: true, encoding: .utf8)
        guard run.status == 0 else {
            let tail = run.output.split(separator: "\n").suffix(6).joined(separator: "\n")
            return .failure(SkipReason(description: "`\(command)` failed (exit \(run.status), log \(log)):\n\(tail)"))
        }
        return .success(Located(library: "\(build)/libmoekernels.so", faultLibrary: "\(build)/libmoekernels_faults.so", origin: command))
    }

    /// "9.0" when nvidia-smi lists a GPU, else nil.
    static func nvidiaComputeCapability() -> String? {
        guard let smi = findTool("nvidia-smi", under: ["/usr"]) else { return nil }
        let r = shell([smi, "--query-gpu=compute_cap", "--format=csv,noheader"])
        guard r.status == 0 else { return nil }
        return r.output.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.first { $0.contains(".") && Double($0) != nil }
    }

    /// The first gfx agent rocminfo names, when /dev/kfd exists.
    static func amdArchitecture() -> String? {
        guard FileManager.default.fileExists(atPath: "/dev/kfd"),
              let rocminfo = findTool("rocminfo", under: [ProcessInfo.processInfo.environment["ROCM_PATH"], "/opt/rocm"]) else { return nil }
        let r = shell([rocminfo])
        guard r.status == 0 else { return nil }
        for word in r.output.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" }) where word.hasPrefix("gfx") && word.count > 3 {
            return String(word)
        }
        return nil
    }

    /// `name` on PATH, else `<root>/bin/name` for the first root that has it.
    static func findTool(_ name: String, under roots: [String?]) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        let dirs = path.split(separator: ":").map(String.init) + roots.compactMap { $0.map { "\($0)/bin" } }
        return dirs.map { "\($0)/\(name)" }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    static func shell(_ argv: [String]) -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: argv[0])
        p.arguments = Array(argv.dropFirst())
        if argv[0] == "make" { p.executableURL = URL(fileURLWithPath: findTool("make", under: []) ?? "/usr/bin/make") }
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        do { try p.run() } catch { return (127, "\(argv[0]): \(error)") }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }
}
