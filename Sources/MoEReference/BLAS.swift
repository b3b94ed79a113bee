import COpenBLAS
import Foundation

/// The OpenBLAS calls the reference makes; nothing else touches the C symbols.
public enum BLAS {
    /// Pins OpenBLAS's thread count (recorded in every output's metadata).
    public static func setThreads(_ n: Int) { openblas_set_num_threads(Int32(n)) }

    public static var threads: Int { Int(openblas_get_num_threads()) }

    /// The environment variable that sets the thread count when no option does.
    public static let threadsEnvironmentVariable = "MOECHECK_BLAS_THREADS"

    /// The thread count given by `MOECHECK_BLAS_THREADS`, if set to an integer.
    public static var environmentThreads: Int? {
        ProcessInfo.processInfo.environment[threadsEnvironmentVariable].flatMap(Int.init)
    }

    /// Pins the thread count: `requested` (a command-line option) if given, else
    /// `MOECHECK_BLAS_THREADS`, else `fallback`; at least 1.
    public static func configureThreads(requested: Int?, fallback: Int = 2) {
        setThreads(Swift.max(1, requested ?? environmentThreads ?? fallback))
    }

    /// `C[m,n] = A[m,k] · B[n,k]ᵀ` in float64, all row-major.
    static func gemmABt(_ a: UnsafePointer<Double>, _ b: UnsafePointer<Double>, _ c: UnsafeMutablePointer<Double>, m: Int, n: Int, k: Int) {
        guard m > 0, n > 0 else { return }
        if k == 0 { c.update(repeating: 0, count: m * n); return }
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(n), Int32(k), 1, a, Int32(k), b, Int32(k), 0, c, Int32(n))
    }

    /// `C[m,n] = A[m,k] · B[n,k]ᵀ` in float32, all row-major (bounds on non-negative data).
    static func sgemmABt(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>, m: Int, n: Int, k: Int) {
        guard m > 0, n > 0 else { return }
        if k == 0 { c.update(repeating: 0, count: m * n); return }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(n), Int32(k), 1, a, Int32(k), b, Int32(k), 0, c, Int32(n))
    }

    /// `C[m,n] = A[m,k] · B[k,n]` in float32, all row-major (the statistical model's projections).
    static func sgemmAB(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>, m: Int, n: Int, k: Int) {
        guard m > 0, n > 0 else { return }
        if k == 0 { c.update(repeating: 0, count: m * n); return }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(m), Int32(n), Int32(k), 1, a, Int32(k), b, Int32(n), 0, c, Int32(n))
    }
}
