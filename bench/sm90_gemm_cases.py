"""bench/sm90_static.py's projection and expert cases at V4-Flash shapes: the FP8 GEMMs (plain, with the fuse
pass's SwiGLU, the q_a_norm -> q_b_proj pair three ways, the triton lowering's joined siblings and folded norms)
and the routed experts' grouped GEMMs with their pair bookkeeping (and, for --gemm-candidates / --moe-candidates, each
config the tuner could time for them). Each case is {"case", "config", "call"}: the
call runs the real launcher, whose Triton launches sm90_static.py catches and compiles for sm_90a (--ws-candidates:
the warp-specialized FP8 GEMM configs in each form an artifact launches them). Imported by
sm90_static.py after it has set up the import paths and unset TRITON_INTERPRET.
"""

import torch


def gemm_cases(extra: list[dict]) -> list[dict]:
    from triton_gpu import ACT, DECODE_TOKENS, FLASH_GEMMS, PREFILL_TOKENS

    from v4c.runtime.quant import quant_fp8
    from v4c.targets.triton.configs import heuristic
    from v4c.targets.triton.kernels.gemm import linear_fp8
    from v4c.targets.triton.kernels.gemm_fused import swiglu_linear_fp8
    n, k = FLASH_GEMMS["expert_gate_up"]
    q, s = quant_fp8(torch.randn(n, k) * 0.02, (128, 128))
    out = []
    for bucket, m in (("decode", DECODE_TOKENS[0]), ("prefill", PREFILL_TOKENS)):
        x = torch.randn(m, k)
        for cfg in [heuristic("linear_fp8")[0 if bucket == "decode" else 1]["config"]] + extra:
            out.append({"case": f"linear_fp8 expert_gate_up n={n} k={k} m={m}", "config": cfg,
                        "call": lambda cfg=cfg, x=x: linear_fp8(x, q, s, block=(128, 128), act=ACT, config=cfg)})
    # the fuse pass's swiglu_linear: the shared expert's down projection computing its SwiGLU from gate and up
    n_d, k_d = FLASH_GEMMS["expert_down"]
    q_d = quant_fp8(torch.randn(n_d, k_d) * 0.02, (128, 128))
    for bucket, m in (("decode", DECODE_TOKENS[0]), ("prefill", PREFILL_TOKENS)):
        cfg = heuristic("swiglu_linear_fp8")[0 if bucket == "decode" else 1]["config"]
        gate, up = torch.randn(m, k_d), torch.randn(m, k_d)
        out.append({"case": f"swiglu_linear_fp8 expert_down n={n_d} k={k_d} m={m}", "config": cfg,
                    "call": lambda cfg=cfg, g=gate, u=up: swiglu_linear_fp8(g, u, *q_d, block=(128, 128), act=ACT,
                                                                            limit=10.0, config=cfg)})
    # the fuse pass's pair: q_a_norm quantizing once (rms_norm_quant) for q_b_proj, which reads the codes
    n_b, k_b = FLASH_GEMMS["q_b"]
    q_b = quant_fp8(torch.randn(n_b, k_b) * 0.02, (128, 128))
    for bucket, m in (("decode", DECODE_TOKENS[0]), ("prefill", PREFILL_TOKENS)):
        cfg = heuristic("linear_fp8")[0 if bucket == "decode" else 1]["config"]
        for fused in ("plain", "codes", "folded"):
            what = {"plain": "rms_norm + linear_fp8 q_b (fp32 x)",
                    "codes": "rms_norm_quant + linear_fp8 q_b (e4m3 codes)",
                    "folded": "norm_linear_fp8 q_b (the triton target's norm_gemm)"}[fused]
            out.append({"case": f"{what} n={n_b} k={k_b} m={m}", "config": cfg,
                        "call": lambda cfg=cfg, m=m, fused=fused: _q_b(torch.randn(m, k_b), *q_b, cfg, fused)})
    out += sibling_cases()
    return out


def sibling_cases() -> list[dict]:
    """The triton lowering's joined projections (targets/triton/siblings.py) at V4-Flash sizes, each beside one of
    its siblings alone: q_a_proj + kv_proj (FP8, reading the input norm's codes, and at decode with that norm folded
    in: norm_gemm.py) and a CSA layer's five compressor and indexer projections (fp32 weights: fp8's default skip
    list)."""
    from triton_gpu import ACT, DECODE_TOKENS, FLASH_GEMMS, PREFILL_TOKENS

    from v4c.runtime.quant import quant_fp8
    from v4c.targets.triton.configs import heuristic
    from v4c.targets.triton.kernels.gemm import linear, linear_cat, linear_fp8, linear_fp8_cat
    from v4c.targets.triton.kernels.gemm_fused import norm_linear_fp8
    (n_a, k), (n_kv, _) = FLASH_GEMMS["q_a"], FLASH_GEMMS["kv"]
    q, s = quant_fp8(torch.randn(n_a + n_kv, k) * 0.02, (128, 128))
    compressor = [2 * 512, 2 * 512, 2 * 128, 2 * 128, 64]  # kv, gate (overlap: 2 x head_dim), indexer's, scorer
    w = torch.randn(sum(compressor), k) * 0.02
    out = []
    for bucket, m in (("decode", DECODE_TOKENS[0]), ("prefill", PREFILL_TOKENS)):
        b = 0 if bucket == "decode" else 1
        codes = torch.randn(m, k).to(torch.float8_e4m3fn)
        scales = torch.rand(m, k // ACT["group"]) + 0.5
        cfg = heuristic("linear_fp8_cat")[b]["config"]
        out.append({"case": f"linear_fp8 q_a alone (e4m3 codes) n={n_a} k={k} m={m}", "config": cfg,
                    "call": lambda cfg=cfg, x=codes, xs=scales: linear_fp8(x, q[:n_a], s[:n_a // 128], xs,
                                                                          block=(128, 128), act=ACT, config=cfg)})
        out.append({"case": f"linear_fp8_cat q_a+kv (e4m3 codes) n={n_a}+{n_kv} k={k} m={m}", "config": cfg,
                    "call": lambda cfg=cfg, x=codes, xs=scales: linear_fp8_cat(
                        x, q, s, xs, sizes=[n_a, n_kv], block=(128, 128), act=ACT, config=cfg)})
        if bucket == "decode":  # the triton target's norm_gemm: the first block's input norm in q_a + kv
            x = torch.randn(m, k)
            out.append({"case": f"norm_linear_fp8 q_a+kv (input norm folded) n={n_a}+{n_kv} k={k} m={m}",
                        "config": cfg, "call": lambda cfg=cfg, x=x: norm_linear_fp8(
                            x, torch.ones(k), q, s, eps=1e-6, sizes=[n_a, n_kv], block=(128, 128), act=ACT,
                            config=cfg)})
            x, cfg = torch.randn(m, k), heuristic("linear_cat")[b]["config"]
            out.append({"case": f"linear compressor kv alone n={compressor[0]} k={k} m={m}", "config": cfg,
                        "call": lambda cfg=cfg, x=x: linear(x, w[:compressor[0]], config=cfg)})
            out.append({"case": f"linear_cat compressor + indexer n={'+'.join(map(str, compressor))} k={k} m={m}",
                        "config": cfg, "call": lambda cfg=cfg, x=x: linear_cat(x, w, sizes=compressor, config=cfg)})
    return out


def _q_b(x, q, s, cfg, fused: str):
    """q_a_norm then q_b_proj, as the fuse pass leaves them ("codes"), or not ("plain"), or as the triton target
    folds them ("folded": one launch)."""
    from triton_gpu import ACT

    from v4c.targets.triton.kernels.gemm import linear_fp8
    from v4c.targets.triton.kernels.gemm_fused import norm_linear_fp8
    from v4c.targets.triton.kernels.norm import rms_norm, rms_norm_quant
    w = torch.ones(x.shape[-1])
    if fused == "folded":
        return norm_linear_fp8(x, w, q, s, eps=1e-6, block=(128, 128), act=ACT, config=cfg)
    if fused == "plain":
        return linear_fp8(rms_norm(x, w, eps=1e-6), q, s, block=(128, 128), act=ACT, config=cfg)
    codes, scales = rms_norm_quant(x, w, eps=1e-6, group=ACT["group"], scale_format=ACT["scale_format"])
    return linear_fp8(codes, q, s, scales, block=(128, 128), act=ACT, config=cfg)


def moe_cases(extra: list[dict]) -> list[dict]:
    """The FP8 grouped expert GEMM at V4-Flash's expert shapes (D 4096, moe_intermediate 2048, 128x128 blocks,
    top-6), decode (16 tokens) and prefill (4096): 16 experts stand in for 256 (the GEMMs' code does not
    depend on their number) and the weights are zero codes, since nothing runs; and the decode pair bookkeeping
    (pairs.sort_pairs) over 256 experts."""
    from triton_gpu import ACT, DECODE_TOKENS, FLASH_GEMMS, PREFILL_TOKENS

    from v4c.targets.triton.configs import heuristic
    from v4c.targets.triton.kernels.moe_quant import moe_experts_q
    from v4c.targets.triton.kernels.pairs import sort_pairs
    experts, top = 16, 6
    two_i, d = FLASH_GEMMS["expert_gate_up"]
    inter = two_i // 2
    gate_up, gu_scale, down, down_scale = _expert_weights("fp8", experts)
    scales = [gu_scale, down_scale]
    out = []
    for bucket, m in (("decode", DECODE_TOKENS[0]), ("prefill", PREFILL_TOKENS)):
        x, w = torch.randn(m, d), torch.rand(m, top)
        idx = torch.stack([torch.randperm(experts)[:top] for _ in range(m)])
        for cfg in [heuristic("moe_experts_q")[0 if bucket == "decode" else 1]["config"]] + extra:
            out.append({"case": f"moe_experts_q fp8 d={d} inter={inter} top={top} m={m}", "config": cfg,
                        "call": lambda cfg=cfg, x=x, w=w, idx=idx: moe_experts_q(
                            x, w, idx, gate_up, scales[0], down, scales[1], format="fp8", block=[128, 128],
                            down_block=[128, 128], act_in=ACT, act_mid=ACT, config=cfg)})
    # the fuse pass: post_attention_layernorm's codes and scales as gate_up's input, at decode below QUANT_ONCE's
    # 64 pairs (4 tokens: every tile quantizes its x otherwise) and above it (16 tokens: the fp32 x case above,
    # with act_quant's launch)
    from v4c.runtime.kernels.quantized import rms_norm_quant  # (the reference's codes: only the experts compile)
    cfg = heuristic("moe_experts_q")[0]["config"]
    for m, forms in ((4, ("fp32 x", "e4m3 codes")), (DECODE_TOKENS[0], ("e4m3 codes",))):
        x, w = torch.randn(m, d), torch.rand(m, top)
        idx = torch.stack([torch.randperm(experts)[:top] for _ in range(m)])
        inputs = {"fp32 x": (x,), "e4m3 codes": rms_norm_quant(x, torch.ones(d), eps=1e-6, group=ACT["group"],
                                                               scale_format=ACT["scale_format"])}
        for what in forms:
            xs = inputs[what]
            out.append({"case": f"moe_experts_q fp8 d={d} inter={inter} top={top} m={m} ({what})", "config": cfg,
                        "call": lambda xs=xs, w=w, idx=idx, cfg=cfg: moe_experts_q(
                            xs[0], w, idx, gate_up, scales[0], down, scales[1], *xs[1:], format="fp8",
                            block=[128, 128], down_block=[128, 128], act_in=ACT, act_mid=ACT, config=cfg)})
    # PAIRS_IN_KERNEL: up to 64 pairs the gate_up programs sort the pairs themselves (their code does not depend on
    # the number of experts): 10 tokens at top-6, 60 pairs, the most it takes
    x, w = torch.randn(10, d), torch.rand(10, top)
    idx = torch.stack([torch.randperm(experts)[:top] for _ in range(10)])
    out.append({"case": f"moe_experts_q fp8 d={d} inter={inter} top={top} m=10 (pairs in gate_up)", "config": cfg,
                "call": lambda x=x, w=w, idx=idx, cfg=cfg: moe_experts_q(
                    x, w, idx, gate_up, scales[0], down, scales[1], format="fp8", block=[128, 128],
                    down_block=[128, 128], act_in=ACT, act_mid=ACT, config=cfg)})
    # FP4 experts (DeepSeek's release format; fp32 dots over dequantized tiles), alone and with the FP8 shared
    # expert as expert E over its own weights (moe_experts_q_shared: the triton lowering's shared_expert.py)
    from v4c.targets.triton.kernels.moe_quant import moe_experts_q_shared
    fp4_gu, fp4_gu_scale, fp4_down, fp4_down_scale = _expert_weights("fp4", experts)
    fp4, fp4_scales = [fp4_gu, fp4_down], [fp4_gu_scale, fp4_down_scale]
    own = [gate_up[0], scales[0][0], down[0], scales[1][0]]
    for bucket, m in (("decode", DECODE_TOKENS[0]), ("prefill", PREFILL_TOKENS)):
        x, w = torch.randn(m, d), torch.rand(m, top + 1)
        idx = torch.cat([torch.stack([torch.randperm(experts)[:top] for _ in range(m)]),
                         torch.full((m, 1), experts)], 1)
        fp4_cfg = heuristic("moe_experts_q", {"format": "fp4"})[0 if bucket == "decode" else 1]["config"]
        kw = {"format": "fp4", "block": None, "down_block": None, "act_in": ACT, "act_mid": ACT, "config": fp4_cfg}
        out.append({"case": f"moe_experts_q fp4 d={d} inter={inter} top={top} m={m}", "config": fp4_cfg,
                    "call": lambda x=x, w=w, idx=idx, kw=kw: moe_experts_q(
                        x, w[:, :top], idx[:, :top], fp4[0], fp4_scales[0], fp4[1], fp4_scales[1], **kw)})
        out.append({"case": f"moe_experts_q_shared fp4 + fp8 shared d={d} inter={inter} top={top}+1 m={m}",
                    "config": fp4_cfg, "call": lambda x=x, w=w, idx=idx, kw=kw: moe_experts_q_shared(
                        x, w, idx, fp4[0], fp4_scales[0], fp4[1], fp4_scales[1], *own, **kw,
                        shared_block=[128, 128], shared_down_block=[128, 128])})
    for m in (DECODE_TOKENS[0], 256):  # the decode bookkeeping over V4-Flash's 256 experts (its code does depend)
        idx = torch.stack([torch.randperm(256)[:top] for _ in range(m)])
        out.append({"case": f"moe pairs experts=256 top={top} m={m}", "config": {},
                    "call": lambda idx=idx: sort_pairs(idx, torch.rand(idx.shape), 256, 16)})
    return out


def gemm_candidate_cases() -> list[dict]:
    """linear_fp8 at V4-Flash's expert_gate_up shape (n 4096, k 4096; 128x128 blocks), once per config of the GEMM
    candidate grid (configs.CANDIDATES), decode and prefill; every one is timed by the tuner ('tuned')."""
    from triton_gpu import ACT, DECODE_TOKENS, FLASH_GEMMS, PREFILL_TOKENS

    from v4c.runtime.quant import quant_fp8
    from v4c.targets.triton.configs import CANDIDATES, candidates
    from v4c.targets.triton.kernels.gemm import linear_fp8
    n, k = FLASH_GEMMS["expert_gate_up"]
    q, s = quant_fp8(torch.randn(n, k) * 0.02, (128, 128))
    out = []
    for bucket, m in (("decode", DECODE_TOKENS[0]), ("prefill", PREFILL_TOKENS)):
        x, tuned = torch.randn(m, k), candidates("linear_fp8", bucket)
        for cfg in CANDIDATES[bucket]["gemm"]:
            out.append({"case": f"linear_fp8 candidate expert_gate_up n={n} k={k} m={m}", "config": cfg,
                        "tuned": cfg in tuned, "call": lambda cfg=cfg, x=x: linear_fp8(x, q, s, block=(128, 128),
                                                                                    act=ACT, config=cfg)})
    return out


def ws_candidate_cases() -> list[dict]:
    """Each warp-specialized FP8 GEMM config the tuner times at prefill (configs.CANDIDATES_WS) in every form of the
    kernel an artifact launches with it: fp32 activations quantized once (expert_gate_up), rms_norm_quant's codes
    (q_b), joined siblings (q_a + kv), the SwiGLU folded in (expert_down), the RMSNorm folded in (q_a + kv) and
    grouped weights (V4-Flash's o_a: 8 groups of 1024 rows over 4096), at 4096 tokens and at 300 (split-K)."""
    from triton_gpu import ACT, FLASH_GEMMS, PREFILL_TOKENS

    from v4c.runtime.quant import quant_fp8
    from v4c.targets.triton.configs import CANDIDATES_WS
    from v4c.targets.triton.kernels.gemm import grouped_linear_fp8, linear_fp8, linear_fp8_cat
    from v4c.targets.triton.kernels.gemm_fused import norm_linear_fp8, swiglu_linear_fp8

    def fp8(n, k):
        return quant_fp8(torch.randn(n, k) * 0.02, (128, 128))
    (n_gu, k_gu), (n_d, k_d), (n_b, k_b) = FLASH_GEMMS["expert_gate_up"], FLASH_GEMMS["expert_down"], FLASH_GEMMS["q_b"]
    (n_a, k_a), (n_kv, _) = FLASH_GEMMS["q_a"], FLASH_GEMMS["kv"]
    gu, down, q_b, q_akv, o_a = fp8(n_gu, k_gu), fp8(n_d, k_d), fp8(n_b, k_b), fp8(n_a + n_kv, k_a), fp8(8 * 1024, 4096)
    kw = dict(block=(128, 128), act=ACT)
    out = []
    for m in (PREFILL_TOKENS, 300):
        codes_b = torch.randn(m, k_b).to(torch.float8_e4m3fn), torch.rand(m, k_b // ACT["group"]) + 0.5
        forms = {
            f"linear_fp8 expert_gate_up n={n_gu} k={k_gu}": lambda c, m=m: linear_fp8(torch.randn(m, k_gu), *gu, **kw,
                                                                                      config=c),
            f"linear_fp8 q_b (e4m3 codes) n={n_b} k={k_b}": lambda c, x=codes_b: linear_fp8(x[0], *q_b, x[1], **kw,
                                                                                            config=c),
            f"linear_fp8_cat q_a+kv n={n_a}+{n_kv} k={k_a}": lambda c, m=m: linear_fp8_cat(
                torch.randn(m, k_a), *q_akv, sizes=[n_a, n_kv], **kw, config=c),
            f"swiglu_linear_fp8 expert_down n={n_d} k={k_d}": lambda c, m=m: swiglu_linear_fp8(
                torch.randn(m, k_d), torch.randn(m, k_d), *down, limit=10.0, **kw, config=c),
            f"norm_linear_fp8 q_a+kv n={n_a}+{n_kv} k={k_a}": lambda c, m=m: norm_linear_fp8(
                torch.randn(m, k_a), torch.ones(k_a), *q_akv, eps=1e-6, sizes=[n_a, n_kv], **kw, config=c),
            "grouped_linear_fp8 o_a groups=8 r=1024 k=4096": lambda c, m=m: grouped_linear_fp8(
                torch.randn(m, 8, 4096), *o_a, groups=8, **kw, config=c),
        }
        for what, call in forms.items():
            for cfg in CANDIDATES_WS:
                out.append({"case": f"{what} m={m}", "config": cfg, "tuned": True,
                            "call": lambda cfg=cfg, call=call: call(cfg)})
    return out


def moe_candidate_cases(fmt: str) -> list[dict]:
    """moe_experts_q with `fmt` experts ("fp8" or "fp4") at V4-Flash's expert shapes, once per config of the expert
    candidate grid (configs.CANDIDATES, decode and prefill), each case saying whether the tuner times that config
    for this format (configs.candidates)."""
    from triton_gpu import ACT, DECODE_TOKENS, FLASH_GEMMS, PREFILL_TOKENS

    from v4c.targets.triton.configs import CANDIDATES, candidates
    from v4c.targets.triton.kernels.moe_quant import moe_experts_q
    experts, top = 16, 6
    two_i, d = FLASH_GEMMS["expert_gate_up"]
    inter = two_i // 2
    weights = _expert_weights(fmt, experts)
    blocks = {"block": None, "down_block": None} if fmt == "fp4" else {"block": [128, 128], "down_block": [128, 128]}
    out = []
    for bucket, m in (("decode", DECODE_TOKENS[0]), ("prefill", PREFILL_TOKENS)):
        x, w = torch.randn(m, d), torch.rand(m, top)
        idx = torch.stack([torch.randperm(experts)[:top] for _ in range(m)])
        tuned = candidates("moe_experts_q", bucket, {"format": fmt})
        for cfg in CANDIDATES[bucket]["experts"]:
            out.append({"case": f"moe_experts_q {fmt} candidate d={d} inter={inter} top={top} m={m}", "config": cfg,
                        "tuned": cfg in tuned, "call": lambda cfg=cfg, x=x, w=w, idx=idx: moe_experts_q(
                            x, w, idx, *weights, format=fmt, **blocks, act_in=ACT, act_mid=ACT, config=cfg)})
    return out


def _expert_weights(fmt: str, experts: int) -> list[torch.Tensor]:
    """Zero-code expert weights at V4-Flash's expert shapes, [gate_up, its scales, down, its scales]: FP8 e4m3 with
    128x128 fp32 block scales, or packed FP4 e2m1 with per-32 UE8M0 scales (all 1: nothing runs)."""
    from triton_gpu import FLASH_GEMMS
    two_i, d = FLASH_GEMMS["expert_gate_up"]
    inter = two_i // 2
    if fmt == "fp4":
        return [torch.zeros(experts, two_i, d // 2, dtype=torch.int8), _ue8m0_ones(experts, two_i, d // 32),
                torch.zeros(experts, d, inter // 2, dtype=torch.int8), _ue8m0_ones(experts, d, inter // 32)]
    return [torch.zeros(experts, two_i, d, dtype=torch.uint8).view(torch.float8_e4m3fn),
            torch.ones(experts, two_i // 128, d // 128),
            torch.zeros(experts, d, inter, dtype=torch.uint8).view(torch.float8_e4m3fn),
            torch.ones(experts, d // 128, inter // 128)]


def _ue8m0_ones(*shape) -> torch.Tensor:
    return torch.full(shape, 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
