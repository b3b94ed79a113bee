/// Test support shared by every MoECheck test target (after swift-collections'
/// `_CollectionsTestSupport`): one seeded generator, the expect helpers, scratch files, tags and
/// the switch for long tiers. Not an API of the package: test targets only.
///
/// - **Seeded generator**: `SeededGenerator` is `SplitMix64` from LowPrecision — the generator
///   the counter-based synthetic layers and the fuzzer use — with `int(_:)` and `permutation(_:)`
///   for test-side choices. Every random case is repeatable from its seed.
/// - **Expect helpers**: `FailureLog` caps the failures a combinatorial sweep reports and names
///   the context of each; `expectError(_:as:mentions:_:)` checks an error's type and text;
///   `requireSuccess(_:_:)` unwraps a memoized `Result` and records its failure.
/// - **Tags**: `.exhaustive`, `.fuzz`, `.endToEnd`, `.python`, `.gpu`, `.longTier` (`swift test
///   --filter` does not take tags on Linux; Xcode and `swift test --skip` by name do).
/// - **Long tiers**: suites tagged `.longTier` run only when the environment variable
///   `MOECHECK_LONG_TESTS=1` is set (`TestTier.long`); otherwise they are skipped with that
///   reason printed. README "Tests" documents the same switch.
import Foundation
import Testing

extension Tag {
    /// Sweeps every code or value of a format.
    @Tag public static var exhaustive: Self
    /// Random cases from the fuzzer or a seeded generator.
    @Tag public static var fuzz: Self
    /// Runs the built `moecheck` executable.
    @Tag public static var endToEnd: Self
    /// Needs python3 with safetensors / ml_dtypes / numpy.
    @Tag public static var python: Self
    /// Needs a GPU kernel library (MOECHECK_KERNELS).
    @Tag public static var gpu: Self
    /// Minutes rather than seconds: runs only with `MOECHECK_LONG_TESTS=1`.
    @Tag public static var longTier: Self
}

/// The switch for long-running tiers: one environment variable, read here only.
public enum TestTier {
    /// The environment variable that turns the long tiers on.
    public static let environmentVariable = "MOECHECK_LONG_TESTS"

    /// Whether `MOECHECK_LONG_TESTS` is set to `1` (or `yes`/`true`).
    public static let long: Bool = {
        let v = ProcessInfo.processInfo.environment[environmentVariable]?.lowercased() ?? ""
        return ["1", "yes", "true"].contains(v)
    }()

    /// The reason a long tier prints when it is skipped.
    public static let longSkipReason: Comment = "long tier: set MOECHECK_LONG_TESTS=1 to run it"
}

/// Unwraps a memoized result (a fake library built once, a matrix run once), recording the
/// failure as an issue that names `what` before rethrowing it.
public func requireSuccess<T>(_ result: Result<T, Error>, _ what: String,
                              sourceLocation: SourceLocation = #_sourceLocation) throws -> T {
    switch result {
    case .success(let value): return value
    case .failure(let error):
        Issue.record("\(what) failed: \(error)", sourceLocation: sourceLocation)
        throw error
    }
}

/// Runs `body`, which must throw an `E` whose description contains every fragment. Failures
/// name `label` and quote the error text. Returns the error for further checks.
@discardableResult
public func expectError<E: Error & CustomStringConvertible>(_ label: String, as _: E.Type, mentions fragments: [String],
                                                           sourceLocation: SourceLocation = #_sourceLocation,
                                                           _ body: () throws -> Void) -> E? {
    do {
        try body()
        Issue.record("\(label): expected a \(E.self), but nothing was thrown", sourceLocation: sourceLocation)
        return nil
    } catch let error as E {
        for fragment in fragments where !error.description.contains(fragment) {
            Issue.record("\(label): error text does not mention \"\(fragment)\": \(error.description)", sourceLocation: sourceLocation)
        }
        return error
    } catch {
        Issue.record("\(label): expected a \(E.self), got \(type(of: error)): \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

/// Records at most `limit` failures of a combinatorial sweep, then a total, so a broken codec
/// reports a handful of named cases instead of 65,536 (swift-collections' context trail).
public struct FailureLog {
    public let context: String
    public let limit: Int
    public private(set) var failures = 0
    public private(set) var checks = 0

    public init(_ context: String, limit: Int = 8) {
        self.context = context
        self.limit = limit
    }

    public mutating func check(_ condition: Bool, _ message: @autoclosure () -> String,
                               sourceLocation: SourceLocation = #_sourceLocation) {
        checks += 1
        if condition { return }
        failures += 1
        if failures <= limit {
            Issue.record(Comment(rawValue: "\(context): \(message())"), sourceLocation: sourceLocation)
        }
    }

    /// Records the total when failures were capped; expects that something was checked at all.
    public func finish(sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(checks > 0, "\(context): no cases were checked", sourceLocation: sourceLocation)
        if failures > limit {
            Issue.record(Comment(rawValue: "\(context): \(failures) of \(checks) checks failed (first \(limit) shown)"),
                         sourceLocation: sourceLocation)
        }
    }
}

/// Whether two decoded values agree: both NaN, or equal with the same sign (so −0 ≠ +0).
public func sameValue(_ a: Double, _ b: Double) -> Bool {
    if a.isNaN || b.isNaN { return a.isNaN && b.isNaN }
    return a == b && a.sign == b.sign
}
