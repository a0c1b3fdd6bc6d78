"""KV tiering: the plan, and a tiered runtime that never changes a value."""

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import tokens
from published_configs import V4_FLASH, V4_PRO
from v4c.cli import main
from v4c.compile import compile_model
from v4c.plan import plan_model
from v4c.runtime.artifact import open_artifact
from v4c.runtime.kv_tiers import PagedEntries

GIB = 2**30


def _compile(root, ckpt, tiers=None, page_tokens=8, fp8=None, max_context=512):
    root.mkdir(parents=True, exist_ok=True)
    passes = "" if fp8 is None else f"passes:\n  - fp8: {json.dumps(fp8)}\n"
    (root / "model.yaml").write_text(
        f"model:\n  checkpoint: {ckpt}\n{passes}kv:\n  max_context: {max_context}\n  prefill_chunk: 64\n"
        f"  page_tokens: {page_tokens}\n  tiers: {json.dumps(tiers or {})}\n")
    compile_model(root / "model.yaml", root / "art")
    return open_artifact(root / "art")


def _tight_budget(art, pages: int) -> tuple[int, int]:
    """A device budget holding everything but the CSA entries, plus `pages` pages per CSA layer;
    -> (budget, tokens of CSA context those pages cover)."""
    plan = json.loads((art.store.root / "plans" / "kv.json").read_text())
    csa = [s for s in plan["slots"].values() if s["family"] == "CSA entries"]
    fixed = plan["session_bytes"] - sum(s["bytes"] for s in csa)
    page_entries = [max(1, 8 // s["tokens_per_entry"]) for s in csa]
    return fixed + pages * sum(pe * s["entry_bytes"] for pe, s in zip(page_entries, csa)), pages * 8


@pytest.mark.parametrize("name, fp8", [("hc1_topk_small", None), ("hc3_topk_large", None), ("hc4_mixed", None),
                                       ("hc2_yarn", {"kv": "fp8", "indexer": "fp8"})])
def test_tiered_logits_equal_all_device_bit_for_bit(name, fp8, hf_checkpoints, tmp_path):
    full = _compile(tmp_path / "full", hf_checkpoints[name], fp8=fp8)
    budget, covered = _tight_budget(full, pages=2)
    tight = _compile(tmp_path / "tight", hf_checkpoints[name], {"device": budget}, fp8=fp8)
    paged = [t for t in tight.session().state.values() if isinstance(t, PagedEntries)]
    assert paged, "the plan should have put the CSA entries on the host tier"
    ids = tokens(1, 480, seed=4)
    assert ids.shape[1] >= 4 * covered  # far more context than the device could hold
    for sizes in ([480], [384] + [1] * 96, [13] * 37):  # one prefill; prefill then decode; uneven chunks
        session, reference, pos = tight.session(), full.session(), 0
        for n in sizes:
            assert torch.equal(reference.forward(ids[:, pos:pos + n]), session.forward(ids[:, pos:pos + n])), (sizes[0], pos)
            pos += n
        report = session.tiers.report()
        assert report["device"]["high_water"] <= budget  # read from the allocator
        assert report["traffic"]["pages_fetched"] > 0 and report["traffic"]["bytes_fetched"] > 0
        session.close()


def test_prefetch_brings_in_the_next_layers_pages(hf_checkpoints, tmp_path):
    full = _compile(tmp_path / "full", hf_checkpoints["hc3_topk_large"])  # two CSA layers
    budget, _ = _tight_budget(full, pages=3)
    tight = _compile(tmp_path / "tight", hf_checkpoints["hc3_topk_large"], {"device": budget})
    a, b = full.session(), tight.session()
    ids = tokens(1, 200, seed=5)
    assert torch.equal(a.forward(ids[:, :120]), b.forward(ids[:, :120]))
    for t in range(120, 200):  # decode: each layer's previous picks are prefetched while the layer before computes
        assert torch.equal(a.forward(ids[:, t:t + 1]), b.forward(ids[:, t:t + 1]))
    assert b.tiers.report()["traffic"]["prefetched_pages"] > 0
    b.close()


def test_an_infeasible_plan_says_what_would_fit(hf_checkpoints, tmp_path):
    (tmp_path / "model.yaml").write_text(
        f"model:\n  checkpoint: {hf_checkpoints['hc2_yarn']}\nkv:\n  max_context: 4096\n  concurrency: 8\n"
        "  tiers: {device: 64KiB}\n")
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "model.yaml"), "-o", str(tmp_path / "art")])
    assert result.exit_code == 2 and "KV plan does not fit" in result.output
    assert "At concurrency 8 the largest context that fits is" in result.output
    assert "at 4,096 tokens the largest concurrency that fits is" in result.output


def _published(tmp_path, config, fp8):
    (tmp_path / "ckpt").mkdir(parents=True)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.yaml").write_text(f"model:\n  checkpoint: ./ckpt\npasses:\n  - fp8: {json.dumps(fp8)}\n"
                                         "kv:\n  max_context: 1048576\n")
    return tmp_path / "model.yaml"


def _families(plan):
    out = {}
    for s in plan["slots"].values():
        f = out.setdefault(s["family"], {"layers": 0, "entry": s["entry_bytes"], "per_token": 0.0, "bytes": 0})
        f["layers"] += 1
        f["bytes"] += s["bytes"]
        f["per_token"] += s["entry_bytes"] / s["tokens_per_entry"]
    return out


@pytest.mark.parametrize("config, layers, bf16_gib", [(V4_FLASH, (21, 20), 6.719), (V4_PRO, (30, 31), 9.617)])
def test_plan_of_the_published_configs_matches_the_public_figures(config, layers, bf16_gib, tmp_path):
    """All-bf16 entries: 1024 B (CSA, HCA), 256 B (indexer keys) -> 6.72 / 9.62 GiB at 1M tokens, as
    published for Flash / Pro; DeepSeek's FP8 entry is 584 B, its FP4 indexer key 68 B."""
    bf16 = _families(plan_model(_published(tmp_path / "bf16", config, {"kv": "bf16", "indexer": "bf16"})))
    compressed = sum(bf16[f]["bytes"] for f in ("CSA entries", "CSA indexer keys", "HCA entries"))
    assert round(compressed / GIB, 3) == bf16_gib
    fp8 = _families(plan_model(_published(tmp_path / "fp8", config, {"kv": "fp8", "indexer": "fp4"})))
    assert (fp8["CSA entries"]["layers"], fp8["HCA entries"]["layers"]) == layers
    assert fp8["CSA entries"]["entry"] == fp8["HCA entries"]["entry"] == fp8["sliding ring"]["entry"] == 584
    assert fp8["CSA indexer keys"]["entry"] == 68
    assert fp8["CSA entries"]["per_token"] == layers[0] * 584 / 4
    total = sum(fp8[f]["bytes"] for f in ("CSA entries", "CSA indexer keys", "HCA entries", "sliding ring"))
    v32 = 61 * (656 + 132) * 2**20  # DeepSeek-V3.2 at 1M tokens: 656 B FP8 MLA + 132 B FP8 indexer key per layer
    assert round(total / v32, 2) == {21: 0.07, 30: 0.10}[layers[0]]  # DeepSeek: "7%" (Flash), "10%" (Pro)


def test_plan_command_prints_the_families(tmp_path):
    spec = _published(tmp_path, V4_FLASH, {"kv": "fp8", "indexer": "fp4"})
    result = CliRunner().invoke(main, ["plan", str(spec), "--concurrency", "2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for fam in ("sliding ring", "CSA entries", "CSA indexer keys", "HCA entries", "compressor buffers"):
        assert fam in result.output
    as_json = json.loads(CliRunner().invoke(main, ["plan", str(spec), "--json", "--context", "65536"]).output)
    assert as_json["context"] == 65536 and as_json["concurrency"] == 1


def test_generate_json_reports_tier_traffic(hf_checkpoints, tmp_path):
    full = _compile(tmp_path / "full", hf_checkpoints["hc4_mixed"])
    budget, _ = _tight_budget(full, pages=2)
    _compile(tmp_path / "tight", hf_checkpoints["hc4_mixed"], {"device": budget})
    out = CliRunner().invoke(main, ["generate", str(tmp_path / "tight" / "art"), "--token-ids",
                                    ",".join(map(str, tokens(1, 200, seed=8)[0].tolist())), "--max-new-tokens", "20",
                                    "--json"])
    assert out.exit_code == 0, out.output
    tiers = json.loads(out.output)["tiers"]
    assert tiers["device"]["high_water"] <= budget and tiers["traffic"]["pages_fetched"] > 0
    info = json.loads(CliRunner().invoke(main, ["inspect", str(tmp_path / "tight" / "art"), "--json"]).output)
    assert info["kv"]["plan"]["budgets"]["device"] == budget
