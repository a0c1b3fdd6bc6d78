"""The `v4c` command line. Each command parses its options and calls a plain function."""

import functools
import json
import sys
import time
import warnings
from pathlib import Path

import click

from v4c import __version__
from v4c.runtime.errors import V4CError
from v4c.views import print_bench, print_description, print_plan, progress_bar


def _user_errors(fn):
    """Print V4CErrors as one clean message (no traceback) and exit with their code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except V4CError as e:
            msg = str(e)
            click.echo(msg if ": error: " in msg else f"v4c: error: {msg}", err=True)
            sys.exit(e.exit_code)
    return wrapper


def _token_ids(ctx, param, value):
    if value is None:
        return None
    try:
        ids = [int(t) for t in value.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers such as 3,17,5") from None
    return ids


def _kernel_options(fn):
    """--kernels / --device / --strict-kernels / --cuda-graphs, passed on as one dict `run`."""
    @click.option("--kernels", type=click.Choice(["auto", "torch"]), default="auto", show_default=True,
                  help="auto: the artifact's own kernels (its target); torch: the runtime's reference kernels "
                       "(any artifact, any device).")
    @click.option("--device", help="Where the model runs: cpu, cuda, cuda:1... Default: cuda for a triton artifact "
                                   "on a GPU machine, else cpu.")
    @click.option("--strict-kernels", is_flag=True,
                  help="A Triton kernel that refuses its inputs stops the run, instead of running that step as "
                       "the torch kernel (reported).")
    @click.option("--cuda-graphs", is_flag=True,
                  help="Triton artifact on a GPU: capture the steps that do not depend on the position as CUDA "
                       "graphs once and replay them, so a decode step launches a few graphs instead of one kernel "
                       "per step (less host time per token).")
    @functools.wraps(fn)
    def wrapper(*args, kernels, device, strict_kernels, cuda_graphs, **kwargs):
        return fn(*args, run={"kernels": kernels, "device": device, "strict": strict_kernels, "graphs": cuda_graphs},
                  **kwargs)
    return wrapper


def _open_session(art, run: dict):
    with warnings.catch_warnings():  # fallbacks are summarised by _report_kernels, not as Python warnings
        warnings.simplefilter("ignore", RuntimeWarning)
        return art.session(**run)


def _report_kernels(session) -> dict:
    """Where the steps ran; fallbacks and toolchain notes also go to stderr."""
    report = session.kernels.report()
    graphs = session.graph_report()
    if graphs is not None:
        report["graphs"] = graphs
        for failure in graphs["failed"]:
            click.echo(f"v4c: a CUDA graph capture failed, that segment runs eagerly: {failure}", err=True)
    for note in report.get("notes", []):
        click.echo(f"v4c: note: {note}", err=True)
    if report["fallbacks"]:
        counts: dict = {}
        for f in report["fallbacks"]:
            counts.setdefault((f["kernel"], f["reason"]), []).append(f["step"])
        lines = [f"  {kernel} x{len(steps)}: {reason}" for (kernel, reason), steps in sorted(counts.items())]
        click.echo(f"v4c: {report['steps']['torch']} of {sum(report['steps'].values())} steps ran as torch kernels "
                   "(fallbacks):\n" + "\n".join(lines), err=True)
    return report


def _status(quiet: bool):
    return (lambda *a: None) if quiet else (lambda msg: click.echo(msg, err=True))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="v4c")
def main():
    """v4c compiles DeepSeek-V4-architecture checkpoints into verifiable artifacts and runs them.

    \b
    Typical use:
      v4c compile examples/tiny-v4/model.yaml -o build/tiny    # checkpoint -> artifact
      v4c generate build/tiny --prompt "def main" --max-new-tokens 40
      v4c score build/tiny --token-ids 3,17,5 --logits-out logits.npy
      v4c schema > model.schema.json                           # editor completion for model.yaml
    """


@main.command("compile")
@click.argument("model_yaml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Artifact directory to write (replaced atomically if it already holds an artifact).")
@click.option("--dump-ir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write the IR after the frontend and after each pass into this directory.")
@click.option("--allow-drift", is_flag=True, help="Write the artifact even if a drift gate (report.thresholds) fails.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or status output.")
@_user_errors
def compile_cmd(model_yaml, out_dir, dump_ir, allow_drift, as_json, quiet):
    """Compile MODEL_YAML (see `v4c schema`) into an artifact directory.

    With a `calibration:` section it also writes report/index.html and report/calibration.json and
    checks the drift gates: a failing gate exits 1 and writes nothing, unless --allow-drift.
    """
    from v4c.compile import compile_model
    status = _status(quiet)
    status(f"v4c {__version__}: compiling {model_yaml} -> {out_dir}")
    t0 = time.perf_counter()
    with progress_bar(quiet) as progress:
        result = compile_model(model_yaml, out_dir, progress=progress, dump_ir=dump_ir, allow_drift=allow_drift)
    m = result.manifest
    if result.skipped:
        reasons = {}
        for reason in result.skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, n in reasons.items():
            status(f"skipped {n} checkpoint tensors: {reason}")
    weight_bytes = sum(meta["size"] for rel, meta in m["files"].items() if rel.startswith("weights/"))
    status(f"wrote {out_dir} ({m['source']['layout']} checkpoint, target {m['target']['name']}, "
           f"{weight_bytes / 2**20:.1f} MiB of weights) in {time.perf_counter() - t0:.1f}s")
    if result.report is not None:
        from v4c.report import table
        e = result.report["end_to_end"]
        status(f"report: KL {e['kl_mean']:.4g} (p99 {e['kl_p99']:.4g}), top-1 {e['top1']:.2%}, top-5 {e['top5']:.2%}, "
               f"perplexity {e['ppl_reference']:.4g} -> {e['ppl_compiled']:.4g}; {out_dir}/report/index.html")
        if result.report["gates"]["results"]:
            status(table(result.report["gates"]["results"]))
    if as_json:
        click.echo(json.dumps({"artifact": str(out_dir), "weight_bytes": weight_bytes, "skipped": result.skipped,
                               "pipeline": m["pipeline"], "counters": m["counters"]}, indent=1))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--token-ids", required=True, callback=_token_ids, help="Comma-separated token ids, e.g. 3,17,5.")
@click.option("--logits-out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write float32 [S, vocab] next-token logits (.npy).")
@click.option("--chunk", type=click.IntRange(min=1),
              help="Feed the tokens through the incremental state N at a time (1: token by token). "
                   "Default: one prefill.")
@_kernel_options
@_user_errors
def score(artifact, token_ids, logits_out, chunk, run):
    """Write next-token logits of a token sequence."""
    import numpy as np

    from v4c.runtime.artifact import open_artifact
    from v4c.runtime.score import score_tokens
    session = _open_session(open_artifact(artifact), run)
    logits = score_tokens(session, token_ids, chunk)
    _report_kernels(session)
    np.save(logits_out, logits.numpy().astype(np.float32))
    click.echo(f"wrote {logits_out}: float32 {list(logits.shape)}", err=True)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", help="Prompt text (needs the artifact's tokenizer).")
@click.option("--token-ids", callback=_token_ids, help="Prompt as comma-separated token ids.")
@click.option("--max-new-tokens", required=True, type=click.IntRange(min=1), help="Tokens to generate at most.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0 = greedy; otherwise sample.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="Sample from the k best (0 = all).")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True), help="Nucleus sampling.")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed.")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at the model's end-of-sequence tokens.")
@click.option("--session", "session_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Continue the conversation saved in this file (if any) and save it there when done. A damaged "
                   "or mismatched file is reported and its tokens recomputed.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"token_ids": [...], "text": ..., "tiers": ..., "kernels": ..., "session": ...} when done, '
                   'instead of streaming.')
@_kernel_options
@_user_errors
def generate(artifact, prompt, token_ids, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, session_path,
             as_json, run):
    """Generate a continuation of a prompt, streaming tokens as they are produced."""
    from v4c.runtime.artifact import open_artifact
    from v4c.runtime.generate import Sampling
    if (prompt is None) == (token_ids is None):
        raise click.UsageError("give exactly one of --prompt TEXT or --token-ids IDS")
    art = open_artifact(artifact)
    conv, info = _conversation(art, session_path, run)
    tok = art.tokenizer()
    if prompt is not None:
        if tok is None:
            raise V4CError(f"{artifact} has no tokenizer; pass --token-ids instead of --prompt")
        continuing = bool(conv.history or conv.pending)  # no second BOS in the middle of a conversation
        token_ids = tok.encode(prompt, add_special_tokens=not continuing).ids
    stop = () if ignore_eos else tuple(art.config.eos_token_ids)
    ids, shown = [], ""
    if prompt is not None and not as_json:
        click.echo(click.style(prompt, dim=True), nl=False)  # the continuation streams after it
    for t in conv.generate(token_ids, max_new_tokens, Sampling(temperature, top_k, top_p, seed), stop):
        ids.append(t)
        if as_json:
            continue
        if tok is None:
            click.echo(f"{t} ", nl=False)
        else:
            text = tok.decode(ids)
            click.echo(text[len(shown):], nl=False)
            shown = text
        sys.stdout.flush()
    if session_path is not None:
        _save_conversation(art, conv, session_path, info)
    if not as_json:
        click.echo()
    kernels = _report_kernels(conv.session)
    if as_json:
        out = {"token_ids": ids, "text": tok.decode(ids) if tok else None, "tiers": conv.session.tiers.report(),
               "kernels": kernels}
        if session_path is not None:
            out["session"] = info
        click.echo(json.dumps(out))


def _conversation(art, path: Path | None, run: dict):
    """A fresh conversation, or the one saved at `path` (a damaged file is reported and recomputed)."""
    from v4c.runtime.sessions import Conversation, SessionMiss, artifact_key
    session = _open_session(art, run)
    info = {"path": str(path), "resumed": False, "miss": None, "saved": False}
    if path is None or not path.exists():
        return Conversation(session), info
    try:
        conv = Conversation.load(path, session, artifact_key(art.manifest))
        info["resumed"] = True
        return conv, info
    except SessionMiss as miss:
        session.reset()
        recompute = miss.history is not None
        info["miss"] = miss.reason
        click.echo(f"v4c: session {path}: {miss.reason}; "
                   f"{'recomputing its ' + str(len(miss.history)) + ' tokens' if recompute else 'starting afresh'}",
                   err=True)
        return Conversation(session, [], (miss.history + miss.pending) if recompute else []), info


def _save_conversation(art, conv, path: Path, info: dict) -> None:
    from v4c.runtime.sessions import SessionSaveError, artifact_key
    budget = art.manifest["kv"].get("plan", {}).get("budgets", {}).get("disk")
    try:
        info["bytes"] = conv.save(path, artifact_key(art.manifest), budget)
        info["saved"] = True
    except SessionSaveError as e:
        info["error"] = str(e)
        click.echo(f"v4c: {e}", err=True)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--key", "public_key", type=click.Path(dir_okay=False, path_type=Path),
              help="Also require a valid signature by this Ed25519 public key (PEM).")
@_user_errors
def verify(artifact, public_key):
    """Check every file of ARTIFACT (directory or .v4c) against its manifest.

    Exits 1 and names the file on a flipped byte, a truncated, missing or extra file, a path
    outside the artifact, an unknown format version, or (with --key) a missing or bad signature.
    """
    from v4c.runtime.artifact import MANIFEST, SIGNATURE, read_manifest, verify_files
    from v4c.runtime.errors import ArtifactError
    from v4c.runtime.signing import check_signature
    from v4c.runtime.store import open_store
    try:
        store = open_store(artifact)
        n = verify_files(store, read_manifest(store))
        signed = ""
        if public_key:
            sig = store.read(SIGNATURE) if store.exists(SIGNATURE) else None
            signed = f"; signature by key {check_signature(store.read(MANIFEST), sig, public_key)} is valid"
    except ArtifactError as e:
        click.echo(f"v4c verify: FAILED: {e}", err=True)
        sys.exit(1)
    click.echo(f"ok: {artifact}: {n} files match the manifest{signed}")


@main.command()
@click.argument("artifact", type=click.Path(file_okay=False, path_type=Path))
@click.option("--key", "private_key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Ed25519 private key (PEM), e.g. from `v4c keygen`.")
@_user_errors
def sign(artifact, private_key):
    """Sign an artifact directory's manifest (writes manifest.sig). Sign before `v4c pack`."""
    import os
    from v4c.runtime.artifact import MANIFEST, SIGNATURE, read_manifest, verify_files
    from v4c.runtime.signing import sign_manifest
    from v4c.runtime.store import DirStore
    store = DirStore(artifact)
    verify_files(store, read_manifest(store))  # never sign an artifact that does not verify
    tmp = artifact / f".{SIGNATURE}.partial"
    tmp.write_bytes(sign_manifest((artifact / MANIFEST).read_bytes(), private_key))
    os.replace(tmp, artifact / SIGNATURE)
    click.echo(f"signed {artifact} ({SIGNATURE})")


@main.command()
@click.argument("private_key", type=click.Path(dir_okay=False, path_type=Path))
@_user_errors
def keygen(private_key):
    """Create an Ed25519 key pair: PRIVATE_KEY (mode 0600) and PRIVATE_KEY.pub."""
    from v4c.runtime.signing import generate_keypair
    public, key_id = generate_keypair(private_key)
    click.echo(f"wrote {private_key} (keep it secret) and {public} (give it to fleets); key id {key_id}")


@main.command()
@click.argument("artifact", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The single file to write, e.g. model.v4c.")
@_user_errors
def pack(artifact, out):
    """Pack a verified artifact directory into one .v4c file (every command also reads .v4c files)."""
    from v4c.runtime.artifact import pack_artifact
    size = pack_artifact(artifact, out)
    click.echo(f"wrote {out} ({size / 2**20:.1f} MiB)")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@_user_errors
def inspect(artifact, as_json):
    """Describe an artifact: model, pipeline, bytes by component and dtype, KV cache families, plans."""
    from v4c.runtime.artifact import open_artifact
    from v4c.runtime.describe import describe
    info = describe(open_artifact(artifact, verify=False))
    if as_json:
        click.echo(json.dumps(info, indent=1))
    else:
        print_description(info)


@main.command()
@click.argument("model_yaml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--context", type=click.IntRange(min=1), help="Tokens per sequence (default: kv.max_context).")
@click.option("--concurrency", type=click.IntRange(min=1), help="Sequences in flight (default: kv.concurrency).")
@click.option("--json", "as_json", is_flag=True, help="Print the full plan (every state slot) as JSON.")
@_user_errors
def plan(model_yaml, context, concurrency, as_json):
    """Print the KV-cache plan of MODEL_YAML: per cache family, bytes per token, tier, pages and
    predicted traffic. Reads only config.json: no weights are converted."""
    from v4c.plan import plan_model
    p = plan_model(model_yaml, context, concurrency)
    if as_json:
        click.echo(json.dumps(p, indent=1))
        return
    print_plan(p)


@main.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Choice(["none", "transformers"]), default="none", show_default=True,
              help="Also time transformers' eager DeepseekV4ForCausalLM (fp32 and bf16) on the same checkpoint, "
                   "in the same run (needs transformers installed and --checkpoint).")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The Hugging Face checkpoint the artifact was compiled from (for --baseline transformers).")
@click.option("--context", default=512, show_default=True, type=click.IntRange(min=1),
              help="Prompt tokens per sequence (prefill).")
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(min=1), help="Greedy decode steps.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Sequences decoded together.")
@click.option("--runs", default=5, show_default=True, type=click.IntRange(min=1),
              help="Runs per system (each in a fresh process); figures are medians with min and max.")
@click.option("--kernels", type=click.Choice(["auto", "torch"]), default="auto", show_default=True,
              help="auto: the artifact's own kernels; torch: the runtime's reference kernels.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the JSON result here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@_user_errors
def bench_cmd(artifact, baseline, checkpoint, context, new_tokens, batch, runs, kernels, out, as_json):
    """Time ARTIFACT: prefill tokens/s, time to first token, decode tokens/s, peak RSS, and the bytes
    a decode step reads per second against this machine's memory bandwidth (a large copy, measured
    in the same run). Every run is a fresh process with a seeded random prompt.

    \b
    Example:
      v4c bench build/small --baseline transformers --checkpoint ckpt/small --context 2048 --new-tokens 64
    """
    from v4c.bench import bench
    result = bench(str(artifact), baseline=None if baseline == "none" else baseline,
                   checkpoint=str(checkpoint) if checkpoint else None, context=context, new_tokens=new_tokens,
                   batch=batch, runs=runs, kernels=kernels, progress=lambda m: click.echo(m, err=True))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    print_bench(result)


@main.group()
def report():
    """Calibration / drift reports."""


@report.command("diff")
@click.argument("old", type=click.Path(exists=True, path_type=Path))
@click.argument("new", type=click.Path(exists=True, path_type=Path))
@click.option("--max-kl", type=float, help="Gate: NEW's mean KL at most this.")
@click.option("--min-top1", type=float, help="Gate: NEW's top-1 agreement at least this.")
@click.option("--max-ppl-increase", type=float, help="Gate: NEW's relative perplexity increase at most this.")
@click.option("--min-sqnr", type=float, help="Gate: NEW's worst layer SQNR (dB) at least this.")
@click.option("--max-kl-increase", type=float, help="Gate: NEW's mean KL minus OLD's at most this.")
@click.option("--max-top1-drop", type=float, help="Gate: OLD's top-1 agreement minus NEW's at most this.")
@_user_errors
def report_diff(old, new, max_kl, min_top1, max_ppl_increase, min_sqnr, max_kl_increase, max_top1_drop):
    """Compare two reports (artifacts, .v4c files or calibration.json): print what changed; exit 1
    if a gate fails. Without gate options, NEW's own thresholds from model.yaml apply."""
    from v4c.report import diff, load_report, table
    o, n = load_report(old), load_report(new)
    given = {"max_kl": max_kl, "min_top1": min_top1, "max_ppl_increase": max_ppl_increase, "min_sqnr_db": min_sqnr}
    thresholds = {k: v for k, v in given.items() if v is not None}
    if not thresholds and max_kl_increase is None and max_top1_drop is None:
        thresholds = n.get("gates", {}).get("thresholds", {})
    text, rows = diff(o, n, thresholds, max_kl_increase, max_top1_drop)
    click.echo(text)
    if rows:
        click.echo("\n" + table(rows))
    if any(not r["passed"] for r in rows):
        sys.exit(1)


@main.command()
def schema():
    """Print the JSON Schema of model.yaml (for editor completion and validation)."""
    from v4c.spec import json_schema
    click.echo(json.dumps(json_schema(), indent=2))


if __name__ == "__main__":
    main()
