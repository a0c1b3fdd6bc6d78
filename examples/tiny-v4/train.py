"""Train the tiny DeepSeek-V4 example: seeded, deterministic, about 12 minutes on 2 CPU cores.

Corpus: the top-level `*.py` files of this Python's standard library (every 10th file, by sorted
name, held out). Their names and sha256 are recorded in `provenance.json`; a run on a different
Python reports the files that differ. Tokenizer: byte-level BPE (`tokenizers`), 2048 tokens.
Model: transformers' DeepseekV4ForCausalLM with sliding, CSA and HCA layers, a hash-routed and
three top-k MoE layers, and 2 mHC streams. The routing bias follows DeepSeek's auxiliary-loss-free
balancing (bias += rate * sign(mean load - load) after each step).

    .venv/bin/python examples/tiny-v4/train.py            # writes examples/tiny-v4/checkpoint/
"""

import argparse
import hashlib
import json
import math
import platform
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter

SEED, VOCAB, SEQ, BATCH, STEPS = 0, 2048, 256, 16, 600
LR, WARMUP, WEIGHT_DECAY, BIAS_RATE = 2e-3, 30, 0.1, 1e-3
BOS, EOS = "<|bos|>", "<|eos|>"
CONFIG = dict(
    vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
    partial_rotary_factor=0.25, q_lora_rank=64, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
    o_groups=2, o_lora_rank=64, index_n_heads=8, index_head_dim=32, index_topk=8, sliding_window=64,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 32},
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "compressed_sparse_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"], hc_mult=2, max_position_embeddings=4096,
    bos_token_id=0, eos_token_id=1, use_cache=False)


def corpus() -> tuple[list[Path], list[Path], list[dict]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    record = [{"file": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "held_out": i % 10 == 9}
              for i, f in enumerate(files)]
    return [f for i, f in enumerate(files) if i % 10 != 9], [f for i, f in enumerate(files) if i % 10 == 9], record


def train_tokenizer(files: list[Path]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[BOS, EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((f.read_text(encoding="utf-8", errors="replace") for f in files), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    return tok


def token_stream(tok: Tokenizer, files: list[Path]) -> torch.Tensor:
    ids = []
    for f in files:  # <bos> document <eos>, concatenated
        ids += tok.encode(f.read_text(encoding="utf-8", errors="replace")).ids + [1]
    return torch.tensor(ids, dtype=torch.long)


def unigram_loss(train: torch.Tensor, targets: torch.Tensor) -> float:
    """Cross-entropy of the held-out targets under train-set token frequencies (add-one smoothing)."""
    counts = torch.bincount(train, minlength=VOCAB).double() + 1
    return float(-(counts / counts.sum()).log()[targets].mean())


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor) -> tuple[float, torch.Tensor]:
    n = (len(stream) - 1) // SEQ
    windows = stream[: n * SEQ + 1]
    x = torch.stack([windows[i * SEQ:(i + 1) * SEQ] for i in range(n)])
    y = torch.stack([windows[i * SEQ + 1:(i + 1) * SEQ + 1] for i in range(n)])
    total = 0.0
    for i in range(0, n, BATCH):
        logits = model(x[i:i + BATCH], use_cache=False).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + BATCH].flatten(), reduction="sum"))
    return total / y.numel(), y.flatten()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "checkpoint")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()

    train_files, heldout_files, record = corpus()
    tok = train_tokenizer(train_files)
    train, heldout = token_stream(tok, train_files), token_stream(tok, heldout_files)
    print(f"corpus: {len(train_files)} train files ({len(train)} tokens), {len(heldout_files)} held out "
          f"({len(heldout)} tokens); tokenizer {time.time() - t0:.0f}s", flush=True)

    model = DeepseekV4ForCausalLM(DeepseekV4Config(**CONFIG))
    model.set_experts_implementation("eager")
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # frozen hash routing: distinct random experts per token
        for layer in model.model.layers:
            if layer.mlp.is_hash:
                layer.mlp.gate.tid2eid.copy_(torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(VOCAB)]))
    routers = [m for m in model.modules() if isinstance(m, DeepseekV4TopKRouter)]
    loads = {}
    for r in routers:
        r.register_forward_hook(lambda mod, inp, out: loads.__setitem__(mod, torch.bincount(
            out[2].flatten(), minlength=mod.num_experts).float()))

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    starts = torch.randint(0, len(train) - SEQ - 1, (args.steps, BATCH), generator=g)
    model.train()
    for step in range(args.steps):
        batch = torch.stack([train[s:s + SEQ + 1] for s in starts[step].tolist()])
        loss = model(batch[:, :-1], labels=batch[:, :-1], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # auxiliary-loss-free balancing of the top-k routers
            for r in routers:
                r.e_score_correction_bias += BIAS_RATE * torch.sign(loads[r].mean() - loads[r])
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - t0:.0f}s", flush=True)
    train_loss = loss.item()
    model.eval()

    with tempfile.TemporaryDirectory() as tmp:  # bf16 with the modules V4 keeps in fp32
        model.save_pretrained(tmp)
        bf16 = DeepseekV4ForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
    bf16.set_experts_implementation("eager")
    args.out.mkdir(parents=True, exist_ok=True)
    bf16.save_pretrained(args.out)
    tok.save(str(args.out / "tokenizer.json"))
    fp32 = DeepseekV4ForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    fp32.set_experts_implementation("eager")
    loss_bf16, targets = heldout_loss(fp32, heldout)
    provenance = {
        "command": "python examples/tiny-v4/train.py" + (f" --steps {args.steps}" if args.steps != STEPS else ""),
        "seed": SEED, "steps": args.steps, "batch": BATCH, "seq_len": SEQ, "lr": LR, "threads": 2,
        "torch": torch.__version__, "python": platform.python_version(),
        "corpus": {"description": "top-level *.py files of the Python standard library "
                                  f"({sysconfig.get_paths()['stdlib']}); every 10th file (sorted by name) held out",
                   "files": record, "sha256_of_list": hashlib.sha256(json.dumps(record).encode()).hexdigest(),
                   "train_tokens": len(train), "heldout_tokens": len(heldout)},
        "final_train_loss": round(train_loss, 4),
        "heldout_loss_bf16_weights": round(loss_bf16, 4),
        "heldout_unigram_loss": round(unigram_loss(train, targets), 4),
        "parameters": sum(p.numel() for p in fp32.parameters()),
        "train_seconds": round(time.time() - t0),
    }
    (args.out.parent / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    print(json.dumps({k: v for k, v in provenance.items() if k != "corpus"}, indent=1))


if __name__ == "__main__":
    main()
