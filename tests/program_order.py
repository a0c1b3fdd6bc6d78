"""Triton's interpreter runs a launch's programs one after another in grid order (x, then y, then z). A GPU
runs them in any order, and at once: a kernel whose programs hand work to each other (the arrival counters of
common.arrived_last, state that one program writes and another reads) must not depend on that order. Under
`shuffled_programs` every interpreted launch runs its programs in a random order instead (seeded per launch,
reproducible), so a test written for the interpreter also checks order independence. It cannot check what
only concurrency shows (two programs interleaved inside one kernel, memory visibility): those stay static.

tests/conftest.py turns it on for the whole session, reseeded for each test from its node id (a test sees the
same orders alone as in the whole run); V4C_PROGRAM_ORDER=grid turns it off (Triton's own order),
V4C_PROGRAM_ORDER=<int> picks another seed.
"""

import contextlib
import itertools
import os
import random


def _builder():
    from triton.runtime import interpreter
    return interpreter.interpreter_builder


class Shuffle:
    def __init__(self, seed: int):
        self.seed = seed
        self.rng = random.Random(seed)

    def reseed(self, key: str) -> None:
        """Launches from here on take their orders from (seed, key): str seeds are stable across processes."""
        self.rng = random.Random(f"{self.seed}:{key}")


@contextlib.contextmanager
def shuffled_programs(seed: int = 0):
    """Every interpreted launch inside runs its programs in a random permutation of the grid: the interpreter's
    loop still makes one call per program, and each call is given the next grid index of the permutation."""
    builder = _builder()
    shuffle = Shuffle(seed)
    order = iter(())
    set_dim, set_idx = type(builder).set_grid_dim, type(builder).set_grid_idx
    outer = {k: builder.__dict__[k] for k in ("set_grid_dim", "set_grid_idx") if k in builder.__dict__}

    def set_grid_dim(nx, ny, nz):
        nonlocal order
        set_dim(builder, nx, ny, nz)
        grid = list(itertools.product(range(nx), range(ny), range(nz)))
        shuffle.rng.shuffle(grid)
        order = iter(grid)

    def set_grid_idx(x, y, z):
        set_idx(builder, *next(order))

    builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx
    try:
        yield shuffle
    finally:  # an enclosing shuffle's methods again, else the class's
        del builder.set_grid_dim, builder.set_grid_idx
        builder.__dict__.update(outer)


def session_order():
    """The order conftest.py asks for: a seed, or None for the interpreter's grid order."""
    value = os.environ.get("V4C_PROGRAM_ORDER", "0")
    return None if value == "grid" else int(value)
