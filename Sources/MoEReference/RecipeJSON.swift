import Foundation

/// Recipes given as data from outside the C ABI: `--recipe NAME`, `--recipe-json FILE`, a
/// Python adapter's `RECIPE`.
///
/// A recipe is a name from `Recipe.named`, or a JSON object of rounding points: `"base"` (a
/// recipe name, default `fused-bf16`) plus any `Recipe` field to override, keyed by its Swift
/// name (`routerLogits`, `routingWeights`, `sharedGate`, `activationFP8`, `scaleConvention`,
/// `gateUp`, `activation`, `intermediate`, `intermediateFP8`, `down`, `weighted`, `combine`,
/// `output`, `accumulatorUnitRoundoff`, `transcendentalRelativeError`, `accumulation`, `quantization`, `name`). Values: a
/// `Rounding` (`none`, `fp32`, `bf16`, `bf16-or-fp32`), a `CombineMode` (`exact`, `fp32`, `bf16`),
/// a `ScaleConvention` (`divide`, `multiply-reciprocal`), an `AccumulationOrder` (`contiguous`,
/// `any`), a `QuantizationArithmetic` (`exact`, `approximate`), booleans and numbers. An unknown key or
/// value is an error naming it: a typo never silently leaves a rounding point unmodelled.
public struct RecipeSpecError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

extension Recipe {
    /// Every recipe name `Recipe.named(_:)` knows, for messages.
    public static var knownNames: String { named.map(\.name).joined(separator: ", ") }

    /// A recipe from a decoded JSON value (a name or an object of overrides); `origin` names
    /// where it came from in errors.
    public static func fromJSONValue(_ value: Any, origin: String) throws -> Recipe {
        if let name = value as? String {
            guard let r = Recipe.named(name) else { throw RecipeSpecError("\(origin): unknown recipe '\(name)' (known: \(knownNames))") }
            return r
        }
        guard let object = value as? [String: Any] else {
            throw RecipeSpecError("\(origin): a recipe is a name or a JSON object of rounding points, not \(type(of: value))")
        }
        let baseName = (object["base"] as? String) ?? "fused-bf16"
        guard var r = Recipe.named(baseName) else { throw RecipeSpecError("\(origin): unknown base recipe '\(baseName)' (known: \(knownNames))") }
        var customName: String? = nil
        func enumValue<T: RawRepresentable>(_ key: String, _ v: Any) throws -> T where T.RawValue == String {
            guard let s = v as? String, let e = T(rawValue: s) else {
                throw RecipeSpecError("\(origin): '\(key)' = \(v) is not one of the allowed values for \(T.self)")
            }
            return e
        }
        func bool(_ key: String, _ v: Any) throws -> Bool {
            guard let b = v as? Bool else { throw RecipeSpecError("\(origin): '\(key)' = \(v) is not a boolean") }
            return b
        }
        func number(_ key: String, _ v: Any) throws -> Double {
            guard let n = v as? NSNumber, !(v is Bool), n.doubleValue.isFinite, n.doubleValue >= 0 else {
                throw RecipeSpecError("\(origin): '\(key)' = \(v) is not a finite non-negative number")
            }
            return n.doubleValue
        }
        for (key, v) in object.sorted(by: { $0.key < $1.key }) {
            switch key {
            case "base": continue
            case "name": customName = v as? String
            case "routerLogits": r.routerLogits = try enumValue(key, v)
            case "routingWeights": r.routingWeights = try enumValue(key, v)
            case "sharedGate": r.sharedGate = try enumValue(key, v)
            case "activationFP8": r.activationFP8 = try bool(key, v)
            case "scaleConvention": r.scaleConvention = try enumValue(key, v)
            case "gateUp": r.gateUp = try enumValue(key, v)
            case "activation": r.activation = try enumValue(key, v)
            case "intermediate": r.intermediate = try enumValue(key, v)
            case "intermediateFP8": r.intermediateFP8 = try bool(key, v)
            case "down": r.down = try enumValue(key, v)
            case "weighted": r.weighted = try enumValue(key, v)
            case "combine": r.combine = try enumValue(key, v)
            case "output": r.output = try enumValue(key, v)
            case "accumulatorUnitRoundoff": r.accumulatorUnitRoundoff = try number(key, v)
            case "transcendentalRelativeError": r.transcendentalRelativeError = try number(key, v)
            case "accumulation": r.accumulation = try enumValue(key, v) as AccumulationOrder
            case "quantization": r.quantization = try enumValue(key, v) as QuantizationArithmetic
            default:
                throw RecipeSpecError("\(origin): unknown recipe field '\(key)' (fields: base, name, routerLogits, routingWeights, sharedGate, activationFP8, scaleConvention, gateUp, activation, intermediate, intermediateFP8, down, weighted, combine, output, accumulatorUnitRoundoff, transcendentalRelativeError, accumulation, quantization)")
            }
        }
        let overrides = object.keys.filter { $0 != "base" && $0 != "name" }.sorted()
        r.name = customName ?? (overrides.isEmpty ? baseName : "\(baseName)+{\(overrides.joined(separator: ","))}")
        return r
    }

    /// A recipe from JSON text (a quoted name or an object).
    public static func fromJSON(_ text: String, origin: String) throws -> Recipe {
        guard let data = text.data(using: .utf8),
              let value = try? JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed]) else {
            throw RecipeSpecError("\(origin): not valid JSON")
        }
        return try fromJSONValue(value, origin: origin)
    }

    /// A recipe from `--recipe NAME` or `--recipe-json FILE` (at most one), nil when neither.
    public static func fromOptions(name: String?, jsonFile: String?) throws -> Recipe? {
        switch (name, jsonFile) {
        case (nil, nil): return nil
        case (.some, .some): throw RecipeSpecError("give --recipe or --recipe-json, not both")
        case let (.some(n), nil): return try fromJSONValue(n, origin: "--recipe")
        case let (nil, .some(path)):
            guard let data = FileManager.default.contents(atPath: path) else { throw RecipeSpecError("\(path): cannot read the recipe file") }
            return try fromJSON(String(decoding: data, as: UTF8.self), origin: path)
        }
    }
}
