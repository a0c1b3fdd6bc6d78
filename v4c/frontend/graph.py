"""Build the IR of a V4 model from its `ModelConfig` and a weight lookup.

Per layer (streams h: [B, S, hc, D]):
    x, post, comb = hc_pre(h);  h = hc_post(attention(rms_norm(x)), h, post, comb)
    x, post, comb = hc_pre(h);  h = hc_post(moe(rms_norm(x)), h, post, comb)
then logits = lm_head(rms_norm(hc_head(h))).
"""

import re
from collections.abc import Callable

from v4c.ir import Builder, Module, TensorType
from v4c.ir.types import f32, i64
from v4c.runtime.config import ModelConfig
from v4c.runtime.dtypes import dtype_name

from .rope import inv_freq

B, S = "B", "S"
WeightLookup = Callable[[str, tuple], object]  # (canonical name, expected shape) -> Tensor | WeightSource


class _Graph:
    def __init__(self, cfg: ModelConfig, weight: WeightLookup, max_context: int):
        self.cfg, self.weight, self.max_context = cfg, weight, max_context
        self.b = Builder()
        self.tokens = self.b.input("tokens", i64(B, S))
        self.positions = self.b.input("positions", i64(S))
        self.rope = {}
        for family, rc in (("main", cfg.rope_main), ("compress", cfg.rope_compress)):
            freqs, scale = inv_freq(rc, cfg.rope_head_dim, cfg.max_position_embeddings)
            self.rope[family] = (self.b.param(f"rope.{family}.inv_freq", f32(freqs.shape[0]), freqs),
                                 {"scale": scale} if scale != 1.0 else {})

    def p(self, name: str, *shape: int):
        src = self.weight(name, shape)
        return self.b.param(name, TensorType(shape, dtype_name(src.dtype)), src)

    def op(self, *args, **kw):
        return self.b.op(*args, **kw)

    # attention ----------------------------------------------------------------------------------
    def compressor(self, prefix: str, x, *, width: int, rate: int, overlap: bool) -> str:
        """Project, buffer and pool `x` into compressed entries; returns the entries state slot."""
        cfg, ch = self.cfg, (2 if overlap else 1) * width
        inv, rope_attrs = self.rope["compress"]
        kv = self.op("linear", x, self.p(prefix + "kv_proj.weight", ch, cfg.hidden_size))
        gate = self.op("linear", x, self.p(prefix + "gate_proj.weight", ch, cfg.hidden_size))
        slots = [self.b.state(prefix + "buf_kv", f32(B, rate, ch)), self.b.state(prefix + "buf_gate", f32(B, rate, ch))]
        if overlap:
            slots += [self.b.state(prefix + "ovl_kv", f32(B, rate, width)),
                      self.b.state(prefix + "ovl_gate", f32(B, rate, width))]
        slots.append(self.b.state(prefix + "entries", f32(B, self.max_context // rate, width)))
        extra = {"rope_scale": rope_attrs["scale"]} if rope_attrs else {}
        self.op("compress", kv, gate, self.p(prefix + "position_bias", rate, ch), self.p(prefix + "kv_norm.weight", width),
                inv, state=slots, rate=rate, overlap=overlap, eps=cfg.rms_norm_eps, **extra)
        return slots[-1]

    def indexer(self, prefix: str, x, q_latent, rate: int):
        cfg = self.cfg
        hi, di = cfg.index_n_heads, cfg.index_head_dim
        keys = self.compressor(prefix, x, width=di, rate=rate, overlap=True)
        inv, rope_attrs = self.rope["compress"]
        q = self.op("linear", q_latent, self.p(prefix + "q_b_proj.weight", hi * di, cfg.q_lora_rank))
        q = self.op("rope", self.op("reshape", q, shape=[B, S, hi, di]), self.positions, inv, **rope_attrs)
        w = self.op("linear", x, self.p(prefix + "scorer.weights_proj.weight", hi, cfg.hidden_size))
        return self.op("index_topk", q, w, state=[keys], topk=cfg.index_topk, rate=rate,
                       score_scale=di ** -0.5, weight_scale=hi ** -0.5)

    def attention(self, layer: int, x):
        cfg, a = self.cfg, f"layers.{layer}.self_attn."
        h, d, dm, eps = cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.rms_norm_eps
        kind, rate = cfg.attention[layer], cfg.compress_rates[layer]
        inv, rope_attrs = self.rope[cfg.rope_family(layer)]
        q_latent = self.op("rms_norm", self.op("linear", x, self.p(a + "q_a_proj.weight", cfg.q_lora_rank, dm)),
                           self.p(a + "q_a_norm.weight", cfg.q_lora_rank), eps=eps)
        q = self.op("linear", q_latent, self.p(a + "q_b_proj.weight", h * d, cfg.q_lora_rank))
        q = self.op("rms_norm", self.op("reshape", q, shape=[B, S, h, d]), eps=eps)
        q = self.op("rope", q, self.positions, inv, **rope_attrs)
        kv = self.op("rms_norm", self.op("linear", x, self.p(a + "kv_proj.weight", d, dm)),
                     self.p(a + "kv_norm.weight", d), eps=eps)
        kv = self.op("rope", kv, self.positions, inv, **rope_attrs)
        state, extra = [self.b.state(a + "ring", f32(B, cfg.sliding_window - 1, d))], []
        if kind != "sliding":
            state.append(self.compressor(a + "compressor.", x, width=d, rate=rate, overlap=kind == "csa"))
        if kind == "csa":
            extra.append(self.indexer(a + "compressor.indexer.", x, q_latent, rate))
        o = self.op("attention", q, kv, self.p(a + "sinks", h), *extra, state=state,
                    window=cfg.sliding_window, rate=rate, scale=d ** -0.5)
        o = self.op("rope", o, self.positions, inv, inverse=True, **rope_attrs)
        g, r = cfg.o_groups, cfg.o_lora_rank
        o = self.op("reshape", o, shape=[B, S, g, h * d // g])
        o = self.op("grouped_linear", o, self.p(a + "o_a_proj.weight", g * r, h * d // g), groups=g)
        o = self.op("reshape", o, shape=[B, S, g * r])
        return self.op("linear", o, self.p(a + "o_b_proj.weight", dm, g * r))

    # MoE ----------------------------------------------------------------------------------------
    def moe(self, layer: int, x):
        cfg, m = self.cfg, f"layers.{layer}.mlp."
        dm, e, k, inter = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        route = dict(score_func=cfg.scoring_func, scale=cfg.routed_scaling_factor)
        gate = self.p(m + "gate.weight", e, dm)
        if cfg.mlp[layer] == "hash":
            weights, experts = self.op("route_hash", x, gate, self.p(m + "gate.tid2eid", cfg.vocab_size, k),
                                       self.tokens, **route)
        else:
            weights, experts = self.op("route_topk", x, gate, self.p(m + "gate.e_score_correction_bias", e), k=k, **route)
        routed = self.op("moe_experts", x, weights, experts, self.p(m + "experts.gate_up_proj", e, 2 * inter, dm),
                         self.p(m + "experts.down_proj", e, dm, inter), limit=cfg.swiglu_limit)
        si, sh = cfg.shared_intermediate_size, m + "shared_experts."
        act = self.op("swiglu", self.op("linear", x, self.p(sh + "gate_proj.weight", si, dm)),
                      self.op("linear", x, self.p(sh + "up_proj.weight", si, dm)), limit=cfg.swiglu_limit)
        return self.op("add", routed, self.op("linear", act, self.p(sh + "down_proj.weight", dm, si)))

    # the model ----------------------------------------------------------------------------------
    def hyper(self, layer: int, prefix: str, h, block: Callable, norm: str):
        """mHC around `block(layer, x)`: collapse the streams, run the block, expand and mix."""
        cfg, hc, dm = self.cfg, self.cfg.hc_mult, self.cfg.hidden_size
        x, post, comb = self.op("hc_pre", h, self.p(prefix + "fn", (2 + hc) * hc, hc * dm),
                                self.p(prefix + "base", (2 + hc) * hc), self.p(prefix + "scale", 3),
                                iters=cfg.hc_sinkhorn_iters, eps=cfg.hc_eps, norm_eps=cfg.rms_norm_eps)
        out = block(layer, self.op("rms_norm", x, self.p(norm, dm), eps=cfg.rms_norm_eps))
        return self.op("hc_post", out, h, post, comb)

    def build(self, name: str) -> Module:
        cfg, dm, hc = self.cfg, self.cfg.hidden_size, self.cfg.hc_mult
        embed = self.p("embed_tokens.weight", cfg.vocab_size, dm)
        h = self.op("hc_expand", self.op("embed", self.tokens, embed), hc=hc)
        for layer in range(cfg.num_layers):
            pre = f"layers.{layer}."
            h = self.hyper(layer, pre + "attn_hc.", h, self.attention, pre + "input_layernorm.weight")
            h = self.hyper(layer, pre + "ffn_hc.", h, self.moe, pre + "post_attention_layernorm.weight")
        x = self.op("hc_head", h, self.p("hc_head.hc_fn", hc, hc * dm), self.p("hc_head.hc_base", hc),
                    self.p("hc_head.hc_scale", 1), eps=cfg.hc_eps, norm_eps=cfg.rms_norm_eps)
        x = self.op("rms_norm", x, self.p("norm.weight", dm), eps=cfg.rms_norm_eps)
        head = embed if cfg.tie_word_embeddings else self.p("lm_head.weight", cfg.vocab_size, dm)
        logits = self.op("linear", x, head)
        return self.b.finish(name, cfg.to_dict(), logits, self.max_context)


def build_module(cfg: ModelConfig, weight: WeightLookup, *, max_context: int, name: str = "model") -> Module:
    """Lower a V4 model to IR. `weight(name, shape)` returns each canonical weight (or raises)."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "model"
    return _Graph(cfg, weight, max_context).build(name)
