"""TVM (apache-tvm 0.27) CPU kernels for the row-wise ops of runtime/kernels/basic.py and hyper.py: RMS norm,
add, SwiGLU, RoPE and the hyper-connection ops, with symbolic token counts (bound from the tensors per call).

Hand-written loop nests like gemv.py: the innermost dimension runs in 16-lane fp32 vectors (then one short
vector or scalars); rows run on the calling thread below PAR_MIN_ELEMS elements per call (decode: no parallel
launch, ~0.6 us per call at d = 1024) and over the cores (`T.parallel`, a contiguous range of rows per core)
from there on; hc_pre / hc_head, compute-bound (~2 us per token), go parallel from two chunks of 16 tokens.
A parallel launch measured ~6.5 us on this 2-core machine while another process held a core, and two threads
got ~1.2 cores: no memory-bound row op gained from it up to m = 512, hence the high threshold.
exp and sin / cos are inline polynomials (LLVM would call scalar libm once per lane): cephes expf, and sinf /
cosf after a float64 reduction by pi / 2 (exact enough for any position), each within ~2 ulp.

  rms_norm   f(x [m, d], w [d], y [m, d])   (weight=False: f(x, y))                basic.rms_norm
  add        f(a [n], b [n], y [n])                                                 basic.add
  swiglu     f(gate [n], up [n], y [n])                                             basic.swiglu
  rope       f(x [b, s, heads, d], positions int64 [s], inv_freq [r/2], y [b, s, heads, d])   basic.rope
  hc_pre     f(streams [m, hc, d], fn [(2+hc)*hc, hc*d], base [(2+hc)*hc], scale [3],
               collapsed [m, d], post [m, hc], comb [m, hc, hc])                    hyper.hc_pre
  hc_post    f(out [m, d], streams [m, hc, d], post [m, hc], comb [m, hc, hc], new [m, hc, d])
  hc_head    f(streams [m, hc, d], fn [hc, hc*d], base [hc], scale [1], y [m, d])
  hc_expand  f(x [m, d], y [m, hc, d])

All tensors fp32 (positions int64), contiguous, any alignment; outputs preallocated by the caller.
"""

import math

from tvm import tirx
from tvm.script import tirx as T

from .gemv import VEC, _fast_macros

PAR_MIN_ELEMS = 1 << 18  # rows go over the cores from this many elements per call (see above)
FLAT_CHUNK = 4096  # elements per row of add / swiglu
HC_CHUNK = VEC  # hc_pre / hc_head: tokens per parallel task, one per lane of the gates stage
HC_K_TILE = 1024  # fn columns per tile: a tile of fn and the chunk's activations stay in cache
SWAP_PAIRS = [lane ^ 1 for lane in range(VEC)]  # (x0, x1, x2, x3, ..) -> (x1, x0, x3, x2, ..)
# Shuffle([a, b], ZIP[h]) = (a0, b0, a1, b1, ..) from lane h * VEC / 2 of a and of b
ZIP = [[h * VEC // 2 + lane // 2 + lane % 2 * VEC for lane in range(VEC)] for h in (0, 1)]


# --- scalar / vector expressions ----------------------------------------------------------------
def _let(value, body):
    """body(v), v bound to value (computed once) by a Let expression."""
    v = tirx.Var("v", value.ty)
    return T.Let(body(v), where={v: value})


def _exp(x):
    """e^x for a float32 expr: cephes expf, 2^k p(r) with r = x - k ln 2, x clamped to [-87.3, 88.3]."""
    def poly(k, r):
        p = T.float32(1.9875691500e-4)
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = p * r + T.float32(c)
        return (p * r * r + r + T.float32(1)) * T.reinterpret("float32", T.shift_left(T.Cast("int32", k) + 127, 23))
    return _let(T.max(T.min(x, T.float32(88.3)), T.float32(-87.3)), lambda x: _let(
        T.nearbyint(x * T.float32(1.4426950408889634)), lambda k: _let(
            x - k * T.float32(0.693359375) + k * T.float32(2.12194440e-4), lambda r: poly(k, r))))


def _vec(buf, o):  # the VEC lanes buf[o : o + VEC] as one vector
    return buf[T.Ramp(o, 1, VEC)]


def _sigmoid(x):
    return T.float32(1) / (T.float32(1) + _exp(-x))


def _sin_cos(a, want_cos):
    """sin a or cos a for a float32 expr: k = round(a / (pi/2)), r = a - k pi/2 in float64 (error ~1e-16 |a|),
    the cephes sinf / cosf polynomials on |r| <= pi/4, picked and signed by the quadrant k mod 4."""
    def poly(k, r, z):
        s = ((T.float32(-1.9515295891e-4) * z + T.float32(8.3321608736e-3)) * z - T.float32(1.6666654611e-1)) \
            * z * r + r
        c = ((T.float32(2.443315711809948e-5) * z - T.float32(1.388731625493765e-3)) * z
             + T.float32(4.166664568298827e-2)) * z * z - T.float32(0.5) * z + T.float32(1)
        if want_cos:
            s, c = c, -s  # cos a = sin(a + pi/2)
        q = T.bitwise_and(T.Cast("int32", k), 3)
        return T.Select(q == 0, s, T.Select(q == 1, c, T.Select(q == 2, -s, -c)))
    return _let(T.Cast("float64", a), lambda ad: _let(T.nearbyint(ad * T.float64(2 / math.pi)), lambda k: _let(
        T.Cast("float32", ad - k * T.float64(1.5707963267948966) - k * T.float64(6.123233995736766e-17)),
        lambda r: _let(r * r, lambda z: poly(k, r, z)))))


# --- loop macros --------------------------------------------------------------------------------
@T.macro
def _each(elem, args, n):  # elem(*args, j) for j < n: 16-lane vectors, then one short vector (static n) or scalars
    for c in range(n // VEC):
        for l in T.vectorized(VEC):
            elem(*args, c * VEC + l)
    for l in T.vectorized(n % VEC) if isinstance(n, int) and n % VEC > 0 else T.serial(n % VEC):
        elem(*args, n // VEC * VEC + l)


@T.macro
def _rows(row, args, rows, parallel):  # row(*args, t) for t < rows, over the cores if `parallel`
    if parallel:
        for t in T.parallel(rows):
            row(*args, t)
    else:
        for t in range(rows):
            row(*args, t)


@T.macro
def _hsum(v):  # v[0] = the sum of the lanes of v[0:VEC]
    for l in T.vectorized(8):
        v[l] = v[l] + v[l + 8]
    for l in T.vectorized(4):
        v[l] = v[l] + v[l + 4]
    for l in T.vectorized(2):
        v[l] = v[l] + v[l + 2]
    v[0] = v[0] + v[1]


@T.macro
def _inv_rms(acc, x, t, n, eps):  # acc[0] = 1 / sqrt(mean(x[t, :n]^2) + eps); acc [4 * VEC]: 4 vector chains
    for l in T.vectorized(4 * VEC):
        acc[l] = T.float32(0)
    for c in range(n // VEC):
        for l in T.vectorized(VEC):
            acc[c % 4 * VEC + l] = acc[c % 4 * VEC + l] + x[t, c * VEC + l] * x[t, c * VEC + l]
    for l in range(n % VEC):
        acc[l] = acc[l] + x[t, n // VEC * VEC + l] * x[t, n // VEC * VEC + l]
    for l in T.vectorized(VEC):
        acc[l] = (acc[l] + acc[VEC + l]) + (acc[2 * VEC + l] + acc[3 * VEC + l])
    _hsum(acc)
    acc[0] = T.float32(1) / T.sqrt(acc[0] / T.float32(n) + T.float32(eps))


def _attrs(name):
    return {"global_symbol": name, "tirx.noalias": True}


# --- basic.py ops -------------------------------------------------------------------------------
@_fast_macros
def rms_norm(d, *, eps, weight=True, name):
    """y = x / sqrt(mean(x^2) + eps) [* w] per row. Compiled: f(x [m, d], w [d], y [m, d]); without weight
    f(x [m, d], y [m, d])."""
    @T.macro
    def elem(x, w, y, t, r, j):
        y[t, j] = w[j] * (x[t, j] * r) if weight else x[t, j] * r

    @T.macro
    def row(x, w, y, t):
        acc = T.alloc_buffer((4 * VEC,), "float32")
        _inv_rms(acc, x, t, d, eps)
        _each(elem, (x, w, y, t, acc[0]), d)

    if weight:
        @T.prim_func
        def kernel(x_h: T.handle, w_h: T.handle, y_h: T.handle):
            T.func_attr(_attrs(name))
            m = T.int32()
            x = T.match_buffer(x_h, (m, d), "float32", align=4)
            w = T.match_buffer(w_h, (d,), "float32", align=4)
            y = T.match_buffer(y_h, (m, d), "float32", align=4)
            _rows(row, (x, w, y), m, m * d >= PAR_MIN_ELEMS)
    else:
        @T.prim_func
        def kernel(x_h: T.handle, y_h: T.handle):
            T.func_attr(_attrs(name))
            m = T.int32()
            x = T.match_buffer(x_h, (m, d), "float32", align=4)
            y = T.match_buffer(y_h, (m, d), "float32", align=4)
            _rows(row, (x, x, y), m, m * d >= PAR_MIN_ELEMS)
    return kernel


def _flat_kernel(name, elem):
    """f(a [n], b [n], y [n]): y[j] = elem(a[j], b[j]), as rows of FLAT_CHUNK elements (the last one partial)."""
    @T.macro
    def at(a, b, y, o, j):
        y[o + j] = elem(a[o + j], b[o + j])

    @T.macro
    def row(a, b, y, n, c):
        _each(at, (a, b, y, c * FLAT_CHUNK), T.min(FLAT_CHUNK, n - c * FLAT_CHUNK))

    @T.prim_func
    def kernel(a_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr(_attrs(name))
        n = T.int32()
        a = T.match_buffer(a_h, (n,), "float32", align=4)
        b = T.match_buffer(b_h, (n,), "float32", align=4)
        y = T.match_buffer(y_h, (n,), "float32", align=4)
        _rows(row, (a, b, y, n), (n + FLAT_CHUNK - 1) // FLAT_CHUNK, n >= PAR_MIN_ELEMS)
    return kernel


@_fast_macros
def add(name):
    """y = a + b (any shape, flattened). Compiled: f(a [n], b [n], y [n])."""
    return _flat_kernel(name, lambda a, b: a + b)


@_fast_macros
def swiglu(*, limit=None, name):
    """y = silu(min(gate, limit)) * clamp(up, -limit, limit), no clamps for limit None.
    Compiled: f(gate [n], up [n], y [n])."""
    def elem(g, u):
        if limit is not None:
            g, u = T.min(g, T.float32(limit)), T.max(T.min(u, T.float32(limit)), T.float32(-limit))
        return g / (T.float32(1) + _exp(-g)) * u
    return _flat_kernel(name, elem)


@_fast_macros
def rope(heads, d, rope_dim, *, inverse=False, scale=1.0, name):
    """Interleaved RoPE on the trailing rope_dim channels of each head: pairs (x[2i], x[2i+1]) rotate by
    positions[s] * inv_freq[i] (-angle if `inverse`), cos / sin times `scale`; the other channels are copied.
    Compiled: f(x [b, s, heads, d], positions int64 [s], inv_freq [rope_dim/2], y [b, s, heads, d]);
    a [b, s, d] tensor goes as heads=1."""
    if rope_dim % 2 or not 0 < rope_dim <= d:
        raise ValueError(f"rope_dim={rope_dim} must be even and in (0, d={d}]")
    nope, hd, half, sign = d - rope_dim, heads * d, rope_dim // 2, -1.0 if inverse else 1.0

    @T.macro
    def angle(pos, inv, cs, sn, s, i):  # pair i: cs = cos * scale, sn = +-sin * scale
        cs[i] = _sin_cos(T.Cast("float32", pos[s]) * inv[i], True) * T.float32(scale)
        sn[i] = _sin_cos(T.Cast("float32", pos[s]) * inv[i], False) * T.float32(sign * scale)

    @T.macro
    def copy(x, y, o, j):
        y[o + j] = x[o + j]

    @T.macro
    def row(x, pos, inv, y, seq, r):  # r = b * seq + s: heads * d channels from r * hd
        cs = T.alloc_buffer((half,), "float32")
        sn = T.alloc_buffer((half,), "float32")
        cx = T.alloc_buffer((rope_dim,), "float32")  # per channel: (c0, c0, c1, c1, ..)
        sx = T.alloc_buffer((rope_dim,), "float32")  # (-s0, s0, -s1, s1, ..)
        _each(angle, (pos, inv, cs, sn, r % seq), half)
        for c in range(half // VEC):
            cx[T.Ramp(2 * c * VEC, 1, VEC)] = T.Shuffle([_vec(cs, c * VEC)] * 2, ZIP[0])
            cx[T.Ramp(2 * c * VEC + VEC, 1, VEC)] = T.Shuffle([_vec(cs, c * VEC)] * 2, ZIP[1])
            sx[T.Ramp(2 * c * VEC, 1, VEC)] = T.Shuffle([-_vec(sn, c * VEC), _vec(sn, c * VEC)], ZIP[0])
            sx[T.Ramp(2 * c * VEC + VEC, 1, VEC)] = T.Shuffle([-_vec(sn, c * VEC), _vec(sn, c * VEC)], ZIP[1])
        for j in range(half // VEC * 2 * VEC, rope_dim):
            cx[j] = cs[j // 2]
            sx[j] = T.Select(j % 2 == 0, -sn[j // 2], sn[j // 2])
        for h in range(heads):
            o: T.let[T.int32] = r * hd + h * d + nope  # the rotated channels of head h
            _each(copy, (x, y, o - nope), nope)
            for c in range(rope_dim // VEC):  # y = x * cx + swap_pairs(x) * sx
                v: T.let[T.float32x16] = _vec(x, o + c * VEC)
                y[T.Ramp(o + c * VEC, 1, VEC)] = v * _vec(cx, c * VEC) + T.Shuffle([v], SWAP_PAIRS) * _vec(sx, c * VEC)
            for j in range(rope_dim // VEC * VEC, rope_dim):  # the pairs after the last full vector
                y[o + j] = x[o + j] * cx[j] + x[o + T.bitwise_xor(j, 1)] * sx[j]

    @T.prim_func
    def kernel(x_h: T.handle, p_h: T.handle, f_h: T.handle, y_h: T.handle):
        T.func_attr(_attrs(name))
        b, seq = T.int32(), T.int32()
        x = T.match_buffer(x_h, (b, seq, heads, d), "float32", align=4)
        pos = T.match_buffer(p_h, (seq,), "int64", align=4)
        inv = T.match_buffer(f_h, (half,), "float32", align=4)
        y = T.match_buffer(y_h, (b, seq, heads, d), "float32", align=4)
        xf = T.decl_buffer((b * seq * hd,), "float32", data=x.data)
        yf = T.decl_buffer((b * seq * hd,), "float32", data=y.data)
        _rows(row, (xf, pos, inv, yf, seq), b * seq, b * seq * hd >= PAR_MIN_ELEMS)
    return kernel


# --- hyper.py ops -------------------------------------------------------------------------------
def _dots(nmix, mb, nr):
    """A macro: acc[j, i0 + i] += xs[t0 + i, k0 : k0 + nvec * VEC] * fn[j, same] lane-wise for mb tokens and every
    fn row j, nr rows at a time (the last group repeats row nmix - 1): nr x mb partial sums in registers."""
    @T.macro
    def dots(acc, xs, fn, t0, i0, k0, nvec):
        part = T.alloc_buffer((nr, mb, VEC), "float32")
        for g in range((nmix + nr - 1) // nr):
            for r, i in T.grid(nr, mb):
                for l in T.vectorized(VEC):
                    part[r, i, l] = acc[T.min(g * nr + r, nmix - 1), i0 + i, l]
            for c in range(nvec):
                for r, i in T.grid(nr, mb):
                    for l in T.vectorized(VEC):
                        part[r, i, l] = part[r, i, l] \
                            + xs[t0 + i, k0 + c * VEC + l] * fn[T.min(g * nr + r, nmix - 1), k0 + c * VEC + l]
            for r, i in T.grid(nr, mb):
                for l in T.vectorized(VEC):
                    acc[T.min(g * nr + r, nmix - 1), i0 + i, l] = part[r, i, l]
    return dots


def _hc_chunk(hc, d, nmix, norm_eps, gates):
    """The row macro of hc_pre / hc_head: count <= HC_CHUNK tokens from t0 = c * HC_CHUNK, x = streams[t] flat:
    (A) mix[j, lane] = dot(x, fn[j]), rs[lane] = 1 / rms(x): fn K tiles outer; within a tile 4 tokens x 2 fn
        rows at a time (8 partial sums), then 2 x 4, then 1 x 4;
    (B) gates(*outs, mix, rs, pre, t0, count): vectorized over the tokens (lanes; lanes past count are zeros);
    (C) y[t] = sum_i pre[i, lane] * streams[t, i]."""
    k = hc * d
    dots4, dots2, dots1 = _dots(nmix, 4, 2), _dots(nmix, 2, 4), _dots(nmix, 1, 4)

    def collapse(streams, pre, t, lane, j):
        acc = pre[0, lane] * streams[t, 0, j]
        for i in range(1, hc):
            acc = acc + pre[i, lane] * streams[t, i, j]
        return acc

    @T.macro
    def out(streams, pre, y, t, lane, j):
        y[t, j] = collapse(streams, pre, t, lane, j)

    @T.macro
    def chunk(streams, xs, fn, y, outs, m, c):
        acc = T.alloc_buffer((nmix, HC_CHUNK, VEC), "float32")
        mix = T.alloc_buffer((nmix, VEC), "float32")
        rs = T.alloc_buffer((VEC,), "float32")
        pre = T.alloc_buffer((hc, VEC), "float32")
        one = T.alloc_buffer((4 * VEC,), "float32")
        t0: T.let[T.int32] = c * HC_CHUNK
        count: T.let[T.int32] = T.max(T.min(HC_CHUNK, m - t0), 0)  # (max: bounds for CompactBufferAllocation)
        for j, i, l in T.grid(nmix, count, VEC):
            acc[j, i, l] = T.float32(0)
        for j, l in T.grid(nmix, VEC):
            mix[j, l] = T.float32(0)
        for l in T.vectorized(VEC):
            rs[l] = T.float32(0)
        for i in range(count):
            _inv_rms(one, xs, t0 + i, k, norm_eps)
            rs[i] = one[0]
        for kt in range((k + HC_K_TILE - 1) // HC_K_TILE):  # the full vectors of each K tile
            k0: T.let[T.int32] = kt * HC_K_TILE
            for i in range(count // 4):
                dots4(acc, xs, fn, t0 + 4 * i, 4 * i, k0, T.min(HC_K_TILE, k - k0) // VEC)
            for _once in range(count % 4 // 2):  # a pair left over
                dots2(acc, xs, fn, t0 + count // 4 * 4, count // 4 * 4, k0, T.min(HC_K_TILE, k - k0) // VEC)
            for i in range(count // 2 * 2, count):
                dots1(acc, xs, fn, t0 + i, i, k0, T.min(HC_K_TILE, k - k0) // VEC)
        for j, i, l in T.grid(nmix, count, k % VEC):  # the scalar tail
            acc[j, i, l] = acc[j, i, l] + xs[t0 + i, k // VEC * VEC + l] * fn[j, k // VEC * VEC + l]
        for j, i in T.grid(nmix, count):
            for l in T.vectorized(VEC):
                one[l] = acc[j, i, l]
            _hsum(one)
            mix[j, i] = one[0]
        gates(*outs, mix, rs, pre, t0, count)
        for i in range(count):
            _each(out, (streams, pre, y, t0 + i, i), d)
    return chunk


@_fast_macros
def hc_pre(hc, d, *, iters, eps, norm_eps, name):
    """hyper.hc_pre in one kernel: the rms-normed mixes matvec, pre / post sigmoids, the comb softmax and its
    Sinkhorn iterations (in the reference's order), the collapse. Compiled: f(streams [m, hc, d],
    fn [(2+hc)*hc, hc*d], base [(2+hc)*hc], scale [3], collapsed [m, d], post [m, hc], comb [m, hc, hc])."""
    nmix = (2 + hc) * hc

    def at(rows, a, e):  # element e of row a (rows) or of column a of comb
        return a * hc + e if rows else e * hc + a

    @T.macro
    def normalize(cm, sums, rows):  # each row (rows) or column a of comb /= (its sum + eps)
        for a in range(hc):
            for l in T.vectorized(VEC):
                sums[a, l] = T.float32(0)
            for e in range(hc):
                for l in T.vectorized(VEC):
                    sums[a, l] = sums[a, l] + cm[at(rows, a, e), l]
        for a, e in T.grid(hc, hc):
            for l in T.vectorized(VEC):
                cm[at(rows, a, e), l] = cm[at(rows, a, e), l] / (sums[a, l] + T.float32(eps))

    @T.macro
    def gates(base, scale, post, comb, mix, rs, pre, t0, count):  # lane t: token t0 + t
        cm = T.alloc_buffer((hc * hc, VEC), "float32")
        sums = T.alloc_buffer((max(hc, 2), VEC), "float32")
        for i in range(hc):
            for l in T.vectorized(VEC):
                pre[i, l] = _sigmoid(mix[i, l] * rs[l] * scale[0] + base[i]) + T.float32(eps)
                mix[hc + i, l] = T.float32(2) * _sigmoid(mix[hc + i, l] * rs[l] * scale[1] + base[hc + i])
        for i in range(hc):  # comb row i: softmax (max in sums[0], sum in sums[1]) + eps
            for l in T.vectorized(VEC):
                sums[0, l] = T.float32(-3.0e38)
                sums[1, l] = T.float32(0)
            for j in range(hc):
                for l in T.vectorized(VEC):
                    cm[i * hc + j, l] = mix[2 * hc + i * hc + j, l] * rs[l] * scale[2] + base[2 * hc + i * hc + j]
                    sums[0, l] = T.max(sums[0, l], cm[i * hc + j, l])
            for j in range(hc):
                for l in T.vectorized(VEC):
                    cm[i * hc + j, l] = _exp(cm[i * hc + j, l] - sums[0, l])
                    sums[1, l] = sums[1, l] + cm[i * hc + j, l]
            for j in range(hc):
                for l in T.vectorized(VEC):
                    cm[i * hc + j, l] = cm[i * hc + j, l] / sums[1, l] + T.float32(eps)
        normalize(cm, sums, False)  # Sinkhorn: columns, then (rows, columns) x (iters - 1)
        for _ in range(iters - 1):
            normalize(cm, sums, True)
            normalize(cm, sums, False)
        for t, i in T.grid(count, hc):
            post[t0 + t, i] = mix[hc + i, t]
        for t, i, j in T.grid(count, hc, hc):
            comb[t0 + t, i, j] = cm[i * hc + j, t]

    chunk = _hc_chunk(hc, d, nmix, norm_eps, gates)

    @T.prim_func
    def kernel(s_h: T.handle, fn_h: T.handle, b_h: T.handle, sc_h: T.handle, y_h: T.handle, p_h: T.handle,
               c_h: T.handle):
        T.func_attr(_attrs(name))
        m = T.int32()
        streams = T.match_buffer(s_h, (m, hc, d), "float32", align=4)
        fn = T.match_buffer(fn_h, (nmix, hc * d), "float32", align=4)
        base = T.match_buffer(b_h, (nmix,), "float32", align=4)
        scale = T.match_buffer(sc_h, (3,), "float32", align=4)
        y = T.match_buffer(y_h, (m, d), "float32", align=4)
        post = T.match_buffer(p_h, (m, hc), "float32", align=4)
        comb = T.match_buffer(c_h, (m, hc, hc), "float32", align=4)
        xs = T.decl_buffer((m, hc * d), "float32", data=streams.data)
        _rows(chunk, (streams, xs, fn, y, (base, scale, post, comb), m), (m + HC_CHUNK - 1) // HC_CHUNK, m > HC_CHUNK)
    return kernel


@_fast_macros
def hc_head(hc, d, *, eps, norm_eps, name):
    """hyper.hc_head: y = sum_i (sigmoid(mix_i * scale + base_i) + eps) streams[i], mix = fn rms_norm(streams).
    Compiled: f(streams [m, hc, d], fn [hc, hc*d], base [hc], scale [1], y [m, d])."""
    @T.macro
    def gates(base, scale, mix, rs, pre, t0, count):
        for i in range(hc):
            for l in T.vectorized(VEC):
                pre[i, l] = _sigmoid(mix[i, l] * rs[l] * scale[0] + base[i]) + T.float32(eps)

    chunk = _hc_chunk(hc, d, hc, norm_eps, gates)

    @T.prim_func
    def kernel(s_h: T.handle, fn_h: T.handle, b_h: T.handle, sc_h: T.handle, y_h: T.handle):
        T.func_attr(_attrs(name))
        m = T.int32()
        streams = T.match_buffer(s_h, (m, hc, d), "float32", align=4)
        fn = T.match_buffer(fn_h, (hc, hc * d), "float32", align=4)
        base = T.match_buffer(b_h, (hc,), "float32", align=4)
        scale = T.match_buffer(sc_h, (1,), "float32", align=4)
        y = T.match_buffer(y_h, (m, d), "float32", align=4)
        xs = T.decl_buffer((m, hc * d), "float32", data=streams.data)
        _rows(chunk, (streams, xs, fn, y, (base, scale), m), (m + HC_CHUNK - 1) // HC_CHUNK, m > HC_CHUNK)
    return kernel


@_fast_macros
def hc_post(hc, d, name):
    """new[t, j] = post[t, j] * out[t] + sum_i comb[t, i, j] * streams[t, i] (hyper.hc_post).
    Compiled: f(out [m, d], streams [m, hc, d], post [m, hc], comb [m, hc, hc], new [m, hc, d])."""
    def mixed(streams, comb, t, j, k):
        acc = comb[t, 0, j] * streams[t, 0, k]
        for i in range(1, hc):
            acc = acc + comb[t, i, j] * streams[t, i, k]
        return acc

    @T.macro
    def elem(out, streams, post, comb, new, t, j, k):
        new[t, j, k] = post[t, j] * out[t, k] + mixed(streams, comb, t, j, k)

    @T.macro
    def row(out, streams, post, comb, new, t):
        for j in range(hc):
            _each(elem, (out, streams, post, comb, new, t, j), d)

    @T.prim_func
    def kernel(o_h: T.handle, s_h: T.handle, p_h: T.handle, c_h: T.handle, n_h: T.handle):
        T.func_attr(_attrs(name))
        m = T.int32()
        out = T.match_buffer(o_h, (m, d), "float32", align=4)
        streams = T.match_buffer(s_h, (m, hc, d), "float32", align=4)
        post = T.match_buffer(p_h, (m, hc), "float32", align=4)
        comb = T.match_buffer(c_h, (m, hc, hc), "float32", align=4)
        new = T.match_buffer(n_h, (m, hc, d), "float32", align=4)
        _rows(row, (out, streams, post, comb, new), m, m * hc * d >= PAR_MIN_ELEMS)
    return kernel


@_fast_macros
def hc_expand(hc, d, name):
    """y[t, i] = x[t] for i < hc (hyper.hc_expand). Compiled: f(x [m, d], y [m, hc, d])."""
    @T.macro
    def elem(x, y, t, i, j):
        y[t, i, j] = x[t, j]

    @T.macro
    def row(x, y, t):
        for i in range(hc):
            _each(elem, (x, y, t, i), d)

    @T.prim_func
    def kernel(x_h: T.handle, y_h: T.handle):
        T.func_attr(_attrs(name))
        m = T.int32()
        x = T.match_buffer(x_h, (m, d), "float32", align=4)
        y = T.match_buffer(y_h, (m, hc, d), "float32", align=4)
        _rows(row, (x, y), m, m * hc * d >= PAR_MIN_ELEMS)
    return kernel
