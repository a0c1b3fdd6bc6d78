"""The compressor pair (kernels/compressor_pair.py, the triton lowering's compress_pair.py): a CSA layer's two
compressors in one launch at a device position, bit for bit the two compress launches it replaces, and the
rewrite that makes the pairs."""

import pytest
import torch

from test_triton_compressor import assert_state_match, clone, make_inputs, make_state
from v4c.ir import Function, Instr
from v4c.ir import Value as IRValue
from v4c.ir.types import f32
from v4c.runtime.kernels.compressor import compress_pair as reference
from v4c.targets.triton import compress_pair as rewrite
from v4c.targets.triton.kernels import compressor, compressor_pair
from v4c.targets.triton.kernels.compressor_pair import compress_pair

B, RATE = 2, 4
# (d, rope half, format) of the first and the second op: V4's KV entries (fp8_split) and indexer keys
# (fp8_block / fp4_block) at small odd sizes, and two that differ in overlap and rate handling
CASES = [((75, 3, "fp8_split"), (13, 2, "fp8_block"), True),
         ((72, 4, "fp8_split"), (16, 4, "fp4_block"), True),
         ((13, 2, "f32"), (9, 1, "bf16"), False)]


def _ops(case):
    (d1, h1, f1), (d2, h2, f2), overlap = case
    inputs = make_inputs(B, 11, d1, RATE, h1, overlap), make_inputs(B, 11, d2, RATE, h2, True)
    state = make_state(B, d1, RATE, h1, overlap, f1) + make_state(B, d2, RATE, h2, True, f2)
    first = {"rate": RATE, "overlap": overlap, "eps": 1e-6, "kv_format": f1, "rope_scale": 0.9}
    second = {"rate": RATE, "overlap": True, "eps": 1e-5, "kv_format": f2}
    return inputs, state, first, second


def _launches(monkeypatch):
    """Counts the launches of the two kernels."""
    seen = []
    for module, name in ((compressor, "_compress_kernel"), (compressor_pair, "_compress_pair_kernel")):
        kernel = getattr(module, name)

        class Counted:
            def __init__(self, kernel=kernel, name=name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                seen.append((self.name, tuple(grid)))
                return self.kernel[grid]
        monkeypatch.setattr(module, name, Counted())
    return seen


@pytest.mark.parametrize("case", CASES, ids=["kv+keys_fp8", "kv+keys_fp4", "no_overlap"])
def test_one_launch_at_a_device_position_is_the_two_compress_launches(case, monkeypatch):
    """Token by token from position 0 through three closed windows: at a device position the pair is one launch
    of grid (1, B, 2) whose state is, bit for bit, that of the two compress launches at the same position (the
    same programs), and within the compressor's tolerances of the torch kernel's."""
    (a, b), state, first, second = _ops(case)
    ours, apart, ref = clone(state), clone(state), clone(state)
    n = len(state) // 2 if case[2] else 3
    seen = _launches(monkeypatch)
    for t in range(11):
        pos = torch.tensor([t])
        tok = [x[:, t:t + 1] if x.dim() == 3 else x for x in (*a, *b)]
        compress_pair(*tok, state=ours, pos0=pos, first=first, second=second)
        assert seen.pop() == ("_compress_pair_kernel", (1, B, 2)) and not seen
        compressor.compress(*tok[:5], state=apart[:n], pos0=pos, **first)
        compressor.compress(*tok[5:], state=apart[n:], pos0=pos, **second)
        reference(*tok, state=ref, pos0=t, first=first, second=second)
        seen.clear()
        for x, y in zip(ours, apart):
            assert torch.equal(x, y), t
    held = 11 % RATE  # the buffers' rows past the open window's are stale, never read (test_triton_compressor)
    for part, op, fmt, (d, half, _) in ((ours[:n], ref[:n], first["kv_format"], case[0]),
                                        (ours[n:], ref[n:], second["kv_format"], case[1])):
        assert_state_match([t[:, :held] for t in part[:2]] + list(part[2:]),
                           [t[:, :held] for t in op[:2]] + list(op[2:]), fmt, d, 2 * half)
    assert ours[n - 1].float().abs().sum() > 0 and ours[-1].float().abs().sum() > 0  # entries were written


def test_at_a_host_position_it_is_the_two_compress_calls(monkeypatch):
    """Prefill of 7 then 2 tokens at host positions: the two compress calls, their launches and their state."""
    (a, b), state, first, second = _ops(CASES[0])
    ours, apart = clone(state), clone(state)
    seen = _launches(monkeypatch)
    for lo, hi in ((0, 7), (7, 9)):
        chunk = [x[:, lo:hi] if x.dim() == 3 else x for x in (*a, *b)]
        compress_pair(*chunk, state=ours, pos0=lo, first=first, second=second)
        compressor.compress(*chunk[:5], state=apart[:5], pos0=lo, **first)
        compressor.compress(*chunk[5:], state=apart[5:], pos0=lo, **second)
    assert [name for name, _ in seen] == ["_compress_kernel"] * 8  # 2 closed windows a call, 2 ops, twice
    assert all(torch.equal(x, y) for x, y in zip(ours, apart))


def test_errors_name_the_problem():
    (a, b), state, first, second = _ops(CASES[0])
    pos = torch.tensor([3])
    tok = [x[:, :1] if x.dim() == 3 else x for x in (*a, *b)]
    with pytest.raises(ValueError, match="first compressor's 5 slots then the second's"):
        compress_pair(*tok, state=state[:5], pos0=pos, first=first, second=second)
    with pytest.raises(ValueError, match="second: expected a compress op's attributes"):
        compress_pair(*tok, state=state, pos0=pos, first=first, second={"rate": RATE})
    with pytest.raises(ValueError, match="kv2: batch 1 differs from kv's 2"):
        bad = make_state(1, 13, RATE, 2, True, "fp8_block")
        compress_pair(*tok[:5], *[x[:1] if x.dim() == 3 else x for x in tok[5:]], state=state[:5] + bad, pos0=pos,
                      first=first, second=second)
    with pytest.raises(ValueError, match="state buf_kv"):  # the second op's own checks
        compress_pair(*tok, state=state[:5] + state[:5], pos0=pos, first=first, second=second)


# --- the rewrite -------------------------------------------------------------------------------------------
def val(name: str) -> IRValue:
    return IRValue(name, f32(1))


def _compress(name: str, rate: int, reads: str = "x") -> Instr:
    return Instr("compress", [val(reads), val(reads + "g")], [], {"rate": rate, "overlap": True, "eps": 1e-6},
                 [f"{name}.buf", f"{name}.entries"])


def _reader(name: str) -> Instr:
    return Instr("attention", [val("q")], [val(f"o_{name}")], {}, [f"{name}.entries"])


class _Module:  # what join reads and makes of a Module: func, replace(func=)
    def __init__(self, func):
        self.func = func

    def replace(self, func):
        return _Module(func)


def _join(body):
    joined, n = rewrite.join(_Module(Function([val("x")], body, val("out"))))
    return [ins.op + (":" + "+".join(s.split(".")[0] for s in ins.state[::2]) if ins.state else "")
            for ins in joined.func.body], n


def test_the_rewrite_pairs_neighbours_of_one_rate_that_nothing_between_reads():
    other = Instr("linear", [val("x")], [val("y")])
    body, n = _join([_compress("kv", 4), other, _compress("keys", 4), _reader("keys"), _reader("kv"),
                     _compress("hca", 128), _reader("hca")])
    assert n == 1 and body == ["linear", "compress_pair:kv+keys", "attention:keys", "attention:kv",
                               "compress:hca", "attention:hca"]
    body, n = _join([_compress("kv", 4), _reader("kv"), _compress("keys", 4)])  # a reader between: apart
    assert n == 0 and body == ["compress:kv", "attention:kv", "compress:keys"]
    body, n = _join([_compress("a", 4), other, _compress("b", 128), _compress("c", 128), _compress("d", 4)])
    assert n == 1 and body == ["compress:a", "linear", "compress_pair:b+c", "compress:d"]


def test_a_pair_keeps_both_ops_attributes_and_state():
    first, second = _compress("kv", 4), _compress("keys", 4, reads="z")
    second.attrs["kv_format"] = "fp4_block"
    (pair,), = [rewrite.join(_Module(Function([val("x")], [first, second], val("out"))))[0].func.body]
    assert pair.op == "compress_pair" and pair.results == []
    assert [v.name for v in pair.operands] == ["x", "xg", "z", "zg"]
    assert pair.attrs == {"first": first.attrs, "second": second.attrs}
    assert pair.state == ["kv.buf", "kv.entries", "keys.buf", "keys.entries"]
