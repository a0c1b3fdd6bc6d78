"""The `v4c` command line. Each command parses its options and calls a plain function."""

import functools
import json
import sys
import time
from pathlib import Path

import click

from v4c import __version__
from v4c.runtime.errors import V4CError


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
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or status output.")
@_user_errors
def compile_cmd(model_yaml, out_dir, dump_ir, as_json, quiet):
    """Compile MODEL_YAML (see `v4c schema`) into an artifact directory."""
    from v4c.compile import compile_model
    status = _status(quiet)
    status(f"v4c {__version__}: compiling {model_yaml} -> {out_dir}")
    t0 = time.perf_counter()
    with _progress(quiet) as progress:
        result = compile_model(model_yaml, out_dir, progress=progress, dump_ir=dump_ir)
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
    if as_json:
        click.echo(json.dumps({"artifact": str(out_dir), "weight_bytes": weight_bytes, "skipped": result.skipped,
                               "pipeline": m["pipeline"], "counters": m["counters"]}, indent=1))


class _progress:
    """A rich progress bar on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet and sys.stderr.isatty()
        self.bar, self.tasks = None, {}

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.console import Console
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        return self.update

    def update(self, task: str, done: int, total: int):
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(task, total=total)
        self.bar.update(self.tasks[task], completed=done)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--token-ids", required=True, callback=_token_ids, help="Comma-separated token ids, e.g. 3,17,5.")
@click.option("--logits-out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write float32 [S, vocab] next-token logits (.npy).")
@click.option("--chunk", type=click.IntRange(min=1),
              help="Feed the tokens through the incremental state N at a time (1: token by token). "
                   "Default: one prefill.")
@_user_errors
def score(artifact, token_ids, logits_out, chunk):
    """Write next-token logits of a token sequence."""
    import numpy as np

    from v4c.runtime.artifact import open_artifact
    from v4c.runtime.score import score_tokens
    logits = score_tokens(open_artifact(artifact).session(), token_ids, chunk)
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
@click.option("--json", "as_json", is_flag=True, help='Print {"token_ids": [...], "text": ...} when done, instead of streaming.')
@_user_errors
def generate(artifact, prompt, token_ids, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, as_json):
    """Generate a continuation of a prompt, streaming tokens as they are produced."""
    from v4c.runtime.artifact import open_artifact
    from v4c.runtime.generate import Sampling, generate as run
    if (prompt is None) == (token_ids is None):
        raise click.UsageError("give exactly one of --prompt TEXT or --token-ids IDS")
    art = open_artifact(artifact)
    tok = art.tokenizer()
    if prompt is not None:
        if tok is None:
            raise V4CError(f"{artifact} has no tokenizer; pass --token-ids instead of --prompt")
        token_ids = tok.encode(prompt).ids
    stop = () if ignore_eos else tuple(art.config.eos_token_ids)
    ids, shown = [], ""
    for t in run(art.session(), token_ids, max_new_tokens, Sampling(temperature, top_k, top_p, seed), stop):
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
    if as_json:
        click.echo(json.dumps({"token_ids": ids, "text": tok.decode(ids) if tok else None}))
    else:
        click.echo()


@main.command()
def schema():
    """Print the JSON Schema of model.yaml (for editor completion and validation)."""
    from v4c.spec import json_schema
    click.echo(json.dumps(json_schema(), indent=2))


if __name__ == "__main__":
    main()
