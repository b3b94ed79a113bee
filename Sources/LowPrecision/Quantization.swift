/// How a dynamic fp8 scale is formed from a group's absolute maximum.
///
/// Both conventions are in use (FACTS §3) and can differ by one ulp in the scale and then
/// occasionally by one fp8 code, so a recipe must say which one a kernel uses.
public enum ScaleConvention: String, CaseIterable, Sendable, Codable {
    /// `scale = amax / FP8_MAX`, `q = fp8(x / scale)` (torch reference quantizers).
    case divide
    /// `scale = amax · fp32(1 / FP8_MAX)`, `q = fp8(x · fp32(1 / scale))` (aiter per_1x128).
    case multiplyReciprocal = "multiply-reciprocal"
}

/// Dynamic per-token 1×`groupSize` activation quantization to fp8, computed in binary32
/// exactly as a kernel does:
///
///     amax  = max(1e-10, max |x_g|)
///     scale = amax / MAX              (divide)           or amax · fp32(1/MAX)       (multiply-reciprocal)
///     q     = fp8(clamp(x / scale))   (divide)           or fp8(clamp(x · fp32(1/scale)))
///
/// with MAX = 448 (e4m3fn) or 240 (e4m3fnuz), RNE, saturating after the clamp. The dequantized
/// value `q · scale` is exact in `Double`. The last group of a row may be shorter than
/// `groupSize` when the row length is not a multiple of it.
public struct GroupQuantizer: Sendable {
    public let codec: FP8Codec
    public let convention: ScaleConvention
    public let groupSize: Int

    public init(format: SmallFloatFormat, convention: ScaleConvention, groupSize: Int = 128) {
        precondition(groupSize > 0)
        self.codec = FP8Codec.codec(for: format)
        self.convention = convention
        self.groupSize = groupSize
    }

    /// The scale for a group with absolute maximum `amax` (binary32 arithmetic).
    @inlinable
    public func scale(amax: Float) -> Float {
        let a = Swift.max(Float(1e-10), amax)
        let maxValue = Float(codec.maximum)
        switch convention {
        case .divide: return a / maxValue
        case .multiplyReciprocal: return a * (Float(1) / maxValue)
        }
    }

    /// The pre-rounding value `x / scale` or `x · fp32(1/scale)`, clamped to ±MAX, in binary32.
    @inlinable
    public func scaled(_ x: Float, scale: Float) -> Float {
        let maxValue = Float(codec.maximum)
        let v: Float
        switch convention {
        case .divide: v = x / scale
        case .multiplyReciprocal: v = x * (Float(1) / scale)
        }
        return Swift.min(Swift.max(v, -maxValue), maxValue)
    }

    /// Number of groups in a row of `length` values.
    @inlinable
    public func groupCount(_ length: Int) -> Int { (length + groupSize - 1) / groupSize }

    /// Quantizes one row. `codes` gets `row.count` codes, `scales` one scale per group.
    public func quantize(row: UnsafeBufferPointer<Float>, codes: UnsafeMutableBufferPointer<UInt8>,
                         scales: UnsafeMutableBufferPointer<Float>) {
        let n = row.count
        var g = 0
        var start = 0
        while start < n {
            let end = Swift.min(start + groupSize, n)
            var amax: Float = 0
            for i in start..<end { amax = Swift.max(amax, Swift.abs(row[i])) }
            let s = scale(amax: amax)
            scales[g] = s
            for i in start..<end { codes[i] = codec.code(scaled(row[i], scale: s), saturating: true) }
            g += 1
            start = end
        }
    }

    /// Quantizes and dequantizes one row into `Double` values `q · scale`.
    public func fakeQuantize(row: [Float]) -> [Double] {
        var codes = [UInt8](repeating: 0, count: row.count)
        var scales = [Float](repeating: 0, count: groupCount(row.count))
        row.withUnsafeBufferPointer { r in
            codes.withUnsafeMutableBufferPointer { c in
                scales.withUnsafeMutableBufferPointer { s in quantize(row: r, codes: c, scales: s) }
            }
        }
        var out = [Double](repeating: 0, count: row.count)
        for i in 0..<row.count { out[i] = Double(codec.value(codes[i])) * Double(scales[i / groupSize]) }
        return out
    }
}

/// Static block quantization of a weight matrix `[rows, columns]` into fp8 codes with one binary32
/// scale per `block × block` tile (`weight_scale_inv`, a multiplier: value = code · scale).
///
/// `scale = amax_tile / MAX` (binary32; tiles of zeros, or so tiny that `amax / MAX` underflows to 0,
/// get scale 1), `code = fp8(w / scale)`
/// saturating RNE. Tail tiles where a dimension is not a multiple of `block` are smaller; the
/// scale tensor has shape `[ceil(rows/block), ceil(columns/block)]`.
public struct BlockQuantizer: Sendable {
    public let codec: FP8Codec
    public let block: Int

    public init(format: SmallFloatFormat, block: Int = 128) {
        precondition(block > 0)
        self.codec = FP8Codec.codec(for: format)
        self.block = block
    }

    public func scaleShape(rows: Int, columns: Int) -> (Int, Int) {
        ((rows + block - 1) / block, (columns + block - 1) / block)
    }

    /// Quantizes row-major `values` (`rows × columns`).
    public func quantize(_ values: [Float], rows: Int, columns: Int) -> (codes: [UInt8], scales: [Float]) {
        precondition(values.count == rows * columns, "BlockQuantizer: \(values.count) values for \(rows)x\(columns)")
        let (sr, sc) = scaleShape(rows: rows, columns: columns)
        var scales = [Float](repeating: 1, count: sr * sc)
        var codes = [UInt8](repeating: 0, count: values.count)
        let maxValue = Float(codec.maximum)
        for br in 0..<sr {
            for bc in 0..<sc {
                let r0 = br * block, r1 = Swift.min(r0 + block, rows)
                let c0 = bc * block, c1 = Swift.min(c0 + block, columns)
                var amax: Float = 0
                for r in r0..<r1 { for c in c0..<c1 { amax = Swift.max(amax, Swift.abs(values[r * columns + c])) } }
                // A tile whose scale would be 0 (all zeros, or amax/MAX underflowing binary32)
                // gets scale 1: a zero scale would turn 0/0 into NaN codes.
                let tileScale = amax / maxValue
                let s: Float = tileScale > 0 ? tileScale : 1
                scales[br * sc + bc] = s
                for r in r0..<r1 {
                    for c in c0..<c1 { codes[r * columns + c] = codec.code(Double(values[r * columns + c] / s), saturating: true) }
                }
            }
        }
        return (codes, scales)
    }

    /// Dequantizes into `Double` (exact: `code · scale`).
    public func dequantize(codes: UnsafeBufferPointer<UInt8>, scales: UnsafeBufferPointer<Float>, rows: Int, columns: Int,
                           into out: UnsafeMutableBufferPointer<Double>) {
        let sc = (columns + block - 1) / block
        for r in 0..<rows {
            let srow = (r / block) * sc
            for c in 0..<columns {
                out[r * columns + c] = Double(codec.value(codes[r * columns + c])) * Double(scales[srow + c / block])
            }
        }
    }
}
