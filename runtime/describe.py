"""`describe(artifact)`: what an artifact holds, from its manifest and weight headers alone."""

import re
from collections import defaultdict

from .artifact import SIGNATURE, Artifact, safetensors_header
from .kv import cache_families

SAFETENSORS_NAMES = {"F32": "f32", "BF16": "bf16", "F16": "f16", "I64": "i64", "I32": "i32", "I8": "i8",
                     "U8": "u8", "F8_E4M3": "f8e4m3", "F8_E8M0": "f8e8m0"}
COMPONENTS = [  # canonical weight name -> component; first match wins
    (re.compile(r"^embed_tokens\."), "embedding"),
    (re.compile(r"^lm_head\."), "output head"),
    (re.compile(r"^rope\."), "rope tables"),
    (re.compile(r"layernorm|^norm\."), "norms"),
    (re.compile(r"\.compressor\.indexer\."), "indexer"),
    (re.compile(r"\.compressor\."), "compressor"),
    (re.compile(r"\.self_attn\."), "attention"),
    (re.compile(r"\.mlp\.experts\+shared\."), "experts + shared expert"),  # stacked (the triton target's)
    (re.compile(r"\.mlp\.experts\."), "routed experts"),
    (re.compile(r"\.mlp\.shared_experts\."), "shared expert"),
    (re.compile(r"\.mlp\.gate\."), "router"),
    (re.compile(r"_hc\.|^hc_head\."), "mHC"),
]


def component_of(name: str) -> str:
    return next((c for pattern, c in COMPONENTS if pattern.search(name)), "other")


def _count(values) -> dict:
    out = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def describe(art: Artifact) -> dict:
    m, cfg = art.manifest, art.config
    by_component, by_dtype, params = defaultdict(lambda: defaultdict(int)), defaultdict(int), 0
    for rel in m["weights"]:
        for name, t in safetensors_header(art.store, rel).items():
            size = t["data_offsets"][1] - t["data_offsets"][0]
            dtype = SAFETENSORS_NAMES.get(t["dtype"], t["dtype"])
            by_component[component_of(name)][dtype] += size
            by_dtype[dtype] += size
            n = 1
            for d in t["shape"]:
                n *= d
            params += n
    max_context = m["kv"]["max_context"]
    families = cache_families(cfg, m["kv"]["state"], max_context)
    source = {k: v for k, v in m["source"].items() if k != "skipped_tensors"}
    source["skipped_tensors"] = len(m["source"].get("skipped_tensors", {}))
    return {
        "artifact": art.label,
        "format_version": m["format_version"], "producer": m["producer"],
        "model": {"layers": cfg.num_layers, "attention": _count(cfg.attention), "mlp": _count(cfg.mlp),
                  "hidden_size": cfg.hidden_size, "heads": cfg.num_heads, "head_dim": cfg.head_dim,
                  "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
                  "hc_mult": cfg.hc_mult, "vocab_size": cfg.vocab_size, "parameters": params},
        "source": source,
        "pipeline": m["pipeline"], "counters": m.get("counters", {}),
        "target": m["target"],
        "weights": {"total_bytes": sum(by_dtype.values()), "by_dtype": dict(by_dtype),
                    "by_component": {c: dict(d) for c, d in sorted(by_component.items())}},
        "kv": {"max_context": max_context, "families": families, "plan": m["kv"].get("plan"),
               "bytes_per_token": sum(f["bytes_per_token"] for f in families.values()),
               "fixed_bytes": sum(f["fixed_bytes"] for f in families.values()),
               "bytes_per_sequence_at_max_context": sum(f["bytes_at_max_context"] for f in families.values())},
        "plans": {"memory": m.get("memory_plan")},
        "report": m.get("report"),
        "signed": art.store.exists(SIGNATURE),
        "tokenizer": bool(m.get("tokenizer")),
    }
