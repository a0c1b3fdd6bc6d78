"""Launch configurations by call size, chosen at compile time.

A step's configs are buckets by tokens per call: decode (at most DECODE_TOKENS tokens: a few
sequences, one token each; for FP8 GEMMs FP8_GEMM_DECODE_TOKENS) and prefill (more). `HEURISTIC`
holds each op's starting point per bucket (`{}`: the launcher's own shape-derived defaults); with a
CUDA GPU at compile time, `tune.py` times `CANDIDATES` on each step's shapes and keeps the fastest.
The runtime never re-tunes: it reads the chosen configs from the artifact's launch.json.
"""

DECODE_TOKENS = 16
BUCKETS = (("decode", DECODE_TOKENS), ("prefill", None))

_GEMM = {
    "decode": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    # prefill: the fastest of 4 configs at 4096 tokens on an H100 (bench/results/triton_gpu.json)
    "prefill": {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
}
# fp32 / bf16 weights: their tiles take 2-4x the shared memory of e4m3 ones, so K tiles of 64
# (BLOCK_K 128 with 3 stages needs ~237 KB at bf16, over an H100's 227 KB).
_GEMM_FLOAT = {
    "decode": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    "prefill": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
}
_EXPERTS = {
    "decode": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 64},
    # prefill: pair tiles of 64 take Hopper's fp8 wgmma (tiles of 32 get mma.sync over f16-converted codes), with
    # no spills at V4-Flash's expert shapes (bench/results/sm90_static.json); not yet timed on a GPU.
    "prefill": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_D": 128, "num_warps": 8, "num_stages": 3},
}
# FP4 experts (their bf16 code dots, kernels/moe.py _fp4_dot): at prefill, N tiles of 64; with 128 the gate_up at
# V4-Flash's shapes takes 255 registers and spills 912 bytes on sm_90a, with 64 226 and none (sm90_static.json)
_EXPERTS_FP4 = {"decode": _EXPERTS["decode"], "prefill": {**_EXPERTS["prefill"], "BLOCK_N": 64}}
HEURISTIC = {
    "linear": _GEMM_FLOAT, "linear_fp8": _GEMM, "swiglu_linear_fp8": _GEMM, "grouped_linear": _GEMM_FLOAT,
    "grouped_linear_fp8": _GEMM, "linear_cat": _GEMM_FLOAT, "linear_fp8_cat": _GEMM, "norm_linear_fp8": _GEMM,
    "moe_experts": _EXPERTS, "moe_experts_q": _EXPERTS, "moe_experts_q_shared": _EXPERTS,
}


def _grid(**axes) -> list[dict]:
    out = [{}]
    for key, values in axes.items():
        out = [{**c, key: v} for c in out for v in values]
    return out


# Decode attention also times scores summed over 128-channel chunks (QK_CHUNK: the queries read a chunk at a time,
# not held whole: 128 registers a thread at D 512) and value parts (V_SPLIT). Compiled for sm_90a under Triton 3.6 at
# V4-Flash's shapes (bench/sm90_static.py, batch 1, 8 and 128) none spills: 16 heads in two parts 167-218 registers,
# 2-3 programs an SM (the default: 255, 2); 16 heads with 8 warps 174-202; all 64 heads in four parts with 8 warps
# 172 at batch 128 (it spills 160 B at batch 1, where the split's merge holds [64, 128] tiles). Not yet timed.
ATTENTION_CHUNKED = [{"QK_CHUNK": 128, "V_SPLIT": 2}, {"QK_CHUNK": 128, "num_warps": 8},
                     {"QK_CHUNK": 128, "BLOCK_H": 64, "V_SPLIT": 4, "num_warps": 8}]
CANDIDATES = {
    "decode": {
        "gemm": _grid(BLOCK_M=[16], BLOCK_N=[32, 64, 128], BLOCK_K=[64, 128, 256], num_warps=[4, 8], num_stages=[3, 4]),
        "experts": _grid(BLOCK_M=[16], BLOCK_N=[32, 64, 128], BLOCK_K=[64, 128], BLOCK_D=[64, 128]),
        "attention": _grid(BLOCK_H=[16, 32, 64], BLOCK_N=[16, 32, 64], num_warps=[4, 8]) + ATTENTION_CHUNKED,
        "index_topk": _grid(BLOCK_T=[32, 64, 128], num_warps=[4, 8]),
    },
    "prefill": {
        "gemm": _grid(BLOCK_M=[64, 128], BLOCK_N=[64, 128, 256], BLOCK_K=[64, 128], num_warps=[4, 8], num_stages=[3, 4]),
        "experts": _grid(BLOCK_M=[32, 64], BLOCK_N=[64, 128], BLOCK_K=[64, 128], BLOCK_D=[128], num_warps=[4, 8]),
        "attention": _grid(BLOCK_H=[16, 32, 64], BLOCK_N=[16, 32, 64], num_warps=[4, 8]),
        "index_topk": _grid(BLOCK_T=[32, 64, 128], num_warps=[4, 8]),
    },
}
# FP4 experts: the expert candidates above that compile without spills on sm_90a at V4-Flash's expert shapes (both
# GEMMs, `bench/sm90_static.py --moe-candidates fp4`): at decode N x K tiles up to 64 x 64 (32 x 128 too), at prefill
# N tiles of 64 with 8 warps. The other 18 spill 52 B to 13 KB a thread, 14 of them over 400 B
# (`bench/results/sm90_candidates.json`). FP8 experts keep the whole grid: 6 of its 16 prefill configs spill
# 128-380 B (the FP8 GEMMs: 16 of 48 prefill configs, 388 B-3 KB), small enough to leave to the timing.
CANDIDATES_FP4 = {
    "decode": (_grid(BLOCK_M=[16], BLOCK_N=[32], BLOCK_K=[64, 128], BLOCK_D=[64, 128])
               + _grid(BLOCK_M=[16], BLOCK_N=[64], BLOCK_K=[64], BLOCK_D=[64, 128])),
    "prefill": _grid(BLOCK_M=[32, 64], BLOCK_N=[64], BLOCK_K=[64, 128], BLOCK_D=[128], num_warps=[8]),
}
# The warp-specialized K loop's configs (kernels/gemm_kernel.py TMA_WS: TMA loads in a producer warp group, two
# consumer warp groups sharing the tile): 4 warps each group, 12 in all, one CTA per SM; each also as a persistent
# kernel (PERSISTENT: one program per SM loops over the tiles, so the next tile loads while this one's output is
# stored). These compile warp-specialized without spills for sm_90a under Triton 3.6 and 3.9 in every form of the
# GEMM, at 4096 and 300 tokens (bench/results/sm90_ws_candidates*.json); 128 x 256 tiles spill 1.4 KB, and 64 x 256
# does not compile (3.9 refuses the wgmma layout, 3.6 aborts the process).
# The tuner does not time them (bench/gpu_session.sh gemm-ws does): on an H100 under Triton 3.6 (2026-11-25,
# bench/results/triton_gpu.json) every 128-row config gave wrong results (error ~1.4 of the output scale)
# wherever M spans several tiles, and the 64-row ones were right but slower than the synchronous heuristic at 4096
# tokens, except kv's (87 against 93 us). The interpreter, which does not warp-specialize, gives the pointer loop's
# bits: the miscompile is in the split. Each would cost the tuner a compile and a rejected or losing timing.
CANDIDATES_WS = [{"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "WARP_SPEC": True},
                 {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "WARP_SPEC": True},
                 {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "WARP_SPEC": True},
                 {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "WARP_SPEC": True}]
CANDIDATES_WS += [{**c, "PERSISTENT": True} for c in CANDIDATES_WS]
FP8_GEMMS = ("linear_fp8", "swiglu_linear_fp8", "grouped_linear_fp8", "linear_fp8_cat", "norm_linear_fp8")
FAMILY = {"linear": "gemm", "linear_fp8": "gemm", "swiglu_linear_fp8": "gemm", "grouped_linear": "gemm",
          "grouped_linear_fp8": "gemm", "linear_cat": "gemm", "linear_fp8_cat": "gemm", "norm_linear_fp8": "gemm",
          "moe_experts": "experts", "moe_experts_q": "experts", "moe_experts_q_shared": "experts",
          "attention": "attention", "attention_rope": "attention", "norm_attention_rope": "attention",
          "index_topk": "index_topk", "rope_index_topk": "index_topk"}


def _fp4_experts(op: str, attrs: dict | None) -> bool:
    return FAMILY.get(op) == "experts" and (attrs or {}).get("format") == "fp4"


def _table(op: str, attrs: dict | None) -> dict:
    return _EXPERTS_FP4 if _fp4_experts(op, attrs) else HEURISTIC.get(op, {})


# FP8 GEMMs keep their decode tiles up to 64 tokens (a batch of up to 64 decoding sequences, a short prefill chunk).
# On an H100 (2026-11-25, bench/results/triton_gpu.json, Triton 3.6) the decode config (16 x 64 tiles) beat the
# prefill one (64 x 256, 8 warps) at 64 tokens in all six V4-Flash shapes: q_a 12.4 against 28.8 us, q_b 36 / 42,
# kv 11 / 28, o_b 38 / 44, expert gate_up 23 / 34, expert down 15 / 29; at 128 tokens it lost in three of six.
FP8_GEMM_DECODE_TOKENS = 64


def heuristic(op: str, attrs: dict | None = None) -> list[dict]:
    """The untuned bucket list of one op (with these attributes): [{"max_tokens", "config", "source"}]."""
    table = _table(op, attrs)
    limits = {"decode": FP8_GEMM_DECODE_TOKENS} if op in FP8_GEMMS else {}
    return [{"max_tokens": limits.get(name, limit), "config": dict(table.get(name, {})),
             "source": "heuristic" if name in table else "kernel defaults"} for name, limit in BUCKETS]


def candidates(op: str, bucket: str, attrs: dict | None = None) -> list[dict]:
    """Configs worth timing for `op` (with these attributes) in `bucket` (the heuristic first); [] = not tuned."""
    family = FAMILY.get(op)
    if family is None:
        return []
    first = _table(op, attrs).get(bucket, {})
    grid = CANDIDATES_FP4[bucket] if _fp4_experts(op, attrs) else CANDIDATES[bucket][family]
    rest = [c for c in grid if c != first]
    return [first] + rest
