"""The fuse pass: a norm quantizes its output once for the FP8 projections and routed experts that
read it (rms_norm_quant + linear_fp8 / moe_experts_q reading e4m3 codes and their scales), and a norm read
only by a RoPE becomes one op with it (rms_norm_rope). The torch target's numbers are bit-for-bit those of
the unfused module; the rules apply only where every reader allows it. `unfuse` (the TVM target's inverse
rewrite) gives the plain program back."""

import pytest
import torch

from conftest import tokens
from v4c.frontend import import_checkpoint
from v4c.interpret import interpret
from v4c.ir import Instr, ParamRef, TensorType, Value, parse_module, print_module, verify
from v4c.passes.fuse import unfuse
from v4c.pipeline import run_pipeline
from v4c.spec import PassSpec

NAME = "hc4_mixed"  # CSA, sliding and HCA layers; hidden 56: with group 16 the last group is partial
g = torch.Generator().manual_seed(0)


def _fp8(module, *passes, **fp8):
    fp8 = {"activations": {"mode": "dynamic", "group": 16}, "skip": [], **fp8}
    return run_pipeline(module, [PassSpec(name="fp8", options=fp8), *(PassSpec(name=p) for p in passes)])


RULES = ("norm_quant", "norm_rope", "attention_rope", "add_post", "post_pre", "post_pre_quant", "swiglu_linear",
         "norm_attention", "rope_index")


def _fuse_only(module, *rules):
    """The fuse pass with only `rules` on."""
    options = {rule: rule in rules for rule in RULES}
    return run_pipeline(module, [PassSpec(name="fuse", options=options)])


@pytest.fixture(scope="module")
def module(hf_checkpoints):
    return import_checkpoint(hf_checkpoints[NAME], max_context=64)[0]


# --- the pass -----------------------------------------------------------------------------------------
def _readers(m) -> dict:
    out = {}
    for ins in m.func.body:
        for i, o in enumerate(ins.operands):
            if not isinstance(o, ParamRef):
                out.setdefault(o.name, []).append((ins, i))
    return out


def test_fuse_quantizes_each_norm_once_for_its_fp8_readers_and_changes_no_number(module):
    plain = _fp8(module)
    fused = run_pipeline(plain, [PassSpec(name="fuse", options={"post_pre_quant": False, "norm_attention": False})])
    verify(fused)
    assert parse_module(print_module(fused)) == fused  # the new op and the multi-result form round-trip
    norms = [ins for ins in fused.func.body if ins.op == "rms_norm_quant"]
    kept = [ins for ins in norms if ins.attrs.get("keep")]
    layers = module.config["num_layers"]
    roped = [ins for ins in fused.func.body if ins.op == "rms_norm_rope"]
    csa = sum(ins.op == "index_topk" for ins in plain.func.body)
    assert csa and fused.counters["fuse"] == {"norm_quant": len(norms), "norm_quant_keeping_y": len(kept),
                                      "experts_reading_codes": layers, "norm_rope": len(roped), "attention_rope": layers, "add_post": layers,
                                      "post_pre": 2 * layers - 1, "post_pre_quant": 0, "swiglu_linear": layers,
                                      "norm_attention": 0, "rope_index": csa}  # (every norm apart)
    assert len(roped) == 2 * layers  # the per-head query norm and kv_norm, each before its RoPE
    readers, weights = _readers(fused), set()
    for ins in norms:
        codes, scales, *y = ins.results
        assert {k: ins.attrs[k] for k in ("group", "scale_format")} == {"group": 16, "scale_format": "ue8m0"}
        uses = readers[codes.name]
        assert {(r.op, i) for r, i in uses} <= {("linear_fp8", 0), ("moe_experts_q", 0)}
        # each reader takes both, codes first and the scales last
        assert [(r, len(r.operands) - 1) for r, _ in uses] == readers[scales.name]
        assert all(len(r.operands) == {"linear_fp8": 4, "moe_experts_q": 8}[r.op] for r, _ in uses)
        weights |= {r.operands[1 if r.op == "linear_fp8" else 3].name for r, _ in uses}
        if y:  # kept: the norm's own output, read by what takes it unquantized
            assert y[0].type == TensorType(codes.type.shape, "f32")
            assert readers[y[0].name]
            assert not any(r.op in ("linear_fp8", "moe_experts_q") for r, _ in readers[y[0].name])
    # with skip: [], every layer's input norm and q_a_norm (all readers FP8), its post-attention norm (the
    # shared expert and the routed experts; the router reads y) and the final norm (lm_head)
    assert len(norms) == 3 * layers + 1 and len(kept) == layers
    kept_readers = {r.op for ins in kept for r, _ in readers[ins.results[2].name]}
    assert kept_readers <= {"route_topk", "route_hash"} and kept_readers
    assert {f"layers.{i}.self_attn.q_b_proj.weight" for i in range(layers)} <= weights
    assert {f"layers.{i}.mlp.shared_experts.gate_proj.weight" for i in range(layers)} <= weights
    assert {f"layers.{i}.mlp.experts.gate_up_proj" for i in range(layers)} <= weights
    assert "lm_head.weight" in weights
    assert sum(ins.op == "rms_norm" for ins in fused.func.body) == \
        sum(ins.op == "rms_norm" for ins in plain.func.body) - len(norms) - len(roped)
    assert sum(ins.op == "rope" for ins in fused.func.body) == \
        sum(ins.op == "rope" for ins in plain.func.body) - len(roped) - layers - csa  # (attention_rope, rope_index)
    ids = tokens(2, 40, seed=3)
    a, b = interpret(plain, batch=2, prefill_chunk=16), interpret(fused, batch=2, prefill_chunk=16)
    for i in range(0, 40, 16):
        assert torch.equal(a.forward(ids[:, i:i + 16]), b.forward(ids[:, i:i + 16]))


def test_fuse_with_the_default_skip_list_keeps_y_for_the_unquantized_readers(module):
    m = run_pipeline(module, [PassSpec(name="fp8", options={}), PassSpec(name="fuse")])
    verify(m)
    # norm weight -> (rms_norm_quant's attributes, its results), apart or in an hc_post_pre_quant (post_pre_quant)
    by_weight = {ins.operands[1].name: (ins.attrs, ins.results) for ins in m.func.body if ins.op == "rms_norm_quant"}
    by_weight |= {ins.operands[7].name: (ins.attrs["quant"], ins.results[4:]) for ins in m.func.body
                  if ins.op == "hc_post_pre_quant"}
    readers = _readers(m)
    kinds = module.config["attention"]
    for i, kind in enumerate(kinds):
        assert not by_weight[f"layers.{i}.self_attn.q_a_norm.weight"][0].get("keep")
        attrs, results = by_weight[f"layers.{i}.input_layernorm.weight"]
        # sliding layers: q_a and kv only; CSA / HCA: the compressor's projections stay unquantized and read y
        assert bool(attrs.get("keep")) == (kind != "sliding")
        if kind != "sliding":
            assert any("compressor" in r.operands[1].name for r, _ in readers[results[2].name] if r.op == "linear")
        assert by_weight[f"layers.{i}.post_attention_layernorm.weight"][0]["keep"]
    assert "norm.weight" not in by_weight  # the final norm feeds lm_head, kept f32 by the default skip list
    ids = tokens(1, 40, seed=4)
    plain = run_pipeline(module, [PassSpec(name="fp8", options={})])
    assert torch.equal(interpret(plain, prefill_chunk=16).forward(ids), interpret(m, prefill_chunk=16).forward(ids))


def test_fuse_needs_fp8_linear_readers(module):
    assert run_pipeline(module, [PassSpec(name="fuse")]).counters["fuse"]["norm_quant"] == 0
    off = run_pipeline(_fp8(module), [PassSpec(name="fuse", options={"norm_quant": False})])
    assert off.counters["fuse"]["norm_quant"] == 0
    static = _fp8(module, activations={"mode": "none"})  # no dynamic activation quantization to take over
    assert run_pipeline(static, [PassSpec(name="fuse")]).counters["fuse"]["norm_quant"] == 0


def test_fuse_needs_one_activation_format_among_the_readers(module):
    m = _fp8(module)
    body = list(m.func.body)
    assert module.config["attention"][0] == "csa"  # its q_a_norm feeds q_b_proj and the indexer's q_b_proj
    i = next(i for i, ins in enumerate(body)
             if ins.op == "linear_fp8" and ins.operands[1].name == "layers.0.self_attn.q_b_proj.weight")
    ins = body[i]
    body[i] = Instr(ins.op, ins.operands, ins.results, {**ins.attrs, "act": {**ins.attrs["act"], "group": 8}})
    changed = m.replace(func=type(m.func)(m.func.inputs, body, m.func.output))
    verify(changed)
    fused = run_pipeline(changed, [PassSpec(name="fuse")])
    norm = ins.operands[0].name  # the q_a_norm whose readers now differ: kept
    assert any(r.name == norm for x in fused.func.body if x.op == "rms_norm" for r in x.results)
    assert fused.counters["fuse"]["norm_quant"] == _fp8(module, "fuse").counters["fuse"]["norm_quant"] - 1


def test_unfuse_gives_back_the_plain_program(module):
    """The TVM target's inverse rewrite: each rms_norm_quant back to rms_norm and its readers to the norm's output,
    each rms_norm_rope back to rms_norm then rope, and on for every rule; the ops and operand counts are the
    unfused module's, in its order (the query and key norms back right after what they read), and so are the
    logits."""
    plain, fused = _fp8(module), _fp8(module, "fuse")
    back, n = unfuse(fused)
    verify(back)
    counts = fused.counters["fuse"]
    assert n == sum(counts[rule] for rule in RULES)
    assert all(counts[rule] for rule in RULES)
    assert [(i.op, len(i.operands), len(i.results)) for i in back.func.body] == \
        [(i.op, len(i.operands), len(i.results)) for i in plain.func.body]
    assert unfuse(plain)[1] == 0
    ids = tokens(1, 24, seed=5)
    assert torch.equal(interpret(plain, prefill_chunk=16).forward(ids), interpret(back, prefill_chunk=16).forward(ids))


def test_fuse_takes_a_norm_and_its_rope_as_one_op_where_the_rope_is_its_only_reader(module):
    """norm_rope: an rms_norm read only by a rope (as x) -> one rms_norm_rope in the rope's place, with the rope's
    result, attributes (inverse) and the norm's eps and weight; a norm with another reader, or the program's
    output, is left alone; off, nothing changes; the logits are the unfused program's bit for bit (the torch
    kernel is rope over rms_norm)."""
    plain = _fp8(module)
    fused = _fuse_only(plain, "norm_rope")
    verify(fused)
    assert parse_module(print_module(fused)) == fused
    by_result = {r.name: ins for ins in plain.func.body for r in ins.results}
    ropes = [ins for ins in plain.func.body if ins.op == "rope" and by_result.get(ins.operands[0].name, ins).op
             == "rms_norm"]
    roped = {ins.results[0].name: ins for ins in fused.func.body if ins.op == "rms_norm_rope"}
    assert len(roped) == len(ropes) == fused.counters["fuse"]["norm_rope"] == 2 * module.config["num_layers"]
    for rope in ropes:
        norm, ins = by_result[rope.operands[0].name], roped[rope.results[0].name]
        assert [o.name for o in ins.operands] == [o.name for o in [norm.operands[0], *rope.operands[1:],
                                                                    *norm.operands[1:]]]
        assert ins.attrs == {**rope.attrs, "eps": norm.attrs["eps"]}
    assert {len(ins.operands) for ins in roped.values()} == {3, 4}  # the weightless query norm, kv_norm
    # a second reader of the query norm's output: that norm stays, every other one fuses
    body = list(plain.func.body)
    rope = ropes[0]
    extra = Instr("add", [rope.operands[0], rope.operands[0]], [Value("extra", rope.results[0].type)])
    body.insert(body.index(rope) + 1, extra)
    out = Value("out2", plain.func.output.type)
    body.append(Instr("add", [plain.func.output, plain.func.output], [out]))
    changed = plain.replace(func=type(plain.func)(plain.func.inputs, body, out))
    verify(changed)
    assert run_pipeline(changed, [PassSpec(name="fuse")]).counters["fuse"]["norm_rope"] == len(ropes) - 1
    off = _fuse_only(plain)
    assert off.func.body == plain.func.body
    ids = tokens(1, 40, seed=6)
    assert torch.equal(interpret(plain, prefill_chunk=16).forward(ids), interpret(fused, prefill_chunk=16).forward(ids))


def _one_rule(module, rule, producer, reader):
    """The fp8 program and it with only `rule` on (verified, the same after printing and parsing), the plain
    program's instructions by result, and its `reader` instructions whose x a `producer` makes, by result: one a
    layer, each folded by the rule (its counter)."""
    plain = _fp8(module)
    fused = _fuse_only(plain, rule)
    verify(fused)
    assert parse_module(print_module(fused)) == fused
    by_result = {r.name: ins for ins in plain.func.body for r in ins.results}
    readers = {ins.results[0].name: ins for ins in plain.func.body if ins.op == reader
               and by_result.get(ins.operands[0].name, ins).op == producer}
    assert len(readers) == fused.counters["fuse"][rule] == module.config["num_layers"]
    return plain, fused, by_result, readers


def _folds_with_a_second_reader(plain, producer, rule) -> int:
    """How many `rule` folds the fuse pass makes once the first `producer`'s result has a second reader (an add)."""
    body = list(plain.func.body)
    made = next(ins for ins in body if ins.op == producer)
    body.insert(body.index(made) + 1, Instr("add", [made.results[0], made.results[0]],
                                            [Value("extra", made.results[0].type)]))
    changed = plain.replace(func=type(plain.func)(plain.func.inputs, body, plain.func.output))
    verify(changed)
    return run_pipeline(changed, [PassSpec(name="fuse")]).counters["fuse"][rule]


def test_fuse_adds_the_experts_sum_in_hc_post(module):
    """add_post: an add whose only reader is hc_post (as the block output) -> that hc_post with the add's second
    operand as its addend, in its place; every MoE layer's routed + shared sum; the logits bit for bit (the
    torch kernel adds them as add does); an add with another reader stays."""
    plain, fused, by_result, posts = _one_rule(module, "add_post", "add", "hc_post")
    layers = module.config["num_layers"]
    assert not any(ins.op == "add" for ins in fused.func.body)  # V4 has no other add
    for ins in fused.func.body:
        if ins.results and ins.results[0].name in posts:
            post = posts[ins.results[0].name]
            add = by_result[post.operands[0].name]
            assert ins.op == "hc_post" and ins.operands == [add.operands[0], *post.operands[1:], add.operands[1]]
    ids = tokens(1, 40, seed=7)
    assert torch.equal(interpret(plain, prefill_chunk=16).forward(ids), interpret(fused, prefill_chunk=16).forward(ids))
    assert _folds_with_a_second_reader(plain, "add", "add_post") == layers - 1


def test_fuse_joins_each_hc_post_with_the_next_blocks_hc_pre(module):
    """post_pre: an hc_post whose new streams an hc_pre reads, and that hc_pre -> one hc_post_pre in the hc_post's
    place, with the hc_post's operands (its addend last), the hc_pre's parameters and attributes, and both ops'
    results; every block boundary but the last (the final hc_post feeds hc_head); the logits bit for bit."""
    plain = _fp8(module)
    fused = _fuse_only(plain, "add_post", "post_pre")
    verify(fused)
    assert parse_module(print_module(fused)) == fused
    with_add = _fuse_only(plain, "add_post")
    posts = {ins.results[0].name: ins for ins in with_add.func.body if ins.op == "hc_post"}
    pres = {ins.operands[0].name: ins for ins in with_add.func.body if ins.op == "hc_pre"}
    joined = [ins for ins in fused.func.body if ins.op == "hc_post_pre"]
    layers = module.config["num_layers"]
    assert len(joined) == fused.counters["fuse"]["post_pre"] == 2 * layers - 1
    assert [ins.op for ins in fused.func.body].count("hc_post") == 1  # the last block's, read by hc_head
    first = [ins for ins in fused.func.body if ins.op == "hc_pre"]  # the first block's, read by hc_expand
    assert len(first) == 1 and first[0].operands[0].name == next(i for i in fused.func.body
                                                                 if i.op == "hc_expand").results[0].name
    for ins in joined:
        new = ins.results[0].name
        post, pre = posts[new], pres[new]
        assert ins.operands == [*post.operands[:4], *pre.operands[1:], *post.operands[4:]]
        assert ins.results == [*post.results, *pre.results] and ins.attrs == pre.attrs
    assert sum(len(ins.operands) == 8 for ins in joined) == layers - 1  # MoE halves carry the experts' addend
    ids = tokens(1, 40, seed=8)
    assert torch.equal(interpret(plain, prefill_chunk=16).forward(ids), interpret(fused, prefill_chunk=16).forward(ids))


def test_fuse_computes_the_shared_experts_swiglu_in_its_down_projection(module):
    """swiglu_linear: a swiglu whose only reader is a linear_fp8 (as its float x) -> one swiglu_linear_fp8 in the
    projection's place, with the swiglu's operands and limit and the projection's weights, attributes and result;
    every layer's shared expert; the logits bit for bit (the torch kernel is linear_fp8 over swiglu); a swiglu
    with another reader, or read by a projection that takes codes, stays."""
    plain, fused, by_result, downs = _one_rule(module, "swiglu_linear", "swiglu", "linear_fp8")
    layers = module.config["num_layers"]
    assert not any(ins.op == "swiglu" for ins in fused.func.body)  # V4's routed experts do theirs in moe_experts
    for ins in fused.func.body:
        if ins.op == "swiglu_linear_fp8":
            down = downs[ins.results[0].name]
            act = by_result[down.operands[0].name]
            assert ins.operands == [*act.operands, *down.operands[1:]]
            assert ins.attrs == {**down.attrs, "limit": act.attrs["limit"]} and act.attrs["limit"] is not None
    ids = tokens(1, 40, seed=9)
    assert torch.equal(interpret(plain, prefill_chunk=16).forward(ids), interpret(fused, prefill_chunk=16).forward(ids))
    assert _folds_with_a_second_reader(plain, "swiglu", "swiglu_linear") == layers - 1
    assert _fuse_only(plain).func.body == plain.func.body


def test_fuse_norms_and_quantizes_each_blocks_input_in_the_hc_post_pre_before_it(module):
    """post_pre_quant: an rms_norm_quant (with a weight) of an hc_post_pre's collapsed row, and that hc_post_pre ->
    one hc_post_pre_quant in the hc_post_pre's place, with its operands and the norm weight before the addend, its
    attributes and the norm's as `quant`, and both ops' results; every block's input norm but the first (whose
    collapse is the first hc_pre's); the logits bit for bit (the torch kernel is rms_norm_quant over hc_post_pre);
    off, or without norm_quant (no rms_norm_quant to take), nothing joins; unfuse gives the plain ops back."""
    plain = _fuse_only(_fp8(module), "norm_quant", "add_post", "post_pre")
    fused = _fuse_only(_fp8(module), "norm_quant", "add_post", "post_pre", "post_pre_quant")
    verify(fused)
    assert parse_module(print_module(fused)) == fused
    mixes = {ins.results[0].name: ins for ins in plain.func.body if ins.op == "hc_post_pre"}
    norms = {ins.operands[0].name: ins for ins in plain.func.body if ins.op == "rms_norm_quant"}
    joined = [ins for ins in fused.func.body if ins.op == "hc_post_pre_quant"]
    layers = module.config["num_layers"]
    assert len(joined) == fused.counters["fuse"]["post_pre_quant"] == 2 * layers - 1
    assert not any(ins.op == "hc_post_pre" for ins in fused.func.body)
    assert sum(ins.op == "rms_norm_quant" for ins in fused.func.body) == len(norms) - len(joined)
    for ins in joined:
        mix = mixes[ins.results[0].name]
        norm = norms[mix.results[1].name]
        assert ins.operands == [*mix.operands[:7], norm.operands[1], *mix.operands[7:]]
        assert ins.results == [*mix.results, *norm.results] and ins.attrs == {**mix.attrs, "quant": norm.attrs}
    assert {len(ins.results) for ins in joined} == {6, 7}  # the post-attention norms keep y for the router
    ids = tokens(1, 40, seed=10)
    assert torch.equal(interpret(plain, prefill_chunk=16).forward(ids), interpret(fused, prefill_chunk=16).forward(ids))
    assert _fuse_only(_fp8(module), "add_post", "post_pre", "post_pre_quant").counters["fuse"]["post_pre_quant"] == 0
    # a norm without a weight (the kernel's row code takes one) stays apart
    body = [Instr(ins.op, ins.operands[:1], ins.results, ins.attrs) if ins is norms[joined[0].results[1].name]
            else ins for ins in plain.func.body]
    unweighted = plain.replace(func=type(plain.func)(plain.func.inputs, body, plain.func.output))
    verify(unweighted)
    assert _fuse_only(unweighted, "post_pre_quant").counters["fuse"]["post_pre_quant"] == 2 * layers - 2
    back, n = unfuse(fused)
    verify(back)
    assert n == sum(fused.counters["fuse"][rule] for rule in RULES)
    assert [ins.op for ins in back.func.body] == [ins.op for ins in unfuse(plain)[0].func.body]


def test_fuse_ropes_each_attention_output_in_the_attention(module):
    """attention_rope: an attention whose only reader is a rope (as x) -> one attention_rope in the rope's place,
    with the attention's operands (the rope's positions and inv_freq before `selected`), state and attributes,
    the rope's as `out_rope`, and the rope's result; every layer's inverse RoPE; the logits bit for bit (the torch
    kernel is rope over attention); an attention with another reader stays; unfuse gives the two ops back."""
    plain, fused, by_result, ropes = _one_rule(module, "attention_rope", "attention", "rope")
    layers = module.config["num_layers"]
    assert not any(ins.op == "attention" for ins in fused.func.body)
    for ins in fused.func.body:
        if ins.op == "attention_rope":
            rope = ropes[ins.results[0].name]
            attn = by_result[rope.operands[0].name]
            assert ins.operands == [*attn.operands[:3], *rope.operands[1:], *attn.operands[3:]]
            assert ins.state == attn.state and ins.attrs == {**attn.attrs, "out_rope": rope.attrs}
            assert rope.attrs == {"inverse": True}
    assert {len(ins.operands) for ins in fused.func.body if ins.op == "attention_rope"} == {5, 6}  # CSA: selected
    ids = tokens(1, 40, seed=11)
    assert torch.equal(interpret(plain, prefill_chunk=16).forward(ids), interpret(fused, prefill_chunk=16).forward(ids))
    assert _folds_with_a_second_reader(plain, "attention", "attention_rope") == layers - 1
    back, n = unfuse(fused)
    verify(back)
    assert n == layers and [ins.op for ins in back.func.body] == [ins.op for ins in plain.func.body]


def test_fuse_norms_and_ropes_each_attentions_queries_and_keys_in_the_attention(module):
    """norm_attention: an attention_rope whose q comes from a weightless rms_norm_rope and kv from one with a
    weight, both read only by it at its positions and inv_freq -> one norm_attention_rope in its place (the raw q
    and kv, kv_norm's weight, then the attention_rope's operands; its attributes with the norms' as q_norm and
    kv_norm; its state), two norms a layer; the logits bit for bit (the torch kernel is the three ops); a second
    reader of a query norm's output keeps that layer apart; without attention_rope nothing folds; unfuse gives the
    plain ops back."""
    plain = _fp8(module)  # with the query norms' eps set apart from kv_norm's
    body = [Instr(i.op, i.operands, i.results, {**i.attrs, "eps": 1e-3}) if i.op == "rms_norm" and len(i.operands) == 1
            else i for i in plain.func.body]
    plain = plain.replace(func=type(plain.func)(plain.func.inputs, body, plain.func.output))
    apart = _fuse_only(plain, "norm_rope", "attention_rope")
    fused = _fuse_only(plain, "norm_rope", "attention_rope", "norm_attention")
    verify(fused)
    assert parse_module(print_module(fused)) == fused
    layers = module.config["num_layers"]
    assert fused.counters["fuse"]["norm_attention"] == 2 * layers
    assert not any(ins.op in ("rms_norm_rope", "attention_rope") for ins in fused.func.body)
    by_result = {r.name: ins for ins in apart.func.body for r in ins.results}
    attentions = {ins.results[0].name: ins for ins in apart.func.body if ins.op == "attention_rope"}
    normed = [ins for ins in fused.func.body if ins.op == "norm_attention_rope"]
    assert len(normed) == layers
    for ins in normed:
        attn = attentions[ins.results[0].name]
        qn, kn = by_result[attn.operands[0].name], by_result[attn.operands[1].name]
        assert ins.operands == [qn.operands[0], kn.operands[0], kn.operands[3], *attn.operands[2:]]
        assert ins.attrs == {**attn.attrs, "q_norm": qn.attrs, "kv_norm": kn.attrs} and ins.state == attn.state
        assert len(qn.operands) == 3 and qn.operands[1:] == kn.operands[1:3] == attn.operands[3:5]
        assert qn.attrs["eps"] == 1e-3 and kn.attrs["eps"] != 1e-3
    assert {len(ins.operands) for ins in normed} == {6, 7}  # CSA: selected
    ids = tokens(1, 40, seed=12)
    assert torch.equal(interpret(plain, prefill_chunk=16).forward(ids), interpret(fused, prefill_chunk=16).forward(ids))
    # a second reader of the first query norm's output
    body = list(apart.func.body)
    qn = by_result[next(iter(attentions.values())).operands[0].name]
    body.insert(body.index(qn) + 1, Instr("add", [qn.results[0], qn.results[0]], [Value("extra", qn.results[0].type)]))
    changed = apart.replace(func=type(apart.func)(apart.func.inputs, body, apart.func.output))
    verify(changed)
    assert _fuse_only(changed, "norm_attention").counters["fuse"]["norm_attention"] == 2 * (layers - 1)
    assert _fuse_only(plain, "norm_rope", "norm_attention").counters["fuse"]["norm_attention"] == 0
    back, n = unfuse(fused)
    verify(back)
    assert n == 5 * layers and [ins.op for ins in back.func.body] == [ins.op for ins in plain.func.body]


def test_fuse_ropes_each_indexer_query_in_its_top_k(module):
    """rope_index: a rope whose only reader is an index_topk (as q) -> one rope_index_topk in the index_topk's
    place (the raw q, the weights, the rope's positions and inv_freq; the index_topk's attributes and state, the
    rope's as q_rope); every CSA layer's; the logits bit for bit (the torch kernel is index_topk over rope); a rope
    with another reader stays; unfuse gives the two ops back in place."""
    plain = _fp8(module)
    fused = _fuse_only(plain, "rope_index")
    verify(fused)
    assert parse_module(print_module(fused)) == fused
    by_result = {r.name: ins for ins in plain.func.body for r in ins.results}
    indexers = {ins.results[0].name: ins for ins in plain.func.body if ins.op == "index_topk"}
    assert len(indexers) == fused.counters["fuse"]["rope_index"] > 0
    assert not any(ins.op == "index_topk" for ins in fused.func.body)
    for ins in fused.func.body:
        if ins.op == "rope_index_topk":
            index = indexers[ins.results[0].name]
            rope = by_result[index.operands[0].name]
            assert rope.op == "rope" and ins.operands == [rope.operands[0], index.operands[1], *rope.operands[1:]]
            assert ins.attrs == {**index.attrs, "q_rope": rope.attrs} and ins.state == index.state
    ids = tokens(1, 40, seed=13)
    assert torch.equal(interpret(plain, prefill_chunk=16).forward(ids), interpret(fused, prefill_chunk=16).forward(ids))
    body = list(plain.func.body)
    rope = by_result[next(iter(indexers.values())).operands[0].name]
    body.insert(body.index(rope) + 1, Instr("add", [rope.results[0], rope.results[0]],
                                            [Value("extra", rope.results[0].type)]))
    changed = plain.replace(func=type(plain.func)(plain.func.inputs, body, plain.func.output))
    verify(changed)
    assert _fuse_only(changed, "rope_index").counters["fuse"]["rope_index"] == len(indexers) - 1
    back, n = unfuse(fused)
    verify(back)
    assert n == len(indexers) and [ins.op for ins in back.func.body] == [ins.op for ins in plain.func.body]
