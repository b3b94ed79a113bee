import Foundation

// Comparing values field by field, floating-point values by their bits (the reference cache's
// round trips must reproduce every bit, NaN payloads and signed zeros included).

/// Every difference between `a` and `b` (floating-point values compared by their bits), walked
/// through their stored properties; `path` names where.
public func bitDifferences(_ a: Any, _ b: Any, path: String = "result") -> [String] {
    func arrays<T>(_ x: [T], _ y: Any, _ same: (T, T) -> Bool) -> [String] {
        guard let y = y as? [T] else { return ["\(path): types differ"] }
        guard x.count == y.count else { return ["\(path): \(x.count) vs \(y.count) elements"] }
        if let i = x.indices.first(where: { !same(x[$0], y[$0]) }) { return ["\(path)[\(i)]: \(x[i]) vs \(y[i])"] }
        return []
    }
    switch a {
    case let x as [Double]: return arrays(x, b) { $0.bitPattern == $1.bitPattern }
    case let x as [Float]: return arrays(x, b) { $0.bitPattern == $1.bitPattern }
    case let x as [Int32]: return arrays(x, b, ==)
    case let x as [Bool]: return arrays(x, b, ==)
    case let x as Double: return (b as? Double)?.bitPattern == x.bitPattern ? [] : ["\(path): \(x) vs \(b)"]
    case let x as Float: return (b as? Float)?.bitPattern == x.bitPattern ? [] : ["\(path): \(x) vs \(b)"]
    case let x as Int: return (b as? Int) == x ? [] : ["\(path): \(x) vs \(b)"]
    case let x as Bool: return (b as? Bool) == x ? [] : ["\(path): \(x) vs \(b)"]
    case let x as String: return (b as? String) == x ? [] : ["\(path): \(x) vs \(b)"]
    default: break
    }
    let ma = Mirror(reflecting: a), mb = Mirror(reflecting: b)
    if ma.displayStyle == .enum { return "\(a)" == "\(b)" ? [] : ["\(path): \(a) vs \(b)"] }
    let ca = Array(ma.children), cb = Array(mb.children)
    guard ca.count == cb.count else { return ["\(path): \(ca.count) vs \(cb.count) children (nil vs non-nil?)"] }
    guard !ca.isEmpty else { return "\(a)" == "\(b)" ? [] : ["\(path): \(a) vs \(b)"] }
    var out: [String] = []
    for (x, y) in zip(ca, cb) {
        out += bitDifferences(x.value, y.value, path: path + "." + (x.label ?? "some"))
    }
    return out
}

/// Stored properties of a value, in declaration order.
public func storedProperties(_ value: Any) -> [String] { Mirror(reflecting: value).children.map { $0.label ?? "?" } }
