"""TVM CPU kernel for the routed experts of a few tokens (decode): one call for the whole MoE step.

    out[m] = sum_j weights[m, j] * down_e(q_mid(swiglu(gate_up_e(q_in(x[m]))))),  e = idx[m, j]

(moe.run_experts / quantized.moe_experts_q, with q_in / q_mid the fused activation quantization of
`act_in` / `act_mid`). Each (token, slot) pair is its own GEMV against its expert's rows, addressed
through the index at run time, so nothing is gathered and no Python runs per expert. Stages, each a
parallel loop over the cores:
    1. xq[p] = q_in(x[p // topk])                       pairs p = m * topk + j
    2. h[p]  = xq[p] @ gate_up[e]^T                      [P, 2I]   (rows of gemv's row macro)
    3. mid[p] = q_mid(swiglu(h[p, :I], h[p, I:]))        [P, I]
    4. y[p]  = mid[p] @ down[e]^T                        [P, D]
    5. out[m] = sum_j weights[m, j] * y[m * topk + j]
A pair reads its expert's weights once; pairs that share an expert read them again, so this kernel
is for calls with few pairs (at most about one per expert); larger calls group tokens per expert
(runtime/tvm_kernels.py). Differences from the reference: fp32 summation order only.
"""

from tvm.script import tirx as T

from .gemv import VEC, _act_stage, _fast_macros, _normalize_act, _rows_kernel, fp8_format, fp8_scale


def _rows(n, k, fmt):
    """The row macro factory of one projection: fmt ("fp8", block, scale_format) or ("dense", dtype)."""
    if fmt[0] == "fp8":
        _, block, scale_format = fmt
        if n % block[0]:
            raise ValueError(f"expert rows {n} are not a multiple of the weight block {block[0]}: an expert's "
                             "scale rows would not start at a block")
        w_args, decode = fp8_format(n, k, block, scale_format)
        return _rows_kernel("", n, k, 1, 1, w_args, decode, block, fp8_scale(k, block, scale_format), None,
                            row_macros=True), w_args
    dtype = fmt[1]
    w_args = (dtype, None, None)
    return _rows_kernel("", n, k, 1, 1, w_args, lambda wf, i: T.Cast("float32", wf[i]), (n, k), None, None,
                        row_macros=True), w_args


@_fast_macros
def experts_gemv(d, inter, topk, *, gate_up, down, act_in=None, act_mid=None, limit=None, name="experts"):
    """Compiled: f(x f32 [M, D], weights f32 [M, topk], idx int64 [M, topk], gate_up [E, 2I, D] (+ its scales
    [E, 2I/bn, D/bk] for FP8), down [E, D, I] (+ scales), out f32 [M, D]). `gate_up` / `down`: the weight
    format, ("fp8", block, scale_format) with e4m3 weights as uint8 (UE8M0 scales as uint8), or
    ("dense", "float32" | "bfloat16")."""
    if d % VEC or inter % VEC:
        raise ValueError(f"D={d} and I={inter} must be multiples of {VEC}")
    act_in, act_mid = _normalize_act(act_in), _normalize_act(act_mid)
    rows_gu, (gu_dtype, gu_sshape, gu_sdtype) = _rows(2 * inter, d, gate_up)
    rows_dn, (dn_dtype, dn_sshape, dn_sdtype) = _rows(d, inter, down)
    row2_gu, row2_dn = rows_gu(2, inter, 1), rows_dn(2, d // 2, 1)  # two rows N/2 apart per iteration
    scaled = gate_up[0] == "fp8", down[0] == "fp8"
    lim = float(limit) if limit is not None else None

    @T.macro
    def body(x, wts, idx, wgu, sgu, wdn, sdn, out, m, ne):
        p_count: T.let[T.int32] = m * topk
        xf = T.decl_buffer((m * d,), "float32", data=x.data)
        wguf = T.decl_buffer((ne * 2 * inter * d,), gu_dtype, data=wgu.data)
        sguf = T.decl_buffer((ne * gu_sshape[0] * gu_sshape[1],) if scaled[0] else (1,),
                             gu_sdtype if scaled[0] else gu_dtype, data=sgu.data)
        wdnf = T.decl_buffer((ne * d * inter,), dn_dtype, data=wdn.data)
        sdnf = T.decl_buffer((ne * dn_sshape[0] * dn_sshape[1],) if scaled[1] else (1,),
                             dn_sdtype if scaled[1] else dn_dtype, data=sdn.data)
        xq = T.alloc_buffer((p_count * d,), "float32")
        h = T.alloc_buffer((p_count * 2 * inter,), "float32")
        mid = T.alloc_buffer((p_count * inter,), "float32")
        y = T.alloc_buffer((p_count * d,), "float32")
        for p, c in T.grid(p_count, d // VEC):  # 1. each pair's copy of its token, quantized in place
            for l in T.vectorized(VEC):
                xq[p * d + c * VEC + l] = xf[p // topk * d + c * VEC + l]
        if act_in["mode"] != "none":
            _act_stage(p_count, d, act_in)(xq, xq)
        for it in T.parallel(p_count * inter):  # 2. gate_up rows r and r + I of pair p
            e1: T.let[T.int32] = T.Cast("int32", idx[it // inter // topk, it // inter % topk])
            row2_gu(xq, wguf, sguf, h, it % inter, it // inter, e1 * 2 * inter)
        for p, c in T.grid(p_count, inter // VEC):  # 3. swiglu (limit: gate <= limit, |up| <= limit)
            for l in T.vectorized(VEC):
                if lim is None:
                    mid[p * inter + c * VEC + l] = h[p * 2 * inter + c * VEC + l] \
                        / (T.float32(1) + T.exp(-h[p * 2 * inter + c * VEC + l])) \
                        * h[p * 2 * inter + inter + c * VEC + l]
                else:
                    mid[p * inter + c * VEC + l] = T.min(h[p * 2 * inter + c * VEC + l], T.float32(lim)) \
                        / (T.float32(1) + T.exp(-T.min(h[p * 2 * inter + c * VEC + l], T.float32(lim)))) \
                        * T.max(T.min(h[p * 2 * inter + inter + c * VEC + l], T.float32(lim)), T.float32(-lim))
        if act_mid["mode"] != "none":
            _act_stage(p_count, inter, act_mid)(mid, mid)
        for it in T.parallel(p_count * (d // 2)):  # 4. down rows r and r + D/2 of pair p
            e2: T.let[T.int32] = T.Cast("int32", idx[it // (d // 2) // topk, it // (d // 2) % topk])
            row2_dn(mid, wdnf, sdnf, y, it % (d // 2), it // (d // 2), e2 * d)
        for t, c in T.grid(m, d // VEC):  # 5. the weighted sum over the token's slots
            acc = T.alloc_buffer((VEC,), "float32")
            for l in T.vectorized(VEC):
                acc[l] = T.float32(0)
            for j in range(topk):
                for l in T.vectorized(VEC):
                    acc[l] = acc[l] + wts[t, j] * y[(t * topk + j) * d + c * VEC + l]
            for l in T.vectorized(VEC):
                out[t, c * VEC + l] = acc[l]

    gu_s = (gu_sshape[0], gu_sshape[1]) if scaled[0] else (1,)
    dn_s = (dn_sshape[0], dn_sshape[1]) if scaled[1] else (1,)
    if all(scaled):
        @T.prim_func
        def kernel(x_h: T.handle, w_h: T.handle, i_h: T.handle, gu_h: T.handle, sgu_h: T.handle, dn_h: T.handle,
                   sdn_h: T.handle, o_h: T.handle):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            m, ne = T.int32(), T.int32()
            x = T.match_buffer(x_h, (m, d), "float32", align=4)
            wts = T.match_buffer(w_h, (m, topk), "float32", align=4)
            idx = T.match_buffer(i_h, (m, topk), "int64", align=8)
            wgu = T.match_buffer(gu_h, (ne, 2 * inter, d), gu_dtype, align=1)
            sgu = T.match_buffer(sgu_h, (ne, *gu_s), gu_sdtype, align=1)
            wdn = T.match_buffer(dn_h, (ne, d, inter), dn_dtype, align=1)
            sdn = T.match_buffer(sdn_h, (ne, *dn_s), dn_sdtype, align=1)
            out = T.match_buffer(o_h, (m, d), "float32", align=4)
            body(x, wts, idx, wgu, sgu, wdn, sdn, out, m, ne)
    elif not any(scaled):
        @T.prim_func
        def kernel(x_h: T.handle, w_h: T.handle, i_h: T.handle, gu_h: T.handle, dn_h: T.handle, o_h: T.handle):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            m, ne = T.int32(), T.int32()
            x = T.match_buffer(x_h, (m, d), "float32", align=4)
            wts = T.match_buffer(w_h, (m, topk), "float32", align=4)
            idx = T.match_buffer(i_h, (m, topk), "int64", align=8)
            wgu = T.match_buffer(gu_h, (ne, 2 * inter, d), gu_dtype, align=1)
            wdn = T.match_buffer(dn_h, (ne, d, inter), dn_dtype, align=1)
            out = T.match_buffer(o_h, (m, d), "float32", align=4)
            body(x, wts, idx, wgu, wgu, wdn, wdn, out, m, ne)
    else:
        raise ValueError("gate_up and down must both be FP8 or both dense")
    return kernel
