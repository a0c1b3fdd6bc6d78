"""Kernel fusion: quantize a norm's output once, in the norm, for the FP8 ops that read it (`norm_quant`); a
norm read only by RoPE and that RoPE as one op (`norm_rope`); an add read only by hc_post done in hc_post
(`add_post`); an hc_post and the next block's hc_pre as one op (`post_pre`), and with the norm that quantizes its
collapsed row (`post_pre_quant`); a SwiGLU read only by an FP8 projection as one op (`swiglu_linear`); an
attention read only by a RoPE as one op (`attention_rope`), and with the norms and RoPE of its queries and keys
(`norm_attention`); the indexer's query RoPE in its top-k op (`rope_index`).

    %y = rms_norm(%x, @w) {eps}                      %yq, %ys = rms_norm_quant(%x, @w) {eps, group, scale_format}
    %a = linear_fp8(%y, @A, @A.scale) {act}     ->   %a = linear_fp8(%yq, @A, @A.scale, %ys) {act}
    %b = moe_experts_q(%y, .., @D.scale) {act_in}    %b = moe_experts_q(%yq, .., @D.scale, %ys) {act_in}

The rule takes every `rms_norm` read (as x) by at least one op that quantizes its x with dynamic
activations, `linear_fp8` (`act`) or the routed experts `moe_experts_q` (`act_in`, FP8 or FP4 weights),
when those readers share one activation format (group and scale format). If the norm's output has
other readers too (the router, projections the fp8 skip list keeps unquantized) or is the program's,
the fused op keeps it as a third result (`keep: true`: %yq, %ys, %y), which those readers go on
reading. The numbers do not change: each reader quantized its x with exactly these codes and scales
(quantization is per token and group, so the experts' per-expert row subsets get the same codes);
now the norm writes them (one byte a channel instead of four, and one amax per group instead of one
per GEMM program, or one quantization kernel per prefill GEMM). In V4 with the default skip list
that is every layer's three norms: `q_a_norm` (q_b_proj, and the indexer's in CSA layers),
`input_layernorm` (q_a and kv projections; the compressor's unquantized projections read y) and
`post_attention_layernorm` (the shared expert and the routed experts; the router reads y). The final
norm feeds lm_head, which the default skip list keeps unquantized: unfused.

`norm_rope`:

    %y = rms_norm(%x, @w?) {eps}                     ->   %r = rms_norm_rope(%x, %positions, @inv_freq, @w?)
    %r = rope(%y, %positions, @inv_freq) {inverse?, scale?}        {eps, inverse?, scale?}

for every `rms_norm` whose only reader is a `rope` (as x), and which is not the program's output. Both ops
work row by row over the last dim, so one kernel does both and the normalized row never goes through
memory. In V4 that is every layer's per-head query norm and kv_norm, each before its RoPE: two launches a
layer fewer in a decode step. The numbers do not change: the torch kernel is `rope(rms_norm(x))`, and the
Triton kernel computes each row as the two kernels did (the same row sum and products), bit for bit.

`add_post`:

    %y = add(%a, %b)                                 ->   %n = hc_post(%a, %streams, %post, %comb, %b)
    %n = hc_post(%y, %streams, %post, %comb)

for every `add` of two values of its result's shape whose only reader is an `hc_post`, as the block output.
In V4 that is every MoE layer's sum of the routed and the shared experts: one launch a layer fewer. The
kernel adds the two in fp32 as `add` does (the same bits).

`post_pre`:

    %n = hc_post(%o, %s, %p, %c, %a?)                ->   %n, %x, %p2, %c2 = hc_post_pre(%o, %s, %p, %c, @fn, @base,
    %x, %p2, %c2 = hc_pre(%n, @fn, @base, @scale)                                         @scale, %a?) {hc_pre's}

for every hc_pre whose streams an hc_post makes (its other operands parameters), at the hc_post's place. The new
streams stay a result (the next hc_post reads them as its residual). In V4 that is every block boundary but the
last (whose hc_post feeds hc_head): 2 x layers - 1 launches fewer. The Triton kernel is hc_pre's, computing each
K tile of its input as hc_post does and storing it, so the same bits again.

`post_pre_quant`:

    %n, %x, %p2, %c2 = hc_post_pre(..) {..}          ->   %n, %x, %p2, %c2, %xq, %xs, %y? = hc_post_pre_quant(..
    %xq, %xs, %y? = rms_norm_quant(%x, @w) {q}                 hc_post_pre's operands, @w, %a?) {hc_post_pre's, quant: q}

for every rms_norm_quant (with a weight) of an hc_post_pre's collapsed row, at the hc_post_pre's place. In V4 with
`norm_quant` that is the input norm of every block but the first: two launches a layer fewer. The kernel that
finishes each token's collapse then norms and quantizes the row as the rms_norm_quant kernel does (the same row
code: the same bits). The collapsed row stays a result (the kernel stores it, then reads it back).

`swiglu_linear`:

    %h = swiglu(%g, %u) {limit?}                     ->   %y = swiglu_linear_fp8(%g, %u, @W, @W.scale) {act, block,
    %y = linear_fp8(%h, @W, @W.scale) {act, block}                                                      limit?}

for every `swiglu` whose only reader is a `linear_fp8` (as its float x) and which is not the program's output. In
V4 that is every layer's shared expert (gate and up projections, SwiGLU, down projection): the Triton GEMM
computes the SwiGLU as it loads its activation tiles (kernels/quantize.load_act), so the hidden activation
never goes through memory and its kernel is one launch a layer fewer. The numbers do not change: the tiles
hold the swiglu kernel's fp32 values, bit for bit.

`attention_rope`:

    %o = attention(%q, %kv, @sinks, %sel?) {..} state(..)   ->   %r = attention_rope(%q, %kv, @sinks, %positions,
    %r = rope(%o, %positions, @inv_freq) {inverse?, scale?}          @inv_freq, %sel?) {.., out_rope: {inverse?, scale?}}
                                                                    state(..)

for every `attention` whose only reader is a `rope` (as x) and which is not the program's output, in the rope's
place. In V4 that is every layer's inverse RoPE of the attention output: one launch a layer fewer. The Triton
program that finishes an output row rotates its RoPE channels after a barrier, as the rope kernel does (the same
bits).

`norm_attention`:

    %qn = rms_norm_rope(%q, %positions, @inv_freq) {eps, ..}         ->   %r = norm_attention_rope(%q, %kv, @kv_w,
    %kn = rms_norm_rope(%kv, %positions, @inv_freq, @kv_w) {eps, ..}         @sinks, %positions, @inv_freq, %sel?)
    %r = attention_rope(%qn, %kn, @sinks, %positions, @inv_freq, %sel?)      {.., q_norm: {eps, ..}, kv_norm: {..}}
         {.., out_rope} state(..)                                           state(..)

for every `attention_rope` whose queries come from a weightless `rms_norm_rope` and whose keys from one with a
weight, each read only by it, at the attention_rope's own positions and inv_freq (so it runs after `norm_rope`
and `attention_rope`; with either off it finds nothing). In V4 that is every layer's per-head query norm and
kv_norm: two launches a layer fewer in a decode step. The Triton programs norm and rotate their own query rows,
and in a decode step (up to 4 new tokens, where they encode the new keys themselves) the new keys, with the
rms_norm_rope kernel's row code (the same bits); from 5 new tokens on the launcher runs the rms_norm_rope kernel
on the keys first.

`rope_index`:

    %qr = rope(%q, %positions, @inv_freq) {inverse?, scale?}    ->   %i = rope_index_topk(%q, %w, %positions, @inv_freq)
    %i = index_topk(%qr, %w) {..} state(..)                               {.., q_rope: {inverse?, scale?}} state(..)

for every `rope` whose only reader is an `index_topk` (as q) and which is not the program's output, in the
index_topk's place. In V4 that is every CSA layer's indexer query RoPE: one launch a CSA layer fewer. Each
Triton score program rotates its query's rows with the rope kernel's row code (the same bits) into scratch rows it
reads back after a barrier.

Run it after `fp8` (before it there is no FP8 op to fuse into). The Triton target runs
`rms_norm_quant` as one kernel and the GEMMs read the codes, except where one projection alone reads them: its
lowering folds the norm into that GEMM (targets/triton/norm_gemm.py). The TVM target undoes the rewrite
(`unfuse`, recorded in its kernels.json): its CPU kernels quantize their input in a first stage of
their own, which at decode sizes costs next to nothing against the weight reads, and it has no fused norm and
RoPE, add and hc_post, hc_post and hc_pre, or SwiGLU and GEMM kernels (on a CPU there is no launch to save).
"""

from pydantic import BaseModel, ConfigDict, Field

from v4c.ir import Function, Instr, Module, ParamRef, TensorType, Value
from v4c.ir.ops import OPS


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    norm_quant: bool = Field(True, description="rms_norm + the dynamic FP8 activation quantization of the "
                                               "linear_fp8 / moe_experts_q ops that read it -> one rms_norm_quant")
    norm_rope: bool = Field(True, description="rms_norm read only by a rope -> one rms_norm_rope (V4's per-head "
                                              "query norm and kv_norm, each before its RoPE)")
    add_post: bool = Field(True, description="add read only by hc_post (as the block output) -> hc_post adding it "
                                             "(V4's routed + shared expert sum)")
    post_pre: bool = Field(True, description="hc_post and the hc_pre that reads its streams -> one hc_post_pre "
                                             "(every block boundary but the last)")
    attention_rope: bool = Field(True, description="attention read only by a rope -> one attention_rope (V4's "
                                                   "inverse RoPE of each layer's attention output)")
    post_pre_quant: bool = Field(True, description="hc_post_pre and the rms_norm_quant of its collapsed row -> one "
                                                   "hc_post_pre_quant (every block's input norm but the first)")
    swiglu_linear: bool = Field(True, description="swiglu read only by a linear_fp8 -> one swiglu_linear_fp8 "
                                                  "(V4's shared expert: its SwiGLU computed in the down projection)")
    norm_attention: bool = Field(True, description="the rms_norm_ropes of an attention_rope's queries and keys -> one "
                                                   "norm_attention_rope (V4's query norm and kv_norm with their RoPE)")
    rope_index: bool = Field(True, description="rope read only by an index_topk (as q) -> one rope_index_topk (V4's "
                                               "indexer query RoPE)")


def check_order(options: Options, earlier: list) -> str | None:
    """Why `fuse` listed after `earlier` [(name, options)] would find nothing to fuse, or None."""
    if not options.norm_quant:
        return None
    fp8 = [o for name, o in earlier if name == "fp8"]
    if not fp8:
        return "fuse rewrites the FP8 projections (linear_fp8) that the fp8 pass makes: list it after fp8"
    if fp8[-1].fake_quant or fp8[-1].activations.mode != "dynamic":
        return ("fuse quantizes a norm's output for dynamic FP8 activations, and the fp8 pass before it has "
                f"activations mode {fp8[-1].activations.mode!r}{' with fake_quant' if fp8[-1].fake_quant else ''}: "
                "nothing would fuse; remove fuse or use dynamic activations")
    return None


def readers(body: list[Instr]) -> dict[str, list[tuple[Instr, int]]]:
    """value name -> (instruction, operand index) of each use (also the triton lowering's, norm_gemm.py)."""
    uses: dict[str, list[tuple[Instr, int]]] = {}
    for ins in body:
        for i, o in enumerate(ins.operands):
            if not isinstance(o, ParamRef):
                uses.setdefault(o.name, []).append((ins, i))
    return uses


# op -> (its operand count without x_scale, the attribute holding x's activation quantization)
CODE_READERS = {"linear_fp8": (3, "act"), "moe_experts_q": (7, "act_in")}


def _act_of(ins: Instr) -> dict:
    """The activation quantization `ins` applies to its x."""
    return ins.attrs.get(CODE_READERS[ins.op][1]) or {}


def _fp8_readers(uses: list[tuple[Instr, int]]) -> tuple[list[Instr], dict | None]:
    """The ops that read a value as x and quantize it with dynamic activations (FP8 projections, FP8 / FP4
    routed experts), and the act they share (None if there are none, or they differ)."""
    quantizing = [ins for ins, i in uses if ins.op in CODE_READERS and i == 0
                  and len(ins.operands) == CODE_READERS[ins.op][0] and _act_of(ins).get("mode") == "dynamic"]
    acts = [_act_of(ins) for ins in quantizing]
    return quantizing, acts[0] if acts and all(a == acts[0] for a in acts) else None


def _fresh(names: set[str], base: str) -> str:
    n = 0
    while f"{base}{n}" in names:
        n += 1
    names.add(f"{base}{n}")
    return f"{base}{n}"


def run(m: Module, options: Options, progress=None) -> Module:
    body = list(m.func.body)
    fused = kept = experts = 0
    if options.norm_quant:
        uses = readers(body)
        names = {v.name for v in m.func.inputs} | {r.name for ins in body for r in ins.results}
        replace: dict[int, Instr] = {}  # id(instr) -> its rewrite
        for ins in body:
            if ins.op != "rms_norm":
                continue
            y = ins.results[0]
            quantizing, act = _fp8_readers(uses.get(y.name, []))
            if act is None:
                continue
            # other readers (the router, unquantized projections) or the program's output: keep y too
            keep = len(quantizing) < len(uses[y.name]) or y.name == m.func.output.name
            attrs = {**ins.attrs, "group": act["group"], "scale_format": act.get("scale_format", "fp32"),
                     **({"keep": True} if keep else {})}
            types = [m.params[o.name] if isinstance(o, ParamRef) else o.type for o in ins.operands]
            op = OPS["rms_norm_quant"]
            codes_t, scales_t, *_ = op.infer(types + [None] * (len(op.operands) - len(types)), [], attrs)
            codes, scales = Value(_fresh(names, f"{y.name}.q"), codes_t), Value(_fresh(names, f"{y.name}.s"), scales_t)
            replace[id(ins)] = Instr("rms_norm_quant", list(ins.operands), [codes, scales, *([y] if keep else [])],
                                     attrs)
            for reader in quantizing:
                replace[id(reader)] = Instr(reader.op, [codes, *reader.operands[1:], scales], reader.results,
                                            dict(reader.attrs), list(reader.state))
            fused += 1
            kept += keep
            experts += sum(r.op == "moe_experts_q" for r in quantizing)
        body = [replace.get(id(ins), ins) for ins in body]
    roped = added = 0
    if options.norm_rope:
        body, roped = _fold_into_reader(body, m.func.output.name, "rms_norm", "rope", _norm_rope)
    roped_out = 0
    if options.attention_rope:
        body, roped_out = _fold_into_reader(body, m.func.output.name, "attention", "rope", _attention_rope)
    if options.add_post:
        body, added = _fold_into_reader(body, m.func.output.name, "add", "hc_post", _add_post)
    joined = quantized = 0
    if options.post_pre:  # (hc_pre's operands but the streams are parameters)
        body, joined = _fold_into_producer(body, "hc_post", 0, "hc_pre", _post_pre)
    if options.post_pre_quant:  # the collapsed row (result 1), normed with a weight (a parameter)
        body, quantized = _fold_into_producer(body, "hc_post_pre", 1, "rms_norm_quant", _post_pre_quant)
    swiglus = normed = 0
    if options.swiglu_linear:
        body, swiglus = _fold_into_reader(body, m.func.output.name, "swiglu", "linear_fp8", _swiglu_linear)
    if options.norm_attention:
        body, normed = _fold_norms_into_attention(body, m.func.output.name)
    indexed = 0
    if options.rope_index:
        body, indexed = _fold_into_reader(body, m.func.output.name, "rope", "index_topk", _rope_index)
    out = m.replace(func=Function(m.func.inputs, body, m.func.output))
    out.counters["fuse"] = {"norm_quant": fused, "norm_quant_keeping_y": kept, "experts_reading_codes": experts,
                            "norm_rope": roped, "attention_rope": roped_out, "add_post": added, "post_pre": joined,
                            "post_pre_quant": quantized, "swiglu_linear": swiglus, "norm_attention": normed,
                            "rope_index": indexed}
    return out


def _fold_into_producer(body: list[Instr], producer: str, result: int, reader: str, fold) -> tuple[list[Instr], int]:
    """Each `reader` instruction whose operand 0 is result `result` of a `producer` instruction, and whose other
    operands are parameters -> fold(producer, reader) in the producer's place (None: left alone), the reader dropped
    (at most one reader a producer; the producer's results stay results, as other ops may read them).
    -> (body, folded)."""
    made = {ins.results[result].name: ins for ins in body if ins.op == producer}
    dropped, folded = set(), {}
    for ins in body:
        x = ins.operands[0] if ins.op == reader else None
        source = made.get(x.name) if isinstance(x, Value) else None
        if source is not None and id(source) not in folded and all(isinstance(o, ParamRef) for o in ins.operands[1:]):
            new = fold(source, ins)
            if new is not None:
                dropped.add(id(ins))
                folded[id(source)] = new
    return [folded.get(id(ins), ins) for ins in body if id(ins) not in dropped], len(folded)


def _post_pre(post: Instr, pre: Instr) -> Instr:
    """hc_post_pre: the hc_post's operands (its addend last) with the hc_pre's parameters, both ops' results (the
    new streams stay a result: the next hc_post reads them too), the hc_pre's attributes."""
    return Instr("hc_post_pre", [*post.operands[:4], *pre.operands[1:], *post.operands[4:]],
                 [*post.results, *pre.results], dict(pre.attrs))


def _post_pre_quant(mix: Instr, norm: Instr) -> Instr | None:
    """hc_post_pre_quant: the hc_post_pre's operands with the norm weight before the addend, both ops' results, the
    hc_post_pre's attributes and the norm's as `quant`; a norm without a weight is left alone."""
    if len(norm.operands) != 2:
        return None
    return Instr("hc_post_pre_quant", [*mix.operands[:7], norm.operands[1], *mix.operands[7:]],
                 [*mix.results, *norm.results], {**mix.attrs, "quant": dict(norm.attrs)})


def _fold_into_reader(body: list[Instr], output: str, producer: str, reader: str, fold) -> tuple[list[Instr], int]:
    """Each `producer` instruction whose result only one `reader` instruction reads, as its operand 0, and is not
    the program's output -> fold(producer, reader) in the reader's place (None: left alone). -> (body, folded)."""
    uses = readers(body)
    made = {ins.results[0].name: ins for ins in body if ins.op == producer}
    dropped, folded = set(), {}
    for ins in body:
        x = ins.operands[0] if ins.op == reader else None
        if isinstance(x, Value) and x.name in made and len(uses[x.name]) == 1 and x.name != output:
            new = fold(made[x.name], ins)
            if new is not None:
                dropped.add(id(made[x.name]))
                folded[id(ins)] = new
    return [folded.get(id(ins), ins) for ins in body if id(ins) not in dropped], len(folded)


def _norm_rope(norm: Instr, rope: Instr) -> Instr:
    """rms_norm_rope(x, positions, inv_freq, weight?) {rope's attributes, the norm's eps}."""
    return Instr("rms_norm_rope", [norm.operands[0], *rope.operands[1:], *norm.operands[1:]], rope.results,
                 {**rope.attrs, "eps": norm.attrs["eps"]})


def _attention_rope(attention: Instr, rope: Instr) -> Instr:
    """attention_rope(q, kv, sinks, positions, inv_freq, selected?) {attention's attributes, out_rope: the rope's},
    with the attention's state."""
    q, kv, sinks, *selected = attention.operands
    return Instr("attention_rope", [q, kv, sinks, *rope.operands[1:], *selected], rope.results,
                 {**attention.attrs, "out_rope": dict(rope.attrs)}, list(attention.state))


def _fold_norms_into_attention(body: list[Instr], output: str) -> tuple[list[Instr], int]:
    """Each attention_rope whose q is a weightless rms_norm_rope's and kv a weighted one's, each read only by it
    and not the program's output, both at the attention_rope's positions and inv_freq -> one norm_attention_rope
    in its place, the norms dropped. -> (body, norms folded: two an attention, one op each as the other rules)."""
    uses = readers(body)
    made = {ins.results[0].name: ins for ins in body if ins.op == "rms_norm_rope"}

    def norm(v: Value, operands: int, rope_at: list[str]) -> Instr | None:
        ins = made.get(v.name) if isinstance(v, Value) else None
        ok = (ins is not None and len(uses[v.name]) == 1 and v.name != output and len(ins.operands) == operands
              and [o.name for o in ins.operands[1:3]] == rope_at)
        return ins if ok else None
    dropped, folded = set(), {}
    for ins in body:
        if ins.op != "attention_rope":
            continue
        q, kv, sinks, positions, inv_freq, *selected = ins.operands
        rope_at = [positions.name, inv_freq.name]
        qn, kn = norm(q, 3, rope_at), norm(kv, 4, rope_at)
        if qn is not None and kn is not None:
            dropped |= {id(qn), id(kn)}
            folded[id(ins)] = Instr("norm_attention_rope", [qn.operands[0], kn.operands[0], kn.operands[3], sinks,
                                                            positions, inv_freq, *selected], ins.results,
                                    {**ins.attrs, "q_norm": dict(qn.attrs), "kv_norm": dict(kn.attrs)},
                                    list(ins.state))
    return [folded.get(id(ins), ins) for ins in body if id(ins) not in dropped], len(dropped)


def _rope_index(rope: Instr, index: Instr) -> Instr:
    """rope_index_topk(q, weights, positions, inv_freq) {index_topk's attributes, q_rope: the rope's}, with the
    index_topk's state."""
    return Instr("rope_index_topk", [rope.operands[0], index.operands[1], *rope.operands[1:]], index.results,
                 {**index.attrs, "q_rope": dict(rope.attrs)}, list(index.state))


def _add_post(add: Instr, post: Instr) -> Instr | None:
    """hc_post(a, streams, post, comb, b) for a = add(a, b) of two values of the block output's shape (no
    broadcast), into an hc_post without an addend yet."""
    a, b = add.operands
    same = all(isinstance(v, Value) and v.type.shape == add.results[0].type.shape for v in (a, b))
    return Instr("hc_post", [a, *post.operands[1:], b], post.results, dict(post.attrs)) \
        if same and len(post.operands) == 4 else None


def _swiglu_linear(act: Instr, linear: Instr) -> Instr | None:
    """swiglu_linear_fp8(gate, up, @W, @W.scale) {the projection's attributes, the SwiGLU's limit} for a linear_fp8
    of a float x (not codes with their scales)."""
    if len(linear.operands) != 3:
        return None
    return Instr("swiglu_linear_fp8", [*act.operands, *linear.operands[1:]], linear.results,
                 {**linear.attrs, **act.attrs})


def unfuse(m: Module) -> tuple[Module, int]:
    """The inverse rewrite, for a target whose FP8 kernels quantize their input in a first stage of their own and
    take no codes (TVM: at decode sizes that stage costs next to nothing against the weight reads): every
    rms_norm_quant back to rms_norm, its readers back to reading the norm's output; every rms_norm_rope back to
    rms_norm then rope, every hc_post_pre back to hc_post then hc_pre, every hc_post with an addend back to add
    then hc_post, every hc_post_pre_quant back to hc_post_pre then rms_norm_quant (and on), every swiglu_linear_fp8
    back to swiglu then linear_fp8, every attention_rope back to attention then rope, every norm_attention_rope back
    to its two rms_norm_ropes (and on) then attention_rope (and on), every rope_index_topk back to rope then
    index_topk. -> (module, ops unfused)."""
    names = {v.name for v in m.func.inputs} | {r.name for ins in m.func.body for r in ins.results}
    body, norm_of, undone = [], {}, 0  # codes name -> the norm's output; the other rules undone
    for fused in m.func.body:
        plain = _split(fused, names)
        undone += len(plain) - 1  # (an hc_post_pre with an addend undoes two rules, hc_post_pre_quant one more)
        runs = HOISTED.get(fused.op, ())  # the input ops folded in, back right after what they read (their place)
        for lo, hi in runs:
            _insert_after_producers(body, plain[lo:hi])
        plain = plain[runs[-1][1]:] if runs else plain
        for ins in plain:
            if ins.op == "rms_norm_quant":
                codes, scales, *kept = ins.results
                y = kept[0] if kept else Value(_fresh(names, f"{codes.name}.y"), TensorType(codes.type.shape, "f32"))
                norm_of[codes.name] = (y, scales.name)
                body.append(Instr("rms_norm", list(ins.operands), [y], {"eps": ins.attrs["eps"]}))
                continue
            x = ins.operands[0] if ins.operands else None
            if isinstance(x, Value) and x.name in norm_of:
                y, scales = norm_of[x.name]
                assert ins.operands[-1].name == scales, f"{ins.op} reads codes {x.name} without their scales"
                ins = Instr(ins.op, [y, *ins.operands[1:-1]], ins.results, dict(ins.attrs), list(ins.state))
            body.append(ins)
    return m.replace(func=Function(m.func.inputs, body, m.func.output)), len(norm_of) + undone


# fused op -> the runs of its split (_split) that were ops on its inputs: the query norm and its rope, the key norm
# and its rope; the indexer query's rope
HOISTED = {"norm_attention_rope": ((0, 2), (2, 4)), "rope_index_topk": ((0, 1),)}


def _insert_after_producers(body: list[Instr], ops: list[Instr]) -> None:
    """`ops` into body right after the last instruction making a value they read (at the start if none does)."""
    reads = {o.name for ins in ops for o in ins.operands if isinstance(o, Value)}
    at = max((i + 1 for i, ins in enumerate(body) if any(r.name in reads for r in ins.results)), default=0)
    body[at:at] = ops


def _split(ins: Instr, names: set[str]) -> list[Instr]:
    """rms_norm_rope, hc_post_pre(_quant), hc_post with an addend and swiglu_linear_fp8 as the plain ops they fused;
    any other op as is (rms_norm_quant: unfuse's)."""
    if ins.op == "rope_index_topk":
        q, weights, positions, inv_freq = ins.operands
        attrs = dict(ins.attrs)
        qr = Value(_fresh(names, f"{ins.results[0].name}.q"), TensorType(q.type.shape, "f32"))
        return [Instr("rope", [q, positions, inv_freq], [qr], attrs.pop("q_rope")),
                Instr("index_topk", [qr, weights], ins.results, attrs, list(ins.state))]
    if ins.op == "norm_attention_rope":
        q, kv, kv_weight, sinks, positions, inv_freq, *selected = ins.operands
        attrs = dict(ins.attrs)
        q_norm, kv_norm = attrs.pop("q_norm"), attrs.pop("kv_norm")
        qn = Value(_fresh(names, f"{ins.results[0].name}.q"), TensorType(q.type.shape, "f32"))
        kn = Value(_fresh(names, f"{ins.results[0].name}.kv"), TensorType(kv.type.shape, "f32"))
        return [*_split(Instr("rms_norm_rope", [q, positions, inv_freq], [qn], q_norm), names),
                *_split(Instr("rms_norm_rope", [kv, positions, inv_freq, kv_weight], [kn], kv_norm), names),
                *_split(Instr("attention_rope", [qn, kn, sinks, positions, inv_freq, *selected], ins.results, attrs,
                              list(ins.state)), names)]
    if ins.op == "attention_rope":
        q, kv, sinks, positions, inv_freq, *selected = ins.operands
        attrs = dict(ins.attrs)
        rope = attrs.pop("out_rope")
        (r,) = ins.results
        out = Value(_fresh(names, f"{r.name}.attn"), r.type)
        return [Instr("attention", [q, kv, sinks, *selected], [out], attrs, list(ins.state)),
                Instr("rope", [out, positions, inv_freq], [r], rope)]
    if ins.op == "hc_post_pre_quant":
        attrs = dict(ins.attrs)
        quant = attrs.pop("quant")
        mix = Instr("hc_post_pre", [*ins.operands[:7], *ins.operands[8:]], ins.results[:4], attrs)
        return [*_split(mix, names), Instr("rms_norm_quant", [ins.results[1], ins.operands[7]], ins.results[4:], quant)]
    if ins.op == "hc_post_pre":
        out, streams, post, comb, fn, base, scale, *addend = ins.operands
        new, *pre = ins.results
        return [*_split(Instr("hc_post", [out, streams, post, comb, *addend], [new]), names),
                Instr("hc_pre", [new, fn, base, scale], pre, dict(ins.attrs))]
    if ins.op == "hc_post" and len(ins.operands) == 5:
        out, *rest, addend = ins.operands
        total = Value(_fresh(names, f"{ins.results[0].name}.out"), TensorType(out.type.shape, "f32"))
        return [Instr("add", [out, addend], [total]), Instr("hc_post", [total, *rest], ins.results, dict(ins.attrs))]
    if ins.op == "rms_norm_rope":
        x, positions, inv_freq, *weight = ins.operands
        (r,) = ins.results
        y = Value(_fresh(names, f"{r.name}.norm"), r.type)
        return [Instr("rms_norm", [x, *weight], [y], {"eps": ins.attrs["eps"]}),
                Instr("rope", [y, positions, inv_freq], [r], {k: v for k, v in ins.attrs.items() if k != "eps"})]
    if ins.op == "swiglu_linear_fp8":
        gate, up, *weights = ins.operands
        attrs = dict(ins.attrs)
        hidden = Value(_fresh(names, f"{ins.results[0].name}.act"), TensorType(gate.type.shape, "f32"))
        swiglu_attrs = {"limit": attrs.pop("limit")} if "limit" in attrs else {}
        return [Instr("swiglu", [gate, up], [hidden], swiglu_attrs), Instr("linear_fp8", [hidden, *weights],
                                                                             ins.results, attrs)]
    return [ins]
