"""The runtime imports nothing from the compiler: checked statically, and by running an artifact in a
process where importing any compiler package fails."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from v4c.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMPILER = ("v4c.passes", "v4c.targets", "v4c.frontend", "v4c.ir", "v4c.spec", "v4c.pipeline", "v4c.compile",
            "v4c.cli", "v4c.artifact_writer", "v4c.interpret", "v4c.yamlpos")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_runtime_sources_import_no_compiler_module():
    offenders = [(p.relative_to(ROOT).as_posix(), name) for p in (ROOT / "runtime").rglob("*.py")
                 for name in _imports(p) if name.startswith(COMPILER) or name in ("v4c.passes", "v4c.ir")]
    assert not offenders, offenders


BLOCKER = """
import sys, importlib.abc
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or any(name.startswith(b + ".") for b in BLOCKED) or name in ("tvm", "transformers"):
            raise ImportError("blocked in this test: " + name)
sys.meta_path.insert(0, Block())
from v4c.runtime.artifact import open_artifact
from v4c.runtime.score import score_tokens
from v4c.runtime.generate import generate
art = open_artifact({artifact!r})
logits = score_tokens(art.session(), [1, 2, 3, 4, 5])
print(list(logits.shape), list(generate(art.session(), [1, 2, 3], 4)))
print(sorted(m for m in sys.modules if m.startswith("v4c")))
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, hf_checkpoints):
    root = tmp_path_factory.mktemp("layering")
    (root / "model.yaml").write_text(f"model:\n  checkpoint: {hf_checkpoints['hc4_mixed']}\nkv:\n  max_context: 32\n")
    assert CliRunner().invoke(main, ["compile", str(root / "model.yaml"), "-o", str(root / "art")]).exit_code == 0
    return root / "art"


def test_an_artifact_runs_where_the_compiler_cannot_be_imported(artifact):
    code = BLOCKER.format(blocked=list(COMPILER), artifact=str(artifact))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    shape, loaded = result.stdout.strip().splitlines()
    assert shape.startswith("[5, 97]")
    assert all(m == "v4c" or m.startswith("v4c.runtime") for m in eval(loaded)), loaded
