"""MoECheck's Python kernel worker: runs one adapter for the Swift side, case after case.

    python -u python/moecheck_worker.py ADAPTER.py

Requests arrive as one JSON object per line on stdin; replies go, one JSON object per line, to a
private copy of the original stdout. fd 1 is pointed at stderr (and fd 0 at /dev/null) before the
adapter is imported, so prints from the adapter or from C libraries never reach the reply channel.
The protocol is written up in docs/python-adapters.md.
"""
from __future__ import annotations

import os
import sys

PROTOCOL = 1

# ---- the channels first, before anything can print -----------------------------------------
_REPLY_FD = os.dup(1)
_REQUEST_FD = os.dup(0)
os.dup2(2, 1)
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
_reply = os.fdopen(_REPLY_FD, "wb", buffering=0)
_requests = os.fdopen(_REQUEST_FD, "rb")

import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402

import moecheck_adapter as helper  # noqa: E402


def reply(obj: dict) -> None:
    _reply.write((json.dumps(obj, allow_nan=False) + "\n").encode())


def tail(exc: BaseException, lines: int = 15) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def describe(exc: BaseException) -> str:
    msg = str(exc)
    if isinstance(exc, KeyError) and exc.args:
        msg = str(exc.args[0])
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def version(dist: str):
    try:
        from importlib.metadata import version as v
        return v(dist)
    except Exception:
        return None


class RunError(Exception):
    """A failed run with the reply's error kind."""

    def __init__(self, kind: str, message: str, tb: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.tb = kind, message, tb


# --------------------------------------------------------------------------------------------
# the adapter
# --------------------------------------------------------------------------------------------


def load_adapter(path: str):
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise RunError("import", f"adapter file {path} does not exist")
    d = os.path.dirname(path)
    if d not in sys.path:
        sys.path.insert(1, d)
    name = "moecheck_user_adapter_" + "".join(c if c.isalnum() else "_" for c in os.path.basename(path)[:-3])
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RunError("import", f"{path} cannot be imported as a Python module (a .py file is needed)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # SystemExit and friends from the adapter's top level too
        raise RunError("import", f"importing {path} failed: {describe(e)}", tail(e)) from None
    missing = []
    if not callable(getattr(module, "forward", None)):
        missing.append("a function forward(layer, x)")
    recipe = getattr(module, "RECIPE", None)
    if recipe is None:
        missing.append("RECIPE (a recipe name such as \"fused-bf16\", or a dict of recipe overrides)")
    elif not isinstance(recipe, (str, dict)):
        raise RunError("contract", f"{path}: RECIPE must be a string or a dict, not {type(recipe).__name__}")
    if missing:
        raise RunError("contract", f"{path} does not define " + " and ".join(missing))
    if hasattr(module, "route") and not callable(module.route):
        raise RunError("contract", f"{path}: route is defined but not a function")
    mutants = list(getattr(module, "MUTANTS", []) or [])
    unknown = [m for m in mutants if m not in helper.MUTANT_NAMES]
    if unknown:
        raise RunError("contract", f"{path}: MUTANTS names unknown mutants {unknown} (known: {sorted(helper.MUTANT_NAMES)})")
    try:
        json.dumps(recipe)
    except (TypeError, ValueError) as e:
        raise RunError("contract", f"{path}: RECIPE is not JSON-serialisable ({e})") from None
    constraints_of(module, path)  # a malformed CONSTRAINTS fails at hello
    return module, path, recipe, mutants


CONSTRAINT_KEYS = {"multiple_of": "H, I and Is (when not 0) are multiples of this int",
                   "fused_shared_expert": "True: a shared expert is always fusable (Is == I) and fused at slot E"}


def constraints_of(module, path: str) -> dict:
    """The adapter's optional CONSTRAINTS: which layers fuzz should draw for it (checked here)."""
    c = getattr(module, "CONSTRAINTS", None)
    if c is None:
        return {}
    if not isinstance(c, dict):
        raise RunError("contract", f"{path}: CONSTRAINTS must be a dict, not {type(c).__name__}")
    unknown = sorted(k for k in c if k not in CONSTRAINT_KEYS)
    if unknown:
        raise RunError("contract", f"{path}: CONSTRAINTS has unknown keys {unknown} (known: "
                                   + "; ".join(f"{k}: {v}" for k, v in CONSTRAINT_KEYS.items()) + ")")
    m = c.get("multiple_of", 1)
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 4096:
        raise RunError("contract", f"{path}: CONSTRAINTS['multiple_of'] must be an int in 1...4096, not {m!r}")
    f = c.get("fused_shared_expert", False)
    if not isinstance(f, bool):
        raise RunError("contract", f"{path}: CONSTRAINTS['fused_shared_expert'] must be True or False, not {f!r}")
    return {"multiple_of": m, "fused_shared_expert": f}


def torch_device_name() -> str:
    torch = sys.modules.get("torch")
    if torch is None:
        return "cpu"
    try:
        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:
        pass
    return "cpu"


def strict_torch() -> None:
    """MOECHECK_TORCH_STRICT=1: torch's CUDA matmuls without reduced-precision reductions and
    TF32 (torch's defaults allow bf16/fp16 split-K reductions in cuBLAS), to tell a recipe
    mismatch caused by those defaults from one in the adapter's own code."""
    try:
        import torch
    except ImportError:
        return
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def synchronize() -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
        except Exception:
            pass


def is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, ROCm), a CUDA/HIP 'out of memory' runtime error, MemoryError."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def release_device_memory(state) -> None:
    """Drops what the adapter built for the current layer (the helper's per-layer cache: fused
    weights, HF blocks on the GPU) and hands torch's cached blocks back to the driver, so a worker
    holds no GPU memory while it waits for the next case. Many shards' workers share one GPU: on
    the H200, 40 workers each keeping their last layer's ~6 GiB ran it out of memory."""
    if state.layer is not None:
        state.layer.cache.clear()
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------
# layers and inputs
# --------------------------------------------------------------------------------------------


class State:
    def __init__(self):
        self.layer_key = None
        self.layer = None
        self.layer_file = None


def load_layer(state: State, spec: dict):
    key = spec.get("key")
    if not isinstance(key, str):
        raise RunError("request", "layer.key must be a string")
    if state.layer_key == key and state.layer is not None:
        return state.layer, 0.0
    t0 = time.perf_counter()
    if state.layer_file is not None:  # drop the previous layer's mapping
        state.layer, state.layer_key = None, None
        state.layer_file.close()
        state.layer_file = None
    path = spec.get("file")
    config = spec.get("config")
    if not isinstance(path, str) or not isinstance(config, dict):
        raise RunError("request", "layer.file (string) and layer.config (object) are required")
    try:
        f = helper.SafetensorsFile(path)
    except (OSError, ValueError) as e:
        raise RunError("load", f"layer file: {describe(e)}") from None
    prefix = spec.get("prefix")
    if prefix is None:
        found = [n for n in f.names() if n.endswith("mlp.gate.weight")]
        if len(found) != 1:
            f.close()
            raise RunError("load", f"{path}: no prefix given and {len(found)} tensors end in 'mlp.gate.weight'")
        prefix = found[0][: -len("gate.weight")]
    try:
        tensors = {n[len(prefix):]: f.tensor(n) for n in f.names() if n.startswith(prefix)}
        layer = helper.Layer(key, config, tensors, f.metadata, path, prefix)
    except (KeyError, ValueError) as e:
        f.close()
        raise RunError("load", f"layer {path} (prefix '{prefix}'): {describe(e)}") from None
    state.layer, state.layer_key, state.layer_file = layer, key, f
    return layer, (time.perf_counter() - t0) * 1e3


def load_x(state: State, spec: dict, layer) -> np.ndarray:
    if not isinstance(spec, dict) or not isinstance(spec.get("file"), str):
        raise RunError("request", "x.file (string) is required")
    name = spec.get("tensor", "hidden_states")
    path = spec["file"]
    try:
        if state.layer_file is not None and os.path.abspath(path) == os.path.abspath(state.layer_file.path):
            x = state.layer_file.tensor(name)
        else:
            f = helper.SafetensorsFile(path)
            x = f.tensor(name)  # the view keeps the mapping alive for this request
    except (OSError, ValueError, KeyError) as e:
        raise RunError("load", f"input: {describe(e)}") from None
    if x.ndim != 2 or x.shape[1] != layer.hidden:
        raise RunError("load", f"{path}: tensor '{name}' has shape {list(x.shape)}, expected [T, {layer.hidden}]")
    return x


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------

_EXACT_TO_F32 = ("bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2")


def as_array(out, what: str, expected_shape) -> tuple[np.ndarray, str]:
    """(float32 or float64 array, source dtype name) of an adapter's output; RunError otherwise."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(out, torch.Tensor):
        src = str(out.dtype)
        if list(out.shape) != list(expected_shape):
            raise RunError("shape", f"{what}: expected shape {list(expected_shape)}, got {list(out.shape)}")
        if not out.is_floating_point():
            raise RunError("dtype", f"{what}: expected a floating-point tensor, got {src}")
        t = out.detach()
        if t.dtype == torch.float64:
            return t.cpu().numpy(), src
        if t.dtype != torch.float32:
            t = t.float()
        return t.cpu().numpy(), src
    try:
        a = np.asarray(out)
    except Exception as e:
        raise RunError("dtype", f"{what}: a {type(out).__name__} is not an array ({describe(e)})") from None
    src = a.dtype.name
    if a.dtype.kind not in "fiubcV" or a.dtype == object:
        raise RunError("dtype", f"{what}: expected a floating-point array, got {type(out).__name__} of dtype {src}")
    if list(a.shape) != list(expected_shape):
        raise RunError("shape", f"{what}: expected shape {list(expected_shape)}, got {list(a.shape)}")
    if a.dtype == np.float64:
        return a, src
    if src in _EXACT_TO_F32:
        return a.astype(np.float32), src
    raise RunError("dtype", f"{what}: expected a floating-point array (bf16, fp16, fp32 or fp64), got {src}")


def write_raw(path: str, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    with open(path, "wb") as f:
        f.write(memoryview(a).cast("B"))


# --------------------------------------------------------------------------------------------
# the run request
# --------------------------------------------------------------------------------------------


def run(state: State, adapter, mutants, req: dict) -> dict:
    rid = req.get("id")
    t_start = time.perf_counter()
    layer, load_ms = load_layer(state, req.get("layer") or {})
    x = load_x(state, req.get("x"), layer)
    T, H = x.shape
    out_dir = req.get("out_dir")
    if not isinstance(out_dir, str):
        raise RunError("request", "out_dir (string) is required")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise RunError("io", f"out_dir {out_dir}: {describe(e)}") from None
    repeats = req.get("repeats", 1)
    if not isinstance(repeats, int) or repeats < 1:
        raise RunError("request", f"repeats must be a positive integer, got {repeats!r}")
    m = req.get("mutant")
    if m is not None and m not in mutants:
        raise RunError("mutant", f"adapter does not support mutant {m!r} (its MUTANTS: {mutants})")
    setup_ms = (time.perf_counter() - t_start) * 1e3
    convert_ms = write_ms = 0.0
    base = os.path.join(out_dir, str(rid))
    route_info, route_ms = None, None
    helper.MUTANT = m
    helper._take_applied()
    applied = False
    try:
        if req.get("route") and callable(getattr(adapter, "route", None)):
            synchronize()
            t0 = time.perf_counter()
            try:
                r = adapter.route(layer, x)
                synchronize()
            except helper.Unsupported as e:
                raise RunError("unsupported", f"route(): {e}") from None
            except Exception as e:
                if is_out_of_memory(e):
                    raise RunError("memory", f"route(): {describe(e)}", tail(e)) from None
                raise RunError("exception", f"route(): {describe(e)}", tail(e)) from None
            route_ms = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            ids, weights, S = check_route(r, T, layer)
            convert_ms += (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            write_raw(base + ".ids", ids)
            write_raw(base + ".weights", weights)
            write_ms += (time.perf_counter() - t0) * 1e3
            route_info = {"ids": base + ".ids", "weights": base + ".weights", "slots": S}
        outputs, forward_ms = [], []
        for r in range(repeats):
            synchronize()
            t0 = time.perf_counter()
            try:
                y = adapter.forward(layer, x)
                synchronize()
            except helper.Unsupported as e:
                raise RunError("unsupported", str(e)) from None
            except Exception as e:
                if is_out_of_memory(e):
                    raise RunError("memory", describe(e), tail(e)) from None
                raise RunError("exception", describe(e), tail(e)) from None
            forward_ms.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            a, src = as_array(y, f"forward() output (run {r + 1})", (T, H))
            del y
            convert_ms += (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            path = f"{base}.out{r}"
            write_raw(path, a)
            write_ms += (time.perf_counter() - t0) * 1e3
            outputs.append({"file": path, "dtype": a.dtype.name, "source_dtype": src})
        applied = helper._take_applied()
    except OSError as e:
        raise RunError("io", f"writing to {out_dir}: {describe(e)}") from None
    finally:
        helper.MUTANT = None
    return {"ok": True, "op": "run", "id": rid, "shape": [T, H], "outputs": outputs, "route": route_info,
            "forward_ms": forward_ms, "route_ms": route_ms, "mutant": m, "mutant_applied": applied if m else None,
            "device": torch_device_name(),
            "worker_ms": {"load": round(load_ms, 3), "setup": round(setup_ms, 3), "convert": round(convert_ms, 3),
                          "write": round(write_ms, 3)}}


def run_retrying(state: State, adapter, mutants, req: dict) -> dict:
    """`run`, then the GPU memory released. Out of memory (other processes on the GPU), the run is
    retried after a pause while the waits fit MOECHECK_WORKER_OOM_WAIT seconds (default 60; under
    the case timeout), then reported as error kind `memory`: the case is not judged, not failed."""
    budget = float(os.environ.get("MOECHECK_WORKER_OOM_WAIT", "60"))
    waited, pause, tries = 0.0, 2.0, 1
    while True:
        try:
            return run(state, adapter, mutants, req)
        except RunError as e:
            if e.kind != "memory":
                raise
            if waited + pause > budget:
                e.message = f"{e.message} (out of GPU memory in {tries} attempt(s) over {waited:.0f} s)"
                raise
        finally:
            release_device_memory(state)  # after every attempt, before a pause
        time.sleep(pause)
        waited, pause, tries = waited + pause, pause * 2, tries + 1


def check_route(r, T: int, layer):
    if not isinstance(r, (tuple, list)) or len(r) != 2:
        raise RunError("route", f"route() must return (topk_ids [T,S], topk_weights [T,S]), got {type(r).__name__}")
    arrays = []
    for what, v in zip(("topk_ids", "topk_weights"), r):
        if hasattr(v, "detach"):
            v = helper.to_numpy(v)
        try:
            arrays.append(np.asarray(v))
        except Exception as e:
            raise RunError("route", f"route() {what}: not an array ({describe(e)})") from None
    ids, w = arrays
    K = layer.top_k
    if ids.ndim != 2 or ids.shape[0] != T or ids.shape[1] not in (K, K + 1):
        raise RunError("route", f"route() topk_ids: expected shape [{T}, {K}] or [{T}, {K + 1}], got {list(ids.shape)}")
    if w.shape != ids.shape:
        raise RunError("route", f"route() topk_weights: shape {list(w.shape)} differs from topk_ids {list(ids.shape)}")
    if ids.dtype.kind not in "iu":
        raise RunError("route", f"route() topk_ids: expected an integer array, got {ids.dtype}")
    if w.dtype.kind != "f" and w.dtype.name not in _EXACT_TO_F32:
        raise RunError("route", f"route() topk_weights: expected a floating-point array, got {w.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > layer.experts):
        raise RunError("route", f"route() topk_ids: ids must lie in [0, {layer.experts}], got "
                                f"[{int(ids.min())}, {int(ids.max())}]")
    return ids.astype("<i4"), w.astype("<f8"), int(ids.shape[1])


# --------------------------------------------------------------------------------------------
# main loop
# --------------------------------------------------------------------------------------------


def main(argv) -> int:
    if len(argv) != 2:
        reply({"ok": False, "op": "hello", "error": "usage",
               "message": "usage: moecheck_worker.py ADAPTER.py", "traceback": ""})
        return 2
    try:
        adapter, path, recipe, mutants = load_adapter(argv[1])
        if os.environ.get("MOECHECK_TORCH_STRICT") == "1":
            strict_torch()
    except RunError as e:
        reply({"ok": False, "op": "hello", "error": e.kind, "message": e.message, "traceback": e.tb or ""})
        return 1
    name = getattr(adapter, "NAME", None) or os.path.splitext(os.path.basename(path))[0]
    reply({"ok": True, "op": "hello", "protocol": PROTOCOL, "name": str(name), "adapter": path, "recipe": recipe,
           "has_route": callable(getattr(adapter, "route", None)), "mutants": mutants,
           "formats": [str(f) for f in getattr(adapter, "FORMATS", None) or []] or None,
           "constraints": constraints_of(adapter, path),
           "python": platform.python_version(),
           "versions": {"numpy": np.__version__, "torch": version("torch"), "transformers": version("transformers"),
                        "triton": version("triton")},
           "device": torch_device_name()})
    state = State()
    while True:
        line = _requests.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            reply({"ok": False, "op": None, "error": "request", "message": f"bad request line: {e}"})
            continue
        op = req.get("op")
        if op == "quit":
            reply({"ok": True, "op": "quit"})
            return 0
        if op != "run":
            reply({"ok": False, "op": op, "id": req.get("id"), "error": "request",
                   "message": f"unknown op {op!r} (run, quit)"})
            continue
        try:
            rep = run_retrying(state, adapter, mutants, req)
        except RunError as e:
            rep = {"ok": False, "op": "run", "id": req.get("id"), "error": e.kind, "message": e.message}
            if e.tb:
                rep["traceback"] = e.tb
        except Exception as e:  # a bug of the worker itself: say so, keep serving
            rep = {"ok": False, "op": "run", "id": req.get("id"), "error": "worker", "message": describe(e),
                   "traceback": tail(e)}
        try:
            reply(rep)
        except ValueError:  # NaN in a timing or similar: never send invalid JSON
            reply({"ok": False, "op": "run", "id": req.get("id"), "error": "worker",
                   "message": "reply not JSON-serialisable"})


if __name__ == "__main__":
    try:
        code = main(sys.argv)
    except BrokenPipeError:
        code = 0
    sys.stdout.flush()
    os._exit(code)
