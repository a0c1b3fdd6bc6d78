"""A norm into the FP8 projection that alone reads it: the triton target's second rewrite (after siblings.py).

    %q, %s = rms_norm_quant(%x, @w) {eps, group, scale_format}   ->   %a = norm_linear_fp8(%x, @w, @A, @A.scale)
    %a = linear_fp8(%q, @A, @A.scale, %s) {block, act}                        {eps, block, act}

and likewise a linear_fp8_cat (its `sizes` kept: one result per sibling), for every rms_norm_quant with a weight
whose codes and scales that one projection reads and nothing else (no kept float output, neither the program's
output), quantized in the projection's own activation format, in the projection's place. Below
QUANT_ONCE_MIN_TOKENS rows (a decode step) the GEMM normalizes the rows in its own tiles (kernels/gemm_fused.py):
the norm's launch is saved. From there on the launcher runs the rms_norm_quant kernel first, as before.

It runs after the sibling join, so that a norm read by two sibling projections (V4's q_a_norm in a CSA layer:
q_b_proj and the indexer's q_b_proj) is read by one op. In V4 with the fuse pass's rules that is every layer's
q_a_norm and the first block's input norm (the other input norms are in hc_post_pre_quant; the post-attention norm
is read by the shared and the routed experts): a layer's norm launch in a decode step. The numbers do not change:
the torch kernel is linear_fp8 over rms_norm, and the Triton tiles hold the norm kernel's values (the same row sum,
then x * rstd, then the weight times that) before the GEMM's own quantization of them.
"""

from v4c.ir import Function, Instr, Module, ParamRef, Value
from v4c.passes.fuse import readers

READERS = ("linear_fp8", "linear_fp8_cat")


def _foldable(norm: Instr | None, reader: Instr, uses: dict, output: str) -> bool:
    """Whether rms_norm_quant `norm` (None: the codes are not a norm's) folds into `reader`, which reads its codes
    as x; uses: fuse.readers of the body, output: the program's output."""
    if norm is None or len(norm.operands) != 2 or not isinstance(norm.operands[1], ParamRef) or len(norm.results) != 2:
        return False  # no weight, or a kept float output (keep)
    codes, scales = norm.results
    act = reader.attrs["act"]
    return (len(reader.operands) == 4 and reader.operands[3].name == scales.name
            and len(uses[codes.name]) == 1 and len(uses[scales.name]) == 1 and output not in (codes.name, scales.name)
            and act.get("group") == norm.attrs["group"]
            and act.get("scale_format", "fp32") == norm.attrs.get("scale_format", "fp32"))


def fold(m: Module) -> tuple[Module, int]:
    """-> (the module with each foldable norm in its projection, norms folded)."""
    uses = readers(m.func.body)
    made = {ins.results[0].name: ins for ins in m.func.body if ins.op == "rms_norm_quant"}
    folded: dict[int, Instr] = {}  # id(the projection) -> norm_linear_fp8
    dropped: set[int] = set()
    for ins in m.func.body:
        x = ins.operands[0] if ins.op in READERS else None
        norm = made.get(x.name) if isinstance(x, Value) else None
        if _foldable(norm, ins, uses, m.func.output.name):
            weight, scale = ins.operands[1:3]
            folded[id(ins)] = Instr("norm_linear_fp8", [*norm.operands, weight, scale], ins.results,
                                    {"eps": norm.attrs["eps"], **ins.attrs})
            dropped.add(id(norm))
    body = [folded.get(id(ins), ins) for ins in m.func.body if id(ins) not in dropped]
    return m.replace(func=Function(m.func.inputs, body, m.func.output)), len(folded)
