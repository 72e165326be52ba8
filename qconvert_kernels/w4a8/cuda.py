"""CuPy launchers of the W4A8 kernels: the runtime API (``prepare`` / ``linear``) on the repacked
kernels of w4a8_repacked.cu, and the native-layout kernels of w4a8_gemm.cu.

Runtime API (what the layouts call):

    prepared = prepare(layout, tensors, group_size, device)     # once, at load time
    y = linear(x, prepared)                                      # x fp16 / bf16 [M, K] -> y [M, N]

``prepare`` takes the on-disk tensors of layout "w4a8-is" (qweight uint8 [N, Kp/2], iscale int32
[N, G], cscale float32 [N], alpha_log2 int32 [1], shape int64 [2] = [N, K]) or "w4a8-fs" (qweight,
scales fp16 [N, G], shape), repacks the weights into the fragment order of the kernels
(repack.py), the scales to [G, N128], and allocates the layer's small self-resetting workspace.
It may read device values (load time).  ``linear`` then never does: every launch parameter comes
from the shapes (``plan``), the outputs and split-K partials are allocated with torch on the
current stream, and the kernels run on torch's current stream, so a linear can be captured in a
CUDA graph.  M <= 64 runs the decode kernel (one launch: per-token quantization fused in, split-K
over the groups); M > 64 the per-token quantizer then the prefill kernel.  Results equal
``reference.py`` rounded to the output dtype: bit for bit for w4a8-is, and for w4a8-fs whenever
the plan has one split (else the fixed split order of ``reference.w4a8_fs_gemm_split``,
deterministic).  A prepared layer's workspace serves one stream at a time (as a model's forward
does); ``PreparedW4A8.reset()`` zeroes it after an aborted launch.

The native-layout kernels (``quantize_per_token_int8``, ``w4a8_is_gemm``, ``w4a8_fs_gemm``) read
``qweight`` as stored; group size a multiple of 32 up to 16384; they are the reference GPU path.

All modules are built by ``qconvert_kernels.launch`` (NVRTC, no flush-to-zero) and launched on
torch's current stream; cupy is imported lazily (``available()`` says whether the kernels can run).
"""

from __future__ import annotations

from pathlib import Path

import torch


from dataclasses import dataclass

from qconvert_kernels.w4a8 import repack as _repack

SOURCE = Path(__file__).with_name("w4a8_gemm.cu")
SOURCE_R = Path(__file__).with_name("w4a8_repacked.cu")
SOURCE_ZQ = Path(__file__).parent.parent / "fp8" / "fp8_repacked.cu"  # the same decode kernel for fp4-fp8
BLOCK_M = 64  # CTA tile (qk::BM, qk::BN in the source)
BLOCK_N = 64
GEMM_THREADS = 128
QUANT_THREADS = 256
MMA_K = 32
MAX_GROUP_SIZE = 16384  # float-scale exactness: |P| <= 127 * 8 * g < 2**24
_OUT = {torch.float16: "f16", torch.bfloat16: "bf16"}


from qconvert_kernels import launch as _l
from qconvert_kernels.fp8.cuda import row_scaled_mm, scaled_mm_outputs  # the row-wise FP8 GEMM (fp4-fp8's prefill)
from qconvert_kernels.roofline import decode_splits

# Shared helpers (qconvert_kernels/launch.py), under the names the sibling launchers imported.
_cupy = _l._cupy
_ptr, _i32, _require = _l.ptr, _l.i32, _l.require
_check_cuda, _check_aligned = _l.check_cuda, _l.check_aligned


def available() -> bool:
    """True if cupy imports, torch sees CUDA and device 0 is sm_80+; never raises."""
    return _l.available(80)


def module(device_index: int = 0):
    """The ``cupy.RawModule`` of w4a8_gemm.cu for the device (built by launch.build: NVRTC, no FTZ)."""
    return _l.module(SOURCE, device_index)


def _launch(name: str, grid: tuple, block: tuple, args: tuple, device: torch.device, source=None) -> None:
    """Launch kernel ``name`` of ``source`` (default w4a8_gemm.cu) on torch's current stream."""
    _l.launch(source or SOURCE, name, grid, block, args, device)


def check_gemm_shape(fn: str, m: int, n: int, kp: int, group_size: int) -> None:
    """ValueError unless the kernels support (M, N, K=Kp, g); the message quotes all four."""
    where = f"{fn}: unsupported shape M={m}, N={n}, K={kp}, g={group_size}"
    _require(group_size % MMA_K == 0 and MMA_K <= group_size <= MAX_GROUP_SIZE,
             f"{where}: the group size must be a multiple of {MMA_K} (the int8 mma K) in [{MMA_K}, {MAX_GROUP_SIZE}]")
    _require(kp > 0 and kp % group_size == 0, f"{where}: K (padded) must be a positive multiple of g")
    _require(m >= 0 and n >= 0, f"{where}: negative M or N")
    _require(-(-m // BLOCK_M) <= 65535, f"{where}: M too large for the grid (at most {65535 * BLOCK_M})")


def _gemm_common(fn, xq, t, qweight, group_size, out_dtype):
    _require(xq.dim() == 2 and qweight.dim() == 2, f"{fn}: xq [M, Kp] and qweight [N, Kp/2] must be 2-D")
    m, kp = xq.shape
    n = qweight.shape[0]
    check_gemm_shape(fn, m, n, kp, group_size)
    _require(xq.dtype == torch.int8, f"{fn}: xq must be int8, got {xq.dtype}")
    _require(qweight.dtype == torch.uint8, f"{fn}: qweight must be uint8 (packed int4), got {qweight.dtype}")
    _require(qweight.shape[1] * 2 == kp, f"{fn}: qweight {tuple(qweight.shape)} does not match xq {tuple(xq.shape)} (need [N, Kp/2])")
    _require(t.shape == (m,), f"{fn}: t must be [M] = [{m}], got {tuple(t.shape)}")
    _require(out_dtype in _OUT, f"{fn}: out_dtype must be torch.float16 or torch.bfloat16, got {out_dtype}")
    return m, n, kp, kp // group_size


def quantize_per_token_int8(x: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused per-token int8 quantizer: x fp16/bf16 [M, K] -> (xq int8 [M, kp], t float32 [M]).

    Bit-exact with ``reference.quantize_per_token_int8(x, kp)``; columns K..kp-1 are 0.
    """
    return _l.quantize_per_token(SOURCE, "quantize_per_token_int8", x, kp, torch.int8)


def w4a8_is_gemm(xq, t, qweight_packed, iscale, cscale, alpha_log2: int, group_size: int, out_dtype, return_acc: bool = False):
    """Integer-scale W4A8 GEMM (layout w4a8-is) on int8 tensor cores.

    xq int8 [M, Kp], t float32 [M], qweight_packed uint8 [N, Kp/2], iscale int32 [N, G],
    cscale float32 [N], alpha_log2 int.  Returns y [M, N] in ``out_dtype`` (and the int32
    accumulator A [M, N] if ``return_acc``):  y = float(A) * (t[m] * (cscale[n] / 2^a)).
    """
    fn = "w4a8_is_gemm"
    m, n, kp, g_count = _gemm_common(fn, xq, t, qweight_packed, group_size, out_dtype)
    _require(iscale.shape == (n, g_count), f"{fn}: iscale must be [N, G] = [{n}, {g_count}], got {tuple(iscale.shape)}")
    _require(cscale.shape == (n,), f"{fn}: cscale must be [N] = [{n}], got {tuple(cscale.shape)}")
    alpha_log2 = int(alpha_log2)
    _require(-126 <= alpha_log2 <= 126, f"{fn}: alpha_log2={alpha_log2} out of [-126, 126]")
    dev = _check_cuda(fn, xq, t, qweight_packed, iscale, cscale)
    xq, qw = xq.contiguous(), qweight_packed.contiguous()
    t, iscale, cscale = t.float().contiguous(), iscale.to(torch.int32).contiguous(), cscale.float().contiguous()
    _check_aligned(fn, xq=xq, qweight_packed=qw)
    y = torch.empty((m, n), dtype=out_dtype, device=dev)
    acc = torch.empty((m, n), dtype=torch.int32, device=dev) if return_acc else None
    if m and n:
        grid = (-(-n // BLOCK_N), -(-m // BLOCK_M))
        _launch(f"w4a8_is_gemm_{_OUT[out_dtype]}", grid, (GEMM_THREADS,),
                (_ptr(xq), _ptr(t), _ptr(qw), _ptr(iscale), _ptr(cscale), _i32(alpha_log2), _ptr(y), _ptr(acc),
                 _i32(m), _i32(n), _i32(kp), _i32(group_size)), dev)
    return (y, acc) if return_acc else y


def w4a8_fs_gemm(xq, t, qweight_packed, scales, group_size: int, out_dtype):
    """Float-scale W4A8 GEMM (layout w4a8-fs): y = t[m] * sum_j float(scales[n, j]) * float(P[j])
    accumulated in float32 in group order without FMA; scales fp16 [N, G]; y [M, N] in out_dtype."""
    fn = "w4a8_fs_gemm"
    m, n, kp, g_count = _gemm_common(fn, xq, t, qweight_packed, group_size, out_dtype)
    _require(scales.shape == (n, g_count), f"{fn}: scales must be [N, G] = [{n}, {g_count}], got {tuple(scales.shape)}")
    _require(scales.dtype == torch.float16, f"{fn}: scales must be float16, got {scales.dtype}")
    dev = _check_cuda(fn, xq, t, qweight_packed, scales)
    xq, qw = xq.contiguous(), qweight_packed.contiguous()
    t, scales = t.float().contiguous(), scales.contiguous()
    _check_aligned(fn, xq=xq, qweight_packed=qw)
    y = torch.empty((m, n), dtype=out_dtype, device=dev)
    if m and n:
        grid = (-(-n // BLOCK_N), -(-m // BLOCK_M))
        _launch(f"w4a8_fs_gemm_{_OUT[out_dtype]}", grid, (GEMM_THREADS,),
                (_ptr(xq), _ptr(t), _ptr(qw), _ptr(scales), _ptr(y), _i32(m), _i32(n), _i32(kp), _i32(group_size)), dev)
    return y


# ============================================================================= repacked kernels
# Twins of the w4r:: constants in w4a8_repacked.cu (tests/test_kernels_w4a8_emulate.py compares them).

DECODE_MAX_M = 64
# Decode with M <= OWN_AMAX_MAX_M tokens whose activations are at most OWN_AMAX_BYTES: every CTA takes
# the per-token amax over all of K itself (A = 0), with no exchange through the workspace.  8 KB,
# not the first rule's 32 KB: on the H200 (2026-12-04, benchmarks/decode_variants.py) the own amax
# gained 2-4% at M = 1 on the K = 4096 linears (8 KB) and lost 5% on down_proj at M = 1 (28 KB) and
# 5-8% on q/o and qkv at M = 4 (32 KB).
OWN_AMAX_MAX_M = 4
OWN_AMAX_BYTES = 8192
R_THREADS = 256
D_STAGES = 8
D_W_BYTES = D_STAGES * 8 * 512
D_XQ_BYTES = 32768
D_AUX_BYTES = 3 * 64 * 4 + 16
WS_TILES = 128
P_BM = 128
P_SMEM = 4 * (8192 + 16384)
# the prefill kernels' token tiles: 128 (one CTA per SM, what linear runs) and 64 (the *_bm64 entries:
# two CTAs per SM on <= 128 registers; timed beside it by ``qconvert bench --kernels``, not yet measured)
PREFILL_BMS = (128, 64)


def p_smem(bm: int) -> int:
    """Dynamic shared memory of the prefill kernel with BM-token tiles (w4r::p_smem)."""
    return 4 * (8192 + bm * 128)
R_MIN_GROUP, R_MAX_GROUP = 32, 1024  # FS exactness of float(16 P): 16 * 127 * 8 * g < 2^24
LAYOUTS = ("w4a8-is", "w4a8-fs", "fp4-fp8")  # fp4-fp8: ZeroQuant-FP, sm_89+ (M > 64: widen_zq + zq_prefill)


def decode_smem(mt8: int) -> int:
    """Dynamic shared memory of the decode kernel for MT8 token tiles (w4r::decode_smem)."""
    rows = 8 * mt8
    return D_W_BYTES + rows * (D_XQ_BYTES // rows + 32) + D_AUX_BYTES


def _next_pow2_log2(v: int) -> int:
    return max(0, (int(v) - 1).bit_length())


@dataclass
class PreparedW4A8:
    """A W4A8 linear ready for ``linear``: repacked device tensors and the sizes the plan needs.

    wq         uint8 [N128/16 * KB * 32 * 16]  repacked weights (repack.py, "W4R")
    scales     [G, N128]: int16 or int32 (w4a8-is, ``scale16`` says which), fp16 (w4a8-fs) or int8
               group exponents (fp4-fp8)
    cscale     float32 [N128] (w4a8-is, fp4-fp8) or None;  alpha_log2: the amplifier exponent a (0 for fp4-fp8)
    workspace  int32 [128 + N128/128]: the decode kernel's amax exchange and split-K tickets,
               zero at rest (each launch returns it to zero)
    """

    layout: str
    n: int
    k: int
    kp: int
    group_size: int
    wq: torch.Tensor
    scales: torch.Tensor
    scale16: bool
    cscale: torch.Tensor | None
    alpha_log2: int
    workspace: torch.Tensor
    widen_exp: torch.Tensor | None = None     # fp4-fp8 prefill: int8 [G, N128] e + s[n] (None: a row spans > 14)
    widen_cscale: torch.Tensor | None = None  # float32 [N128] c[n] * 2^-s[n]
    step_group: torch.Tensor | None = None    # int32 [2 KB]: each k step's group
    scaled_mm_out: dict | None = None         # {fp16, bf16: the out_dtype torch._scaled_mm takes, or None}
    lorc_v: torch.Tensor | None = None        # fp4-fp8 with LoRC (R <= LORC_MAX_R): V fp16 [R, K] ...
    lorc_u: torch.Tensor | None = None        # ... and U float32 [N128, R]: the decode adds (x V^T) U^T itself

    @property
    def n_groups(self) -> int:
        return self.kp // self.group_size

    @property
    def n128(self) -> int:
        return _repack.round_up(max(self.n, 1), _repack.BN)

    @property
    def kq(self) -> int:
        return _repack.round_up(self.kp, _repack.KBLOCK)

    @property
    def kb(self) -> int:
        return self.kq // _repack.KBLOCK

    @property
    def tiles(self) -> int:
        return self.n128 // _repack.BN

    @property
    def is_int(self) -> bool:
        return self.layout == "w4a8-is"

    @property
    def is_zq(self) -> bool:
        """ZeroQuant-FP fp4-fp8: E2M1 weights, E4M3 activations; ``linear`` at M <= 64 (FP8 tensor
        cores), ``zq_prefill`` above where ``widen_exp`` is set."""
        return self.layout == "fp4-fp8"

    def prefills(self, dtype) -> bool:
        """Whether ``zq_prefill`` can take activations of ``dtype`` (fp4-fp8 with a widening plan, and
        a row-wise FP8 GEMM for that output on the device)."""
        return self.widen_exp is not None and bool(self.scaled_mm_out and self.scaled_mm_out.get(dtype))

    def reset(self) -> None:
        """Zero the workspace (only needed after a launch that did not complete)."""
        self.workspace.zero_()


def check_repacked_shape(fn: str, n: int, k: int, kp: int, group_size: int) -> None:
    """ValueError unless the repacked kernels support (N, K, Kp, g); the message quotes them."""
    where = f"{fn}: unsupported shape N={n}, K={k} (padded {kp}), g={group_size}"
    _require(group_size % MMA_K == 0 and R_MIN_GROUP <= group_size <= R_MAX_GROUP,
             f"{where}: the group size must be a multiple of {MMA_K} in [{R_MIN_GROUP}, {R_MAX_GROUP}]")
    _require(kp > 0 and kp % group_size == 0 and k <= kp < k + group_size, f"{where}: Kp must be K rounded up to g")
    _require(n > 0 and k > 0, f"{where}: empty weight")
    _require(_repack.round_up(n, _repack.BN) // _repack.BN <= 65535, f"{where}: N too large for the grid")


def prepare(layout: str, tensors: dict, group_size: int, device) -> PreparedW4A8:
    """Repack one W4A8 linear for ``linear`` (load time; may synchronize).

    layout "w4a8-is": tensors qweight uint8 [N, Kp/2] (low nibble = even column), iscale int32
    [N, G], cscale float32 [N], alpha_log2 int32 [1], shape int64 [2] = [N, K];
    "w4a8-fs": qweight, scales fp16 [N, G], shape; "fp4-fp8" (ZeroQuant-FP, E2M1 codes in the same
    nibbles; decode only, sm_89+): qweight, sexp int8 [N, G], cscale float32 [N], shape.  Returns the
    repacked device tensors."""
    fn = "w4a8.prepare"
    _require(layout in LAYOUTS, f"{fn}: layout {layout!r} not one of {LAYOUTS}")
    needs = {"w4a8-is": ("iscale", "cscale", "alpha_log2"), "w4a8-fs": ("scales",), "fp4-fp8": ("sexp", "cscale")}[layout]
    for key in ("qweight", "shape") + needs:
        _require(key in tensors, f"{fn}: layout {layout} needs tensor {key!r} (got {sorted(tensors)})")
    device = torch.device(device)
    if layout == "fp4-fp8" and device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        _require(cap >= (8, 9), f"{fn}: layout fp4-fp8 needs FP8 tensor cores (sm_89+), device is sm_{cap[0]}{cap[1]}")
    n, k = (int(v) for v in tensors["shape"].reshape(-1)[:2].tolist())
    qweight = tensors["qweight"]
    _require(qweight.dtype == torch.uint8 and qweight.dim() == 2 and qweight.shape[0] == n,
             f"{fn}: qweight must be uint8 [N, Kp/2] = [{n}, *], got {qweight.dtype} {tuple(qweight.shape)}")
    kp = 2 * qweight.shape[1]
    check_repacked_shape(fn, n, k, kp, group_size)
    g_count = kp // group_size
    n128 = _repack.round_up(n, _repack.BN)
    wq = _repack.repack_weight(qweight.to(device))
    if layout == "w4a8-is":
        iscale, cscale = tensors["iscale"], tensors["cscale"]
        _require(tuple(iscale.shape) == (n, g_count), f"{fn}: iscale must be [N, G] = [{n}, {g_count}], got {tuple(iscale.shape)}")
        _require(tuple(cscale.reshape(-1).shape) == (n,), f"{fn}: cscale must be [N] = [{n}], got {tuple(cscale.shape)}")
        alpha = int(tensors["alpha_log2"].reshape(-1)[0])
        _require(-126 <= alpha <= 126, f"{fn}: alpha_log2={alpha} out of [-126, 126]")
        sdt = _repack.iscale_dtype(iscale)
        scales = _repack.repack_scales(iscale.to(device=device, dtype=torch.int32), n128, sdt)
        cs = torch.zeros(n128, dtype=torch.float32, device=device)
        cs[:n] = cscale.reshape(-1).to(device=device, dtype=torch.float32)
        scale16 = sdt == torch.int16
    elif layout == "fp4-fp8":
        sexp, cscale = tensors["sexp"], tensors["cscale"]
        _require(sexp.dtype == torch.int8 and tuple(sexp.shape) == (n, g_count),
                 f"{fn}: sexp must be int8 [N, G] = [{n}, {g_count}], got {sexp.dtype} {tuple(sexp.shape)}")
        _require(tuple(cscale.reshape(-1).shape) == (n,), f"{fn}: cscale must be [N] = [{n}], got {tuple(cscale.shape)}")
        scales = _repack.repack_scales(sexp.to(device), n128)
        cs = torch.zeros(n128, dtype=torch.float32, device=device)
        cs[:n] = cscale.reshape(-1).to(device=device, dtype=torch.float32)
        alpha, scale16 = 0, False
        outs = scaled_mm_outputs(device)
        widen = widen_plan(qweight, sexp, cscale.reshape(-1), n128, kp, group_size, device) if any(outs.values()) else None
    else:
        sc = tensors["scales"]
        _require(tuple(sc.shape) == (n, g_count), f"{fn}: scales must be [N, G] = [{n}, {g_count}], got {tuple(sc.shape)}")
        scales = _repack.repack_scales(sc.to(device=device, dtype=torch.float16), n128)
        cs, alpha, scale16 = None, 0, False
    workspace = torch.zeros(WS_TILES + n128 // _repack.BN, dtype=torch.int32, device=device)
    prep = PreparedW4A8(layout, n, k, kp, group_size, wq, scales, scale16, cs, alpha, workspace)
    if layout == "fp4-fp8" and widen is not None:
        prep.widen_exp, prep.widen_cscale, prep.step_group = widen
        prep.scaled_mm_out = dict(outs)
    u, v = tensors.get("lorc_u"), tensors.get("lorc_v")
    if layout == "fp4-fp8" and u is not None and v is not None and 0 < u.shape[1] <= LORC_MAX_R:
        r = u.shape[1]
        _require(tuple(u.shape) == (n, r) and tuple(v.shape) == (r, k),
                 f"{fn}: lorc_u must be [N, R] = [{n}, {r}] and lorc_v [R, K] = [{r}, {k}], got {tuple(u.shape)}, {tuple(v.shape)}")
        prep.lorc_v = v.to(device=device, dtype=torch.float16).contiguous()
        prep.lorc_u = torch.zeros((n128, r), dtype=torch.float32, device=device)
        prep.lorc_u[:n] = u.to(device=device, dtype=torch.float32)
    return prep


WIDEN_SPAN = 14  # E4M3 holds every E2M1 value times 2^-8 .. 2^6 exactly: a row's exponents may span 14
LORC_MAX_R = 32  # fp8_repacked.cu's zql::MAX_R: the decode path's LoRC rank at most


def widen_plan(qweight: torch.Tensor, sexp: torch.Tensor, cscale: torch.Tensor, n128: int, kp: int, group_size: int,
               device):
    """fp4-fp8's prefill on FP8 GEMMs (``zq_prefill``): per row n the shift s[n] = 6 - max_j e[n, j]
    over the groups with a non-zero weight, the widening exponents e + s (in [-8, 6] when those span at
    most WIDEN_SPAN, so w * 2^(e + s) is an E4M3 value exactly: fp8_repacked.cu; an all-zero group,
    whose e the method sets to E_MIN, gets 6) repacked to int8 [G, N128], the row scale c * 2^-s
    (computed in float64 on the host, exact while it stays a normal float32), and each k step's group.
    None when some row spans more or a row scale would leave float32's normal range (the layer's
    prefill then stays on fp8_gemm.cu's kernel)."""
    n, g_count = sexp.shape
    e = sexp.cpu().to(torch.int64)
    b = qweight.cpu().to(torch.int64)
    mags = torch.stack([b & 0x7, (b >> 4) & 0x7], -1).reshape(n, g_count, group_size)  # E2M1 magnitudes
    live = (mags != 0).any(dim=2)                                                        # [N, G]
    hi = torch.where(live, e, torch.full_like(e, -(2**31))).amax(dim=1)
    lo = torch.where(live, e, torch.full_like(e, 2**31)).amin(dim=1)
    hi = torch.where(live.any(dim=1), hi, torch.zeros_like(hi))                          # an all-zero row
    if bool(((hi - lo) > WIDEN_SPAN)[live.any(dim=1)].any()):
        return None
    shift = 6 - hi
    ew = torch.where(live, e + shift[:, None], torch.full_like(e, 6))
    cw64 = cscale.cpu().double() * torch.pow(2.0, (-shift).double())
    if not bool(((cw64 >= 2.0**-126) & (cw64 < 2.0**127)).all()):
        return None
    cw = torch.zeros(n128, dtype=torch.float32, device=device)
    cw[:n] = cw64.float().to(device)
    ew = _repack.repack_scales(ew.to(torch.int8).to(device), n128)
    kb = _repack.round_up(kp, _repack.KBLOCK) // _repack.KBLOCK
    steps = torch.arange(2 * kb, dtype=torch.int32) * MMA_K // group_size
    return ew, cw, steps.clamp(max=kp // group_size - 1).to(device)


def widen_zq(prep: PreparedW4A8) -> torch.Tensor:
    """The fp4-fp8 layer's weights as E4M3 values w * 2^(e + s[n]), [N16, Kq] (N rounded up to 16,
    zero rows and columns past N and Kp): one launch of w4a8r_widen_zq."""
    fn = "w4a8.widen_zq"
    _require(prep.is_zq and prep.widen_exp is not None, f"{fn}: a fp4-fp8 layer whose rows' exponents span <= {WIDEN_SPAN}")
    n16 = _repack.round_up(prep.n, 16)
    _require(n16 // 16 <= 65535, f"{fn}: N={prep.n} too large for the grid")
    w8 = torch.empty((n16, prep.kq), dtype=torch.uint8, device=prep.wq.device)
    grid = (-(-prep.kb * 32 // R_THREADS), n16 // 16)
    _l.launch(SOURCE_ZQ, "w4a8r_widen_zq", grid, (R_THREADS,),
              (_ptr(prep.wq), _ptr(prep.widen_exp), _ptr(prep.step_group), _ptr(w8), _i32(n16), _i32(prep.n128),
               _i32(prep.kb)), prep.wq.device)
    return w8.view(torch.float8_e4m3fn)


def lorc_h(x: torch.Tensor, prep: PreparedW4A8) -> torch.Tensor:
    """LoRC's first product at decode, h float32 [M, R] = (xq * t) V^T of the layer's E4M3 quantization
    of x (the decode kernel's, bit for bit), in w4a8r_lorc_h_zq's order (reference.lorc_h_lanes)."""
    m, r = x.shape[0], prep.lorc_u.shape[1]
    h = torch.empty((m, r), dtype=torch.float32, device=x.device)
    _l.launch(SOURCE_ZQ, "w4a8r_lorc_h_zq", (m,), (R_THREADS,),
              (_ptr(x), _ptr(prep.lorc_v), _ptr(h), _i32(m), _i32(prep.k), _i32(r), _i32(int(x.dtype == torch.bfloat16))),
              x.device)
    return h


def zq_prefill(xq: torch.Tensor, t: torch.Tensor, prep: PreparedW4A8, out_dtype) -> torch.Tensor:
    """fp4-fp8 at M > 64 on an FP8 GEMM with per-row scales: y = (xq * t[m]) (w8 * c[n] 2^-s[n])^T
    (torch._scaled_mm: cuBLASLt / CUTLASS on the GPU), w8 from ``widen_zq``; xq E4M3 [M, Kq] and t
    float32 [M] from the per-token E4M3 quantizer.  y [M, N] in out_dtype, contiguous.
    The same products as ``reference.fp4_fp8_gemm``, summed over all of K in the GEMM's order
    (``reference.fp4_fp8_gemm_widened`` sums them exactly)."""
    _require(prep.prefills(out_dtype), f"w4a8.zq_prefill: no row-wise FP8 GEMM for {out_dtype} output on this device "
             f"(found at load: {prep.scaled_mm_out}), or no widening plan; fp8.cuda.fp4_fp8_gemm runs the stored tensors")
    w8 = widen_zq(prep)
    n16 = w8.shape[0]
    out = prep.scaled_mm_out[out_dtype]  # found at prepare time (load), never probed here
    return row_scaled_mm(xq, t, w8, prep.widen_cscale[:n16], prep.n, out, out_dtype)


@dataclass(frozen=True)
class Plan:
    """Every launch parameter of one ``linear`` call, from the shapes alone (no device value)."""

    kind: str              # "decode" or "prefill"
    kernel: str
    grid: tuple
    smem: int
    splits: int            # S: the groups are split S ways (split-K)
    gq: int                # G = gq * S + gr
    gr: int
    mt8: int = 0           # decode: n8 token tiles (M <= 8 * mt8)
    amax_ctas: int = 0     # decode: A, the CTAs that publish a k chunk's amax
    ak_log2: int = 0       # decode: that chunk is 2^ak_log2 k wide
    mtiles: int = 0        # prefill
    ntiles: int = 0
    band_log2: int = 0
    part_int4: int = 0     # split-K partial slots (16 bytes each), 0 without split-K
    counters: int = 0      # prefill split-K tickets

    def split_bounds(self) -> list[tuple[int, int]]:
        """[(g0, g1)] of every split, as the kernels compute them (split_g0 / split_g1)."""
        out = []
        for s in range(self.splits):
            g0 = s * self.gq + min(s, self.gr)
            out.append((g0, g0 + self.gq + (1 if s < self.gr else 0)))
        return out


def amax_plan(m: int, k: int, publishers: int, own: bool = True) -> tuple[int, int]:
    """(A, ak_log2) of a decode launch with M = m tokens of K = k activations and at most
    ``publishers`` CTAs that may publish.  The per-token amax is published by the first A CTAs,
    each covering 2^ak_log2 k of every row (about 2048 activations), with A <= the SM count: the
    publishers wait for each other, so they must all be resident at once (dispatch is in grid
    order and one decode CTA fits any SM).  With M <= OWN_AMAX_MAX_M and at most OWN_AMAX_BYTES of
    activations (and ``own``, False being the rule before 2026-12-04), A = 0: every CTA reads its
    rows whole (2^ak_log2 >= K) and takes the amax itself, which costs that many bytes from L2 per
    CTA and saves the exchange's grid-wide wait."""
    if own and m <= OWN_AMAX_MAX_M and m * k * 2 <= OWN_AMAX_BYTES:
        return 0, max(3, _next_pow2_log2(k))
    ak = max(3, _next_pow2_log2(-(-2048 // m)))
    if -(-k // (1 << ak)) > publishers:
        ak = max(3, _next_pow2_log2(-(-k // publishers)))
    return -(-k // (1 << ak)), ak


def plan(m: int, prep: PreparedW4A8, sm_count: int, prefill_bm: int = P_BM, prefill_ctas_per_sm: int | None = None) -> Plan:
    """Kernel, grid and split-K choice for M tokens on a device with ``sm_count`` SMs.

    Decode (M <= 64): S splits as ``roofline.decode_splits`` says, the per-token amax as
    ``amax_plan`` says.  Prefill: 128-channel x ``prefill_bm``-token tiles (128: one CTA per SM;
    64: ``prefill_ctas_per_sm``, default two, one where an SM's shared memory holds one, as on sm_86 /
    sm_89), split only when the tiles do not fill the SMs' CTA slots (<= 4 ways, S x tiles <= slots:
    one wave)."""
    g = prep.n_groups
    tiles = prep.tiles
    sms = max(int(sm_count), 1)
    is_ = "is" if prep.is_int else ("zq" if prep.is_zq else "fs")
    _require(m <= DECODE_MAX_M or not prep.is_zq,
             f"w4a8.plan: layout fp4-fp8 runs M={m} > {DECODE_MAX_M} as zq_prefill (the widened weights and an FP8 "
             "GEMM), not through linear")
    if m <= DECODE_MAX_M:
        mt8 = next(t for t in (1, 2, 4, 8) if 8 * t >= m)
        s = decode_splits(prep.n, prep.k, m, prep.group_size, sms)
        gq, gr = divmod(g, s)
        a, ak = amax_plan(m, prep.k, min(s * tiles, sms))
        return Plan("decode", f"w4a8r_decode_{is_}_m{8 * mt8}", (s, tiles), decode_smem(mt8), s, gq, gr, mt8=mt8,
                    amax_ctas=a, ak_log2=ak, part_int4=s * tiles * 8 * mt8 * 32 if s > 1 else 0)
    _require(prefill_bm in PREFILL_BMS, f"w4a8.plan: prefill_bm must be one of {PREFILL_BMS}, got {prefill_bm}")
    mtiles = -(-m // prefill_bm)
    n_tiles = mtiles * tiles
    slots = sms * (1 if prefill_bm == P_BM else (prefill_ctas_per_sm or 2))
    s = 1 if n_tiles >= slots else max(1, min(4, g, slots // n_tiles))   # one wave: S x tiles <= slots
    gq, gr = divmod(g, s)
    band = min(3, _next_pow2_log2(tiles))
    grid = (mtiles << band, -(-tiles // (1 << band)), s)
    name = f"w4a8r_prefill_{is_}" + ("" if prefill_bm == P_BM else f"_bm{prefill_bm}")
    return Plan("prefill", name, grid, p_smem(prefill_bm), s, gq, gr, mtiles=mtiles, ntiles=tiles, band_log2=band,
                part_int4=s * n_tiles * 8 * (prefill_bm // 8) * 32 if s > 1 else 0, counters=n_tiles if s > 1 else 0)


def prefill_ctas(dev: torch.device, bm: int) -> int:
    """Prefill CTAs of ``bm`` tokens that one SM of ``dev`` holds at once, by shared memory (1 KB per
    CTA kept by the driver): 128-token ones one, 64-token ones two on an A100 / H100 / H200, one on
    sm_86 / sm_89's 100 KB; two under emulation or where torch does not give the figure."""
    if bm == P_BM or dev.type != "cuda":
        return 1 if bm == P_BM else 2
    per_sm = _l.smem_per_sm(dev.index if dev.index is not None else torch.cuda.current_device())
    return 2 if per_sm is None else max(1, min(2, per_sm // (p_smem(bm) + 1024)))


def device_sm_count(dev: torch.device) -> int:
    """The SMs a plan fills: the device's, or the emulated count for CPU tensors (launch hooks)."""
    if dev.type == "cuda":
        return _l.sm_count(dev.index if dev.index is not None else torch.cuda.current_device())
    return _l.emulated_sm_count()


def linear(x: torch.Tensor, prepared: PreparedW4A8, return_acc: bool = False, prefill_bm: int = P_BM):
    """y = the W4A8 linear of ``prepared`` applied to x (fp16 / bf16 [M, K]) -> [M, N] in x's dtype.

    No host synchronization and no device value read on the host; launched on torch's current
    stream.  ``return_acc`` (w4a8-is, tests): also the int32 accumulator A [M, N].  ``prefill_bm``
    (M > 64): the prefill kernel's token tile, 128 or 64 (the same bits for w4a8-is; see ``plan``)."""
    fn = "w4a8.linear"
    p = prepared
    _require(x.dim() == 2, f"{fn}: x must be [M, K], got {tuple(x.shape)}")
    _require(x.dtype in _OUT, f"{fn}: x must be float16 or bfloat16, got {x.dtype}")
    _require(x.shape[1] == p.k, f"{fn}: x has K={x.shape[1]}, the layer {p.k}")
    dev = _check_cuda(fn, x, p.wq)
    x = x.contiguous()
    m = x.shape[0]
    y = torch.empty((m, p.n), dtype=x.dtype, device=dev)
    acc = torch.empty((m, p.n), dtype=torch.int32, device=dev) if (return_acc and p.is_int) else None
    if m == 0:
        return (y, acc) if return_acc else y
    pl = plan(m, p, device_sm_count(dev), prefill_bm, prefill_ctas(dev, prefill_bm))
    part = torch.empty(4 * pl.part_int4, dtype=torch.int32, device=dev) if pl.part_int4 else None
    bf16 = x.dtype == torch.bfloat16
    spg = p.group_size // MMA_K
    common = (_ptr(p.wq), _ptr(p.scales), _ptr(p.cscale), _i32(p.alpha_log2), _ptr(y), _ptr(acc), _ptr(part))
    if pl.kind == "decode":
        vec = p.k % 8 == 0 and x.data_ptr() % 16 == 0
        flags = int(bf16) | (int(vec) << 1) | (int(p.scale16) << 2)
        args = (_ptr(x), *common, _ptr(p.workspace), _i32(m), _i32(p.n), _i32(p.k), _i32(p.n128),
                _i32(p.n_groups), _i32(spg), _i32(p.kb), _i32(pl.splits), _i32(pl.gq), _i32(pl.gr),
                _i32(pl.amax_ctas), _i32(pl.ak_log2), _i32(flags))
        if p.is_zq:  # LoRC's h first (its own small launch), added to y in the decode kernel's epilogue
            h = lorc_h(x, p) if p.lorc_u is not None else None
            args += (_ptr(h), _ptr(p.lorc_u if h is not None else None), _i32(h.shape[1] if h is not None else 0))
        _l.launch(SOURCE_ZQ if p.is_zq else SOURCE_R, pl.kernel, pl.grid, (R_THREADS,), args, dev, pl.smem)
    else:
        xq = torch.empty((m, p.kq), dtype=torch.int8, device=dev)
        t = torch.empty((m,), dtype=torch.float32, device=dev)
        _l.launch(SOURCE_R, f"w4a8r_quantize_{_OUT[x.dtype]}", (m,), (QUANT_THREADS,),
                  (_ptr(x), _ptr(xq), _ptr(t), _i32(m), _i32(p.k), _i32(p.kq)), dev)
        counters = torch.zeros(pl.counters, dtype=torch.int32, device=dev) if pl.counters else None
        flags = int(bf16) | (int(p.scale16) << 2)
        _l.launch(SOURCE_R, pl.kernel, pl.grid, (R_THREADS,),
                  (_ptr(xq), _ptr(t), *common, _ptr(counters), _i32(m), _i32(p.n), _i32(p.n128), _i32(p.n_groups),
                   _i32(spg), _i32(p.kb), _i32(pl.splits), _i32(pl.gq), _i32(pl.gr), _i32(pl.mtiles), _i32(pl.ntiles),
                   _i32(pl.band_log2), _i32(flags)), dev, pl.smem)
    return (y, acc) if return_acc else y
