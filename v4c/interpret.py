"""The reference interpreter: the runtime's executor over a module lowered for the torch target.

Used by tests and by passes that need to run the model (calibration). Observers see every
step's inputs and outputs.
"""

from v4c.ir import Module, load_weight
from v4c.passes import memory_plan
from v4c.runtime.executor import Session
from v4c.targets.torch import lower


def interpret(module: Module, batch: int = 1, prefill_chunk: int = 512) -> Session:
    """A fresh session over `module`, with its weights materialised (planned here if needed)."""
    if "memory" not in module.plans:
        module = memory_plan.run(module, memory_plan.Options())
    weights = {name: load_weight(w) for name, w in module.weights.items()}
    return Session(lower(module, prefill_chunk=prefill_chunk), weights, batch=batch)
