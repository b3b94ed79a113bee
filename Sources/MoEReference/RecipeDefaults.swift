import TensorIO

extension Recipe {
    /// The recipe a layer is judged with when none is named: the aiter/sglang fused path of its
    /// weight format — `fused-fp8` for fp8 weights (e4m3fn or e4m3fnuz), `fused-bf16` otherwise.
    /// The one place this rule lives (the CLI, goldens, benchmarks and kernels use it).
    public static func `default`(for format: WeightFormat) -> Recipe {
        format.fp8 != nil ? .fusedFP8 : .fusedBF16
    }

    /// The recipe called `name`, or the default of `format` when `name` is nil.
    /// Throws `RecipeLookupError.unknown` naming the known recipes.
    public static func named(_ name: String?, orDefaultFor format: WeightFormat) throws -> Recipe {
        guard let name else { return .default(for: format) }
        guard let r = Recipe.named(name) else { throw RecipeLookupError.unknown(name, known: Recipe.named.map(\.name)) }
        return r
    }
}

/// A recipe name that is not one of `Recipe.named`.
public enum RecipeLookupError: Error, CustomStringConvertible, Equatable {
    case unknown(String, known: [String])

    public var description: String {
        switch self {
        case let .unknown(name, known): return "unknown recipe '\(name)' (known: \(known.joined(separator: ", ")))"
        }
    }
}
