"""tests/program_order.py: interpreted launches run their programs in a shuffled order (conftest.py's session
fixture), every program exactly once; the kernels' order independence is then checked by their own tests."""

import torch
import triton
import triton.language as tl

from program_order import session_order, shuffled_programs


@triton.jit
def _ticket_kernel(counter_ptr, out_ptr):
    """out[program] = the number of programs that ran before it."""
    pid = tl.program_id(0) * tl.num_programs(1) * tl.num_programs(2) + tl.program_id(1) * tl.num_programs(2) \
        + tl.program_id(2)
    tl.store(out_ptr + pid, tl.atomic_add(counter_ptr, 1))


def tickets(grid) -> torch.Tensor:
    n = grid[0] * grid[1] * grid[2]
    counter, out = torch.zeros(1, dtype=torch.int32), torch.full((n,), -1, dtype=torch.int32)
    _ticket_kernel[grid](counter, out)
    assert int(counter) == n
    return out


def test_every_program_runs_once_in_a_shuffled_order():
    seed = session_order()
    order = tickets((5, 3, 4))
    assert sorted(order.tolist()) == list(range(60))  # each program once
    if seed is None:  # V4C_PROGRAM_ORDER=grid: the interpreter's own order
        assert order.tolist() == list(range(60))
    else:
        assert order.tolist() != list(range(60))
        assert tickets((5, 3, 4)).tolist() != order.tolist()  # a new order each launch


def test_the_order_is_reproducible_and_restored():
    with shuffled_programs(7):
        first = [tickets((16, 1, 1)).tolist() for _ in range(2)]
    with shuffled_programs(7):
        again = [tickets((16, 1, 1)).tolist() for _ in range(2)]
    assert first == again and first[0] != first[1]
    with shuffled_programs(7), shuffled_programs(8):  # nested: the inner one rules, then the outer one's again
        inner = tickets((16, 1, 1)).tolist()
    assert inner != first[0]
    seed = session_order()
    after = tickets((16, 1, 1)).tolist()  # the session's own order is back
    assert sorted(after) == list(range(16)) and (seed is not None or after == list(range(16)))
