"""Frontend: read a checkpoint (Hugging Face or DeepSeek release layout) and lower it to IR."""

from pathlib import Path

from v4c.ir import Module

from .checkpoint import Checkpoint, CheckpointError
from .graph import build_module


def import_checkpoint(path, *, max_context: int) -> tuple[Module, Checkpoint]:
    """-> (module with lazy weights, the opened checkpoint). Fails on missing, misshaped or
    unexpected tensors; tensors the layout table lists as unused are skipped (`ckpt.unused`)."""
    ckpt = Checkpoint(path)
    used = set()

    def weight(name, shape):
        used.add(name)
        return ckpt.weight(name, shape)

    module = build_module(ckpt.config, weight, max_context=max_context, name=Path(path).resolve().name)
    extra = ckpt.unexpected(used)
    if extra:
        raise CheckpointError(
            f"{len(extra)} tensors in {ckpt.path} are neither used by the model nor known to be unused: "
            f"{', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''} (does config.json match the weights?)")
    return module, ckpt


__all__ = ["Checkpoint", "CheckpointError", "build_module", "import_checkpoint"]
