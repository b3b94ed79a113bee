"""MoECheck adapter: HF transformers 5.x sparse-MoE block with transformers' fine-grained FP8
(the FP8Experts / FP8Linear modules its `quant_method: fp8` quantizer puts in a
Qwen2-MoE / Qwen3-Next / Qwen3.5-MoE model), on e4m3fn block-scaled case files.

Experts implementation: env MOECHECK_HF_FP8_EXPERTS = "eager" (default; FP8Experts' own loop,
one FP8 linear per expert), "batched_mm", "grouped_mm" or "deepgemm" (transformers'
FP8ExpertsInterface). The FP8 matmuls are the `kernels-community/finegrained-fp8` Triton kernels
(or DeepGEMM), which transformers 5.17 fetches from the HF kernel hub through the `kernels`
package: on a machine without hub access they must already be in the local HF cache, or env
MOECHECK_FINEGRAINED_FP8_SRC names a local copy of the hub kernel's source (the `torch-ext`
folder of kernels-community's `finegrained-fp8`, a pure Python/Triton package): the adapter then
imports it and hands its `matmul_2d` / `matmul_batched` / `matmul_grouped` to transformers, exactly
the entry points transformers takes from the hub build. CUDA only.

Autotuning: the hub kernel's block-scaled FP8 matmuls are `triton.autotune`d over num_warps and
num_stages only (the tile comes from the 128×128 block size), re-tuned for every new (N, K,
BLOCK_SIZE_M) — 16–75 s per new layer shape on the H200, which starves a fuzz campaign of its
thousands of shapes. Those configs schedule the same arithmetic (same tile, same K order), so the
adapter pins each such autotuner to one of its own configs (4 warps, 3 stages where offered);
autotuners whose configs differ in anything else are left alone. Env
MOECHECK_FINEGRAINED_FP8_AUTOTUNE=1 keeps the kernel's full autotuning.

Rounding points (docs/python-adapters.md): router logits bf16, routing weights cast to bf16,
every FP8 linear quantises its bf16 input per token and 128-column group with scale amax/448
(a division) and writes bf16; silu and silu·up bf16 (then requantised by the down linear);
w·down a bf16 product; routed sum in fp32 then bf16; the bf16 shared-expert term (its linears
are FP8Linear too, sigmoid gate bf16) added in bf16.
"""
import os
import sys

import numpy as np

import moecheck_adapter as mc

NAME = "HF transformers fine-grained FP8 block"
# Its act_quant is a Triton kernel: Triton's fp32 `/` lowers to div.full.f32 (up to 2 ulp, triton-lang/triton#10661),
# so a scaled value on an fp8 rounding midpoint may take either code: "quantization": "approximate".
RECIPE = {"base": "hf-mm-bf16", "activationFP8": True, "intermediateFP8": True, "scaleConvention": "divide",
          "quantization": "approximate"}


def _hopper():
    try:
        import torch
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    except Exception:
        return False


# On sm_90 Triton compiles an fp8 `tl.dot` with `max_num_imprecise_acc_default = 2**30`
# (triton/backends/nvidia/compiler.py: imprecise for capability 90, else 0): the tensor cores
# accumulate the 128 fp8 products of each K block without promotion to fp32, keeping about 14
# significant bits (FACTS §8); only the block's partial is then scaled and added in fp32. The
# recipe says so: an accumulator unit roundoff of 2^-14 (it applies to every accumulation the
# reference models, so it is wider than the kernel's error outside the fp8 blocks). Measured on
# the H200: smoke-q35-small-fp8fn-T33 fails the fp32 declaration by one bf16 step (bound 0)
# and passes at 2^-14 (worst/bound 0.019).
if _hopper():
    RECIPE["accumulatorUnitRoundoff"] = 2.0 ** -14
FORMATS = ["fp8-e4m3fn"]  # weight formats of the case files this adapter takes
# fuzz draws H, I and Is as multiples of 128 (the block size: FP8Experts blocks gate and up rows
# together, so other I are unsupported unless their scales agree; real FP8 checkpoints are 128-aligned)
CONSTRAINTS = {"multiple_of": 128}
MUTANTS = ["expert_down_x1p01", "shared_slot_weight_zero"]
IMPLEMENTATION = os.environ.get("MOECHECK_HF_FP8_EXPERTS", "eager")
_EXPERTS_CLASS = []


def _combined_gate_up_scales(layer, e):
    """[max(ceil(2I/128), 2), ceil(H/128)] scales blocked over all 2I gate+up rows (FP8Experts'
    layout), or ValueError where a 128-row block mixes rows of different scales."""
    (g, gs, g0), (u, us, u0), _ = layer.stored(e)
    rows = np.concatenate([gs[(np.arange(g.shape[0]) + g0) // 128], us[(np.arange(u.shape[0]) + u0) // 128]])
    blocks = []
    for b in range(0, rows.shape[0], 128):
        blk = rows[b:b + 128]
        if not (blk == blk[0]).all():
            raise mc.Unsupported(f"{layer.file}: expert {e}: gate and up scales differ inside one 128-row block of "
                             f"gate_up_proj (I={layer.intermediate} not a multiple of 128); transformers' FP8Experts "
                             "blocks the 2I rows together and cannot represent them")
        blocks.append(blk[0])
    while len(blocks) < 2:
        blocks.append(blocks[-1])
    return np.stack(blocks).astype(np.float32)


def _block(layer, dev):
    import importlib

    import torch
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts, FP8Linear
    from transformers.integrations.moe import use_experts_implementation

    if layer.fp8 != "e4m3fn":
        raise mc.Unsupported(f"transformers' fine-grained FP8 takes e4m3fn weights; this layer stores {layer.weight_dtype}")
    if not _EXPERTS_CLASS:  # the decorator patches the class in place: once per process
        _EXPERTS_CLASS.append(use_experts_implementation(experts_class=FP8Experts,
                                                         experts_interface=ALL_FP8_EXPERTS_FUNCTIONS))
    _, _, mmod, bname = mc._HF_CLASSES[layer.family]
    cfg = mc.hf_config(layer, IMPLEMENTATION)
    E, I, H, Is = layer.experts, layer.intermediate, layer.hidden, max(1, layer.shared_intermediate)
    with torch.device("meta"):
        block = getattr(importlib.import_module(mmod), bname)(cfg)
        block.experts = _EXPERTS_CLASS[0](cfg, block_size=(128, 128), activation_scheme="dynamic")
        for name, (i, o) in {"gate_proj": (H, Is), "up_proj": (H, Is), "down_proj": (Is, H)}.items():
            setattr(block.shared_expert, name, FP8Linear(i, o, block_size=(128, 128), activation_scheme="dynamic"))
    block = block.to_empty(device=dev)

    def put(module, name, array, dtype=None):
        t = mc.to_torch(array, dev, dtype)
        setattr(module, name, torch.nn.Parameter(t, requires_grad=False))

    put(block.gate, "weight", layer.tensor("gate.weight"), torch.bfloat16)
    gu = np.empty((E, 2 * I, H), layer.weight_dtype)
    dn = np.empty((E, H, I), layer.weight_dtype)
    for e in range(E):
        (g, _, _), (u, _, _), (d, _, _) = layer.stored(e)
        gu[e, :I], gu[e, I:], dn[e] = g, u, d
    put(block.experts, "gate_up_proj", gu)
    put(block.experts, "gate_up_proj_scale_inv", np.stack([_combined_gate_up_scales(layer, e) for e in range(E)]))
    put(block.experts, "down_proj", dn)
    put(block.experts, "down_proj_scale_inv", np.stack([layer.stored(e)[2][1] for e in range(E)]).astype(np.float32))
    if layer.has_shared:
        for name, (w, s, _) in zip(("gate_proj", "up_proj", "down_proj"), layer.stored(E)):
            put(getattr(block.shared_expert, name), "weight", w)
            put(getattr(block.shared_expert, name), "weight_scale_inv", np.asarray(s, np.float32))
        put(block.shared_expert_gate, "weight", layer.tensor("shared_expert_gate.weight"), torch.bfloat16)
    else:  # no shared expert: an all-zero one adds exact zeros
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(block.shared_expert, name)
            lin.weight.data.view(torch.uint8).zero_()
            lin.weight_scale_inv.data.fill_(1.0)
        block.shared_expert_gate.weight = torch.nn.Parameter(torch.zeros(1, H, dtype=torch.bfloat16, device=dev),
                                                             requires_grad=False)
    block.eval()
    return block


def _local_hub_kernel():
    """Installs the finegrained-fp8 kernel from MOECHECK_FINEGRAINED_FP8_SRC (a hub kernel's
    `torch-ext` folder, or its `finegrained_fp8` package folder) as transformers' loaded kernel.
    The hub's build adds a generated `_ops` module (the torch.library namespace of its ops); the
    source tree has none, so one is made here under the namespace `_finegrained_fp8_moecheck`."""
    src = os.environ.get("MOECHECK_FINEGRAINED_FP8_SRC")
    if not src:
        return
    import importlib.util
    import sys
    import types

    import torch
    import transformers.integrations.finegrained_fp8 as tf8
    if tf8._FINEGRAINED_FP8 is not None:
        return
    pkg_dir = os.path.join(src, "finegrained_fp8") if os.path.isdir(os.path.join(src, "finegrained_fp8")) else src
    init = os.path.join(pkg_dir, "__init__.py")
    if not os.path.isfile(init):
        raise FileNotFoundError(f"MOECHECK_FINEGRAINED_FP8_SRC={src}: no finegrained_fp8/__init__.py there "
                                "(expected kernels-community's finegrained-fp8/torch-ext folder)")
    name = "finegrained_fp8"
    ns = "_finegrained_fp8_moecheck"
    ops = types.ModuleType(name + "._ops")
    ops.ops = getattr(torch.ops, ns)
    ops.add_op_namespace_prefix = lambda op: f"{ns}::{op}"
    sys.modules[name + "._ops"] = ops
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[pkg_dir])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    tf8._FINEGRAINED_FP8 = tf8.FineGrainedFP8(matmul=pkg.matmul_2d, batched_matmul=pkg.matmul_batched,
                                              grouped_matmul=pkg.matmul_grouped)


def _pin_autotuners(package):
    """Pins every Triton autotuner of `package` (and its submodules) whose configs share their
    meta-parameters — they differ only in num_warps / num_stages / num_ctas, so in scheduling,
    not arithmetic — to one of them. Returns the names pinned."""
    import sys
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return []
    pinned = []
    for modname, mod in list(sys.modules.items()):
        if mod is None or not (modname == package or modname.startswith(package + ".")):
            continue
        for attr, obj in list(vars(mod).items()):
            if not isinstance(obj, Autotuner) or len(obj.configs) <= 1:
                continue
            if any(c.kwargs != obj.configs[0].kwargs for c in obj.configs):
                continue
            pick = [c for c in obj.configs if c.num_warps == 4 and c.num_stages == 3] or obj.configs[:1]
            obj.configs = pick[:1]
            pinned.append(f"{modname}.{attr}")
    return pinned


_PINNED = []


def _get(layer):
    import torch
    _local_hub_kernel()
    if not _PINNED and os.environ.get("MOECHECK_FINEGRAINED_FP8_AUTOTUNE") != "1":
        import transformers.integrations.finegrained_fp8 as tf8
        if tf8._FINEGRAINED_FP8 is None and torch.cuda.is_available():
            tf8._load_finegrained_fp8_kernel()  # from the hub cache; ImportError names what is missing
        if tf8._FINEGRAINED_FP8 is not None:
            _PINNED.extend(_pin_autotuners(tf8._FINEGRAINED_FP8.matmul.__module__.split(".")[0]) or ["(none)"])
            print(f"hf_finegrained_fp8: autotuners pinned to one config: {', '.join(_PINNED)}", file=sys.stderr)
    if not torch.cuda.is_available() and os.environ.get("MOECHECK_HF_FP8_ALLOW_CPU") != "1":
        raise RuntimeError("transformers' fine-grained FP8 path runs its Triton (or DeepGEMM) kernels on CUDA only; "
                           "no CUDA device here")
    dev = mc.device()
    return layer.cached(("hf_fp8_block", IMPLEMENTATION, str(dev)), lambda: _block(layer, dev))


def forward(layer, x):
    import torch
    block = _get(layer)
    xt = mc.to_torch(x, next(block.gate.parameters()).device, torch.bfloat16)
    restore = []
    with torch.no_grad():
        try:
            if mc.mutant("expert_down_x1p01"):  # x1.01 exactly, through the block scale
                e = int(block.gate(xt[:1])[2][0, 0])
                s = block.experts.down_proj_scale_inv
                restore.append((s.data, e, s.data[e].clone()))
                s.data[e] *= 1.01
                mc.mutant_applied()
            if mc.mutant("shared_slot_weight_zero") and layer.has_shared:
                s = block.shared_expert.down_proj.weight_scale_inv
                restore.append((s.data, None, s.data.clone()))
                s.data.zero_()
                mc.mutant_applied()
            return block(xt[None])[0]
        finally:
            for data, e, old in restore:
                if e is None:
                    data.copy_(old)
                else:
                    data[e] = old


def route(layer, x):
    import torch
    block = _get(layer)
    xt = mc.to_torch(x, next(block.gate.parameters()).device, torch.bfloat16)
    with torch.no_grad():
        _, w, ids = block.gate(xt)
        if layer.fusable:
            g = torch.sigmoid(block.shared_expert_gate(xt))
            if mc.mutant("shared_slot_weight_zero"):
                g = torch.zeros_like(g)
                mc.mutant_applied()
            ids = torch.cat([ids, torch.full_like(ids[:, :1], layer.experts)], dim=1)
            w = torch.cat([w, g.to(w.dtype)], dim=1)
    return ids, w
