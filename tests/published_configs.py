"""The published DeepSeek-V4-Flash and V4-Pro configurations (hub config.json, HF dialect).

Transcribed from copies of the released files (V4-Flash: inference/config.json and the hub
config.json as quoted in tests of rtp-llm and others; V4-Pro: the hub config.json quoted in
model-info reports); the compress_ratios lists end with the MTP layer's entry.
"""

COMMON = dict(
    model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], vocab_size=129280, num_key_value_heads=1,
    head_dim=512, qk_rope_head_dim=64, sliding_window=128, index_n_heads=64, index_head_dim=128, hc_mult=4,
    hc_sinkhorn_iters=20, hc_eps=1e-6, num_experts_per_tok=6, n_shared_experts=1, num_hash_layers=3,
    num_nextn_predict_layers=1, max_position_embeddings=1048576, rope_theta=10000, compress_rope_theta=160000,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                  "beta_slow": 1},
    scoring_func="sqrtsoftplus", swiglu_limit=10.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]})

V4_FLASH = dict(COMMON, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, q_lora_rank=1024, o_groups=8,
                o_lora_rank=1024, index_topk=512, n_routed_experts=256, moe_intermediate_size=2048,
                routed_scaling_factor=1.5,
                compress_ratios=[0, 0] + [4 if i % 2 == 0 else 128 for i in range(41)] + [0])

V4_PRO = dict(COMMON, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
              o_lora_rank=1024, index_topk=1024, n_routed_experts=384, moe_intermediate_size=3072,
              routed_scaling_factor=2.5,
              compress_ratios=[128, 128] + [4 if i % 2 == 0 else 128 for i in range(59)] + [0])
