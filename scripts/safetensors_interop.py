#!/usr/bin/env python3
"""safetensors interoperability between MoECheck's Swift TensorIO and the Python safetensors
library (numpy + ml_dtypes; no torch).

  python3 scripts/safetensors_interop.py write DIR
      writes DIR/python_written.safetensors (one tensor per dtype F64 F32 F16 BF16 I64 I32 U8
      F8_E4M3 [+ F8_E4M3FNUZ when the installed safetensors writes it], a 0-d and a [1] tensor,
      negative numbers, subnormals and max values of each format, __metadata__
      {"producer": "python", "config": "<json>"}) and DIR/python_written.json describing it.

  python3 scripts/safetensors_interop.py check FILE.safetensors FILE.json
      loads FILE with safetensors (safetensors.numpy.load_file; BF16 / F8 through ml_dtypes views
      of the raw bytes where numpy cannot name the dtype) and compares every tensor's dtype,
      shape and exact bits with the JSON. Prints one line per tensor, then
      "interop: N tensors match" (exit 0), or names the first mismatch (exit 1).

JSON schema (one object, keyed by tensor name; "__metadata__" optional, compared if present):
  {"NAME": {"dtype": "BF16", "shape": [3, 5],
            "values": [floats or ints, row-major],
            "bits": [raw unsigned integer bit patterns, row-major]   # BF16, F16, F8_* (optional else)
           }, ...}
Comparison: where "bits" is present it is compared exactly with the stored bit patterns; else
"values" are compared exactly (floats by their IEEE bits after conversion to the tensor's dtype,
so -0.0 != 0.0; integers exactly). NaN/Inf are not used (plain JSON has no such numbers).

Needs: numpy, safetensors, ml_dtypes (pip install safetensors ml_dtypes).
"""

from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np

try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    print("interop: ml_dtypes is not installed (pip install ml_dtypes)", file=sys.stderr)
    sys.exit(2)
import safetensors
import safetensors.numpy as stnp

# dtype name -> (numpy dtype used to hold the values, unsigned integer type of the same width)
DTYPES = {
    "F64": (np.dtype(np.float64), np.uint64),
    "F32": (np.dtype(np.float32), np.uint32),
    "F16": (np.dtype(np.float16), np.uint16),
    "BF16": (np.dtype(ml_dtypes.bfloat16), np.uint16),
    "I64": (np.dtype(np.int64), np.uint64),
    "I32": (np.dtype(np.int32), np.uint32),
    "I16": (np.dtype(np.int16), np.uint16),
    "I8": (np.dtype(np.int8), np.uint8),
    "U64": (np.dtype(np.uint64), np.uint64),
    "U32": (np.dtype(np.uint32), np.uint32),
    "U16": (np.dtype(np.uint16), np.uint16),
    "U8": (np.dtype(np.uint8), np.uint8),
    "BOOL": (np.dtype(np.bool_), np.uint8),
    "F8_E4M3": (np.dtype(ml_dtypes.float8_e4m3fn), np.uint8),
    "F8_E4M3FNUZ": (np.dtype(ml_dtypes.float8_e4m3fnuz), np.uint8),
    "F8_E5M2": (np.dtype(ml_dtypes.float8_e5m2), np.uint8),
}
BITS_DTYPES = {"BF16", "F16", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2"}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2"}


def _codes(dtype: str, codes):
    np_dt, ut = DTYPES[dtype]
    return np.asarray(codes, dtype=ut).view(np_dt)


def sample_tensors() -> dict[str, tuple[str, np.ndarray]]:
    """name -> (safetensors dtype, array). No NaN / Inf anywhere."""
    f64 = np.array([
        [0.0, -0.0, 1.0, -1.5, 3.141592653589793],
        [5e-324, -5e-324, 2.2250738585072014e-308, 2.225073858507201e-308, -1e-310],   # subnormals, min normal
        [1.7976931348623157e308, -1.7976931348623157e308, 0.1, -123456.789, 1e300],    # max
    ], dtype=np.float64)
    f32 = np.array([
        [0.0, -0.0, 1.0, -2.5, 0.1],
        [np.float32(2.0 ** -149), -np.float32(2.0 ** -149), np.float32(2.0 ** -126),
         np.float32(1.1754942e-38), -np.float32(3e-39)],                                 # subnormals, min normal
        [np.finfo(np.float32).max, -np.finfo(np.float32).max, 16777217.0, -1e30, 65504.0],
    ], dtype=np.float32)
    f16 = _codes("F16", [
        [0x0000, 0x8000, 0x3C00, 0xBE00, 0x2E66],     # 0, -0, 1, -1.5, ~0.1
        [0x0001, 0x8001, 0x03FF, 0x0400, 0x8200],     # 2^-24, -2^-24, max subnormal, min normal, -subnormal
        [0x7BFF, 0xFBFF, 0x5640, 0xC880, 0x3555],     # 65504, -65504, 100, -9, ~1/3
    ])
    bf16 = _codes("BF16", [
        [0x0000, 0x8000, 0x3F80, 0xBFC0, 0x3DCD],     # 0, -0, 1, -1.5, ~0.1
        [0x0001, 0x8001, 0x007F, 0x0080, 0x8040],     # 2^-133, -2^-133, max subnormal, min normal 2^-126, -subnormal
        [0x7F7F, 0xFF7F, 0x4049, 0xC2C8, 0x3EAB],     # max, -max, ~3.14, -100, ~1/3
    ])
    i64 = np.array([
        [0, -1, 1, 2 ** 53 + 1, -(2 ** 53) - 1],
        [2 ** 62 + 12345, -(2 ** 62) - 7, 1 << 40, -(1 << 33), 42],
        [2 ** 63 - 1, -(2 ** 63), 1000000007, -1000000007, 7],
    ], dtype=np.int64)
    i32 = np.array([
        [0, -1, 1, 65536, -65537],
        [2 ** 31 - 1, -(2 ** 31), 16777217, -16777217, 123],
        [7, -7, 1 << 30, -(1 << 30), 99999],
    ], dtype=np.int32)
    u8 = np.array([[0, 1, 127, 128, 255], [2, 4, 8, 16, 32], [254, 253, 64, 200, 99]], dtype=np.uint8)
    f8 = _codes("F8_E4M3", [
        [0x00, 0x80, 0x38, 0xBC, 0x30],               # 0, -0, 1, -1.5, 0.5
        [0x01, 0x81, 0x07, 0x08, 0x84],               # 2^-9, -2^-9, max subnormal 7*2^-9, min normal 2^-6, -4*2^-9
        [0x7E, 0xFE, 0x7D, 0x40, 0xC9],               # 448, -448, 416, 2, -4.5
    ])
    tensors = {
        "t_f64": ("F64", f64),
        "t_f32": ("F32", f32),
        "t_f16": ("F16", f16),
        "t_bf16": ("BF16", bf16),
        "t_i64": ("I64", i64),
        "t_i32": ("I32", i32),
        "t_u8": ("U8", u8),
        "t_f8_e4m3": ("F8_E4M3", f8),
        "scalar_f32": ("F32", np.array(-0.75, dtype=np.float32)),          # 0-d
        "one_bf16": ("BF16", _codes("BF16", [0xC0A0])),                    # [1]: -5
        "model.layers.0.mlp.experts.gate_up_proj": ("BF16", _codes("BF16", np.arange(24).reshape(2, 3, 4) * 0x0101 & 0x7F7F)),
    }
    tensors["t_f8_e4m3fnuz"] = ("F8_E4M3FNUZ", _codes("F8_E4M3FNUZ", [
        [0x00, 0x40, 0xC4, 0x38, 0x3C],               # 0, 1, -1.5, 0.5, 0.75
        [0x01, 0x81, 0x07, 0x08, 0x85],               # 2^-10, -2^-10, max subnormal 7*2^-10, min normal 2^-7, -5*2^-10
        [0x7F, 0xFF, 0x7E, 0x48, 0xCA],               # 240, -240, 224, 2, -2.5
    ]))
    return tensors


def fnuz_supported() -> bool:
    """Whether the installed safetensors can write and read F8_E4M3FNUZ (>= 0.8.0)."""
    try:
        data = stnp.save({"x": np.zeros(2, dtype=ml_dtypes.float8_e4m3fnuz)})
        n = struct.unpack("<Q", data[:8])[0]
        if json.loads(data[8:8 + n])["x"]["dtype"] != "F8_E4M3FNUZ":
            return False
        safetensors.deserialize(data)
        return True
    except Exception:
        return False


def describe(dtype: str, arr: np.ndarray) -> dict:
    np_dt, ut = DTYPES[dtype]
    flat = np.ascontiguousarray(arr).reshape(-1)
    d = {"dtype": dtype, "shape": list(arr.shape)}
    if dtype in FLOAT_DTYPES:
        d["values"] = [float(v) for v in flat.astype(np.float64)]
    elif dtype == "BOOL":
        d["values"] = [int(v) for v in flat]
    else:
        d["values"] = [int(v) for v in flat]
    if dtype in BITS_DTYPES:
        d["bits"] = [int(v) for v in flat.view(ut)]
    return d


def cmd_write(out_dir: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    tensors = sample_tensors()
    fnuz = fnuz_supported()
    print(f"safetensors {safetensors.__version__}, ml_dtypes {ml_dtypes.__version__}, numpy {np.__version__}; "
          f"F8_E4M3FNUZ {'supported: written' if fnuz else 'NOT supported by this safetensors: skipped'}")
    if not fnuz:
        tensors.pop("t_f8_e4m3fnuz")
    config = {"model_type": "qwen3_5_moe", "hidden_size": 4, "moe_intermediate_size": 2,
              "shared_expert_intermediate_size": 2, "num_experts": 2, "num_experts_per_tok": 1,
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}, "note": "unicode ok: \u00e9\u2713"}
    metadata = {"producer": "python", "config": json.dumps(config, ensure_ascii=False)}
    st_path = os.path.join(out_dir, "python_written.safetensors")
    js_path = os.path.join(out_dir, "python_written.json")
    stnp.save_file({k: a.copy(order="C") for k, (_, a) in tensors.items()}, st_path, metadata=metadata)  # keeps 0-d
    desc = {k: describe(dt, a) for k, (dt, a) in tensors.items()}
    desc["__metadata__"] = metadata
    with open(js_path, "w") as f:  # one line per tensor
        f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in desc.items()) + "\n}\n")
    # the written header must carry the dtypes we meant
    header = _read_header(st_path)
    for k, (dt, _) in tensors.items():
        assert header[k]["dtype"] == dt, (k, header[k]["dtype"], dt)
    print(f"wrote {st_path} ({len(tensors)} tensors) and {js_path}")
    return 0


def _read_header(path: str) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def load_with_safetensors(path: str) -> tuple[dict, dict, str]:
    """name -> (dtype string, numpy array holding the bits in the tensor's dtype); metadata; how."""
    header = _read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    try:
        arrays = stnp.load_file(path)
        how = "safetensors.numpy.load_file"
    except Exception as e:  # numpy cannot name F8 dtypes: take the raw bytes from safetensors
        with open(path, "rb") as f:
            raw = safetensors.deserialize(f.read())
        arrays = {}
        for name, v in raw:
            np_dt, _ = DTYPES[v["dtype"]]
            arrays[name] = np.frombuffer(bytes(v["data"]), dtype=np_dt).reshape(v["shape"])
        how = f"safetensors.deserialize + ml_dtypes views (load_file: {type(e).__name__}: {e})"
    out = {}
    for name, arr in arrays.items():
        dt = header[name]["dtype"]
        np_dt, ut = DTYPES[dt]
        if arr.dtype != np_dt:  # same width, reinterpret (e.g. a uint view)
            arr = np.ascontiguousarray(arr).view(np_dt)
        out[name] = (dt, arr)
    return out, metadata, how


def expected_bits(name: str, d: dict) -> np.ndarray:
    dt = d["dtype"]
    np_dt, ut = DTYPES[dt]
    if "bits" in d:
        return np.array([int(b) for b in d["bits"]], dtype=np.uint64).astype(ut)
    vals = d["values"]
    if dt in FLOAT_DTYPES:
        a = np.array([float(v) for v in vals], dtype=np.float64)
        conv = a.astype(np_dt)
        if not np.array_equal(conv.astype(np.float64), a, equal_nan=False):
            raise ValueError(f"{name}: a JSON value is not exactly representable in {dt}")
        return conv.view(ut)
    if dt == "BOOL":
        return np.array([bool(v) for v in vals], dtype=np.bool_).view(np.uint8)
    return np.array([int(v) for v in vals], dtype=np_dt).view(ut)  # OverflowError if out of range


def cmd_check(st_path: str, js_path: str) -> int:
    with open(js_path) as f:
        want = json.load(f)
    want_meta = want.pop("__metadata__", None)
    try:
        got, meta, how = load_with_safetensors(st_path)
    except Exception as e:
        print(f"MISMATCH: {st_path}: safetensors could not load the file: {type(e).__name__}: {e}")
        return 1
    print(f"loaded {st_path} via {how}")
    if set(got) != set(want):
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        print(f"MISMATCH: tensor names differ: missing in file {missing}, not in JSON {extra}")
        return 1
    for name in sorted(want):
        d = want[name]
        dt, arr = got[name]
        if dt != d["dtype"]:
            print(f"MISMATCH: {name}: dtype {dt} in file, {d['dtype']} in JSON")
            return 1
        if list(arr.shape) != list(d["shape"]):
            print(f"MISMATCH: {name}: shape {list(arr.shape)} in file, {d['shape']} in JSON")
            return 1
        _, ut = DTYPES[dt]
        have = np.ascontiguousarray(arr).reshape(-1).view(ut)
        try:
            exp = expected_bits(name, d)
        except (ValueError, OverflowError, TypeError) as e:
            print(f"MISMATCH: {name}: bad JSON entry: {e}")
            return 1
        if exp.shape != have.shape:
            print(f"MISMATCH: {name}: {have.size} elements in file, {exp.size} in JSON")
            return 1
        diff = np.nonzero(have != exp)[0]
        if diff.size:
            i = int(diff[0])
            print(f"MISMATCH: {name}: element {i} (flat) has bits 0x{int(have[i]):X} "
                  f"(value {have.view(arr.dtype)[i]!r}), JSON wants 0x{int(exp[i]):X}")
            return 1
        if "bits" in d and "values" in d and dt in FLOAT_DTYPES:  # values must agree with bits too
            v = np.array([float(x) for x in d["values"]])
            if not np.array_equal(have.view(arr.dtype).astype(np.float64), v):
                print(f"MISMATCH: {name}: JSON values disagree with its bits / the file's values")
                return 1
        print(f"ok  {name:45s} {dt:12s} {str(list(arr.shape)):12s} {arr.size} elements")
    if want_meta is not None:
        for k, v in want_meta.items():
            if meta.get(k) != v:
                print(f"MISMATCH: __metadata__[{k!r}]: file has {meta.get(k)!r}, JSON wants {v!r}")
                return 1
        print(f"ok  __metadata__ ({len(want_meta)} keys)")
    print(f"interop: {len(want)} tensors match")
    return 0


def main(argv) -> int:
    if len(argv) == 3 and argv[1] == "write":
        return cmd_write(argv[2])
    if len(argv) == 4 and argv[1] == "check":
        return cmd_check(argv[2], argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
