"""v4c's Triton kernels. This package is copied, as source, into every triton artifact
(kernels/triton/) and imported from there by the runtime, so it imports only torch and triton
(and its own modules, relatively).

Each launcher has exactly the signature and semantics of the runtime's torch kernel of the same
name (runtime/kernels/), plus an optional `config` dict of launch parameters chosen at compile
time, and an optional `into`: the tensor (a tuple for several results) to write the result into, the
runtime's planned buffer (common.result: used where it has exactly the result's shape, dtype and device,
else the result is a new tensor, as without `into`). Launchers check their inputs and raise `ValueError`
naming what is unsupported; they never fall back silently. `LAUNCHERS` maps op names to launchers; ops
missing here run as the torch kernel, and the runtime reports them as fallbacks.
"""

import importlib

MODULES = ("gemm", "gemm_fused", "embed", "moe", "moe_quant", "router", "attention", "attention_fused", "indexer", "compressor",
           "compressor_pair", "norm", "hyper", "hyper_quant", "hyper_head")

LAUNCHERS: dict = {}
for _name in MODULES:
    try:
        _module = importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as _e:  # a kernel module not written yet
        if _e.name != f"{__name__}.{_name}":
            raise
        continue
    LAUNCHERS.update(getattr(_module, "LAUNCHERS", {}))
