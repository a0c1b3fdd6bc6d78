"""TVM (apache-tvm 0.27) CPU kernels for the selections: the Lightning Indexer's top-k of compressed
entries and the two MoE routers; hand-written loop nests for a multi-core AVX-512 CPU, as gemv.py.

  index_topk  out[b, s, j] = the causal entry t < (pos0 + s + 1) // rate with the j-th best score  attention.index_topk
              sum_h relu(q[h] . k_t) * score_scale * (w[h] * weight_scale); -1 past the causal ones
  route_topk  experts = top-k of score_func(x W^T) + bias; weights = their scores renormalised x scale  moe.route_topk
  route_hash  experts = table[token]; weights as route_topk                                           moe.route_hash

Selection is exactly moe.select_topk's stable descending sort: a score becomes the int64 key
(order-preserving int32 image of the fp32) << 32 | (2^31 - 1 - index): unique, larger for (higher score,
then lower index), -0.0 = +0.0 and NaN first as in torch.sort. Picks are vectorised max scans on two
levels: the max of each 64 keys is kept; a pick takes the best of those, knocks its key out and rescans
its 64 (~25 ns a pick).

index_topk (batch B, queries S, capacity T symbolic; pos0 a scalar argument):
  1. scores, in parallel over (block of 16 queries, batch row, chunk of 128 entries; query blocks taken
     from both ends of the causal triangle alternately): tiles of 16 entries are decoded (f32, bf16,
     fp8_block: e4m3 bytes x the fp32 scale of each 128 channels, stored after them) and transposed
     (16 x 16 blocks, 4 stages of two-source shuffles) to kt[d, 16 entries], shared by the block's
     queries; a query's 16 scores are then per head Di FMAs of q[h, d] (broadcast) x kt[d], 8
     heads at a time (independent chains): FMA-bound;
  2. selection, in parallel over the queries, from the keys phase 1 left in a workspace [B, S, ~n].
Routers (tokens M symbolic): logits by 16-lane dot products, 4 tokens x 2 experts per pass (a lone
token: 8 experts), token blocks in parallel from 8 tokens on; then scores, keys, top-k and weights.
Scores and logits differ from torch's by fp32 summation order only (~1e-6 relative).
"""

from tvm.script import tirx as T

from .gemv import VEC, _fast_macros, cdiv, e4m3_div256, hsum

KEY_DTYPES = {"f32": ("float32", 4), "bf16": ("bfloat16", 2), "fp8_block": ("uint8", 1)}  # (dtype, alignment)
FP8_GROUP = 128  # channels per fp32 scale in an fp8_block row (quant.INDEX_FP8_GROUP)
QUERY_BLOCK = 16  # queries sharing one decoded entry tile
ENTRY_CHUNK = 128  # entries per parallel work item (a multiple of VEC)
HEAD_GROUP = 8  # heads per pass over a tile: independent FMA chains
TOKEN_BLOCK = 4  # router tokens per pass over W
EXPERT_BLOCK = {4: 2, 1: 8}  # experts per pass, by tokens: accumulators in registers, loads per FMA <= 1
CHUNK = 64  # keys per chunk maximum in the selection
NONE_KEY = -(2**63)  # below every real key: knocked out, or not causal
SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
SOFTPLUS_THRESHOLD = 20.0  # F.softplus: x past it is returned as is


# --- expressions ------------------------------------------------------------------------------
def sort_key(score, index):
    """fp32 score, int32 index -> int64 key, larger for (higher score, then lower index)."""
    bits = T.reinterpret("int32", score)
    mag = T.bitwise_and(bits, T.int32(0x7FFFFFFF))
    ordered = T.Select(bits < 0, T.bitwise_xor(bits, T.int32(0x7FFFFFFF)), bits)  # monotone in the float order
    ordered = T.Select(mag == 0, T.int32(0), T.Select(mag > T.int32(0x7F800000), T.int32(0x7FFFFFFF), ordered))
    return T.bitwise_or(T.shift_left(T.Cast("int64", ordered), T.int64(32)),
                        T.Cast("int64", T.int32(0x7FFFFFFF) - index))


def key_index(key):
    return T.int32(0x7FFFFFFF) - T.Cast("int32", T.bitwise_and(key, T.int64(0xFFFFFFFF)))


def fp32_at(bytes_, i):
    """The fp32 stored little-endian in bytes_[i : i + 4] (uint8; any alignment)."""
    u = [T.shift_left(T.Cast("uint32", bytes_[i + j]), T.uint32(8 * j)) for j in range(4)]
    return T.reinterpret("float32", T.bitwise_or(T.bitwise_or(u[0], u[1]), T.bitwise_or(u[2], u[3])))


def zigzag(i, n):
    """0, n-1, 1, n-2, ...: contiguous ranges of i get work from both ends of a causal triangle."""
    return T.Select(i % 2 == 0, i // 2, n - 1 - i // 2)


def transpose16(src, tmp, dst, dst_off):
    """dst[dst_off + c * 16 + r] = row r lane c of src (r, c < 16; src, tmp: pairs of [8 rows * 16] buffers,
    under TVM's 1 KB stack limit; src is clobbered): 4 stages of two-source shuffles, each swapping the
    off-diagonal b x b blocks of the 2b x 2b blocks (b = 8, 4, 2, 1). Emits the statements."""
    def at(pair, i):
        return (pair[i // 8], i % 8 * VEC) if isinstance(pair, tuple) else (pair, dst_off + i * VEC)

    for b, (a, z) in zip((8, 4, 2, 1), ((src, tmp), (tmp, src), (src, tmp), (tmp, dst))):
        for i in (i for i in range(VEC) if not i & b):
            (ab, ai), (aj_b, aj) = at(a, i), at(a, i + b)
            vi, vj = ab[T.ramp(ai, 1, VEC)], aj_b[T.ramp(aj, 1, VEC)]
            lo = [lane if not lane & b else VEC + lane - b for lane in range(VEC)]
            hi = [lane + b if not lane & b else VEC + lane for lane in range(VEC)]
            (zb, zi), (zj_b, zj) = at(z, i), at(z, i + b)
            T.buffer_store(zb, T.Shuffle([vi, vj], lo), [T.ramp(zi, 1, VEC)])
            T.buffer_store(zj_b, T.Shuffle([vi, vj], hi), [T.ramp(zj, 1, VEC)])


@T.macro
def lane_max(best, src, base, nvec):  # best[0] = max of src[base : base + nvec * VEC] (int64)
    for lane in T.vectorized(VEC):
        best[lane] = T.int64(NONE_KEY)
    for c in range(nvec):
        for lane in T.vectorized(VEC):
            best[lane] = T.max(best[lane], src[base + c * VEC + lane])
    for lane in T.vectorized(8):
        best[lane] = T.max(best[lane], best[lane + 8])
    for lane in T.vectorized(4):
        best[lane] = T.max(best[lane], best[lane + 4])
    for lane in T.vectorized(2):
        best[lane] = T.max(best[lane], best[lane + 2])
    best[0] = T.max(best[0], best[1])


@T.macro
def pick_topk(keys, base, count, k, out, obase, cmax, cbase):
    """out[obase + j] = the index of the j-th largest of keys[base : base + count] for j < min(k, count),
    -1 after. Two levels: the max of each CHUNK keys is kept in cmax[cbase:] (scratch, cdiv(cdiv(count,
    CHUNK), VEC) * VEC); a pick scans those, knocks its key out and rescans its chunk. Clobbers
    keys[base : base + cdiv(count, CHUNK) * CHUNK]."""
    best = T.alloc_buffer((VEC,), "int64")
    nch: T.let[T.int32] = (count + CHUNK - 1) // CHUNK
    for i in range(count, nch * CHUNK):
        keys[base + i] = T.int64(NONE_KEY)
    for c in range((nch + VEC - 1) // VEC * VEC):
        cmax[cbase + c] = T.int64(NONE_KEY)
    for c in range(nch):
        lane_max(best, keys, base + c * CHUNK, CHUNK // VEC)
        cmax[cbase + c] = best[0]
    for j in range(T.min(k, count)):
        lane_max(best, cmax, cbase, (nch + VEC - 1) // VEC)
        t: T.let[T.int32] = key_index(best[0])
        out[obase + j] = T.Cast("int64", t)
        keys[base + t] = T.int64(NONE_KEY)
        lane_max(best, keys, base + t // CHUNK * CHUNK, CHUNK // VEC)
        cmax[cbase + t // CHUNK] = best[0]
    for j in range(T.min(k, count), k):
        out[obase + j] = T.int64(-1)


# --- index_topk -------------------------------------------------------------------------------
def _decode_tile(dim, width, key_format):
    """A macro: kt[d * VEC + i] = channel d < dim of entry row (row0 + min(i, rows - 1)) in fp32. Rows are
    flat (b * T + t); an fp8_block row is dim bytes, then fp32 scales."""
    nfull = dim // VEC

    def value(kf, row, d):
        if key_format == "fp8_block":
            return e4m3_div256(kf[row * width + d]) * (fp32_at(kf, row * width + dim + d // FP8_GROUP * 4)
                                                       * T.float32(256.0))
        return T.Cast("float32", kf[row * width + d])

    @T.macro
    def decode(kf, row0, rows, kt):
        r0 = T.alloc_buffer((8 * VEC,), "float32")  # rows 0-7 and 8-15 of a 16 x 16 block
        r1 = T.alloc_buffer((8 * VEC,), "float32")
        t0 = T.alloc_buffer((8 * VEC,), "float32")
        t1 = T.alloc_buffer((8 * VEC,), "float32")
        for c in range(nfull):
            for i in T.unroll(8):
                for lane in T.vectorized(VEC):
                    r0[i * VEC + lane] = value(kf, row0 + T.min(i, rows - 1), c * VEC + lane)
                    r1[i * VEC + lane] = value(kf, row0 + T.min(i + 8, rows - 1), c * VEC + lane)
            transpose16((r0, r1), (t0, t1), kt, c * VEC * VEC)
        for d in range(nfull * VEC, dim):  # the last dim % 16 channels: gathered, not transposed
            for i in T.vectorized(VEC):
                kt[d * VEC + i] = value(kf, row0 + T.min(i, rows - 1), d)
    return decode


def _score_tile(heads, dim, score_scale, weight_scale):
    """A macro: keys[soff + t0 + i] = sort_key(score of entry t0 + i), NONE_KEY for t0 + i >= lim (i < VEC),
    for the query whose q starts at qf[qoff] and head weights at wf[woff]."""
    ss, ws = T.float32(score_scale), T.float32(weight_scale)

    @T.macro
    def head_group(qf, wf, kt, qoff, woff, h0, nh, acc):  # acc[i] += sum_{h0 <= h < h0 + nh} w_h relu(q_h . k_i)
        dot = T.alloc_buffer((nh, VEC), "float32")
        for h in T.unroll(nh):
            for lane in T.vectorized(VEC):
                dot[h, lane] = T.float32(0)
        for d in range(dim):
            for h in T.unroll(nh):
                for lane in T.vectorized(VEC):
                    dot[h, lane] = dot[h, lane] + qf[qoff + (h0 + h) * dim + d] * kt[d * VEC + lane]
        for h in T.unroll(nh):
            for lane in T.vectorized(VEC):  # relu keeps NaN, as torch.relu
                acc[lane] = acc[lane] + T.Select(dot[h, lane] < T.float32(0), T.float32(0), dot[h, lane]) * ss \
                    * (wf[woff + h0 + h] * ws)

    @T.macro
    def score(qf, wf, kt, qoff, woff, t0, lim, keys, soff):
        acc = T.alloc_buffer((VEC,), "float32")
        for lane in T.vectorized(VEC):
            acc[lane] = T.float32(0)
        for g in range(heads // HEAD_GROUP):
            head_group(qf, wf, kt, qoff, woff, g * HEAD_GROUP, HEAD_GROUP, acc)
        if heads % HEAD_GROUP > 0:
            head_group(qf, wf, kt, qoff, woff, heads // HEAD_GROUP * HEAD_GROUP, heads % HEAD_GROUP, acc)
        for lane in T.vectorized(VEC):
            keys[soff + t0 + lane] = T.Select(t0 + lane < lim, sort_key(acc[lane], t0 + lane), T.int64(NONE_KEY))
    return score


@_fast_macros
def index_topk(heads, dim, topk, rate, *, key_format="fp8_block", score_scale=1.0, weight_scale=1.0, name=None):
    """Lightning Indexer selection (attention.index_topk). Compiled: f(q f32 [B, S, H, Di], weights f32
    [B, S, H], keys [B, T, W] (f32 / bf16 [.., Di]; fp8_block: uint8 [.., Di + 4 cdiv(Di, 128)]), pos0 int,
    out int64 [B, S, topk]); B, S, T any; raises unless (pos0 + S) // rate <= T."""
    if key_format not in KEY_DTYPES:
        raise ValueError(f"key_format {key_format!r}; allowed: {', '.join(KEY_DTYPES)}")
    kdtype, kalign = KEY_DTYPES[key_format]
    width = dim + 4 * cdiv(dim, FP8_GROUP) if key_format == "fp8_block" else dim
    decode, score = _decode_tile(dim, width, key_format), _score_tile(heads, dim, score_scale, weight_scale)
    kt_size = cdiv(dim, VEC) * VEC * VEC

    @T.macro
    def select_row(keys, of, row, ns, pos0, row_size, n64):  # row = b * S + s
        pick_topk(keys, row * row_size, (pos0 + row % ns + 1) // rate, topk, of, row * topk, keys, row * row_size + n64)

    @T.prim_func
    def kernel(q_h: T.handle, w_h: T.handle, k_h: T.handle, pos0: T.int32, o_h: T.handle):
        T.func_attr({"global_symbol": name or f"index_topk_{key_format}_h{heads}_d{dim}_k{topk}_r{rate}",
                     "tir.noalias": True})
        nb, ns, cap = T.int32(), T.int32(), T.int32()
        q = T.match_buffer(q_h, (nb, ns, heads, dim), "float32", align=4)
        w = T.match_buffer(w_h, (nb, ns, heads), "float32", align=4)
        k = T.match_buffer(k_h, (nb, cap, width), kdtype, align=kalign)
        o = T.match_buffer(o_h, (nb, ns, topk), "int64", align=8)
        assert pos0 >= 0, "index_topk: pos0 must be >= 0"
        assert (pos0 + ns) // rate <= cap, "index_topk: keys capacity T < (pos0 + S) // rate entries"
        qf = T.decl_buffer((nb * ns * heads * dim,), "float32", data=q.data)
        wf = T.decl_buffer((nb * ns * heads,), "float32", data=w.data)
        kf = T.decl_buffer((nb * cap * width,), kdtype, data=k.data)
        of = T.decl_buffer((nb * ns * topk,), "int64", data=o.data)
        n: T.let[T.int32] = (pos0 + ns) // rate
        n64: T.let[T.int32] = (n + CHUNK - 1) // CHUNK * CHUNK
        row_size: T.let[T.int32] = n64 + (n64 // CHUNK + VEC - 1) // VEC * VEC  # keys, then chunk maxima
        nq: T.let[T.int32] = (ns + QUERY_BLOCK - 1) // QUERY_BLOCK
        nc: T.let[T.int32] = (n + ENTRY_CHUNK - 1) // ENTRY_CHUNK
        keys = T.alloc_buffer((T.max(nb * ns * row_size, 1),), "int64")  # [B, S, row_size] sort keys
        for item in T.parallel(nb * nq * nc):  # (query block, batch row, entry chunk)
            kt = T.alloc_buffer((kt_size,), "float32")  # [cdiv(Di, 16) * 16 channels, 16 entries]
            b: T.let[T.int32] = item // nc % nb
            s0: T.let[T.int32] = zigzag(item // nc // nb, nq) * QUERY_BLOCK
            s1: T.let[T.int32] = T.min(s0 + QUERY_BLOCK, ns)
            t_lo: T.let[T.int32] = item % nc * ENTRY_CHUNK
            t_hi: T.let[T.int32] = T.min(t_lo + ENTRY_CHUNK, (pos0 + s1) // rate)  # the block's last limit
            for tile in range((T.max(t_hi - t_lo, 0) + VEC - 1) // VEC):
                decode(kf, b * cap + t_lo + tile * VEC, n - t_lo - tile * VEC, kt)
                for s in range(s0, s1):
                    if t_lo + tile * VEC < (pos0 + s + 1) // rate:
                        score(qf, wf, kt, (b * ns + s) * heads * dim, (b * ns + s) * heads, t_lo + tile * VEC,
                              (pos0 + s + 1) // rate, keys, (b * ns + s) * row_size)
        if nb * ns == 1:  # decode: no parallel launch
            select_row(keys, of, 0, ns, pos0, row_size, n64)
        else:
            for i in T.parallel(nb * ns):
                select_row(keys, of, i % nb * ns + zigzag(i // nb, ns), ns, pos0, row_size, n64)

    return kernel


# --- routers ----------------------------------------------------------------------------------
def _router(name, dim, experts, k, score_func, scale, vocab, weight_dtype="float32"):
    """route_topk (vocab None) / route_hash (a table of `vocab` rows): see the public builders."""
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func {score_func!r}; allowed: {', '.join(SCORE_FUNCS)}")
    if not 0 < k <= experts:
        raise ValueError(f"k={k} must be in [1, experts={experts}]")
    e64, nfull, tail = cdiv(experts, CHUNK) * CHUNK, dim // VEC, dim % VEC
    hashed = vocab is not None

    def logits_macro(mb, eb):  # lg[m * E + e] = x[t0 + m] . W[e], eb experts per pass (mb * eb chains)
        @T.macro
        def experts_pass(xf, wf, lg, t0, e0, ne):
            acc = T.alloc_buffer((1, ne, mb, VEC), "float32")
            for r, m, lane in T.grid(ne, mb, VEC):
                acc[0, r, m, lane] = T.float32(0)
            for c in range(nfull):
                for r, m in T.grid(ne, mb):  # (unrolled by LLVM)
                    for lane in T.vectorized(VEC):
                        acc[0, r, m, lane] = acc[0, r, m, lane] + xf[(t0 + m) * dim + c * VEC + lane] \
                            * T.Cast("float32", wf[(e0 + r) * dim + c * VEC + lane])
            for r, m, lane in T.grid(ne, mb, tail):
                acc[0, r, m, lane] = acc[0, r, m, lane] + xf[(t0 + m) * dim + nfull * VEC + lane] \
                    * T.Cast("float32", wf[(e0 + r) * dim + nfull * VEC + lane])
            for r in T.unroll(ne):
                hsum(acc, r, mb, lg, 0, e0 + r, experts)

        @T.macro
        def logits(xf, wf, lg, t0):
            for e in range(experts // eb):
                experts_pass(xf, wf, lg, t0, e * eb, eb)
            for e in range(experts % eb):
                experts_pass(xf, wf, lg, t0, experts // eb * eb + e, 1)
        return logits

    @T.macro
    def scores_of(lg, off, sc):  # sc[e] = score_func(lg[off + e])
        if score_func == "softmax":
            mx = T.alloc_buffer((1,), "float32")
            total = T.alloc_buffer((1,), "float32")
            mx[0] = lg[off]
            total[0] = T.float32(0)
            for e in range(1, experts):
                mx[0] = T.max(mx[0], lg[off + e])
            for e in range(experts):
                sc[e] = T.exp(lg[off + e] - mx[0])
                total[0] = total[0] + sc[e]
            for e in range(experts):
                sc[e] = sc[e] / total[0]
        elif score_func == "sigmoid":
            for e in range(experts):
                sc[e] = T.float32(1) / (T.float32(1) + T.exp(-lg[off + e]))
        else:
            for e in range(experts):
                sc[e] = T.sqrt(T.Select(lg[off + e] > T.float32(SOFTPLUS_THRESHOLD), lg[off + e],
                                        T.log1p(T.exp(lg[off + e]))))

    @T.macro
    def route_token(lg, off, bf, tf, tok, wo, io, t):  # token t's logits at lg[off]
        sc = T.alloc_buffer((experts,), "float32")
        keys = T.alloc_buffer((e64,), "int64")
        cmax = T.alloc_buffer((cdiv(e64 // CHUNK, VEC) * VEC,), "int64")
        total = T.alloc_buffer((1,), "float32")
        scores_of(lg, off, sc)
        if hashed:
            for j in range(k):
                io[t * k + j] = T.Cast("int64", tf[T.Cast("int32", tok[t]) * k + j])
        else:
            for e in range(experts):
                keys[e] = sort_key(sc[e] + bf[e], e)
            pick_topk(keys, 0, experts, k, io, t * k, cmax, 0)
        total[0] = T.float32(0)
        for j in range(k):
            total[0] = total[0] + sc[io[t * k + j]]
        for j in range(k):
            wo[t * k + j] = sc[io[t * k + j]] / (total[0] + T.float32(1e-20)) * T.float32(scale)

    def block_macro(mb):
        logits = logits_macro(mb, EXPERT_BLOCK[mb])

        @T.macro
        def block(xf, wf, bf, tf, tok, wo, io, t0):  # tokens t0 .. t0 + mb - 1
            lg = T.alloc_buffer((mb * experts,), "float32")
            logits(xf, wf, lg, t0)
            for m in range(mb):
                route_token(lg, m * experts, bf, tf, tok, wo, io, t0 + m)
        return block

    block4, block1 = block_macro(TOKEN_BLOCK), block_macro(1)

    @T.macro
    def body(x_h, w_h, wo_h, io_h, bf, table, tok, m):  # (table: the bias for route_topk)
        x = T.match_buffer(x_h, (m, dim), "float32", align=4)
        w = T.match_buffer(w_h, (experts, dim), weight_dtype, align=2)
        wo = T.match_buffer(wo_h, (m, k), "float32", align=4)
        io = T.match_buffer(io_h, (m, k), "int64", align=8)
        tf = T.decl_buffer((vocab * k,), "int32", data=table.data) if hashed else table
        if hashed:
            for t in range(m):
                assert 0 <= tok[t] and tok[t] < T.int64(vocab), "route_hash: token id outside the table"
                for j in range(k):
                    assert 0 <= tf[T.Cast("int32", tok[t]) * k + j] and tf[T.Cast("int32", tok[t]) * k + j] < experts, \
                        "route_hash: table entry outside [0, experts)"
        xf = T.decl_buffer((m * dim,), "float32", data=x.data)
        wf = T.decl_buffer((experts * dim,), weight_dtype, data=w.data)
        wof = T.decl_buffer((m * k,), "float32", data=wo.data)
        iof = T.decl_buffer((m * k,), "int64", data=io.data)
        if m >= 2 * TOKEN_BLOCK:
            for i in T.parallel(m // TOKEN_BLOCK):
                block4(xf, wf, bf, tf, tok, wof, iof, i * TOKEN_BLOCK)
        else:
            for i in range(m // TOKEN_BLOCK):
                block4(xf, wf, bf, tf, tok, wof, iof, i * TOKEN_BLOCK)
        for i in range(m % TOKEN_BLOCK):
            block1(xf, wf, bf, tf, tok, wof, iof, m // TOKEN_BLOCK * TOKEN_BLOCK + i)

    if hashed:
        @T.prim_func
        def kernel(x_h: T.handle, w_h: T.handle, t_h: T.handle, tok_h: T.handle, wo_h: T.handle, io_h: T.handle):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            m = T.int32()
            table = T.match_buffer(t_h, (vocab, k), "int32", align=4)
            tok = T.match_buffer(tok_h, (m,), "int64", align=8)
            body(x_h, w_h, wo_h, io_h, table, table, tok, m)
    else:
        @T.prim_func
        def kernel(x_h: T.handle, w_h: T.handle, b_h: T.handle, wo_h: T.handle, io_h: T.handle):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            m = T.int32()
            bias = T.match_buffer(b_h, (experts,), "float32", align=4)
            body(x_h, w_h, wo_h, io_h, bias, bias, bias, m)
    return kernel


@_fast_macros
def route_topk(dim, experts, k, *, score_func="sqrtsoftplus", scale=1.0, weight_dtype="float32", name=None):
    """Learned router (moe.route_topk). Compiled: f(x f32 [M, D], weight f32 | bf16 [E, D], bias f32 [E],
    weights f32 [M, k], idx int64 [M, k]); M any."""
    return _router(name or f"route_topk_{score_func}_d{dim}_e{experts}_k{k}", dim, experts, k, score_func, scale, None,
                   weight_dtype)


@_fast_macros
def route_hash(dim, experts, k, vocab, *, score_func="sqrtsoftplus", scale=1.0, weight_dtype="float32", name=None):
    """Hash router (moe.route_hash). Compiled: f(x f32 [M, D], weight f32 | bf16 [E, D], table int32 [V, k],
    tokens int64 [M], weights f32 [M, k], idx int64 [M, k]); M any; raises on a token outside [0, V)."""
    return _router(name or f"route_hash_{score_func}_d{dim}_e{experts}_k{k}_v{vocab}", dim, experts, k, score_func,
                   scale, vocab, weight_dtype)
