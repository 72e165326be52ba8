"""Integer-only operators of I-LLM (Hu et al., 2024, arXiv 2405.17849), as torch integer code.

Every function here takes and returns integer tensors (int8 / int32 / int64) and runs integer
operations only: add, multiply, shifts, floor division, comparisons, min / max, and int8 x int8
-> int32 matrix products (``int8_matmul``: ``torch._int_mm``, or on a CPU without AVX512-VNNI
exact float32 / float64 GEMMs giving the same integers).  A real number is an integer v with a **dyadic
scale** m / 2^k (``Dyadic``: m and k int64 tensors, m < 2^16 normalized so its top bit is bit 15),
usually one scale per row (token): x ~= v * m / 2^k.  Rounding is "half up" (``rshift_round``:
(v + 2^(s-1)) >> s) everywhere.

Operators (the names of the paper):

- **DI-MatMul** (``di_linear``): per-token int8 (or int4) activations x per-channel int8 / int4
  weights with dyadic scales; int32 accumulation; the output stays exact as int64 t = acc * m_w
  (channel exponents aligned by shifts) with the per-token scale s_x * 2^-k, and is
  requantized by the consumer from the integer min / max (``quantize_rows``).
- **DI-ClippedSoftmax** (``di_softmax``): x - max, clipped at -c (c = 15 by default) in the real
  domain, exponent by DI-Exp, probabilities as integers with scale 2^-15.
- **DI-Exp** (``di_exp2``): 2^u for fixed-point u <= 0: the integer part is a right shift, the
  fraction 2^f ~= 1 + a f + (1 - a) f^2 (a = 0.6602: relative error <= 0.27 %).
- **DI-Norm** (``di_rmsnorm``): RMSNorm with an integer square root (Newton, ``isqrt``); the
  input's per-token scale cancels, so the output's scale is amax / (qmax * rms) in integers.
  RMSNorm's epsilon is dropped (it matters only for an all-but-zero token).
- integer **SiLU** (``di_silu``): x * sigmoid(x), sigmoid = 1 / (1 + e^-|x|) by DI-Exp and one
  integer division; integer **RoPE** (``rope``): rotation by a table of cos / sin rounded to
  integers with scale 2^-14 (``rope_table``; the table is a constant of the model built once at
  load time, like a weight, not part of the per-token computation).
- the online **Hadamard** transform of down_proj's input (``hadamard_rows``, ``--rotate
  hadamard+online``): additions, subtractions and sign flips, its 1 / sqrt(n) a dyadic constant.
- the model's fused steps, each what one kernel of illm_gemm.cu computes: ``swiglu`` (gate and up
  requantized to 16 bits, SiLU(g) * u), ``residual_add`` and ``attention`` (q k^T with each key's
  scale joined by shifts, DI-ClippedSoftmax, P requantized, P V).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch

from qconvert_kernels.hadamard.reference import unnormalized

MANT = 16  # mantissa bits of a dyadic scale
EXP_F = 16  # fractional bits of DI-Exp's fixed-point argument and result
EXP_A = round(0.6602 * 2**EXP_F)  # 2^f ~= 1 + a f + (1 - a) f^2 on [0, 1)
EXP_B = 2**EXP_F - EXP_A
PROB_BITS = 15  # softmax probabilities: integers in [0, 2^15], scale 2^-15
ROPE_BITS = 14
LOG2E = (round(math.log2(math.e) * 2**15), 15)  # a constant, as m / 2^k
CLIP_BITS = 16  # an activation clip c is the integer round(c * 2^16), c in [1/2, 1]
CLIP_ONE = 1 << CLIP_BITS  # no clipping


@dataclass
class Dyadic:
    """m / 2^k elementwise (m, k int64; m = 0 means 0)."""

    m: torch.Tensor
    k: torch.Tensor

    def __mul__(self, other: "Dyadic") -> "Dyadic":
        return normalize(self.m * other.m, self.k + other.k)


def const(m: int, k: int) -> Dyadic:
    return normalize(torch.tensor(m, dtype=torch.int64), torch.tensor(k, dtype=torch.int64))


_POW2: dict[torch.device, torch.Tensor] = {}


@functools.lru_cache(maxsize=1)
def _log2e() -> Dyadic:
    """log2(e) as a normalized dyadic: a constant made once (CPU scalars, which broadcast anywhere)."""
    return const(*LOG2E)


def bit_length(v: torch.Tensor) -> torch.Tensor:
    """Number of bits of v >= 0 (0 for 0 and below): how many of 2^0 .. 2^62 are <= v, one
    integer search (comparisons) in that constant table."""
    table = _POW2.get(v.device)
    if table is None:
        table = _POW2[v.device] = torch.ones(63, dtype=torch.int64, device=v.device) << torch.arange(63, device=v.device)
    return torch.searchsorted(table, v.long().contiguous(), right=True)


def rshift_round(v: torch.Tensor, s) -> torch.Tensor:
    """round(v / 2^s), halves up; s >= 0 (an int or a tensor broadcast with v)."""
    if isinstance(s, int):
        return v if s == 0 else (v + (1 << (s - 1))) >> s
    if s.numel() < v.numel():  # s per row or column: 2^(s-1) made on s's few elements, 2 ops on v's
        return (v + torch.where(s > 0, 1 << (s - 1).clamp_min(0), 0)) >> s
    # s per element: floor(v / 2^s) plus v's bit s - 1 (the half), read as bit s of 2v (0 for
    # s = 0; for s <= 63 exact for any int64 v: 2v may wrap, its low 64 bits are v's moved up
    # one), the value of the formula above (where its sum does not wrap) in 5 ops, not 7
    return (v >> s) + (((v << 1) >> s) & 1)


_SYNC_FREE = [False]  # set by sync_free()


@contextlib.contextmanager
def sync_free():
    """Inside: the functions here take no branch on a tensor's values on the CPU either, as they
    never do on CUDA (``host_branches``): what a CUDA graph captures, run on the CPU (tests)."""
    was = _SYNC_FREE[0]
    _SYNC_FREE[0] = True
    try:
        yield
    finally:
        _SYNC_FREE[0] = was


def host_branches(t: torch.Tensor) -> bool:
    """Whether a function here may read ``t``'s values back to the host to pick a cheaper branch:
    on the CPU (a few cheap tests), never on CUDA (each read would wait for the GPU and a CUDA graph
    cannot capture it) nor inside ``sync_free()``.  Both branches give the same integers."""
    return not (t.is_cuda or _SYNC_FREE[0])


def shift(v: torch.Tensor, s) -> torch.Tensor:
    """v * 2^-s for any integer s: a rounded right shift, or a left shift when s < 0."""
    if isinstance(s, int):
        return rshift_round(v, s) if s >= 0 else v << (-s)
    if host_branches(s):
        if s.numel() == 1:
            return shift(v, int(s))
        if bool((s >= 0).all()):
            return rshift_round(v, s)
        if bool((s <= 0).all()):
            return v << (-s)
    return rshift_round(v << (-s).clamp_min(0), s.clamp_min(0))  # one of the two shifts is by 0


def normalize(m: torch.Tensor, k: torch.Tensor, bits: int = MANT) -> Dyadic:
    """The same value with a ``bits``-bit mantissa (m >= 0)."""
    m, k = torch.broadcast_tensors(m, k)
    sh = bit_length(m) - bits
    m2 = shift(m, sh)
    carry = m2 >> bits  # rounding up to 2^bits
    m2 = m2 >> carry
    # m = 0 gives m2 = 0 (shifted left, carry 0); its exponent is made 0 too
    return Dyadic(m2, torch.where(m == 0, 0, k - sh - carry))


def ratio(num: torch.Tensor, den: torch.Tensor | int) -> Dyadic:
    """num / den as a dyadic (num, den >= 0 integers below 2^40; 0 when den == 0)."""
    num = torch.as_tensor(num, dtype=torch.int64)
    if isinstance(den, int):  # a constant (a qmax): no tensor made of it, so nothing copied to a GPU
        sh = (MANT + 2 + den.bit_length() - bit_length(num)).clamp_min(0)
        q = (num << sh) // den if den > 0 else torch.zeros_like(num)
        return normalize(q, sh)
    den = den.to(device=num.device, dtype=torch.int64)  # where num is (a GPU's torch.where takes no CPU condition)
    sh = (MANT + 2 + bit_length(den) - bit_length(num)).clamp_min(0)
    q = torch.where(den > 0, (num << sh) // den.clamp_min(1), 0)
    return normalize(q, sh)


def apply(v: torch.Tensor, d: Dyadic, frac_bits: int = 0) -> torch.Tensor:
    """round(v * m / 2^(k - frac_bits)): v scaled by d, with ``frac_bits`` fractional bits kept."""
    return shift(v * d.m, d.k - frac_bits)


def clip_int(c: float) -> int:
    """The activation clip c in [1/2, 1] as the integer ``quantize_rows`` takes: round(c * 2^16)."""
    return round(c * CLIP_ONE)


def clip_of(c: float) -> float:
    """The clip the integer runtime applies for c, as a float for float paths: clip_int(c) / 2^16 (exact)."""
    return clip_int(c) / CLIP_ONE


def valid_clip(c) -> bool:
    """An activation clip the integer runtime takes: a number in [1/2, 1]."""
    return isinstance(c, (int, float)) and not isinstance(c, bool) and 0.5 <= c <= 1


def quantize_rows(v: torch.Tensor, qmax: int, clip: int = CLIP_ONE) -> tuple[torch.Tensor, Dyadic]:
    """Per row (last dim): q = round(v * qmax / amax) in [-qmax, qmax], and amax / qmax as a
    dyadic (so that v ~= q * amax / qmax).  Rows above 2^40 are first shifted down (their low
    bits are far below the output's resolution).  ``clip`` (c * 2^16, ``clip_int``): the range
    is amax' = round(amax * clip / 2^16) instead, and |v| beyond it saturates at qmax (activation
    clipping; CLIP_ONE leaves every row as it was)."""
    mag = v.abs()
    amax = mag.amax(dim=-1, keepdim=True)
    pre = (bit_length(amax) - 40).clamp_min(0)
    if not host_branches(pre) or bool((pre > 0).any()):  # (a shift by 0 changes nothing)
        v = rshift_round(v, pre)
        mag = v.abs()
        amax = mag.amax(dim=-1, keepdim=True)
    if clip != CLIP_ONE:
        amax = rshift_round(amax * clip, CLIP_BITS)  # amax <= 2^40 after the shift, clip <= 2^16: <= 2^56
        mag = torch.minimum(mag, amax)
    mag = (mag * qmax + amax // 2) // amax.clamp_min(1)
    q = torch.where(v < 0, -mag, mag)
    r = ratio(amax, qmax)
    return q, Dyadic(r.m, r.k - pre)


def isqrt(v: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(v)) for int64 v >= 0: Newton from above, then one correction."""
    x = torch.ones_like(v) << ((bit_length(v) + 1) // 2)
    for _ in range(8):
        x = torch.minimum(x, (x + v // x.clamp_min(1)) // 2)
    x = torch.where(x * x > v, x - 1, x)
    return torch.where(v > 0, x, 0)


def di_exp2(u: torch.Tensor) -> torch.Tensor:
    """2^(u / 2^F) for u <= 0 (F = EXP_F fractional bits), as an integer with F fractional bits."""
    q = u >> EXP_F  # floor: the integer part, <= 0
    r = u - (q << EXP_F)  # the fraction, [0, 2^F)
    p = (1 << EXP_F) + rshift_round(r * (EXP_A + rshift_round(EXP_B * r, EXP_F)), EXP_F)
    return rshift_round(p, (-q).clamp_max(62))


def exp_umax(clip: float) -> int:
    """The clip of DI-Exp's argument, clip * log2(e) in fixed point (F bits): a constant."""
    return round(clip * math.log2(math.e) * 2**EXP_F)


SILU_CLIP = 40.0  # di_silu's e^-|x| is taken as e^-40 beyond |x| = 40


def exp_argument(x: torch.Tensor, scale: Dyadic, clip: float) -> torch.Tensor:
    """u = -min(|x| * scale * log2(e), clip * log2(e)) in fixed point (F bits), for x <= 0."""
    coef = scale * _log2e()
    umax = exp_umax(clip)
    s = coef.k - EXP_F
    v = (-x).clamp_max(1 << 40) * coef.m  # < 2^57
    # before a left shift (a scale above 2^-16, rare) cap v so that nothing overflows
    v = torch.where(s >= 0, v, torch.minimum(v, (umax >> (-s).clamp(0, 40)) + 1))
    # (a right shift above 62 would leave v < 2^57 at 0 anyway: clamped there, shifts of 64 or
    # more being undefined for int64)
    return -torch.minimum(shift(v, s.clamp(-40, 62)), torch.full_like(v, umax))


def di_softmax(scores: torch.Tensor, scale: Dyadic, mask: torch.Tensor | None = None, clip: float = 15.0) -> torch.Tensor:
    """DI-ClippedSoftmax over the last dim: ``scores`` int64 with real value scores * scale (one
    scale per row); ``mask`` bool, True where a score takes part.  Returns probabilities
    P int64 in [0, 2^15] (scale 2^-15)."""
    if mask is not None:
        low = torch.iinfo(torch.int64).min // 4
        scores = torch.where(mask, scores, low)
    x = scores - scores.amax(dim=-1, keepdim=True)
    e = di_exp2(exp_argument(x, scale, clip))
    if mask is not None:
        e = torch.where(mask, e, 0)
    total = e.sum(dim=-1, keepdim=True)
    return ((e << PROB_BITS) + total // 2) // total.clamp_min(1)


def di_rmsnorm(x: torch.Tensor, gamma: torch.Tensor, gamma_k: int, qmax: int,
               clip: int = CLIP_ONE) -> tuple[torch.Tensor, Dyadic]:
    """DI-Norm: RMSNorm(x) * g with g = gamma / 2^gamma_k (gamma int64 [H]); x int64 [.., H]
    (|x| < 2^22).  Returns (q in [-qmax, qmax], per-row dyadic scale) for the next DI-MatMul:
    x / rms(x) * g ~= q * scale; the input's own scale cancels.  ``clip``: as in ``quantize_rows``."""
    h = x.shape[-1]
    rms = isqrt((x * x).sum(dim=-1, keepdim=True) // h)
    y = x * gamma
    q, r = quantize_rows(y, qmax, clip)  # y ~= q * r
    # x / rms * gamma / 2^gk = q * r / (rms * 2^gk)
    inv = ratio(r.m, rms)
    return q, Dyadic(inv.m, inv.k + r.k + gamma_k)


def di_silu(g: torch.Tensor, scale: Dyadic) -> torch.Tensor:
    """SiLU of g * scale in the same scale: g * sigmoid, sigmoid = 1 / (1 + e^-|x|) from DI-Exp."""
    one = 1 << EXP_F
    e = di_exp2(exp_argument(-g.abs(), scale, clip=SILU_CLIP))  # e^-|x|, F fractional bits
    sig_pos = ((one << EXP_F) + (one + e) // 2) // (one + e)  # sigmoid(|x|) in [1/2, 1]
    sig = torch.where(g >= 0, sig_pos, one - sig_pos)
    return rshift_round(g * sig, EXP_F)


WIDE_QMAX = (1 << 15) - 1  # the 16-bit activations: q, k, v before RoPE, gate and up, P before P V
RESIDUAL_QMAX = (1 << 20) - 1  # the residual stream's 20 bits


def swiglu(tg: torch.Tensor, sg: Dyadic, tu: torch.Tensor, su: Dyadic,
           qmax: int = WIDE_QMAX) -> tuple[torch.Tensor, Dyadic, Dyadic]:
    """The MLP's SwiGLU on gate_proj's and up_proj's DI-MatMul outputs (int64 rows with row scales
    ``sg``, ``su``): each requantized per row to ``qmax`` (16 bits) and its ratio folded into its
    scale, then a = SiLU(g) * u in integers.  Returns (a int64, the gate's scale, the up's scale):
    a's scale is their product, left to the caller (whose order of dyadic products is the format's)."""
    g, rg = quantize_rows(tg, qmax)
    u, ru = quantize_rows(tu, qmax)
    sg, su = rg * sg, ru * su
    return di_silu(g, sg) * u, sg, su  # |a| < 2^15 * 2^15


def residual_add(x: torch.Tensor, sx: Dyadic, b: torch.Tensor, sb: Dyadic,
                 qmax: int = RESIDUAL_QMAX) -> tuple[torch.Tensor, Dyadic]:
    """The residual add: x (the residual, |x| <= qmax) with row scale ``sx`` plus a branch's output b
    with ``sb``, b requantized per row to ``qmax`` first; both terms aligned by rounded shifts to
    the smaller exponent (a zero term, m = 0, has no exponent: the other's is taken), their sum
    requantized to ``qmax``.  Returns (h, its row scale)."""
    b, rb = quantize_rows(b, qmax)
    sb = rb * sb
    big_x, big_b = x * sx.m, b * sb.m  # <= 2^36 each
    kmin = torch.where(sb.m == 0, sx.k, torch.where(sx.m == 0, sb.k, torch.minimum(sx.k, sb.k)))
    # the shifts clamped to [-62, 62] (a term is below 2^36, so 62 leaves 0 as the exact quotient
    # does, and only a zero term is shifted left): int64 shifts by 64 or more are not defined
    total = shift(big_x, (sx.k - kmin).clamp(-62, 62)) + shift(big_b, (sb.k - kmin).clamp(-62, 62))
    q, r = quantize_rows(total, qmax)
    return q, Dyadic(r.m, r.k + kmin)


NO_EXPONENT = 1 << 40  # the exponent of a zero (a dyadic with m = 0), left out of minimums


def column_alignment(col: Dyadic, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column dyadics ``col`` ([..., n]) seen by rows ``mask`` ([t, n], or [..., t, n] broadcast
    with col's leading dims: a mask per head): (shifts [..., t, n],
    e [..., t, 1]) such that x * col ~= shift(x * col.m, shifts) * 2^-e, e the smallest exponent
    among the row's columns that ``mask`` keeps (the others are shifted down to it, rounding), so a
    row depends on its own columns only (causal attention)."""
    live = mask & (col.m > 0)[..., None, :]
    kk = torch.where(live, col.k[..., None, :], NO_EXPONENT)
    e = kk.amin(dim=-1, keepdim=True)
    e = torch.where(e == NO_EXPONENT, 0, e)  # a row without a live column: all zero
    return torch.where(live, kk - e, 0).clamp(0, 62), e


F32_EXACT_K = 1 << 10  # K x 2^14 <= 2^24: float32 holds every partial sum of K int8 products exactly
GEMM_PATHS = ("int_mm", "float32", "float64")
_FORCED: list[str | None] = [None]  # a path set by gemm_path() / int_mm_only()


@functools.lru_cache(maxsize=1)
def cpu_has_int8_dot() -> bool:
    """Whether torch's CPU ``_int_mm`` runs oneDNN's int8 GEMM here: it does on a CPU with
    AVX512-VNNI (Linux's /proc/cpuinfo flags; AMX-INT8 CPUs have it too) when oneDNN is on, and
    is a plain loop otherwise (AVX-VNNI alone included)."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    if mkldnn is None or not (mkldnn.is_available() and mkldnn.enabled):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_vnni" in line.split()
    except OSError:
        pass
    return False


def _ieee_float32_gemm() -> bool:
    """Whether CPU float32 GEMMs compute in float32: not bf16 / tf32, which
    ``torch.set_float32_matmul_precision`` or an ``fp32_precision`` of torch.backends (generic,
    oneDNN, oneDNN matmul) allows."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    levels = (torch.backends, mkldnn, getattr(mkldnn, "matmul", None))
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # torch refuses to answer once the newer per-backend settings were used: they decide
        legacy = "highest"
    return legacy == "highest" and all(getattr(level, "fp32_precision", "none") in ("none", "ieee") for level in levels)


def cpu_gemm_path() -> str:
    """How ``int8_matmul`` computes on the CPU (every path gives the same integers): "int_mm"
    (``torch._int_mm``) where it runs oneDNN (``cpu_has_int8_dot``), else "float32" (exact float32 GEMMs over
    slices of K), or "float64" (one exact float64 GEMM) where float32 GEMMs may round to bf16 / tf32;
    ``gemm_path()`` chooses instead (a float32 choice still yields to float64 there)."""
    path = _FORCED[0] or ("int_mm" if cpu_has_int8_dot() else "float32")
    return "float64" if path == "float32" and not _ieee_float32_gemm() else path


def float32_gemm(a: torch.Tensor) -> bool:
    """Whether ``int8_matmul`` of ``a`` runs as exact float32 GEMMs (then a ``b32`` is worth making)."""
    return not a.is_cuda and cpu_gemm_path() == "float32"


def int_mm_padding(m: int, k: int, n: int) -> tuple[int, int, int]:
    """Zero rows / columns (of M, K, N) that make ``torch._int_mm`` on CUDA take an [M, K] @ [K, N]
    product: M > 16, K >= 16, and all three multiples of 8 (torch documents M > 16 and K, N
    multiples of 8).  Zero padding adds nothing.  The layout matters as much: see
    ``int_mm_operands``."""
    return (max(24, m + -m % 8) - m, max(16, k + -k % 8) - k, max(16, n + -n % 8) - n)


def int8_matmul(a: torch.Tensor, b: torch.Tensor, b32: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] for int8-range integers (any int dtype), int32 accumulation, as int64;
    with a batch dimension, a [B, M, K] @ b [B, K, N] -> [B, M, N] (one product per batch entry).

    On CUDA by ``torch._int_mm`` (a batch by one float64 GEMM); on the CPU by the path
    ``cpu_gemm_path`` names (a batch on the "int_mm" path by the float32 one), each exact:
    ``torch._int_mm`` (int32 accumulation); float32 GEMMs over slices of at most 1024 of K (every
    product is at most 2^14 in magnitude, so every partial sum is an integer of at most 2^24, which
    float32 holds exactly, in any order of summation; the slices' results summed as int64); or one
    float64 GEMM (exact below K = 2^39).  ``b32``: b as float32, made once by the caller (a layer's
    weights) for the float32 path.  Measured on SmolLM2 (docs/benchmarks.md, "I-LLM forward on the
    CPU"): with ``_int_mm`` a 512-token forward is the fastest of the three on an AVX512-VNNI CPU,
    and 9.1x slower than with the float64 GEMM on an AVX2 one."""
    a8, b8 = a.to(torch.int8), b.to(torch.int8)
    path = "int_mm" if a8.is_cuda else cpu_gemm_path()
    if a8.dim() == 3 and path == "int_mm" and _FORCED[0] != "int_mm":
        # torch._int_mm takes 2-D operands only: a batch (attention's heads x rows) runs as one exact
        # float GEMM instead of one launch per entry (float64 on CUDA, whatever its TF32 settings);
        # int_mm_only() keeps the loop of integer products
        path = "float64" if a8.is_cuda or not _ieee_float32_gemm() else "float32"
    if path == "float64":
        return (a8.double() @ b8.double()).long()
    if path == "float32":
        af, bf = a8.float(), (b32 if b32 is not None else b8.float())
        k = af.shape[-1]
        acc = None
        for s in range(0, max(k, 1), F32_EXACT_K):
            part = (af[..., s:s + F32_EXACT_K] @ bf[..., s:s + F32_EXACT_K, :]).long()
            acc = part if acc is None else acc + part
        return acc
    if a8.dim() == 3:
        return torch.stack([int8_matmul(x, y) for x, y in zip(a8, b8)])
    m, n = a8.shape[0], b8.shape[1]
    return torch._int_mm(*int_mm_operands(a8, b8))[:m, :n].long()


def int_mm_operands(a8: torch.Tensor, b8: torch.Tensor, cuda: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """a [M, K], b [K, N] (int8) as ``torch._int_mm`` on CUDA takes them: padded by
    ``int_mm_padding``, a row-major and b column-major (b.t() contiguous), so cuBLASLt sees the
    "TN" product its int8 tensor-core kernels support.  Row-major b (the "NN" product) was refused
    on an H200 (CUDA 13.0, 2026-12-04: CUBLAS_STATUS_NOT_SUPPORTED for M = 17 and M = 24, K = 64,
    N = 304); torch's own test skips that case as unsupported by cuBLAS.  On the CPU, whose
    ``_int_mm`` takes any shape and layout, both come back contiguous and unpadded; ``cuda``
    (default: where a8 is) picks the rule."""
    if not (a8.is_cuda if cuda is None else cuda):
        return a8.contiguous(), b8.contiguous()
    m, k = a8.shape
    n = b8.shape[1]
    pm, pk, pn = int_mm_padding(m, k, n)
    if pm or pk:
        a8 = torch.nn.functional.pad(a8, (0, pk, 0, pm))
    if pk or pn:
        b8 = torch.nn.functional.pad(b8, (0, pn, 0, pk))
    return a8.contiguous(), b8.t().contiguous().t()


def int_mm_product(a8: torch.Tensor, w_nk: torch.Tensor, fn: str) -> torch.Tensor:
    """a8 int8 [M, K] times w_nk int8 [N, K] (a layer's weights as stored) by ``torch._int_mm`` on the
    operands ``int_mm_operands`` makes as CUDA takes them (on the CPU too, so that the emulated runs
    take the same): int32 [M', N'] with M' >= M, N' >= N, rows ``stride(0)`` apart, what the epilogue
    kernels after it read (ValueError naming ``fn`` otherwise)."""
    prod = torch._int_mm(*int_mm_operands(a8, w_nk.t(), cuda=True))
    if prod.dtype != torch.int32 or prod.stride(1) != 1:
        raise ValueError(f"{fn}: torch._int_mm gave {prod.dtype} with strides {prod.stride()}; the epilogue reads int32 rows")
    return prod


@contextlib.contextmanager
def gemm_path(path: str):
    """Inside: ``int8_matmul`` on the CPU takes ``path`` (one of GEMM_PATHS), whatever the CPU."""
    if path not in GEMM_PATHS:
        raise ValueError(f"gemm_path: {path!r} is not one of {GEMM_PATHS}")
    was = _FORCED[0]
    _FORCED[0] = path
    try:
        yield
    finally:
        _FORCED[0] = was


def int_mm_only():
    """Inside: ``int8_matmul`` runs ``torch._int_mm`` on the CPU too, so that every torch call
    returns integers (the integer-only proof in tests/test_illm.py traces dtypes)."""
    return gemm_path("int_mm")


def wide_matmul(a: torch.Tensor, b: torch.Tensor, below_2_15: bool = False) -> torch.Tensor:
    """a @ b for a with values in [-2^15, 2^15] (e.g. probabilities, 16-bit activations) and int8 b:
    a split into two byte planes, each shifted into int8 range, so both products are int8 GEMMs;
    exact.  2-D, or batched as ``int8_matmul``.  ``below_2_15``: the caller knows |a| < 2^15 (a
    row requantized to 2^15 - 1), so the third product for a == 2^15 is never needed (nor looked for)."""
    lo = a & 0xFF  # [0, 255]
    hi = a >> 8  # [-128, 128]
    colsum = b.long().sum(dim=-2, keepdim=True)
    p_lo = int8_matmul(lo - 128, b) + 128 * colsum
    hi_c = hi.clamp_max(127)  # hi == 128 only where a == 2^15 (a probability of 1)
    p_hi = int8_matmul(hi_c, b)
    if not below_2_15 and (not host_branches(hi) or bool((hi > 127).any())):
        p_hi = p_hi + int8_matmul(hi - hi_c, b)
    return (p_hi << 8) + p_lo


def hadamard_rows(v: torch.Tensor, sign: torch.Tensor, lp: int) -> torch.Tensor:
    """The online Hadamard transform in integers: each row of v [..., n] times A (x) H_p (entries
    +-1; n = m * 2^lp, ``sign`` = A int8 [m, m]), unnormalized: the butterflies of the fast
    Walsh-Hadamard transform (u, w) -> (u + w, u - w), then the +-1 combination of A's rows, the
    order of qconvert_kernels/hadamard/reference.py.  |result| <= n max|v|; the 1 / sqrt(n) of the
    orthogonal transform goes into the row's dyadic scale (a constant of the model)."""
    return unnormalized(v, sign, lp, torch.int64)


def rope_table(positions: int, head_dim: int, theta: float, scaling=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) int64 [positions, head_dim / 2] with scale 2^-14: a constant table of the model,
    built once (float64 trigonometry at load time, then rounded), as HF Llama's rotary
    embedding without scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None, :]
    one = 1 << ROPE_BITS
    return torch.round(torch.cos(ang) * one).long(), torch.round(torch.sin(ang) * one).long()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x int64 [.., T, head_dim] (HF's rotate_half convention) by the integer table."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([rshift_round(x1 * cos - x2 * sin, ROPE_BITS), rshift_round(x2 * cos + x1 * sin, ROPE_BITS)], -1)


def _per_group(d: Dyadic) -> Dyadic:
    """A per-row dyadic [rows, 1] (or a 0-dim one) broadcast over a row's groups: [rows, 1, 1]."""
    return d if d.m.dim() == 0 else Dyadic(d.m.unsqueeze(-1), d.k.unsqueeze(-1))


def rope_requant(t: torch.Tensor, head_dim: int, qmax: int, per_head: bool, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None, fold: Dyadic | None = None,
                 out_fold: Dyadic | None = None) -> tuple[torch.Tensor, Dyadic]:
    """A token's q, k or v projection to int8-range values, as attention takes them: ``t`` int64
    [rows, L] (L = heads * head_dim, one token per row) requantized to 16 bits over the token
    (WIDE_QMAX; that ratio times ``fold`` if given), each head rotated by ``rope`` with the rows'
    tables ``cos``, ``sin`` int64 [rows, head_dim / 2] (if given), then requantized to ``qmax`` per
    token or, with ``per_head``, per head and token.  Each scale is that ratio times the 16-bit
    scale, then times ``out_fold`` if given (Dyadic products round: this order is the format's;
    folds are per row [rows, 1]).  Returns (q int64 [rows, L], Dyadic [rows, G, 1]), G = heads
    with ``per_head``, else 1."""
    rows, width = t.shape
    x, r = quantize_rows(t, WIDE_QMAX)
    if fold is not None:
        r = r * fold
    x = x.reshape(rows, width // head_dim, head_dim)
    if cos is not None:
        x = rope(x, cos[:, None], sin[:, None])
    q, s = quantize_rows(x if per_head else x.reshape(rows, 1, width), qmax)
    s = s * _per_group(r)
    if out_fold is not None:
        s = s * _per_group(out_fold)
    return q.reshape(rows, width), s


def attention(q: torch.Tensor, sq: Dyadic, k8: torch.Tensor, sk: Dyadic, v8: torch.Tensor, sv: Dyadic,
              mask: torch.Tensor, inv_sqrt_d: Dyadic) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer attention of query rows over their keys, per head-row (a row's KV head) and its
    ``group`` query heads: q int8-range [HR, group, t, d] with one scale per query row ``sq`` ([HR, 1,
    t, 1]); keys and values int8 [HR, n, d] with one scale per column ``sk``, ``sv`` ([HR, n]);
    ``mask`` bool [HR or 1, t, n], the columns each query row sees.  Each key's scale joins its
    column of q k^T by shifts to the row's smallest key exponent (``column_alignment``), DI-ClippedSoftmax
    on the scores with the query's scale times ``inv_sqrt_d``, each value's scale joins its column of
    P the same way, P is requantized to 16 bits per row, and P V is an exact integer product.
    Returns (o int64 [HR, group, t, d], e int64 [HR, group, t, 1]): the output is o * 2^-(e + 15)
    (e = NO_EXPONENT for an all-zero row)."""
    hr, group, t, d = q.shape
    n = k8.shape[1]
    # per KV head (shared by its query heads): the key and value scales' alignment per query row
    k_sh, k_e = column_alignment(sk, mask)  # [HR, t, n], [HR, t, 1]
    v_sh, v_e = column_alignment(sv, mask)
    acc = int8_matmul(q.reshape(hr, group * t, d), k8.transpose(1, 2)).reshape(hr, group, t, n)  # int32 products
    scores = shift(acc * sk.m[:, None, None, :], k_sh[:, None])  # key scales in, 2^-k_e
    scale = Dyadic(sq.m, sq.k + k_e[:, None]) * inv_sqrt_d  # [HR, 1, t, 1]
    p = di_softmax(scores, scale, mask[:, None])  # 2^-15
    # the value scales, one per token (the sum's index), fold into P's columns, then P is
    # requantized to 16 bits per row (P >= 0: 15 bits of magnitude): P V stays an exact product of int8 V
    pv = shift(p * sv.m[:, None, None, :], v_sh[:, None])
    pq, rp = quantize_rows(pv, WIDE_QMAX)  # rp [HR, group, t, 1]
    pvq = wide_matmul(pq.reshape(hr, group * t, n), v8, below_2_15=True).reshape(hr, group, t, d)
    return pvq * rp.m, torch.where(rp.m > 0, rp.k + v_e[:, None], NO_EXPONENT)  # scale 2^-(k + 15)


def heads_requant(o: torch.Tensor, e: torch.Tensor, qmax: int, clip: int = CLIP_ONE) -> tuple[torch.Tensor, Dyadic]:
    """Attention's heads (``attention``'s outputs o int64 [rows, heads, t, d], exponents e [rows,
    heads, t, 1]; heads in the query's order) as o_proj's input: per token, each head shifted to the
    heads' smallest exponent (0 when every head is zero), the token's heads * d values requantized
    to ``qmax`` with ``clip``.  Returns (q int64 [rows * t, heads * d], Dyadic [rows * t, 1]): the
    values are q times that scale."""
    rows, heads, t, d = o.shape
    emin = e.amin(dim=1, keepdim=True)  # [rows, 1, t, 1]
    emin = torch.where(emin == NO_EXPONENT, 0, emin)
    x = rshift_round(o, (e - emin).clamp(0, 62)).permute(0, 2, 1, 3).reshape(rows * t, heads * d)
    q, r = quantize_rows(x, qmax, clip)
    return q, Dyadic(r.m, r.k + emin.reshape(rows * t, 1) + PROB_BITS)
