"""Helpers shared by the kernel modules: host-side input checks with clear messages, sizes and launch
configs; and the numeric device helpers (@triton.jit) every kernel uses for storage formats.

Device helpers work on fp32 values and int32 codes / bit patterns with integer or exact power-of-two
arithmetic only, so they are bit-exact with torch's casts both on a GPU and in the Triton interpreter
(whose own `.to(tl.float8e4nv)` / `.to(tl.bfloat16)` do not round to nearest even):
  pow2, pow2_ceil, ceil_log2             2^e from bits; UE8M0 scales (the reference's quant.pow2_ceil)
  group_scale                            quantization scale max(amax, 1e-4) / qmax, or its pow2_ceil
  round_e4m3, e4m3_code                  float8_e4m3fn rounding (RNE, as torch's cast): value / bits
  e4m3_quant, fake_quant                 e4m3(clamp(x / s, +-448)) as bits / dequantized again
  to_e4m3                                e4m3 operand of an fp8 dot (hardware cast on a GPU)
  bf16_bits, bf16_value                  bfloat16 encode (RNE) / decode
  to_bf16, dot_bf16                      bf16 operand of a dot (hardware cast on a GPU), the bf16 dot
  e2m1_code, e2m1_value                  FP4 e2m1 encode (as quant.quant_fp4) / decode
  ue8m0_value, decode_scale              UE8M0 scale bytes (float8_e8m0fnu) -> fp32
  swiglu_value                           silu(min(g, limit)) * clamp(u, +-limit)
  arrived_last, sum_runs                 split work finished in-kernel: the last program of SPLIT to arrive at a
                                         counter (tile_counters) adds the runs' partial results in run order
and host side: launch_config (config validation), result / results (a launcher's output tensors: the caller's
`into` buffers where they fit), host_values (whether ids may be range-checked on the host),
once (a value check per tensor contents), entry_layout (KV entry / indexer key storage).
"""

import torch
import triton
import triton.language as tl

E4M3_MAX: tl.constexpr = tl.constexpr(448.0)
SCALE_FLOOR: tl.constexpr = tl.constexpr(1e-4)  # amax floor of every quantization scale


# --- host side -----------------------------------------------------------------------------------
# Host arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr functions in Triton 3.9,
# which unwrap their arguments on every call (a few microseconds each, ~1,500 calls in a `small` decode step).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_tensor(name: str, t: torch.Tensor, *, dtypes=None, dim=None, contiguous=True) -> None:
    """A tensor argument's type, dtype, rank and layout; the message is built only when a check fails (the decode
    loop makes hundreds of these calls a step)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported; expected one of {list(dtypes)}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dimensions, got shape {list(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (shape {list(t.shape)}, strides {list(t.stride())})")


def result(into, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The tensor a launcher writes a result of this shape and dtype into: `into` (the runtime's planned buffer)
    where it is exactly that, contiguous, on `device`; else a new one, which the caller then copies into its
    buffer (the runtime does, when the launcher returns another tensor). `into` must not overlap the inputs."""
    if (into is not None and into.dtype == dtype and into.shape == shape and into.device == device
            and into.is_contiguous()):
        return into
    return torch.empty(shape, dtype=dtype, device=device)


def results(into, n: int) -> tuple:
    """`into` of a launcher with n results: None, or a tuple / list of n tensors (None where not given)."""
    if into is None:
        return (None,) * n
    if not isinstance(into, (tuple, list)) or len(into) != n:
        raise ValueError(f"into: expected {n} tensors for this launcher's {n} results, got {into!r}")
    return tuple(into)


HOST_CHECKS = None  # None: host_values decides by device; True / False: always / never (tests emulate a GPU)


def host_values(t: torch.Tensor) -> bool:
    """Whether a launcher may check `t`'s values (id ranges) on the host: only where reading them costs no
    wait. On a GPU, reading a value waits for every queued kernel (the host can no longer run ahead) and
    cannot be captured in a CUDA graph, so there the ids are not read: the runtime's inputs are checked
    before they reach the device (token ids) or are in range by construction (router outputs), and the
    kernels mask what they gather."""
    return t.device.type == "cpu" if HOST_CHECKS is None else HOST_CHECKS


_ONCE: dict = {}  # (what, tensor identity and version) -> result of a value check


def once(what, t: torch.Tensor, test) -> bool:
    """`test()` (a check of t's values, e.g. an id range) evaluated once per tensor contents: weights such
    as the hash-routing table are read on the host at their first use only, not on every launch. A tensor
    changed in place (its version moves) or a new tensor at the same address is checked again."""
    key = (what, t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)
    if key not in _ONCE:
        _ONCE[key] = bool(test())
    return _ONCE[key]


def same_device(**tensors) -> None:
    first = None
    for t in tensors.values():
        if isinstance(t, torch.Tensor):
            if first is None:
                first = t.device
            elif t.device != first:
                devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
                raise ValueError(f"tensors on different devices: {devices}")


def position(pos0, device: torch.device) -> int | None:
    """A stateful launcher's `pos0`: an int, the tokens the session held before this call, from which the host
    sizes grids and slices; or an int64 tensor on `device` whose first element is that count, read by the
    kernels themselves ("device position"). The launches are then the same at every position (grids sized by
    the state's capacity, programs past the causal range exit at once), so a decode step can be captured
    once as a CUDA graph and replayed (runtime/executor.py). -> the int, or None for a device position."""
    if isinstance(pos0, torch.Tensor):  # messages built only on failure: every stateful call checks this
        if not (pos0.dtype == torch.int64 and pos0.numel() >= 1 and pos0.is_contiguous()):
            raise ValueError(f"pos0: a device position must be a contiguous int64 tensor, got {pos0.dtype} "
                             f"{list(pos0.shape)}")
        if pos0.device != device:
            raise ValueError(f"pos0: on {pos0.device}, the kernels' inputs on {device}")
        return None
    if not (isinstance(pos0, int) and not isinstance(pos0, bool) and pos0 >= 0):
        raise ValueError(f"pos0: expected an int >= 0 or an int64 device tensor, got {pos0!r}")
    return pos0


# KV entry / indexer key storage formats, as runtime/quant.py: fp8_split's UE8M0 scale covers KV_GROUP nope
# channels, fp8_block's fp32 scale FP8_BLOCK values, fp4_block's UE8M0 scale FP4_BLOCK values.
KV_GROUP, FP8_BLOCK, FP4_BLOCK = 64, 128, 32
STORAGE_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "fp8_split": torch.uint8, "fp8_block": torch.uint8,
                  "fp4_block": torch.uint8}


def entry_layout(fmt: str, d: int, rope: int = 0) -> tuple[torch.dtype, int]:
    """(storage dtype, elements per entry) of `fmt` for entries of d channels, the last `rope` of them RoPE
    ones (fp8_split keeps those in bf16); as runtime.quant.entry_layout."""
    check(fmt in STORAGE_DTYPES, f"KV format {fmt!r} is not supported; expected one of {list(STORAGE_DTYPES)}")
    if fmt == "fp8_split":
        raw = d + rope + cdiv(d - rope, KV_GROUP)  # nope e4m3 + rope bf16 + scales
        return torch.uint8, raw + (-raw % 8)
    if fmt == "fp8_block":
        return torch.uint8, d + 4 * cdiv(d, FP8_BLOCK)
    if fmt == "fp4_block":
        return torch.uint8, cdiv(d, 2) + cdiv(d, FP4_BLOCK)
    return STORAGE_DTYPES[fmt], d


def _is_pow2(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and value & (value - 1) == 0


# config keys that take 'auto', true or false (config_switch)
SWITCHES = ("FP8_DOT", "QUANT_ONCE", "SUM_IN_KERNEL", "ENCODE_IN_KERNEL", "PAIRS_IN_KERNEL", "WARP_SPEC",
            "PERSISTENT")
_CONFIGS: dict = {}  # validated configs by (name, config, defaults, at_least): a launch validates a config once


def launch_config(config, defaults: dict, name: str, *, at_least: dict | None = None) -> dict:
    """`_launch_config`, memoized: the same config of the same launcher is validated once (the decode
    loop launches every step with the same config); a config that fails is not cached."""
    try:
        key = (name, tuple(sorted(config.items())) if isinstance(config, dict) else config,
               tuple(defaults.items()), tuple(sorted((at_least or {}).items())))
        cfg = _CONFIGS.get(key)
    except TypeError:  # an unhashable value: validate (and reject) it uncached
        key = cfg = None
    if cfg is None:
        cfg = _launch_config(config, defaults, name, at_least=at_least)
        if key is not None:
            _CONFIGS[key] = cfg
    return dict(cfg)


def _launch_config(config, defaults: dict, name: str, *, at_least: dict | None = None) -> dict:
    """`config` (None or a dict) merged over `defaults` (which also lists the allowed keys). Raises
    ValueError, naming `name`, the key and the allowed keys, for: unknown keys; block sizes (keys
    starting with BLOCK / block) and num_warps that are not positive powers of two; num_stages that is
    not a positive int; split factors (keys starting with SPLIT) that are not ints >= 0; SWITCHES not
    'auto', true or false; values below their `at_least` minimum (e.g. 16 for tl.dot tiles)."""
    allowed = list(defaults)
    check(config is None or isinstance(config, dict),
          f"{name}: config: expected a dict or None, got {type(config).__name__}; keys: {allowed}")
    config = dict(config or {})
    unknown = sorted(set(config) - set(defaults), key=str)
    check(not unknown, f"{name}: config: unknown keys {unknown}; supported: {allowed}")
    cfg = {**defaults, **config}
    for key, value in cfg.items():
        if key.upper().startswith("BLOCK") or key == "num_warps":
            check(_is_pow2(value),
                  f"{name}: config[{key!r}]: expected a positive power of two, got {value!r} (keys: {allowed})")
        elif key == "num_stages":
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  f"{name}: config[{key!r}]: expected a positive int, got {value!r} (keys: {allowed})")
        elif key.startswith("SPLIT"):
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                  f"{name}: config[{key!r}]: expected an int >= 0 (0: chosen from the GPU's SM count), got {value!r} "
                  f"(keys: {allowed})")
        elif key in SWITCHES:
            check(value in ("auto", True, False),
                  f"{name}: config[{key!r}]: expected 'auto', true or false, got {value!r} (keys: {allowed})")
    for key, low in (at_least or {}).items():
        check(cfg[key] >= low, f"{name}: config[{key!r}]: expected a power of two >= {low}, got {cfg[key]!r} "
                               f"(keys: {allowed})")
    return cfg


# --- the GPU a launch runs on (host) -------------------------------------------------------------
# fp8 tensor-core dots need K tiles of at least 32 (mma k32) and an sm_89+ GPU (or the interpreter).
FP8_DOT_MIN_K = 32


_DEVICE_FACTS: dict = {}  # (device, what) -> value: asked once per device, not on every launch


def _device_fact(device: torch.device, what: str, ask):
    key = (device, what)
    if key not in _DEVICE_FACTS:
        _DEVICE_FACTS[key] = ask()
    return _DEVICE_FACTS[key]


def fp8_dot_supported(device: torch.device) -> bool:
    """Whether `device` runs e4m3 x e4m3 tl.dot: NVIDIA sm_89 (Ada) / sm_90 (Hopper) and newer, and the
    Triton interpreter (CPU tensors)."""
    if device.type != "cuda":
        return True
    return _device_fact(device, "fp8 dot", lambda: torch.cuda.get_device_capability(device) >= (8, 9))


def tma_supported(device: torch.device) -> bool:
    """Whether `device` has the Tensor Memory Accelerator that tensor descriptors load through: NVIDIA sm_90
    (Hopper) and newer, and the Triton interpreter (CPU tensors)."""
    if device.type != "cuda":
        return True
    return _device_fact(device, "TMA", lambda: torch.cuda.get_device_capability(device) >= (9, 0))


def native_cvt(device: torch.device) -> bool:
    """Whether kernels on `device` may use the hardware fp32 -> e4m3 conversion (round to nearest even on
    NVIDIA GPUs) instead of integer rounding (the Triton interpreter's cast rounds ties away from zero)."""
    return device.type == "cuda"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 off a GPU (the interpreter: no split pays off)."""
    if device.type != "cuda":
        return 0
    return _device_fact(device, "SMs", lambda: torch.cuda.get_device_properties(device).multi_processor_count)


# Arrival counters of split work finished in-kernel (gemm's and attention's SUM_IN_KERNEL, hyper's splits): per
# device, int32 zeros that every launch leaves zero.
# One fixed buffer, never replaced, because a captured CUDA graph keeps its address; kernels on one device share
# it, so they must not run concurrently on two streams (the runtime runs one stream).
TILE_COUNTERS = 1 << 16
_COUNTERS: dict = {}


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The device's arrival counters, if `tiles` fit (TILE_COUNTERS) and they exist or can be made now: never
    while a CUDA graph is being captured (it would own their memory), so a launch captured before any eager one
    gets None."""
    if tiles > TILE_COUNTERS:
        return None
    counters = _COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _COUNTERS[device] = torch.zeros(TILE_COUNTERS, dtype=torch.int32, device=device)
    return counters


def in_kernel_counters(want, device: torch.device, tiles: int, name: str) -> torch.Tensor | None:
    """The arrival counters for a launch that finishes its split work in-kernel (config SUM_IN_KERNEL = `want`,
    'auto': wherever the counters are to be had), else None (the launcher finishes it with another launch); true
    without them is an error naming why."""
    if want is False:
        return None
    counters = tile_counters(device, tiles)
    if counters is None and want is True:
        raise ValueError(f"{name}: config['SUM_IN_KERNEL'] is true but it needs at most {TILE_COUNTERS} arrival "
                         f"counters ({tiles} here) and no CUDA graph capture before the first eager launch on {device}")
    return counters


def config_switch(key: str, want, needs, name: str, auto: bool = True) -> bool:
    """A config switch `key` (one of SWITCHES) set to `want` ('auto', True, False) against `needs`
    [(ok, what)]: True insists and names what is missing, False is off, 'auto' is on where every need holds
    and the launcher's own preference `auto` does."""
    missing = [what for ok, what in needs if not ok]
    check(want is not True or not missing, f"{name}: config[{key!r}] is true but it needs {', '.join(missing)}")
    return not missing and (want is True or (want == "auto" and auto))


# --- powers of two and UE8M0 scales (device) ------------------------------------------------------
@triton.jit
def pow2(e):
    """2^e as fp32 from bits, exact for integer e in [-149, 128] (128 -> inf)."""
    normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
    tiny = (1 << tl.minimum(tl.maximum(e + 149, 0), 22)).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, tiny)


@triton.jit
def ceil_log2(s):
    """ceil(log2(s)) as int32, exactly, for positive normal fp32 s: the exponent field, plus one
    unless s is a power of two (no log2 rounding: 2^-10 * (1 + 2^-23) gives -9)."""
    bits = s.to(tl.int32, bitcast=True)
    return (bits >> 23) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)


@triton.jit
def pow2_ceil(s):
    """The smallest power of two >= s (positive normal fp32 s), exactly: quant.pow2_ceil (inf and NaN stay)."""
    bits = s.to(tl.int32, bitcast=True)
    p = (((bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)) << 23).to(tl.float32, bitcast=True)
    return tl.where(bits >= 0x7F800000, s, p)


@triton.jit
def group_scale(amax, QMAX: tl.constexpr, UE8M0: tl.constexpr):
    """Quantization scale of a group: max(amax, 1e-4) / QMAX, correctly rounded (tl.div_rn: a plain
    `/` is approximate on a GPU), or for UE8M0 its pow2_ceil; as quant._scale / quant.fp4_scales."""
    s = tl.div_rn(tl.maximum(amax, SCALE_FLOOR, propagate_nan=tl.PropagateNan.ALL), QMAX)
    if UE8M0:
        s = pow2_ceil(s)
    return s


@triton.jit
def ue8m0_value(byte):
    """UE8M0 byte b (float8_e8m0fnu, any int type) -> 2^(b - 127) as fp32 from bits (0 -> 2^-127, 255 -> NaN)."""
    b = byte.to(tl.int32) & 0xFF
    return tl.where(b == 0, 0x00400000, tl.where(b == 255, 0x7FC00000, b << 23)).to(tl.float32, bitcast=True)


@triton.jit
def decode_scale(raw, E8M0: tl.constexpr):
    """A block scale as fp32: UE8M0 bytes (E8M0) through ue8m0_value, any float dtype as is."""
    if E8M0:
        return ue8m0_value(raw)
    else:
        return raw.to(tl.float32)


# --- split work finished in the kernel (device) ----------------------------------------------------
@triton.jit
def arrived_last(counter, arrivals):
    """Whether this program is the last of `arrivals` to arrive at `counter` (tile_counters), which it then zeroes for
    the next launch. The barrier orders every thread's partial-result stores before the counter's release (the
    pattern of CUTLASS's semaphore and of Triton's layer-norm tutorial); the acquire orders the last program's
    loads after the others' releases."""
    tl.debug_barrier()
    last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == arrivals - 1
    if last:
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def sum_runs(ptrs, stride, mask, SPLIT: tl.constexpr):
    """sum over runs p = 0 .. SPLIT-1, in order (deterministic), of the partial results at ptrs + p * stride; the
    loads bypass L1 (.cg: other SMs wrote them)."""
    total = tl.zeros(ptrs.shape, tl.float32)
    for p in range(SPLIT):
        total += tl.load(ptrs + p * stride, mask=mask, other=0.0, cache_modifier=".cg")
    return total


# --- activation (device) -------------------------------------------------------------------------
@triton.jit
def swiglu_value(g, u, limit, HAS_LIMIT: tl.constexpr):
    """silu(min(g, limit)) * clamp(u, +-limit) (no clamp without HAS_LIMIT), silu(g) = g / (1 + exp(-g)):
    basic.swiglu on fp32 tiles."""
    if HAS_LIMIT:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    return g / (1.0 + tl.exp(-g)) * u


# --- float8 e4m3fn (device) -----------------------------------------------------------------------
@triton.jit
def round_e4m3(x):
    """fp32 x -> the float8_e4m3fn value of torch's cast (x.to(float8_e4m3fn).float()): round to nearest
    even, saturating at +-448 (inf too), NaN stays NaN, the sign kept (-0.0 for small negatives).
    |x| >= 2^-6: RNE of the fp32 bits at mantissa bit 20 (integer arithmetic); below, the quantum is 2^-9
    and fl(|x| + 2^14) - 2^14 rounds to it exactly (one correctly rounded add: the ulp of 2^14 is 2^-9)."""
    bits = x.to(tl.int32, bitcast=True)
    a = tl.abs(x)
    abits = bits & 0x7FFFFFFF
    abits = tl.where(abits > 0x7F800000, 0x7FC00000, abits)  # any NaN -> one whose rounding stays NaN
    normal = ((abits + 0x7FFFF + ((abits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    r = tl.where(a < 0.015625, (a + 16384.0) - 16384.0, normal)
    r = tl.minimum(r, E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
    return (r.to(tl.int32, bitcast=True) | (bits & -0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_code(x):
    """fp32 x -> float8_e4m3fn bits (int32 0..255) of torch's cast: those of round_e4m3(x), an exact e4m3
    value (normal: exponent re-biased 127 -> 7 and 3 mantissa bits; subnormal: |r| / 2^-9; NaN: 0x7F)."""
    rbits = round_e4m3(x).to(tl.int32, bitcast=True)
    m = rbits & 0x7FFFFFFF
    sub = (tl.minimum(m, 0x3C800000).to(tl.float32, bitcast=True) * 512.0).to(tl.int32)  # <= 8; exact
    code = tl.where(m >= 0x3C800000, (m >> 20) - (120 << 3), sub)
    return tl.where(m > 0x7F800000, 0x7F, code) | ((rbits >> 24) & 0x80)


@triton.jit
def e4m3_quant(x, s):
    """e4m3 code of clamp(x / s, +-448), x / s correctly rounded (the clamp is round_e4m3's saturation)."""
    return e4m3_code(tl.div_rn(x, s))


@triton.jit
def to_e4m3(x, NATIVE: tl.constexpr):
    """float8e4nv tensor of clamp(x, +-448) rounded to nearest even. NATIVE (a GPU: cvt.rn.satfinite, one
    instruction per two values) or the integer rounding of round_e4m3 (the interpreter, whose own cast
    rounds ties away from zero); both give torch's float8_e4m3fn cast for finite x."""
    if NATIVE:
        return tl.clamp(x, -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv)
    return round_e4m3(x).to(tl.float8e4nv)  # an exact e4m3 value: the cast is exact


@triton.jit
def fake_quant(x, s):
    """e4m3(clamp(x / s, +-448)) * s: quant.fake_quant_* for x / s (any broadcastable shapes)."""
    return round_e4m3(tl.div_rn(x, s)) * s  # round_e4m3 saturates at +-448 as the clamp does


# --- bfloat16 (device) ----------------------------------------------------------------------------
@triton.jit
def bf16_bits(x):
    """fp32 -> bfloat16 bits (int32 0..0xFFFF), round to nearest even, as torch's cast (NaN -> 0x7FC0)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded.to(tl.int32))


@triton.jit
def bf16_value(bits):
    """bfloat16 bits (any int type, low 16 bits used) -> fp32, exact."""
    return ((bits.to(tl.uint32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def to_bf16(x, NATIVE: tl.constexpr):
    """bfloat16 tensor of fp32 x rounded to nearest even, as torch's cast: NATIVE (a GPU: cvt.rn.bf16x2) or
    through bf16_bits (the interpreter, whose own cast does not round to nearest even)."""
    if NATIVE:
        return x.to(tl.bfloat16)
    return bf16_bits(x).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def dot_bf16(a, b, NATIVE: tl.constexpr):
    """tl.dot of bf16 tiles with fp32 accumulation. NATIVE: the tensor cores; else (the interpreter, whose
    tl.dot of bf16 tiles returns garbage in Triton 3.9) an fp32 dot of the same values, which are exact in
    fp32, so only the order of the fp32 sums can differ."""
    if NATIVE:
        return tl.dot(a, b)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


# --- FP4 e2m1 (device) ----------------------------------------------------------------------------
@triton.jit
def e2m1_code(x):
    """Nearest e2m1 code of fp32 x (magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6; bit 3 the sign), ties to the
    smaller magnitude, +0 for anything rounding to zero, 6 past it: as quant.quant_fp4's first-index argmin."""
    m = tl.abs(x)
    code = ((m > 0.25).to(tl.int32) + (m > 0.75).to(tl.int32) + (m > 1.25).to(tl.int32) + (m > 1.75).to(tl.int32)
            + (m > 2.5).to(tl.int32) + (m > 3.5).to(tl.int32) + (m > 5.0).to(tl.int32))
    return tl.where((x < 0) & (code > 0), code | 8, code)


@triton.jit
def e2m1_value(code):
    """e2m1 code (int, low 4 bits used) -> fp32: 0, .5, 1, 1.5, 2, 3, 4, 6 (bit 3 the sign; 8 -> -0.0)."""
    m = code.to(tl.int32) & 7
    normal = ((((m >> 1) + 126) << 23) | ((m & 1) << 22)).to(tl.float32, bitcast=True)  # m >= 2
    mag = tl.where(m < 2, 0.5 * (m & 1).to(tl.float32), normal)
    return tl.where((code.to(tl.int32) & 8) != 0, -mag, mag)
