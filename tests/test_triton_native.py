"""The kernels' GPU branches (NATIVE: hardware e4m3 / bf16 casts, bf16 tensor-core dots) under the interpreter
with a GPU's arithmetic (gpu_semantics.py). Each GPU branch must give its interpreter branch's result bit for bit:
the interpreter branches compute the same roundings in integer arithmetic and the same dots in fp32, and every
other test holds them to the torch references. Before this file, the GPU branches only ran on a lent GPU.
"""

import contextlib

import pytest
import torch
import triton
import triton.language as tl

from conftest import tokens
from gpu_semantics import as_gpu, gpu_arithmetic, kernel_modules
from test_triton_attention import CASES, FORMATS, clone, make_case
from test_triton_gemm import EXACT_ACTS, fp8_weight, randn, tricky_activations
from test_triton_moe import problem, quantized
from test_triton_target import FP8, NAME, _compile, _prefill_then_decode
from v4c.runtime.artifact import open_artifact
from v4c.runtime.quant import fake_quant_act
from v4c.targets.triton.kernels import attention as attention_module
from v4c.targets.triton.kernels import gemm as gemm_module
from v4c.targets.triton.kernels import moe as moe_module
from v4c.targets.triton.kernels.attention import attention
from v4c.targets.triton.kernels.gemm import grouped_linear_fp8, linear_fp8
from v4c.targets.triton.kernels.moe_quant import moe_experts_q


@triton.jit
def _gpu_ops(x_ptr, bf16_ptr, e4m3_ptr, a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(bf16_ptr + i, x.to(tl.bfloat16).to(tl.int16, bitcast=True))
    tl.store(e4m3_ptr + i, tl.clamp(x, -448.0, 448.0).to(tl.float8e4nv).to(tl.uint8, bitcast=True))
    tile = i[:, None] * N + i[None, :]
    a, b = tl.load(a_ptr + tile).to(tl.bfloat16), tl.load(b_ptr + tile).to(tl.bfloat16)
    tl.store(c_ptr + tile, tl.dot(a, b))


def _run_gpu_ops():
    # bf16 ties (1 + 2^-8 rounds to even 1.0), a value above a tie (1 + 3 2^-9 rounds up), e4m3 ties (1.0625 ->
    # 1.0, 1.1875 -> 1.25), a mantissa carry into the exponent (1.9375 -> 2.0), saturation (500 -> 448)
    x = torch.tensor([1 + 2**-8, 1 + 3 * 2**-9, 1.0625, 1.1875, 1.9375, -1.9375, 500.0, 0.3] * 2)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).to(torch.bfloat16).float() for _ in range(2))
    bf16, e4m3, c = torch.empty(16, dtype=torch.int16), torch.empty(16, dtype=torch.uint8), torch.empty(16, 16)
    _gpu_ops[(1,)](x, bf16, e4m3, a, b, c, N=16)
    want = (x.to(torch.bfloat16).view(torch.int16), x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8), a @ b)
    return (bf16, e4m3, c), want


def test_the_interpreter_needs_the_shim():
    """Triton 3.9's interpreter truncates fp32 -> bf16, rounds fp32 -> e4m3 ties away (and loses a carry), and
    multiplies bf16 bit patterns in tl.dot; with gpu_arithmetic() all three are a GPU's (torch's) results.
    If the first half fails, the interpreter got fixed and the shim's patch of that operation can go."""
    (bf16, e4m3, c), (want_bf16, want_e4m3, want_c) = _run_gpu_ops()
    assert not torch.equal(bf16, want_bf16) and not torch.equal(e4m3, want_e4m3)
    assert not torch.allclose(c, want_c, rtol=1e-3)
    with gpu_arithmetic():
        (bf16, e4m3, c), (want_bf16, want_e4m3, want_c) = _run_gpu_ops()
    assert torch.equal(bf16, want_bf16) and torch.equal(e4m3, want_e4m3)
    torch.testing.assert_close(c, want_c, rtol=1e-6, atol=1e-5)


def _gpu_run(monkeypatch, modules, fn, proof: bool = True):
    """fn() with `modules`' launchers on their GPU branches and the interpreter computing as a GPU. proof: also
    show the GPU branch ran, since without the shim the interpreter's own casts and dots change the result."""
    with monkeypatch.context() as m:
        as_gpu(m, modules)
        with gpu_arithmetic():
            out = fn()
        if proof:
            assert not torch.equal(fn(), out), "the GPU branch did not run (native_cvt not patched?)"
    return out


@pytest.mark.parametrize("mode", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_attention_bf16_dots_on_the_gpu_branch(monkeypatch, fmt, mode):
    """DOT bf16 with the hardware casts and tensor-core dots (NATIVE) equals the interpreter's bf16 branch, whole
    and split into runs; "auto" takes bf16 there."""
    cases = [(*c, 100 + i, 9) for i, c in enumerate(CASES)] + [(2, 1, 40, 60, 31, 40), (1, 6, 20, 3, 32, 40)]
    for i, (batch, s, window, pos0, seed, cap) in enumerate(cases):
        args, state, kwargs = make_case(fmt, batch, s, window, pos0, mode, seed=seed, capacity=cap)
        for config in ({"DOT": "bf16", "BLOCK_N": 16}, {"DOT": "bf16", "BLOCK_N": 16, "SPLIT_KV": 3}):
            plain_state, gpu_states = clone(state), []

            def run(cfg):
                gpu_states.append(clone(state))
                return attention(*args, state=gpu_states[-1], **kwargs, config=cfg)
            plain = attention(*args, state=plain_state, **kwargs, config=config)
            gpu = _gpu_run(monkeypatch, [attention_module], lambda: run({**config, "DOT": "auto"}), proof=i == 0)
            gpu_state = gpu_states[0]
            assert torch.equal(gpu, plain), f"{config} case {batch, s, window, pos0}"
            assert all(torch.equal(a, b) for a, b in zip(gpu_state, plain_state) if isinstance(a, torch.Tensor))


@pytest.mark.parametrize("act", [a for a in EXACT_ACTS if a.get("group", 32) >= 32],
                         ids=lambda a: "-".join(str(v) for v in a.values()))
def test_fused_activation_quantization_on_the_gpu_branch(monkeypatch, act):
    """The hardware e4m3 cast of the fp8 dot's activations (ties, carries, subnormals, saturation) is
    fake_quant_act exactly, as the integer rounding of the interpreter branch is."""
    x = tricky_activations()
    eye = torch.eye(x.shape[-1]).to(torch.float8_e4m3fn)
    for once in ([False, True] if act["mode"] == "dynamic" else [False]):
        config = {"BLOCK_K": 32, "FP8_DOT": True, "QUANT_ONCE": once}
        y = _gpu_run(monkeypatch, [gemm_module],  # QUANT_ONCE: e4m3 codes from their own kernel, no cast left
                     lambda: linear_fp8(x, eye, torch.ones(1, 1), block=list(eye.shape), act=act, config=config),
                     proof=not once)
        assert torch.equal(y, fake_quant_act(x, act)), f"QUANT_ONCE {once}"


@pytest.mark.parametrize("m,groups,k,n,block,group", [(70, 1, 160, 33, [16, 32], 32), (9, 2, 97, 40, [128, 128], 128),
                                                      (5, 1, 64, 17, [1, 32], 64)])
def test_fp8_gemm_on_the_gpu_branch(monkeypatch, m, groups, k, n, block, group):
    x = randn(m, groups, k, seed=41) * 3
    w, s = fp8_weight(groups * n, k, block, "ue8m0", seed=42)
    act = {"mode": "dynamic", "group": group, "scale_format": "ue8m0"}
    for config in ({"FP8_DOT": True, "BLOCK_K": 32}, {"FP8_DOT": True, "BLOCK_K": 32, "SPLIT_K": 2}):
        def run():
            return grouped_linear_fp8(x, w, s, groups=groups, block=block, act=act, config=config)
        assert torch.equal(_gpu_run(monkeypatch, [gemm_module], run), run()), config


DYN_UE = {"mode": "dynamic", "group": 32, "scale_format": "ue8m0"}


@pytest.mark.parametrize("fmt, block, down_block, act_in, act_mid", [
    ("fp8", [32, 32], [64, 32], DYN_UE, {"mode": "static", "scale": 0.01}),
    ("fp8", [32, 32], [64, 32], {"mode": "static", "scale": 0.01}, {"mode": "dynamic", "group": 64}),
    ("fp8", [128, 128], [128, 128], DYN_UE, DYN_UE),
    ("fp4", None, None, DYN_UE, {"mode": "static", "scale": 0.01}),
    ("fp4", None, None, {"mode": "dynamic", "group": 64}, DYN_UE)])
def test_moe_experts_q_on_the_gpu_branch(monkeypatch, fmt, block, down_block, act_in, act_mid):
    """FP8 blocks that put every K chunk in one weight block column, so both GEMMs take the fp8 dot; FP4 experts,
    whose code dots a GPU takes as bf16 tensor-core dots of exact values: the interpreter's branches, bit for bit."""
    x, weights, idx, gate_up, down = problem(2, 5, 96, 64, 4, 2, seed=10 if fmt == "fp8" else 12)
    q = quantized(gate_up, down, fmt, block, down_block, "ue8m0")
    kw = {"format": fmt, "block": block, "down_block": down_block, "act_in": act_in, "act_mid": act_mid}

    def run():
        return moe_experts_q(x, weights, idx, *q, **kw, config={"FP8_DOT": True})
    assert torch.equal(_gpu_run(monkeypatch, [moe_module], run), run())


@pytest.fixture(scope="module")
def fp8_build(tmp_path_factory, hf_checkpoints):
    return _compile(tmp_path_factory.mktemp("native"), hf_checkpoints[NAME], "triton", FP8, name="fp8")


@pytest.mark.slow  # 40-100 s of artifacts under the interpreter; make test-all
def test_an_artifact_on_the_gpu_branches(monkeypatch, fp8_build):
    """A whole FP8 triton artifact with every launcher deciding as on an H100 (native casts, bf16 attention
    dots, fp8 dots, no host-side id checks, 132 SMs for the split heuristics) equals the interpreter branches
    with the same decisions."""
    art, ids = open_artifact(fp8_build), tokens(1, 19, seed=4)

    def run(native: bool):
        session = art.session()  # loads the artifact's own copy of the kernels
        modules = kernel_modules()
        assert any(mod.__name__.startswith("_v4c_triton_kernels_") for mod in modules)  # the artifact's copy
        with monkeypatch.context() as m:
            as_gpu(m, modules, sms=132)
            if not native:  # the same decisions, computed by the interpreter branches (DOT auto -> bf16 kept)
                for mod in modules:
                    if hasattr(mod, "_dot_precision"):
                        m.setattr(mod, "_dot_precision", lambda cfg, device: "bf16" if cfg["DOT"] == "auto"
                                  else cfg["DOT"])
                    if hasattr(mod, "native_cvt"):
                        m.setattr(mod, "native_cvt", lambda device: False)
            with gpu_arithmetic() if native else contextlib.nullcontext():
                return _prefill_then_decode(session, ids, 16)
    assert torch.equal(run(native=True), run(native=False))
