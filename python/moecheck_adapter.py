"""MoECheck's helper for Python kernel adapters.

An adapter is a Python file with ``RECIPE`` and ``forward(layer, x)`` (optionally ``route``,
``NAME``, ``MUTANTS``); ``moecheck_worker.py`` loads it and hands it a :class:`Layer` and the
hidden states. This module gives adapter authors the pieces that every adapter needs:

- reading safetensors files zero-copy (``SafetensorsFile``; the worker uses it too);
- the layer's shape and weights in one place (:class:`Layer`: family, H, I, Is, E, K,
  renormalisation, fusable or not, fp8 format; each expert's gate/up/down whatever the
  checkpoint layout; fp8 block dequantisation);
- the fused form: ``w13 [E+1, 2I, H]`` / ``w2 [E+1, H, I]`` with the shared expert at slot E
  (bf16 or dequantised, or fp8 codes with per-half block scales as sglang/aiter/vLLM take them);
- routing (softmax top-k, renormalisation, the shared slot appended) and the expert stage as
  plain NumPy (float64 between rounding points) and plain torch compositions;
- HF transformers' own sparse-MoE block for a layer, with the weights loaded;
- conversion between NumPy (ml_dtypes) arrays and torch tensors.

Helper-level mutants: the worker sets ``MUTANT`` to one of ``MUTANT_NAMES`` around a run; the
building blocks here then compute a known bug (see docs/python-adapters.md). A block that
changed its result because of the mutant calls ``mutant_applied()`` so the worker can report
whether the mutant had any effect on this case.

torch and transformers are imported lazily: the NumPy parts work without them.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from dataclasses import dataclass

import ml_dtypes
import numpy as np

__all__ = [
    "Unsupported", "MUTANT", "MUTANT_NAMES", "BLOCK_M", "Layer", "SafetensorsFile", "Routing",
    "route", "select_experts", "moe_numpy", "round_bf16", "device", "to_torch", "to_numpy",
    "fused_weights_torch", "fused_fp8_weights", "moe_torch", "hf_block", "hf_forward", "hf_route",
]

# --------------------------------------------------------------------------------------------
# what a kernel cannot run
# --------------------------------------------------------------------------------------------


class Unsupported(ValueError):
    """Raised by an adapter (from ``forward``/``route`` or while building its weights) for a layer
    its kernel cannot run at all — a shape, layout or format outside the kernel's contract (e.g.
    fused shared expert only, I a multiple of 128). MoECheck reports the case as skipped with the
    message, not as a failure; any other exception is a failure of the kernel on that case."""


# --------------------------------------------------------------------------------------------
# mutants
# --------------------------------------------------------------------------------------------

#: The mutant in force for the current run request (set and reset by the worker), or None.
MUTANT: str | None = None

#: Every helper-level mutant, with the bug it computes.
MUTANT_NAMES = {
    "shared_slot_weight_zero": "the shared slot's routing weight is 0 (shared expert dropped)",
    "shared_gate_no_sigmoid": "the shared gate is the raw logit ws·x, no sigmoid",
    "shared_gate_in_renorm": "renormalisation runs over K+1 weights including the shared gate",
    "no_renormalize": "top-k weights not renormalised although the config says so",
    "shared_slot_id_e_minus_1": "the shared slot is given expert id E-1 instead of E",
    "expert_down_x1p01": "one routed expert's down projection x1.01 (the first token's top expert)",
    "drop_last_partial_block": "the routed expert with most tokens drops its last block of BLOCK_M rows",
    "fnuz_as_fn": "e4m3fnuz weight bytes decoded as e4m3fn (fnuz layers only)",
}

#: Token rows per block of the ``drop_last_partial_block`` mutant (a kernel's BLOCK_M).
BLOCK_M = 16

_applied = False


def mutant(name: str) -> bool:
    """Whether the mutant `name` is in force (does not mark it applied)."""
    return MUTANT == name


def mutant_applied() -> None:
    """Records that the mutant in force changed this run's result."""
    global _applied
    _applied = True


def _take_applied() -> bool:
    global _applied
    a, _applied = _applied, False
    return a


# --------------------------------------------------------------------------------------------
# safetensors, zero-copy
# --------------------------------------------------------------------------------------------

#: safetensors dtype names -> NumPy dtypes (BF16 and FP8 through ml_dtypes).
DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16), "I32": np.dtype(np.int32), "I64": np.dtype(np.int64), "BOOL": np.dtype(np.bool_),
}


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """A safetensors file memory-mapped read-only; ``tensor(name)`` is a zero-copy NumPy view.

    Layout: 8-byte little-endian header length n, n bytes of JSON header
    (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
    then the data; offsets are relative to the end of the header.
    """

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise SafetensorsError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{path}: header is not a JSON object")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self.entries: dict = header
        self._data = 8 + n
        self._size = size

    def names(self):
        return self.entries.keys()

    def __contains__(self, name):
        return name in self.entries

    def tensor(self, name: str) -> np.ndarray:
        e = self.entries.get(name)
        if e is None:
            raise KeyError(f"{self.path}: no tensor '{name}'")
        dt = DTYPES.get(e.get("dtype"))
        if dt is None:
            raise SafetensorsError(f"{self.path}: tensor '{name}' has unsupported dtype {e.get('dtype')!r}")
        shape = tuple(int(s) for s in e["shape"])
        begin, end = (int(v) for v in e["data_offsets"])
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dt.itemsize or self._data + end > self._size or begin < 0:
            raise SafetensorsError(f"{self.path}: tensor '{name}' {e['dtype']}{list(shape)} needs {count * dt.itemsize} "
                                   f"bytes, data_offsets {[begin, end]} (file {self._size} bytes)")
        if count == 0:
            return np.zeros(shape, dt)
        return np.frombuffer(self._mm, dtype=dt, count=count, offset=self._data + begin).reshape(shape)

    def close(self):
        """Drops the mapping (the OS unmaps it once no array views it any more)."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # arrays still view it; unmapped when they are collected


# --------------------------------------------------------------------------------------------
# rounding (NumPy, exact)
# --------------------------------------------------------------------------------------------


def round_bf16(a) -> np.ndarray:
    """Values rounded to bfloat16 (nearest even), returned as float64; exact for float64 input
    (no double rounding through float32). NaN stays NaN; overflow gives inf."""
    a = np.asarray(a, dtype=np.float64)
    m, e = np.frexp(a)
    q = np.ldexp(np.round(np.ldexp(m, 8)), e - 8)  # 8 significant bits, ties to even
    sub = np.abs(a) < 2.0 ** -126
    if sub.any():
        q = np.where(sub, np.round(a * 2.0 ** 133) * 2.0 ** -133, q)
    return np.where(np.abs(q) > 3.3895313892515355e38, np.copysign(np.inf, a), q)


def round_f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


def _round(a, how: str):
    if how == "none":
        return np.asarray(a, dtype=np.float64)
    if how == "bf16":
        return round_bf16(a)
    if how == "fp32":
        return round_f32(a)
    raise ValueError(f"unknown rounding {how!r} (none, fp32, bf16)")


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _silu(v):
    return v / (1.0 + np.exp(-v))


# --------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------

FP8_MAX = {"e4m3fn": 448.0, "e4m3fnuz": 240.0}


class Layer:
    """One MoE layer as the worker hands it to ``forward(layer, x)``.

    ``config`` is the HF config dict, ``tensors`` maps checkpoint names without the layer
    prefix to NumPy arrays (views of the mapped file: read-only), ``metadata`` is the file's
    ``__metadata__``, ``key`` the worker's layer key (same key = same layer). ``cache`` is a dict
    that lives as long as the layer: keep per-layer work (converted weights, modules) there.
    """

    def __init__(self, key: str, config: dict, tensors: dict, metadata: dict | None = None, file: str | None = None,
                 prefix: str = ""):
        self.key = key
        if isinstance(config.get("text_config"), dict):
            config = {**config, **config["text_config"]}
        self.config = config
        self.tensors = tensors
        self.metadata = metadata or {}
        self.file = file
        self.prefix = prefix
        self.cache: dict = {}
        c = config

        def need(k):
            if k not in c:
                raise KeyError(f"layer config has no '{k}' ({file or key})")
            return int(c[k])

        self.family = c.get("model_type", "qwen3_5_moe")
        if self.family not in ("qwen2_moe", "qwen3_next", "qwen3_5_moe"):
            raise ValueError(f"unsupported model_type {self.family!r} (qwen2_moe, qwen3_next, qwen3_5_moe)")
        self.hidden = need("hidden_size")
        self.intermediate = need("moe_intermediate_size")
        self.experts = need("num_experts")
        self.top_k = need("num_experts_per_tok")
        self.has_shared = "shared_expert.gate_proj.weight" in tensors
        self.shared_intermediate = (int(tensors["shared_expert.gate_proj.weight"].shape[0]) if self.has_shared else 0)
        if self.family == "qwen3_5_moe":
            self.renormalize = True
        else:
            self.renormalize = bool(c.get("norm_topk_prob", self.family == "qwen3_next"))
        self.fusable = self.has_shared and self.shared_intermediate == self.intermediate
        self.combined = "experts.gate_up_proj" in tensors
        w = tensors["experts.gate_up_proj"] if self.combined else self.tensor("experts.0.gate_proj.weight")
        self.weight_dtype = w.dtype
        self.fp8 = {np.dtype(ml_dtypes.float8_e4m3fn): "e4m3fn",
                    np.dtype(ml_dtypes.float8_e4m3fnuz): "e4m3fnuz"}.get(w.dtype)

    def __repr__(self):
        return (f"Layer({self.family} H={self.hidden} I={self.intermediate} Is={self.shared_intermediate} "
                f"E={self.experts} K={self.top_k} renorm={self.renormalize} fusable={self.fusable} "
                f"weights={self.weight_dtype} {'combined' if self.combined else 'per-expert'})")

    def tensor(self, name: str) -> np.ndarray:
        """The tensor `name` (without prefix); a KeyError naming the file and full name if absent."""
        t = self.tensors.get(name)
        if t is None:
            raise KeyError(f"{self.file or self.key}: no tensor '{self.prefix}{name}'")
        return t

    def cached(self, key, build):
        """``cache[key]``, built with ``build()`` on first use."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    @property
    def gate_up_per_half(self) -> bool:
        """Whether combined fp8 gate_up scales block gate and up separately (2·ceil(I/128) rows,
        sglang's layout) rather than all 2I rows together (ceil(2I/128)); where the shapes agree,
        ``__metadata__["gate_up_scale_blocking"]`` decides and "combined" is assumed without it."""
        s = self.tensors.get("experts.gate_up_proj_scale_inv")
        if s is None:
            return False
        b = self.metadata.get("gate_up_scale_blocking")
        return b == "per-half" or (b is None and s.shape[1] != -(-2 * self.intermediate // 128))

    # ---- weights as stored ------------------------------------------------------------------

    def fp8_codes(self, w: np.ndarray) -> np.ndarray:
        """fp8 weights as the kernel reads them; under the ``fnuz_as_fn`` mutant e4m3fnuz bytes
        are reinterpreted as e4m3fn."""
        if w.dtype == np.dtype(ml_dtypes.float8_e4m3fnuz) and mutant("fnuz_as_fn"):
            mutant_applied()
            return w.view(ml_dtypes.float8_e4m3fn)
        return w

    def dequantize(self, w: np.ndarray, scale: np.ndarray | None, row0: int = 0) -> np.ndarray:
        """float64 values of a weight [N, K]: exact (fp8 code x block scale, ``weight_scale_inv``
        is a multiplier). `row0` is the first row's index inside the scale's 128-row blocking."""
        v = self.fp8_codes(w).astype(np.float64)
        if scale is None:
            return v
        n, k = w.shape
        rows = (np.arange(n) + row0) // 128
        cols = np.arange(k) // 128
        return v * scale.astype(np.float64)[rows][:, cols]

    def stored(self, e: int) -> tuple:
        """Routed expert `e` (or the shared expert for ``e == E``) as stored: ((gate [I,H], scale,
        row0), (up, scale, row0), (down [H,I], scale, row0)); scales are None for non-fp8 layers,
        row0 is the first row's index inside the scale's 128-row blocking (combined gate_up
        blocked over all 2I rows: I for up)."""
        t = self.tensors
        if e == self.experts or not self.combined:
            b = "shared_expert." if e == self.experts else f"experts.{e}."
            return tuple((self.tensor(b + p + ".weight"), t.get(b + p + ".weight_scale_inv"), 0)
                         for p in ("gate_proj", "up_proj", "down_proj"))
        I = self.intermediate
        gu = self.tensor("experts.gate_up_proj")[e]
        gs = t.get("experts.gate_up_proj_scale_inv")
        ds = t.get("experts.down_proj_scale_inv")
        if gs is None:
            g, u = (gu[:I], None, 0), (gu[I:], None, 0)
        elif self.gate_up_per_half:
            si = -(-I // 128)
            g, u = (gu[:I], gs[e][:si], 0), (gu[I:], gs[e][si:], 0)
        else:
            g, u = (gu[:I], gs[e], 0), (gu[I:], gs[e], I)
        return g, u, (self.tensor("experts.down_proj")[e], None if ds is None else ds[e], 0)

    def expert(self, e: int, cache: bool = True) -> tuple:
        """float64 (gate [I,H], up [I,H], down [H,I]) of routed expert `e`, or of the shared
        expert for ``e == E``; exact dequantisation for fp8. Cached per layer (and mutant)
        unless `cache` is False."""
        fnuz = mutant("fnuz_as_fn") and self.fp8 == "e4m3fnuz"
        key = ("expert64", e, fnuz)
        if key in self.cache:
            r = self.cache[key]
        else:
            r = tuple(self.dequantize(w, s, row0) for w, s, row0 in self.stored(e))
            if cache:
                self.cache[key] = r
        if fnuz:
            mutant_applied()
        return r


# --------------------------------------------------------------------------------------------
# routing (NumPy; small [T, E] arrays, so torch adapters use it too)
# --------------------------------------------------------------------------------------------


@dataclass
class Routing:
    """Routing of T tokens: ``ids [T,S]`` int32 and ``weights [T,S]`` float64 values (rounded as
    the recipe says). S = K+1 when the shared expert rides at slot E (``fused``), else K and the
    shared expert, if any, is added unfused with ``shared_gate [T]``."""
    ids: np.ndarray
    weights: np.ndarray
    fused: bool
    shared_gate: np.ndarray | None
    logits: np.ndarray

    @property
    def slots(self) -> int:
        return self.ids.shape[1]


def select_experts(layer: Layer, logits, gate_logit=None, *, probabilities: str = "fp32", weights: str = "fp32",
                   gate: str = "bf16", fuse: bool = True) -> Routing:
    """Top-K routing from router logits [T,E] (already rounded as the kernel rounds them) and the
    shared gate's pre-activation ``ws·x`` [T] or [T,1] (already rounded), with the mutants.

    softmax over all E in `probabilities` precision ("fp32" or "none" = float64), top-K by
    probability with ties to the lower expert index, renormalised over the K when the layer
    says so, weights rounded to `weights` ("fp32", "bf16", "none"). Shared gate
    ``g = round_gate(sigmoid(ws·x))``; with `fuse` and a fusable layer it is appended as slot
    id E (never part of the renormalisation).
    """
    T = logits.shape[0]
    E, K = layer.experts, layer.top_k
    logits = np.asarray(logits, dtype=np.float64)
    if probabilities == "fp32":
        l32 = logits.astype(np.float32)
        ex = np.exp(l32 - l32.max(axis=1, keepdims=True))
        p = (ex / ex.sum(axis=1, keepdims=True, dtype=np.float32)).astype(np.float64)
    else:
        ex = np.exp(logits - logits.max(axis=1, keepdims=True))
        p = ex / ex.sum(axis=1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :K].astype(np.int32)
    w = np.take_along_axis(p, ids, axis=1)
    renorm = layer.renormalize
    if renorm and mutant("no_renormalize"):
        renorm = False
        mutant_applied()

    g = None
    if layer.has_shared:
        gl = np.asarray(gate_logit, dtype=np.float64).reshape(T)
        if mutant("shared_gate_no_sigmoid"):
            g = _round(gl, gate)
            mutant_applied()
        else:
            g = _round(_sigmoid(gl), gate)
    fused = fuse and layer.fusable

    def renormalised(v, total):
        s = total.astype(np.float32) if probabilities == "fp32" else total
        return v / s

    if renorm:
        total = w.sum(axis=1, keepdims=True)
        if fused and mutant("shared_gate_in_renorm"):
            total = total + g[:, None]
            g = renormalised(g[:, None], total)[:, 0]
            mutant_applied()
        w = renormalised(w, total)
        if probabilities == "fp32":
            w = round_f32(w)
    w = _round(w, weights)
    if g is not None and mutant("shared_slot_weight_zero"):
        g = np.zeros_like(g)
        mutant_applied()
    if fused:
        sid = E
        if mutant("shared_slot_id_e_minus_1"):
            sid = E - 1
            mutant_applied()
        ids = np.concatenate([ids, np.full((T, 1), sid, np.int32)], axis=1)
        w = np.concatenate([w, g[:, None]], axis=1)
        return Routing(ids, w, True, None, logits)
    return Routing(ids, w, False, g, logits)


def route(layer: Layer, x, *, logits: str = "bf16", probabilities: str = "fp32", weights: str = "fp32",
          gate: str = "bf16", fuse: bool = True) -> Routing:
    """Routing computed in NumPy from hidden states `x` [T,H]: router logits ``x·Wg`` and the
    shared gate logit ``ws·x`` in float64, rounded to `logits` ("bf16", "fp32", "none"), then
    ``select_experts``. ``route(layer, x)`` is the fused-bf16 recipe's routing."""
    x64 = np.asarray(x, dtype=np.float64)
    lg = _round(x64 @ layer.tensor("gate.weight").astype(np.float64).T, logits)
    gl = None
    if layer.has_shared:
        gl = _round(x64 @ layer.tensor("shared_expert_gate.weight").astype(np.float64).reshape(-1), logits)
    return select_experts(layer, lg, gl, probabilities=probabilities, weights=weights, gate=gate, fuse=fuse)


def _mutant_plan(layer: Layer, ids: np.ndarray):
    """The expert stage's mutants as data: (expert whose down projection is x1.01 or None,
    {expert: boolean [T,S] mask of (token, slot) pairs dropped})."""
    down, drop = None, {}
    if mutant("expert_down_x1p01") and ids.size:
        down = int(ids[0, 0])
        mutant_applied()
    if mutant("drop_last_partial_block") and ids.size:
        routed = np.where(ids < layer.experts, ids, -1)
        counts = np.bincount(routed[routed >= 0].ravel(), minlength=layer.experts)
        e = int(np.argmax(counts))  # ties: lower index
        n = int(counts[e])
        if n:
            k = n % BLOCK_M or BLOCK_M
            pos = np.argwhere(ids == e)  # (token, slot) in token order, as a sorted kernel keeps them
            mask = np.zeros(ids.shape, bool)
            for t, s in pos[n - k:]:
                mask[t, s] = True
            drop[e] = mask
            mutant_applied()
    return down, drop


# --------------------------------------------------------------------------------------------
# the expert stage in NumPy (float64 between the rounding points)
# --------------------------------------------------------------------------------------------


def moe_numpy(layer: Layer, x, routing: Routing, *, intermediate: str = "bf16", output: str = "bf16"):
    """The layer output [T,H] from `routing`: for every (token, slot), ``y = W2 · r(silu(W_g x) ⊙
    (W_u x))`` with r = `intermediate` rounding ("bf16", "fp32", "none"), summed with the routing
    weights in float64; slot id E is the shared expert; an unfused shared expert is added with
    ``routing.shared_gate``. Returns bfloat16 (`output` "bf16") or float64 ("none")."""
    x64 = np.asarray(x, dtype=np.float64)
    T, H = x64.shape
    out = np.zeros((T, H))
    ids, w = routing.ids, routing.weights
    down_x, drops = _mutant_plan(layer, ids[:, :layer.top_k] if not routing.fused else ids)

    def mlp(e, rows):
        g, u, d = layer.expert(e)
        xe = x64[rows]
        a = _round(_silu(xe @ g.T) * (xe @ u.T), intermediate)
        y = a @ d.T
        return y * 1.01 if e == down_x and e < layer.experts else y

    for e in np.unique(ids):
        mask = ids == e
        if e in drops:
            mask = mask & ~drops[e]
        t, s = np.nonzero(mask)
        if t.size == 0:
            continue
        np.add.at(out, t, w[t, s][:, None] * mlp(int(e), t))
    if routing.shared_gate is not None:
        out += routing.shared_gate[:, None] * mlp(layer.experts, np.arange(T))
    if output == "bf16":
        return round_bf16(out).astype(ml_dtypes.bfloat16)
    return _round(out, output)


# --------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------

_TORCH_FP8 = {"e4m3fn": "float8_e4m3fn", "e4m3fnuz": "float8_e4m3fnuz"}


def _torch():
    import torch
    return torch


def device():
    """``torch.device("cuda")`` when a CUDA (or ROCm) device is there, else CPU."""
    torch = _torch()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_torch(a, device=None, dtype=None, exact: bool = True):
    """A NumPy array (ml_dtypes bf16/fp8 included) as a torch tensor on `device` (default
    ``device()``), converted to `dtype` if given. Always a copy (the worker's arrays are views
    of a read-only mapping). With `exact`, converting to a narrower float dtype that changes a
    value raises ValueError instead of silently rounding the case's weights."""
    torch = _torch()
    dev = device if device is not None else globals()["device"]()
    a = np.asarray(a)
    src = a.dtype
    # the upload is the copy; on the CPU a copy, never a view of the read-only mapping
    t = host_view(a).to(dev) if torch.device(dev).type != "cpu" else host_view(a).clone()
    if dtype is not None and t.dtype != dtype:
        c = t.to(dtype)
        if exact and c.is_floating_point() and t.is_floating_point():
            back = c.to(torch.float64)
            orig = t.to(torch.float64)
            same = (back == orig) | (torch.isnan(back) & torch.isnan(orig))
            if not bool(same.all()):
                raise ValueError(f"converting {src} values to {dtype} would round them (this adapter needs the "
                                 f"case's values exactly representable in {dtype})")
        t = c
    return t


def host_view(a):
    """A CPU torch tensor over the NumPy array `a`'s memory, no copy (ml_dtypes bf16/fp8 as torch's
    bf16/fp8): for copying a case file's mapped weights straight into a device tensor
    (``dst.copy_(host_view(a))``). Never write through it: the worker's arrays are views of a
    read-only mapping (torch warns about that; the warning is silenced here)."""
    import warnings
    torch = _torch()
    a = np.asarray(a)
    views = {np.dtype(ml_dtypes.bfloat16): (np.int16, torch.bfloat16),
             np.dtype(ml_dtypes.float8_e4m3fn): (np.uint8, torch.float8_e4m3fn),
             np.dtype(ml_dtypes.float8_e4m3fnuz): (np.uint8, torch.float8_e4m3fnuz)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if a.dtype in views:
            raw, tdt = views[a.dtype]
            return torch.from_numpy(a.view(raw)).view(tdt)
        return torch.from_numpy(a)


def to_numpy(t) -> np.ndarray:
    """A torch tensor (any device) or array as NumPy; bf16/fp16 become float32 (exact)."""
    if hasattr(t, "detach"):
        torch = _torch()
        t = t.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.cpu().numpy()
    return np.asarray(t)


def fused_weights_torch(layer: Layer, device=None, dtype=None):
    """``(w13 [E', 2I, H], w2 [E', H, I])`` on `device` with E' = E+1 (shared expert at slot E)
    when the layer is fusable, else E. Weights are the exact (dequantised) values converted to
    `dtype` (default bfloat16; a ValueError if that would round them). Cached per layer."""
    torch = _torch()
    dev = device if device is not None else globals()["device"]()
    dtype = dtype or torch.bfloat16
    fnuz = mutant("fnuz_as_fn") and layer.fp8 == "e4m3fnuz"

    def build():
        torch = _torch()
        n = layer.experts + (1 if layer.fusable else 0)
        I, H = layer.intermediate, layer.hidden
        if layer.fp8 is None and layer.weight_dtype == np.dtype(ml_dtypes.bfloat16) and dtype == torch.bfloat16:
            # bf16 as stored: copied from the case file's mapping straight into the device tensor
            # (no host copies; 2026-12-02: two NumPy copies before the upload held it to ~1 GB/s)
            w13 = torch.empty((n, 2 * I, H), dtype=dtype, device=dev)
            w2 = torch.empty((n, H, I), dtype=dtype, device=dev)
            if layer.combined:
                w13[:layer.experts].copy_(host_view(layer.tensor("experts.gate_up_proj")))
                w2[:layer.experts].copy_(host_view(layer.tensor("experts.down_proj")))
            for e in range(0 if not layer.combined else layer.experts, n):
                (g, _, _), (u, _, _), (d, _, _) = layer.stored(e)
                w13[e, :I].copy_(host_view(g))
                w13[e, I:].copy_(host_view(u))
                w2[e].copy_(host_view(d))
            return w13, w2
        if layer.fp8 is None:  # as stored, one conversion of the whole tensor
            w13 = np.empty((n, 2 * I, H), layer.weight_dtype)
            w2 = np.empty((n, H, I), layer.weight_dtype)
            if layer.combined:
                w13[:layer.experts] = layer.tensor("experts.gate_up_proj")
                w2[:layer.experts] = layer.tensor("experts.down_proj")
            for e in range(0 if not layer.combined else layer.experts, n):
                (g, _, _), (u, _, _), (d, _, _) = layer.stored(e)
                w13[e, :I], w13[e, I:], w2[e] = g, u, d
            return to_torch(w13, dev, dtype), to_torch(w2, dev, dtype)
        w13 = torch.empty((n, 2 * I, H), dtype=dtype, device=dev)
        w2 = torch.empty((n, H, I), dtype=dtype, device=dev)
        for e in range(n):  # fp8: exact float64 dequantisation one expert at a time
            g, u, d = layer.expert(e, cache=False)
            w13[e] = to_torch(np.concatenate([g, u]), dev, dtype)
            w2[e] = to_torch(d, dev, dtype)
        return w13, w2

    r = layer.cached(("fused_torch", str(dev), str(dtype), fnuz), build)
    if fnuz:
        mutant_applied()
    return r


def fused_fp8_weights(layer: Layer, device=None):
    """fp8 fused weights as block-scale kernels take them (sglang/vLLM/aiter layout): codes
    ``w13 [E', 2I, H]``, ``w2 [E', H, I]`` (torch fp8 dtype of the layer, or e4m3fn under the
    ``fnuz_as_fn`` mutant) and float32 ``w13_scale [E', 2·ceil(I/128), ceil(H/128)]`` (gate and
    up blocked separately), ``w2_scale [E', ceil(H/128), ceil(I/128)]``; E' = E+1 with the shared
    expert at slot E when fusable. Raises ValueError for non-fp8 layers and for combined-blocked
    gate_up scales that per-half blocks cannot represent. Cached per layer."""
    if layer.fp8 is None:
        raise Unsupported(f"layer weights are {layer.weight_dtype}, not fp8: use a bf16 adapter")
    torch = _torch()
    dev = device if device is not None else globals()["device"]()
    fnuz = mutant("fnuz_as_fn") and layer.fp8 == "e4m3fnuz"

    def build():
        E, I, H = layer.experts, layer.intermediate, layer.hidden
        si, sh = -(-I // 128), -(-H // 128)
        n = E + (1 if layer.fusable else 0)
        # codes copied from the case file's mapping straight into the device tensors (no host copy)
        w13 = torch.empty((n, 2 * I, H), dtype=torch.uint8, device=dev)
        w2 = torch.empty((n, H, I), dtype=torch.uint8, device=dev)
        if layer.combined:
            w13[:E].copy_(host_view(layer.tensor("experts.gate_up_proj").view(np.uint8)))
            w2[:E].copy_(host_view(layer.tensor("experts.down_proj").view(np.uint8)))
        s13 = np.empty((n, 2 * si, sh), np.float32)
        s2 = np.empty((n, sh, si), np.float32)
        t = layer.tensors
        for e in range(n):
            if e < E and layer.combined:
                gs = layer.tensor("experts.gate_up_proj_scale_inv")[e]
                if layer.gate_up_per_half:
                    s13[e] = gs
                else:  # combined blocking: re-block per half, only if every 128-row block of each half has one scale
                    rows = np.arange(2 * I) // 128
                    for half in (0, 1):
                        r = rows[half * I:(half + 1) * I]
                        for b in range(si):
                            blk = np.unique(r[b * 128:(b + 1) * 128])
                            vals = gs[blk]
                            if not (vals == vals[0]).all():
                                raise ValueError(
                                    f"{layer.file}: experts.gate_up_proj_scale_inv blocks all 2I={2 * I} rows together "
                                    f"(I={I} not a multiple of 128) and expert {e}'s scales differ across the "
                                    f"gate/up boundary; per-half kernels cannot represent them")
                            s13[e, half * si + b] = vals[0]
                s2[e] = layer.tensor("experts.down_proj_scale_inv")[e]
            else:
                b = "shared_expert." if e == E else f"experts.{e}."
                w13[e, :I].copy_(host_view(layer.tensor(b + "gate_proj.weight").view(np.uint8)))
                w13[e, I:].copy_(host_view(layer.tensor(b + "up_proj.weight").view(np.uint8)))
                w2[e].copy_(host_view(layer.tensor(b + "down_proj.weight").view(np.uint8)))
                s13[e, :si] = layer.tensor(b + "gate_proj.weight_scale_inv")
                s13[e, si:] = layer.tensor(b + "up_proj.weight_scale_inv")
                s2[e] = layer.tensor(b + "down_proj.weight_scale_inv")
        fmt = "e4m3fn" if fnuz else layer.fp8
        tdt = getattr(torch, _TORCH_FP8[fmt])
        return (w13.view(tdt), w2.view(tdt), torch.from_numpy(s13).to(dev), torch.from_numpy(s2).to(dev))

    r = layer.cached(("fused_fp8", str(dev), fnuz), build)
    if fnuz:
        mutant_applied()
    return r


def shared_weights_torch(layer: Layer, device=None, dtype=None):
    """(gate [Is,H], up [Is,H], down [H,Is]) of an unfusable shared expert as torch tensors."""
    torch = _torch()
    dev = device if device is not None else globals()["device"]()
    dtype = dtype or torch.bfloat16
    fnuz = mutant("fnuz_as_fn") and layer.fp8 == "e4m3fnuz"
    return layer.cached(("shared_torch", str(dev), str(dtype), fnuz),
                        lambda: tuple(to_torch(w, dev, dtype) for w in layer.expert(layer.experts, cache=False)))


_GROUPED_MM_STATE = {"ok": None}


def _grouped_or_loop(a, w, counts, out_dtype):
    """``a [M, K]`` (rows sorted by group) times ``w[g].T`` per group with `counts` rows each, in
    fp32 (`out_dtype`). ``torch.nn.functional.grouped_mm(..., out_dtype=float32)`` on CUDA where it
    works, else a loop of fp32 matmuls (products of bf16 values are exact in fp32)."""
    torch = _torch()
    F = torch.nn.functional
    if a.is_cuda and _GROUPED_MM_STATE["ok"] is not False and hasattr(F, "grouped_mm") and a.dtype == torch.bfloat16:
        try:
            offs = torch.cumsum(counts, 0).to(torch.int32)
            r = F.grouped_mm(a, w.transpose(-2, -1), offs=offs, out_dtype=out_dtype)
            _GROUPED_MM_STATE["ok"] = True
            return r
        except (TypeError, RuntimeError, NotImplementedError) as e:
            _GROUPED_MM_STATE["ok"] = False
            print(f"moecheck_adapter: grouped_mm unavailable ({type(e).__name__}: {e}); using a matmul loop",
                  file=sys.stderr)
    out = torch.empty(a.shape[0], w.shape[1], dtype=out_dtype, device=a.device)
    start = 0
    for g, n in enumerate(counts.tolist()):
        if n:
            out[start:start + n] = a[start:start + n].to(out_dtype) @ w[g].to(out_dtype).T
        start += n
    return out


def moe_torch(layer: Layer, x, routing: Routing, *, w13=None, w2=None, shared=None, linear=None):
    """The fused layer in plain torch, fused-bf16 rounding points: gate/up in fp32, ``silu(g)·u``
    rounded once to bf16, down in fp32, times the fp32 routing weight, combined in fp32
    (``index_add_``), output bf16. Slots are sorted by expert id and run as grouped GEMMs
    (``_grouped_or_loop``); `linear(a, e_counts, which)` may replace the GEMMs (the fp8 adapter's
    block-scaled matmul); the mutants of the expert stage apply. Returns bf16 [T,H]."""
    torch = _torch()
    dev = x.device
    T, H = x.shape
    n_slots = (w13.shape[0] if w13 is not None else layer.experts + (1 if routing.fused else 0))
    ids = routing.ids
    down_x, drops = _mutant_plan(layer, ids if routing.fused else ids[:, :layer.top_k])
    keep = np.ones(ids.shape, bool)
    for e, m in drops.items():
        keep &= ~((ids == e) & m)
    t_idx, s_idx = np.nonzero(keep)
    flat_e = ids[t_idx, s_idx]
    order = np.argsort(flat_e, kind="stable")
    t_sorted, e_sorted = t_idx[order], flat_e[order]
    w_sorted = routing.weights[t_idx, s_idx][order]
    counts = np.bincount(e_sorted, minlength=n_slots)
    tt = torch.from_numpy(t_sorted.astype(np.int64)).to(dev)
    wt = torch.from_numpy(w_sorted.astype(np.float32)).to(dev)
    ct = torch.from_numpy(counts.astype(np.int64))
    xs = x[tt]
    if linear is None:
        def linear(a, c, which):
            return _grouped_or_loop(a, w13 if which == "w13" else w2, c, torch.float32)
    gu = linear(xs, ct, "w13")
    I = gu.shape[1] // 2
    inter = (torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]).to(torch.bfloat16)
    y = linear(inter, ct, "w2")
    if down_x is not None:
        y[torch.from_numpy(e_sorted == down_x).to(dev)] *= 1.01
    out = torch.zeros(T, H, dtype=torch.float32, device=dev)
    out.index_add_(0, tt, y * wt[:, None])
    if routing.shared_gate is not None:
        g, u, d = shared if shared is not None else shared_weights_torch(layer, dev)
        xf = x.float()
        a = (torch.nn.functional.silu(xf @ g.float().T) * (xf @ u.float().T)).to(torch.bfloat16)
        sg = torch.from_numpy(routing.shared_gate.astype(np.float32)).to(dev)
        out += sg[:, None] * (a.float() @ d.float().T)
    return out.to(torch.bfloat16)


def router_logits_torch(layer: Layer, x, device=None):
    """Router logits ``bf16(x·Wg)`` [T,E] and shared gate logit ``bf16(ws·x)`` [T] computed by
    torch in bf16 (fp32 accumulation, one rounding) on `device`, returned as float64 NumPy."""
    torch = _torch()
    dev = x.device
    wg = layer.cached(("router_torch", str(dev)), lambda: to_torch(layer.tensor("gate.weight"), dev, torch.bfloat16))
    lg = to_numpy(torch.nn.functional.linear(x, wg)).astype(np.float64)
    gl = None
    if layer.has_shared:
        ws = layer.cached(("shared_gate_torch", str(dev)),
                          lambda: to_torch(layer.tensor("shared_expert_gate.weight"), dev, torch.bfloat16))
        gl = to_numpy(torch.nn.functional.linear(x, ws)).astype(np.float64).reshape(-1)
    return lg, gl


# --------------------------------------------------------------------------------------------
# HF transformers sparse-MoE blocks
# --------------------------------------------------------------------------------------------

_HF_CLASSES = {
    "qwen2_moe": ("transformers.models.qwen2_moe.configuration_qwen2_moe", "Qwen2MoeConfig",
                  "transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    "qwen3_next": ("transformers.models.qwen3_next.configuration_qwen3_next", "Qwen3NextConfig",
                   "transformers.models.qwen3_next.modeling_qwen3_next", "Qwen3NextSparseMoeBlock"),
    "qwen3_5_moe": ("transformers.models.qwen3_5_moe.configuration_qwen3_5_moe", "Qwen3_5MoeTextConfig",
                    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock"),
}


def hf_config(layer: Layer, experts_implementation: str = "eager"):
    """The HF config object of the layer's family (hidden_act silu), with
    ``_experts_implementation`` set."""
    import importlib
    cmod, cname, _, _ = _HF_CLASSES[layer.family]
    Config = getattr(importlib.import_module(cmod), cname)
    kw = dict(hidden_size=layer.hidden, moe_intermediate_size=layer.intermediate,
              shared_expert_intermediate_size=max(1, layer.shared_intermediate), num_experts=layer.experts,
              num_experts_per_tok=layer.top_k, hidden_act="silu")
    if layer.family != "qwen3_5_moe":
        kw["norm_topk_prob"] = layer.renormalize
    cfg = Config(**kw)
    cfg._experts_implementation = experts_implementation
    return cfg


def hf_block(layer: Layer, experts_implementation: str = "eager", device=None, dtype=None):
    """HF transformers' sparse-MoE block of the layer's family (``Qwen2MoeSparseMoeBlock``,
    ``Qwen3NextSparseMoeBlock``, ``Qwen3_5MoeSparseMoeBlock``) in `dtype` (default bf16) on
    `device`, with the layer's weights (fused into the 3-D ``experts.gate_up_proj [E,2I,H]`` /
    ``experts.down_proj [E,H,I]`` parameters transformers 5 uses) and the experts
    implementation `experts_implementation` (a name in transformers' ``ExpertsInterface``, or
    "eager"). A layer without a shared expert gets an all-zero one (it adds exact zeros).
    Values must be exactly representable in `dtype` (ValueError otherwise). Cached per layer."""
    torch = _torch()
    dev = device if device is not None else globals()["device"]()
    dtype = dtype or torch.bfloat16
    fnuz = mutant("fnuz_as_fn") and layer.fp8 == "e4m3fnuz"

    def build():
        import importlib
        _, _, mmod, bname = _HF_CLASSES[layer.family]
        Block = getattr(importlib.import_module(mmod), bname)
        cfg = hf_config(layer, experts_implementation)
        with torch.device("meta"):
            block = Block(cfg)
        block = block.to_empty(device=dev).to(dtype)
        full13, full2 = fused_weights_torch(layer, dev, dtype)
        w13, w2 = full13[:layer.experts], full2[:layer.experts]
        sd = {"gate.weight": to_torch(layer.tensor("gate.weight"), dev, dtype),
              "experts.gate_up_proj": w13.clone(), "experts.down_proj": w2.clone()}
        if layer.has_shared:
            g, u, d = (to_torch(w, dev, dtype) for w in layer.expert(layer.experts, cache=False))
            sd.update({"shared_expert.gate_proj.weight": g, "shared_expert.up_proj.weight": u,
                       "shared_expert.down_proj.weight": d,
                       "shared_expert_gate.weight": to_torch(layer.tensor("shared_expert_gate.weight"), dev, dtype)})
        else:
            for k, p in block.state_dict().items():
                if k.startswith("shared_expert"):
                    sd[k] = torch.zeros_like(p)
        block.load_state_dict(sd, strict=True)
        block.eval()
        return block

    block = layer.cached(("hf_block", experts_implementation, str(dev), str(dtype), fnuz), build)
    if fnuz:
        mutant_applied()
    return block


def hf_forward(layer: Layer, x, experts_implementation: str = "eager", device=None, dtype=None):
    """Runs the HF block on hidden states `x` [T,H] (NumPy); returns the torch output [T,H].
    Mutants that act through the weights the helper loads: ``expert_down_x1p01`` (the first
    token's top expert's ``down_proj`` x1.01 for this call), ``shared_slot_weight_zero`` (shared
    expert's down projection zeroed for this call: its contribution is 0), ``fnuz_as_fn``."""
    torch = _torch()
    block = hf_block(layer, experts_implementation, device, dtype)
    p = next(block.parameters())
    xt = to_torch(x, p.device, p.dtype)
    restore = []
    with torch.no_grad():
        try:
            if mutant("expert_down_x1p01"):
                _, _, idx = block.gate(xt[:1])
                e = int(idx[0, 0])
                dp = block.experts.down_proj
                restore.append((dp, e, dp.data[e].clone()))
                dp.data[e] = (dp.data[e].float() * 1.01).to(dp.dtype)
                mutant_applied()
            if mutant("shared_slot_weight_zero") and layer.has_shared:
                sw = block.shared_expert.down_proj.weight
                restore.append((sw, None, sw.data.clone()))
                sw.data.zero_()
                mutant_applied()
            y = block(xt[None])[0]
        finally:
            for param, e, old in restore:
                if e is None:
                    param.data.copy_(old)
                else:
                    param.data[e] = old
    return y


def hf_route(layer: Layer, x, experts_implementation: str = "eager", device=None, dtype=None):
    """The HF block's own routing: (ids [T,S], weights [T,S]) from its router (weights in the
    model dtype, as the block multiplies them), with the shared gate ``sigmoid(ws·x)`` in the model
    dtype appended as slot id E when the layer is fusable (S = K+1), else S = K."""
    torch = _torch()
    block = hf_block(layer, experts_implementation, device, dtype)
    p = next(block.parameters())
    xt = to_torch(x, p.device, p.dtype)
    with torch.no_grad():
        _, w, ids = block.gate(xt)
        if layer.fusable:
            g = torch.sigmoid(block.shared_expert_gate(xt))
            if mutant("shared_slot_weight_zero"):
                g = torch.zeros_like(g)
                mutant_applied()
            ids = torch.cat([ids, torch.full_like(ids[:, :1], layer.experts)], dim=1)
            w = torch.cat([w, g.to(w.dtype)], dim=1)
    return ids, w
