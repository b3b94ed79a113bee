// lowprecision-bench: throughput of the bf16 codec hot loops (not a test; run in release).
//
//     swift run -c release lowprecision-bench [elements-in-Mi] [repetitions]
//
// Measures BFloat16.encode (Float → bf16 bits, RNE, canonical NaN) followed by BFloat16.decode
// (bf16 bits → Float) over the whole buffer, and the same round trip in L2-sized chunks, and
// reports G elements/s (one element = one encode + one decode). Inputs are seeded random
// Floats across many binades, with a few NaNs and infinities, so the NaN path is exercised.

import Dispatch
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import LowPrecision

let arguments = CommandLine.arguments
let mebi = arguments.count > 1 ? Int(arguments[1]) ?? 64 : 64
let repetitions = arguments.count > 2 ? Int(arguments[2]) ?? 7 : 7
let count = mebi << 20

var random = SplitMix64(seed: 0x1234_5678_9ABC_DEF0)

let source = UnsafeMutableBufferPointer<Float>.allocate(capacity: count)
let bits = UnsafeMutableBufferPointer<UInt16>.allocate(capacity: count)
let decoded = UnsafeMutableBufferPointer<Float>.allocate(capacity: count)
defer { source.deallocate(); bits.deallocate(); decoded.deallocate() }
for i in 0..<count {
    let r = random.next()
    // Random sign and mantissa, exponent within ±40 binades of 1.
    let exponent = UInt32(127 - 40 + Int(r >> 58) % 81)
    source[i] = Float(bitPattern: UInt32(truncatingIfNeeded: r) & 0x807F_FFFF | exponent << 23)
}
source[0] = .nan; source[1] = .infinity; source[2] = -0.0; source[3] = Float(bitPattern: 0x7F80_0001)
bits.initialize(repeating: 0); decoded.initialize(repeating: 0)

func seconds(_ body: () -> Void) -> Double {
    let start = DispatchTime.now().uptimeNanoseconds
    body()
    return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
}

func checksum() -> UInt64 {
    var sum: UInt64 = 0
    for i in stride(from: 0, to: count, by: 4099) { sum = sum &* 31 &+ UInt64(decoded[i].bitPattern) }
    return sum
}

func report(_ name: String, _ times: [Double]) {
    let sorted = times.sorted()
    let best = sorted.first!, median = sorted[sorted.count / 2]
    let g = Double(count) / 1e9
    print("\(name): best \((best * 1000).rounded()) ms = \(String(format2(g / best))) G elements/s, "
          + "median \((median * 1000).rounded()) ms = \(String(format2(g / median))) G elements/s")
}

func format2(_ x: Double) -> String { String(Double(Int(x * 100 + 0.5)) / 100) }

let constSource = UnsafeBufferPointer(source)
let constBits = UnsafeBufferPointer(bits)

var wholeTimes: [Double] = []
for _ in 0..<repetitions {
    wholeTimes.append(seconds {
        BFloat16.encode(constSource, into: bits)
        BFloat16.decode(constBits, into: decoded)
    })
}
let wholeChecksum = checksum()

let chunk = 32 << 10  // 32 Ki elements: 64 KiB of bf16 stays in L2
var chunkTimes: [Double] = []
for _ in 0..<repetitions {
    chunkTimes.append(seconds {
        var start = 0
        while start < count {
            let n = min(chunk, count - start)
            let s = UnsafeBufferPointer(rebasing: constSource[start..<(start + n)])
            let b = UnsafeMutableBufferPointer(rebasing: bits[start..<(start + n)])
            BFloat16.encode(s, into: b)
            BFloat16.decode(UnsafeBufferPointer(b), into: UnsafeMutableBufferPointer(rebasing: decoded[start..<(start + n)]))
            start += n
        }
    })
}
let chunkChecksum = checksum()

// Correctness spot check against the scalar functions.
var mismatches = 0
for i in stride(from: 0, to: count, by: 997) where bits[i] != BFloat16.bits(source[i]) { mismatches += 1 }
for i in stride(from: 0, to: count, by: 997) where decoded[i].bitPattern != BFloat16.float(bits[i]).bitPattern { mismatches += 1 }

print("BFloat16 encode+decode round trip, \(mebi) Mi elements, \(repetitions) repetitions")
report("whole buffer (encode all, then decode all)", wholeTimes)
report("chunked (\(chunk) elements per encode+decode)", chunkTimes)
print("checksums \(wholeChecksum) \(chunkChecksum), spot-check mismatches \(mismatches), NaN → 0x\(String(bits[0], radix: 16)), payload NaN → 0x\(String(bits[3], radix: 16))")
if mismatches != 0 || wholeChecksum != chunkChecksum { print("FAILED"); exit(1) }
