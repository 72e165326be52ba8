// I-LLM kernels of qconvert: DI-MatMul (int8 tensor cores, dyadic rescaling epilogue), the
// per-token requantization from the integer row max, DI-ClippedSoftmax with DI-Exp, and DI-Norm.
//
// The arithmetic is the one of qconvert_kernels/illm/reference.py, bit for bit: integer values,
// dyadic scales m / 2^k (16-bit m), "half up" rounding shifts.  No float arithmetic is written
// here, and none is generated: tests/test_kernels_illm_compile.py pins that the SASS has no
// float-unit instruction at all.
//
//   illm_matmul_w8 / _w4   t[m, n] = round((acc[m, n] * wm[n]) / 2^(wk[n] - kmin))   int64 out,
//                          acc = sum_k xq[m, k] * q[n, k] on int8 tensor cores (w4: weights
//                          widened from packed int4 in registers, the W4A8 main loop); optionally
//                          the rows' output scale exponents xk[m] + kmin.  Up to three sibling
//                          linears of one input (q/k/v, gate/up) joined along N run as one launch,
//                          each column segment with its own layer's kmin and row exponents
//   illm_dyadic_rows       the same t from an int32 product made by torch._int_mm (w8 above the
//                          GEMV's rows: cuBLASLt's int8 GEMM), and the rows' exponents
//   illm_requant_rows      q = round(|v| * qmax / amax) with v's sign, per row; the row's scale
//                          ratio amax / qmax as (m, k)   (reference_illm.quantize_rows); a clip
//                          c * 2^16 below 2^16 first shrinks amax to round(amax * c) (|v| clamped)
//   illm_softmax           DI-ClippedSoftmax of int32 scores with a per-row dyadic scale and a
//                          per-row valid length (causal): 15-bit probabilities (di_softmax)
//   illm_rmsnorm           DI-Norm: integer square root, x * gamma requantized per row (di_rmsnorm)
//   illm_rope_requant      q, k or v of a token: requantized to 16 bits, RoPE per head, requantized
//                          to int8 per token or per head, scale products folded (rope_requant)
//   illm_swiglu            gate and up requantized to 16 bits, scales folded, SiLU(g) * u (swiglu)
//   illm_heads_requant     attention's heads on one exponent per token, requantized for o_proj
//                          (heads_requant)
//   illm_residual_norm     the branch requantized to 20 bits, both terms aligned by shifts, the
//                          sum requantized to 20 bits (residual_add), then its DI-Norm
//   illm_hadamard          the online Hadamard transform of int64 rows (hadamard_rows): exact sums
//   illm_attention         one query row of one head: int8 q.k (dp4a, once per key), each key's
//                          scale folded in by shifts, DI-ClippedSoftmax, each value's scale folded
//                          into P, P requantized to 16 bits, P V exact (attention)
//
// Requirements (launcher: qconvert_kernels/illm/cuda.py): K a multiple of 32 for the GEMMs;
// row-major operands (contiguous, but illm_rope_requant's and illm_swiglu's inputs may have a row
// stride), the GEMMs' 16-byte aligned; |x| < 2^22 for the norm.
// This file includes ../common.cuh, the W4A8 main loop (../w4a8/w4a8_mainloop.cuh) and the QUIK
// byte main loop (../quik/quik_mainloop.cuh); kernel_source() in compile.py inlines them for NVRTC.
//
// Integer division is done with integer instructions only (common.cuh): qk::udiv_u64 (binary long
// division) for per-row values, qk::DivBy (multiply by a precomputed reciprocal, exact for the
// stated numerator bound) for the per-element quotients.  nvcc's own division routine would use a
// float reciprocal estimate (with an FTZ conversion); with these the SASS has no float instruction.

#include "../common.cuh"
#include "../w4a8/w4a8_mainloop.cuh"
#include "../quik/quik_mainloop.cuh"

namespace illm {

constexpr int MANT = 16;
constexpr int EXP_F = 16;
constexpr long long EXP_A = 43267;  // round(0.6602 * 2^16): 2^f ~= 1 + a f + (1 - a) f^2
constexpr long long EXP_B = 65536 - EXP_A;
constexpr long long LOG2E_M = 47274;  // round(log2(e) * 2^15), exponent 15
constexpr int LOG2E_K = 15;
constexpr int PROB_BITS = 15;
constexpr int ROPE_BITS = 14;  // the rotary table's scale 2^-14 (reference.ROPE_BITS)
constexpr int CLIP_BITS = 16;  // an activation clip is round(c * 2^16), c in [1/2, 1]
constexpr long long WIDE_QMAX = 32767;  // the 16-bit activations (reference.WIDE_QMAX)
constexpr int ROW_THREADS = 256;
constexpr int ATTN_MAX_D = 256;  // illm_attention's largest head_dim
constexpr long long NO_EXPONENT = 1LL << 40;  // the exponent of a zero scale, left out of minimums

__device__ __forceinline__ int bitlen(long long v) { return v > 0 ? 64 - __clzll(v) : 0; }
__device__ __forceinline__ long long rshift_round(long long v, int s) { return s > 0 ? (v + (1LL << (s - 1))) >> s : v; }
__device__ __forceinline__ long long shift(long long v, int s) { return s >= 0 ? rshift_round(v, s) : (v << (-s)); }

struct Dy {
    long long m, k;
};

__device__ __forceinline__ Dy normalize(long long m, long long k) {  // m >= 0
    if (m == 0) return {0, 0};
    const int sh = bitlen(m) - MANT;
    long long m2 = shift(m, sh);
    const long long carry = m2 >> MANT;  // rounding up to 2^16
    m2 >>= carry;
    return {m2, k - sh - carry};
}

__device__ __forceinline__ Dy ratio(long long num, long long den) {  // num, den >= 0, < 2^40
    int sh = MANT + 2 + bitlen(den) - bitlen(num);
    sh = sh > 0 ? sh : 0;
    const long long q = den > 0 ? static_cast<long long>(qk::udiv_u64(static_cast<unsigned long long>(num << sh),
                                                                        static_cast<unsigned long long>(den))) : 0;
    return normalize(q, sh);
}

// Block-wide reductions of one value per thread (ROW_THREADS threads): warp shuffles, then
// the warps' results in shared memory; every thread gets the result.
__device__ __forceinline__ long long block_max(long long v, long long* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    v = red[0];
#pragma unroll
    for (int w = 1; w < ROW_THREADS / 32; ++w) v = max(v, red[w]);
    return v;
}
__device__ __forceinline__ long long block_sum(long long v, long long* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    v = 0;
#pragma unroll
    for (int w = 0; w < ROW_THREADS / 32; ++w) v += red[w];
    return v;
}

// quantize_rows over one row (the caller's CTA), in two parts: `init` reads the row through
// `get(i)` (once, or twice when the row needs the pre-shift below 2^40) for its range, then
// `operator()` gives q of one value and `scale()` the row's scale ratio (m, k - pre) of
// amax / qmax.  `clip` (c * 2^16, in [2^15, 2^16]) shrinks amax first; |v| beyond the shrunken
// amax saturates.  NBITS bounds the division's numerator |v| * qmax + amax2 / 2 (|v| clamped to
// amax2 <= 2^40): 48 bits for qmax <= 127 (< 2^47 + 2^39), 61 for qmax < 2^20 (< 2^60).
template <int NBITS>
struct RowQuant {
    long long amax2;
    int qmax, pre;
    qk::DivBy by;
    template <typename Get>
    __device__ __forceinline__ void init(const Get& get, int n, int qmax_, long long clip, long long* red) {
        long long amax = 0;
        for (int i = threadIdx.x; i < n; i += ROW_THREADS) amax = max(amax, llabs(get(i)));
        finish(block_max(amax, red), get, n, qmax_, clip, red);
    }
    // init's second part, for a caller that has the row's max |v| (the CTA's, block_max'ed) already
    template <typename Get>
    __device__ __forceinline__ void finish(long long amax, const Get& get, int n, int qmax_, long long clip, long long* red) {
        pre = bitlen(amax) - 40;
        pre = pre > 0 ? pre : 0;
        amax2 = amax;
        if (pre > 0) {
            amax2 = 0;
            for (int i = threadIdx.x; i < n; i += ROW_THREADS) amax2 = max(amax2, llabs(rshift_round(get(i), pre)));
            amax2 = block_max(amax2, red);
        }
        amax2 = rshift_round(amax2 * clip, CLIP_BITS);  // amax2 <= 2^40 after `pre`, clip <= 2^16: below 2^57
        by.init(static_cast<unsigned long long>(amax2 > 0 ? amax2 : 1), NBITS);
        qmax = qmax_;
    }
    __device__ __forceinline__ long long operator()(long long v) const {
        v = rshift_round(v, pre);
        const long long mag = static_cast<long long>(by.div(static_cast<unsigned long long>(min(llabs(v), amax2) * qmax + amax2 / 2)));
        return v < 0 ? -mag : mag;
    }
    __device__ __forceinline__ Dy scale() const {
        const Dy r = ratio(amax2, qmax);
        return {r.m, r.k - pre};
    }
};

// The int8 requantization of one row (qmax <= 127): writes q, returns the row's scale.
template <typename Get>
__device__ __forceinline__ Dy requant_row(Get get, int n, long long qmax, long long clip, signed char* q, long long* red) {
    RowQuant<48> rq;
    rq.init(get, n, qmax, clip, red);
    for (int i = threadIdx.x; i < n; i += ROW_THREADS) q[i] = static_cast<signed char>(rq(get(i)));
    return rq.scale();
}

__device__ __forceinline__ long long isqrt(long long v) {  // floor(sqrt(v)), v >= 0
    if (v <= 0) return 0;
    long long x = 1LL << ((bitlen(v) + 1) / 2);
#pragma unroll 1
    for (int i = 0; i < 8; ++i)
        x = min(x, (x + static_cast<long long>(qk::udiv_u64(static_cast<unsigned long long>(v), static_cast<unsigned long long>(x)))) / 2);
    return x * x > v ? x - 1 : x;
}

__device__ __forceinline__ long long di_exp2(long long u) {  // u <= 0, 16 fractional bits
    const long long q = u >> EXP_F;
    const long long r = u - (q << EXP_F);
    const long long p = (1LL << EXP_F) + rshift_round(r * (EXP_A + rshift_round(EXP_B * r, EXP_F)), EXP_F);
    const long long s = -q < 62 ? -q : 62;
    return rshift_round(p, static_cast<int>(s));
}

__device__ __forceinline__ Dy mul(Dy a, Dy b) { return normalize(a.m * b.m, a.k + b.k); }  // Dyadic.__mul__

// DI-Exp's fixed-point argument u = -min(negx * coef, umax) for negx = -x >= 0, coef = scale *
// log2(e) (reference.exp_argument): a scale above 2^-16 (s < 0, rare) caps v first so the left
// shift stays in range.
__device__ __forceinline__ long long exp_arg(long long negx, Dy coef, long long umax) {
    const int s = static_cast<int>(coef.k) - EXP_F;
    long long v = min(negx, 1LL << 40) * coef.m;
    if (s < 0) v = min(v, (umax >> min(-s, 40)) + 1);
    return -min(shift(v, min(max(s, -40), 62)), umax);  // (v < 2^57: a shift above 62 leaves 0 too)
}

// Integer SiLU of g (reference.di_silu): g * sigmoid, sigmoid(|x|) = 2^32 / (2^16 + e^-|x|) with
// e^-|x| by DI-Exp (16 fractional bits), one per-element long division (quotient <= 2^16 + 1).
__device__ __forceinline__ long long silu(long long g, Dy coef, long long umax) {
    constexpr long long ONE = 1LL << EXP_F;
    const long long den = ONE + di_exp2(exp_arg(llabs(g), coef, umax));  // [2^16, 2^17]
    const long long pos = static_cast<long long>(qk::udiv_u64(static_cast<unsigned long long>((ONE << EXP_F) + den / 2),
                                                              static_cast<unsigned long long>(den)));
    return rshift_round(g * (g >= 0 ? pos : ONE - pos), EXP_F);
}

// DI-MatMul epilogue: t = round(acc * wm[n] / 2^(wk[n] - kmin)), int64, kmin the one of n's segment:
// kmin[0] below column n1, kmin[1] from n1 to n2, kmin[2] from n2 (one layer: n1 = n2 = N).
__device__ __forceinline__ void matmul_epilogue(const int (&P)[quik::MT][quik::NT][4], const int* __restrict__ wm,
                                                const int* __restrict__ wk, const int* __restrict__ kmin,
                                                long long* __restrict__ t, int M, int N, int n1, int n2, int bm, int bn) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int wmo = (warp >> 1) * quik::WM, wno = (warp & 1) * quik::WN;
#pragma unroll
    for (int nt = 0; nt < quik::NT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const int n = bn + wno + nt * 8 + 2 * tig + c;
            if (n >= N) continue;
            const long long m_n = __ldg(wm + n);
            const int s = __ldg(wk + n) - __ldg(kmin + (n >= n1) + (n >= n2));
#pragma unroll
            for (int mt = 0; mt < quik::MT; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int m = bm + wmo + mt * 16 + gid + 8 * h;
                    if (m < M) t[static_cast<long long>(m) * N + n] = rshift_round(P[mt][nt][2 * h + c] * m_n, s);
                }
        }
}

}  // namespace illm

#define ILLM_MATMUL_ARGS                                                                              \
    const signed char* __restrict__ xq,   /* int8 [M, K] activations */                               \
    const signed char* __restrict__ qw,   /* int8 [N, K] (w8) or packed int4 [N, K/2] (w4) */         \
    const int* __restrict__ wm,           /* int32 [N] mantissas */                                   \
    const int* __restrict__ wk,           /* int32 [N] exponents */                                   \
    const int* __restrict__ kmin_p,       /* int32 [segments]: each segment's min of wk (device) */   \
    long long* __restrict__ t,            /* int64 [M, N] out */                                      \
    const long long* __restrict__ xk,     /* int64 [M]: the rows' scale exponents, or null */         \
    long long* __restrict__ tk,           /* int64 [segments, M] out: xk + kmin (not when null) */    \
    int M, int N, int K,                                                                              \
    int n1, int n2                        /* segment bounds: [0, n1), [n1, n2), [n2, N) */

namespace illm {
// The output rows' scale exponents, xk + kmin (the input's scale times 2^-kmin) per column segment,
// written by the CTAs of the first column tile: one addition per row and segment that would
// otherwise be a launch of its own.  A segment is there when its start is below N.
__device__ __forceinline__ void matmul_row_exponents(const long long* __restrict__ xk, long long* __restrict__ tk,
                                                     const int* __restrict__ kmin, int M, int N, int n1, int n2,
                                                     int bm) {
    if (tk == nullptr || blockIdx.x != 0) return;
    const int segments = 1 + (n1 < N) + (n2 < N);
    for (int g = 0; g < segments; ++g) {
        const int km = __ldg(kmin + g);
        for (int i = threadIdx.x; i < quik::BM; i += quik::THREADS)
            if (bm + i < M) tk[static_cast<long long>(g) * M + bm + i] = xk[bm + i] + km;
    }
}
}  // namespace illm

// DI-MatMul at decode (M <= quik::GV_ROWS): the GEMV main loops of quik_mainloop.cuh (a warp per
// two output columns, dp4a; w4: the nibbles sign-extended bytewise), then matmul_epilogue's t for
// lane j's output (j / 2, j % 2); CTA 0 also writes the rows' exponents.  Launch: grid ceil(N / 16),
// block 256.
namespace illm {
template <bool kW4>
__device__ __forceinline__ void gemv(ILLM_MATMUL_ARGS) {
    if (tk != nullptr && blockIdx.x == 0) {
        const int segments = 1 + (n1 < N) + (n2 < N);
        for (int g = 0; g < segments; ++g)
            for (int i = threadIdx.x; i < M; i += quik::GV_THREADS)
                tk[static_cast<long long>(g) * M + i] = xk[i] + __ldg(kmin_p + g);
    }
    const int lane = threadIdx.x & 31;
    const int n0 = quik::gemv_n0();
    if (n0 >= N) return;  // no barrier in this kernel
    int acc[quik::GV_ROWS][quik::GV_COLS];
    quik::gemv_sums<kW4>(xq, qw, M, N, kW4 ? K / 2 : K, n0, acc);
    const int a = quik::gemv_pick(acc, lane);
    const int m = lane / quik::GV_COLS, n = n0 + lane % quik::GV_COLS;
    if (lane >= quik::GV_ROWS * quik::GV_COLS || m >= M || n >= N) return;
    const int s = __ldg(wk + n) - __ldg(kmin_p + (n >= n1) + (n >= n2));
    t[static_cast<long long>(m) * N + n] = rshift_round(a * static_cast<long long>(__ldg(wm + n)), s);
}
}  // namespace illm

extern "C" __global__ void __launch_bounds__(quik::GV_THREADS) illm_gemv_w8(ILLM_MATMUL_ARGS) {
    illm::gemv<false>(xq, qw, wm, wk, kmin_p, t, xk, tk, M, N, K, n1, n2);
}

extern "C" __global__ void __launch_bounds__(quik::GV_THREADS) illm_gemv_w4(ILLM_MATMUL_ARGS) {
    illm::gemv<true>(xq, qw, wm, wk, kmin_p, t, xk, tk, M, N, K, n1, n2);
}

// Launch: grid (ceil(N / 64), ceil(M / 64)), block 128.
extern "C" __global__ void __launch_bounds__(quik::THREADS, 1) illm_matmul_w8(ILLM_MATMUL_ARGS) {
    const int bm = blockIdx.y * quik::BM, bn = blockIdx.x * quik::BN;
    int P[quik::MT][quik::NT][4];
    quik::mainloop_bytes<false>(xq, qw, M, N, K, bm, bn, P);
    illm::matmul_epilogue(P, wm, wk, kmin_p, t, M, N, n1, n2, bm, bn);
    illm::matmul_row_exponents(xk, tk, kmin_p, M, N, n1, n2, bm);
}

extern "C" __global__ void __launch_bounds__(quik::THREADS, 1) illm_matmul_w4(ILLM_MATMUL_ARGS) {
    const int bm = blockIdx.y * quik::BM, bn = blockIdx.x * quik::BN;
    int P[quik::MT][quik::NT][4];
    quik::NoFold fold;
    qk::mainloop(xq, reinterpret_cast<const unsigned char*>(qw), M, N, K, K, bm, bn, P, fold);
    illm::matmul_epilogue(P, wm, wk, kmin_p, t, M, N, n1, n2, bm, bn);
    illm::matmul_row_exponents(xk, tk, kmin_p, M, N, n1, n2, bm);
}

// DI-MatMul's epilogue alone, after an int32 product made elsewhere (torch._int_mm: cuBLASLt's int8
// GEMM, for w8 above the GEMV's rows): t[m, n] = round(acc[m, n] * wm[n] / 2^(wk[n] - kmin of n's
// segment)), matmul_epilogue's arithmetic, and the rows' exponents as matmul_row_exponents writes
// them (thread g of row m's CTA: tk[g, m] = xk[m] + kmin[g]).  acc's rows are ld apart (the GEMM's
// output may be padded).  Launch: grid (M), block 256.
#define ILLM_DYADIC_ARGS                                                                              \
    const int* __restrict__ acc,          /* int32 [M, ld] */                                         \
    const int* __restrict__ wm,           /* int32 [N] mantissas */                                   \
    const int* __restrict__ wk,           /* int32 [N] exponents */                                   \
    const int* __restrict__ kmin_p,       /* int32 [segments] */                                      \
    long long* __restrict__ t,            /* int64 [M, N] out */                                      \
    const long long* __restrict__ xk,     /* int64 [M], or null */                                    \
    long long* __restrict__ tk,           /* int64 [segments, M] out (not when null) */               \
    int M, int N, int ld, int n1, int n2

extern "C" __global__ void __launch_bounds__(illm::ROW_THREADS) illm_dyadic_rows(ILLM_DYADIC_ARGS) {
    const int m = blockIdx.x;
    if (m >= M) return;
    if (tk != nullptr && threadIdx.x < 1 + (n1 < N) + (n2 < N))
        tk[static_cast<long long>(threadIdx.x) * M + m] = xk[m] + __ldg(kmin_p + threadIdx.x);
    const int* a = acc + static_cast<long long>(m) * ld;
    long long* o = t + static_cast<long long>(m) * N;
    for (int n = threadIdx.x; n < N; n += illm::ROW_THREADS) {
        const int s = __ldg(wk + n) - __ldg(kmin_p + (n >= n1) + (n >= n2));
        o[n] = illm::rshift_round(static_cast<long long>(__ldg(a + n)) * __ldg(wm + n), s);
    }
}

// Launch: grid (rows), block 256.  v int64 [rows, n] -> q int8 [rows, n], scale (m, k) int64 [rows];
// clip: c * 2^16 (2^16: none).  The scale returned is the row's ratio times `folds` per-row dyadics
// in turn, (fm, fk) int64 [folds, rows] (Dyadic products, left to right; not read when folds = 0),
// then times the one dyadic (cm[0], ck[0]) of every row when cm is not null (the online Hadamard
// transform's 1 / sqrt(n), a device constant).
extern "C" __global__ void __launch_bounds__(illm::ROW_THREADS) illm_requant_rows(
        const long long* __restrict__ v, signed char* __restrict__ q, long long* __restrict__ sm,
        long long* __restrict__ sk, int rows, int n, int qmax, int clip, const long long* __restrict__ fm,
        const long long* __restrict__ fk, int folds, const long long* __restrict__ cm, const long long* __restrict__ ck) {
    __shared__ long long red[illm::ROW_THREADS / 32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long* row = v + static_cast<long long>(r) * n;
    illm::Dy d = illm::requant_row([&](int i) { return row[i]; }, n, qmax, clip, q + static_cast<long long>(r) * n, red);
    if (threadIdx.x == 0) {
        for (int f = 0; f < folds; ++f) d = illm::mul(d, {fm[static_cast<long long>(f) * rows + r], fk[static_cast<long long>(f) * rows + r]});
        if (cm != nullptr) d = illm::mul(d, {cm[0], ck[0]});
        sm[r] = d.m;
        sk[r] = d.k;
    }
}

// Launch: grid (rows), block 256.  scores int32 [rows, T]; row r's first valid[r] entries take part
// (causal attention: position + 1); scale (sm, sk) per row; P int32 [rows, T] out (2^-15 units).
extern "C" __global__ void __launch_bounds__(illm::ROW_THREADS) illm_softmax(
        const int* __restrict__ scores, const int* __restrict__ valid, const long long* __restrict__ sm,
        const long long* __restrict__ sk, long long umax, int* __restrict__ P, int rows, int T) {
    __shared__ long long red[illm::ROW_THREADS / 32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int* row = scores + static_cast<long long>(r) * T;
    int* out = P + static_cast<long long>(r) * T;
    const int L = min(max(valid[r], 0), T);  // a length outside [0, T] reads nothing out of the row
    long long mx = -(1LL << 62);
    for (int j = threadIdx.x; j < L; j += illm::ROW_THREADS) mx = max(mx, static_cast<long long>(row[j]));
    mx = illm::block_max(mx, red);
    const illm::Dy coef = illm::normalize(sm[r] * illm::LOG2E_M, sk[r] + illm::LOG2E_K);
    auto e_of = [&](int j) -> long long { return illm::di_exp2(illm::exp_arg(mx - row[j], coef, umax)); };
    long long total = 0;
    for (int j = threadIdx.x; j < L; j += illm::ROW_THREADS) total += e_of(j);
    total = illm::block_sum(total, red);
    const long long den = total > 0 ? total : 1;
    // numerator (e << 15) + total / 2 <= 2^31 + 2^46 < 2^48 (e <= 2^16, total <= T * 2^16, T < 2^31)
    qk::DivBy by;
    by.init(static_cast<unsigned long long>(den), 48);
    for (int j = threadIdx.x; j < T; j += illm::ROW_THREADS)
        out[j] = j < L ? static_cast<int>(by.div(static_cast<unsigned long long>((e_of(j) << illm::PROB_BITS) + total / 2))) : 0;
}

namespace illm {
// DI-Norm of row r of x (the CTA's), q and the scale (sm, sk)[r] written: di_rmsnorm.  x is not
// __restrict__: illm_residual_norm passes the h it has just written (no read-only-cache loads).
__device__ __forceinline__ void norm_row(const long long* x, const long long* __restrict__ gamma, int gk,
                                         int qmax, signed char* __restrict__ q, long long* __restrict__ sm,
                                         long long* __restrict__ sk, int r, int H, int clip, long long* red) {
    const long long* row = x + static_cast<long long>(r) * H;
    long long ss = 0;
    for (int i = threadIdx.x; i < H; i += ROW_THREADS) ss += row[i] * row[i];
    ss = block_sum(ss, red);
    const long long rms = isqrt(static_cast<long long>(qk::udiv_u64(static_cast<unsigned long long>(ss), static_cast<unsigned long long>(H))));
    const Dy d = requant_row([=](int i) { return row[i] * __ldg(gamma + i); }, H, qmax, clip, q + static_cast<long long>(r) * H, red);
    const Dy inv = ratio(d.m, rms);
    if (threadIdx.x == 0) {
        sm[r] = inv.m;
        sk[r] = inv.k + d.k + gk;
    }
}
}  // namespace illm

// Launch: grid (rows), block 256.  x int64 [rows, H] (|x| < 2^22), gamma int64 [H] with exponent gk;
// q int8 [rows, H] out and the row scale (sm, sk); clip as in illm_requant_rows.
// (Four CTAs per SM asked for: without it ptxas chose 40 registers on sm_80 and spilled one value.)
extern "C" __global__ void __launch_bounds__(illm::ROW_THREADS, 4) illm_rmsnorm(
        const long long* __restrict__ x, const long long* __restrict__ gamma, int gk, int qmax,
        signed char* __restrict__ q, long long* __restrict__ sm, long long* __restrict__ sk, int rows, int H, int clip) {
    __shared__ long long red[illm::ROW_THREADS / 32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    illm::norm_row(x, gamma, gk, qmax, q, sm, sk, r, H, clip, red);
}

// Launch: grid (rows, L / sub), block 256.  A token's q, k or v projection t int64 [rows, L] (L =
// heads * d; rows `ld` apart: a joined DI-MatMul's columns) to int8-range values, reference.rope_requant: the token's L values requantized to
// WIDE_QMAX (16 bits), that ratio times (fm, fk)[r] when `fold`; with `rope`, each head of d values
// rotated by the integer table row pos[r] of cos, sin int64 [positions, d / 2] (pos[r] < positions:
// the caller's bound); then each sub-row of `sub` values (L: per token; d: per head and token) is
// requantized to qmax, its scale that ratio times the 16-bit scale, then times (om, ok)[r] when
// `ofold` (Dyadic products, in this order).  q int8 [rows, L], (sm, sk) int64 [rows, L / sub]; or,
// with `col` (a device column, one token per row), straight into a cache of `stride` columns: q int8
// [rows, L / sub, stride, sub] and (sm, sk) [rows, L / sub, stride] at column col[0] < stride.
// The 16-bit values are recomputed where read (each is one multiply-shift), not staged: a row of
// any width fits.
extern "C" __global__ void __launch_bounds__(illm::ROW_THREADS) illm_rope_requant(
        const long long* __restrict__ t, const long long* __restrict__ fm, const long long* __restrict__ fk, int fold,
        const long long* __restrict__ cos, const long long* __restrict__ sin, const long long* __restrict__ pos,
        int rope, const long long* __restrict__ om, const long long* __restrict__ ok, int ofold,
        signed char* __restrict__ q, long long* __restrict__ sm, long long* __restrict__ sk, const long long* __restrict__ col,
        int stride, int rows, int L, int ld, int sub, int d, int qmax) {
    __shared__ long long red[illm::ROW_THREADS / 32];
    const int r = blockIdx.x, g = blockIdx.y, groups = gridDim.y;
    if (r >= rows) return;
    const long long* row = t + static_cast<long long>(r) * ld;
    illm::RowQuant<61> wq;
    wq.init([&](int i) { return row[i]; }, L, static_cast<int>(illm::WIDE_QMAX), 1LL << illm::CLIP_BITS, red);
    const long long* sr = row + static_cast<long long>(g) * sub;
    const int half = d >> 1;
    const long long* c = rope ? cos + pos[r] * half : nullptr;
    const long long* s = rope ? sin + pos[r] * half : nullptr;
    qk::DivBy byd;  // i / d by a multiply: the head of a sub-row's value i (sub is a multiple of d)
    byd.init(static_cast<unsigned long long>(d), 32);
    const auto get = [&](int i) -> long long {
        if (!rope) return wq(sr[i]);
        const int j = i - static_cast<int>(byd.div(static_cast<unsigned long long>(i))) * d;  // within the head
        if (j < half) return illm::rshift_round(wq(sr[i]) * c[j] - wq(sr[i + half]) * s[j], illm::ROPE_BITS);
        return illm::rshift_round(wq(sr[i]) * c[j - half] + wq(sr[i - half]) * s[j - half], illm::ROPE_BITS);
    };
    illm::RowQuant<48> oq;
    oq.init(get, sub, qmax, 1LL << illm::CLIP_BITS, red);
    // the sub-row's place: (r * groups + g) * sub in a dense q (stride 1, column 0), else its row of
    // `sub` values at the column of that head's `stride` columns
    const long long at = col != nullptr ? col[0] : 0;
    if (at < 0 || at >= stride) __trap();  // a column outside the cache: a device error, as index_copy_'s
    const long long slot = (static_cast<long long>(r) * groups + g) * stride + at;
    signed char* out = q + slot * sub;
    for (int i = threadIdx.x; i < sub; i += illm::ROW_THREADS) out[i] = static_cast<signed char>(oq(get(i)));
    if (threadIdx.x == 0) {
        illm::Dy w = wq.scale();
        if (fold) w = illm::mul(w, {fm[r], fk[r]});
        illm::Dy o = illm::mul(oq.scale(), w);
        if (ofold) o = illm::mul(o, {om[r], ok[r]});
        sm[slot] = o.m;
        sk[slot] = o.k;
    }
}

// Launch: grid (rows * t), block 256.  Attention's heads as o_proj's input (reference.heads_requant):
// o int64 [rows, heads, t, d] and e int64 [rows, heads, t] (illm_attention's outputs); per token
// (block row * t + token) each head shifted by its exponent's distance to the heads' smallest
// (clamped to [0, 62]; 0 is that exponent when every head is NO_EXPONENT), the token's heads * d
// values requantized to qmax with `clip`: q int8 [rows * t, heads * d] and the scale (sm, sk)
// [rows * t], sk including that exponent and PROB_BITS.  rows * t < 2^31 (the launcher's check).
extern "C" __global__ void __launch_bounds__(illm::ROW_THREADS) illm_heads_requant(
        const long long* __restrict__ o, const long long* __restrict__ e, int qmax, int clip, signed char* __restrict__ q,
        long long* __restrict__ sm, long long* __restrict__ sk, int rows, int heads, int t, int d) {
    __shared__ long long red[illm::ROW_THREADS / 32];
    const int tok = blockIdx.x;
    if (tok >= rows * t) return;
    const int b = qk::udiv_u32(tok, t), j = tok - b * t;
    const long long* ob = o + (static_cast<long long>(b) * heads * t + j) * d;  // head h at ob + h * t * d
    const long long* eb = e + static_cast<long long>(b) * heads * t + j;  // head h at eb[h * t]
    long long lo = 1LL << 62;
    for (int h = threadIdx.x; h < heads; h += illm::ROW_THREADS) lo = min(lo, eb[static_cast<long long>(h) * t]);
    lo = -illm::block_max(-lo, red);
    if (lo == illm::NO_EXPONENT) lo = 0;
    qk::DivBy byd;  // i / d by a multiply: the head of value i
    byd.init(static_cast<unsigned long long>(d), 32);
    const long long td = static_cast<long long>(t) * d;
    const auto get = [&](int i) -> long long {
        const int h = static_cast<int>(byd.div(static_cast<unsigned long long>(i)));
        const long long s = eb[h * static_cast<long long>(t)] - lo;
        return illm::rshift_round(ob[h * td + (i - h * d)], static_cast<int>(min(max(s, 0LL), 62LL)));
    };
    const int n = heads * d;
    const illm::Dy r = illm::requant_row(get, n, qmax, clip, q + static_cast<long long>(tok) * n, red);
    if (threadIdx.x == 0) {
        sm[tok] = r.m;
        sk[tok] = r.k + lo + illm::PROB_BITS;
    }
}

// Launch: grid (rows), block 256.  The SwiGLU of the MLP (reference.swiglu): tg, tu int64 [rows, n],
// rows `ld` apart (gate_proj's and up_proj's DI-MatMul outputs, or a joined one's columns) with
// their row scales (gm, gk), (um, uk), each requantized to [-qmax, qmax] (16 bits) with its ratio
// folded into its scale -> (sgm, sgk), (sum, suk) [rows]; a int64 [rows, n] (dense) = SiLU(g) * u
// in the scale sg * su; umax the clip of
// SiLU's DI-Exp argument.  Nothing but a, sg and su is written: g and u are requantized again
// where they are read.  The bounds' 4 CTAs per SM give ptxas 64 registers: left to itself it took 48
// for sm_89 and spilled 8 bytes (tests/test_kernels_illm_compile.py), now 56 on sm_80/89/90.
extern "C" __global__ void __launch_bounds__(illm::ROW_THREADS, 4) illm_swiglu(
        const long long* __restrict__ tg, const long long* __restrict__ gm, const long long* __restrict__ gk,
        const long long* __restrict__ tu, const long long* __restrict__ um, const long long* __restrict__ uk,
        long long umax, int qmax, long long* __restrict__ a, long long* __restrict__ sgm, long long* __restrict__ sgk,
        long long* __restrict__ sum, long long* __restrict__ suk, int rows, int n, int ld) {
    __shared__ long long red[illm::ROW_THREADS / 32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long* g = tg + static_cast<long long>(r) * ld;
    const long long* u = tu + static_cast<long long>(r) * ld;
    illm::RowQuant<61> qg, qu;
    qg.init([&](int i) { return g[i]; }, n, qmax, 1LL << illm::CLIP_BITS, red);
    qu.init([&](int i) { return u[i]; }, n, qmax, 1LL << illm::CLIP_BITS, red);
    const illm::Dy sg = illm::mul(qg.scale(), {gm[r], gk[r]});
    const illm::Dy su = illm::mul(qu.scale(), {um[r], uk[r]});
    const illm::Dy coef = illm::normalize(sg.m * illm::LOG2E_M, sg.k + illm::LOG2E_K);
    long long* out = a + static_cast<long long>(r) * n;
    for (int i = threadIdx.x; i < n; i += illm::ROW_THREADS) out[i] = illm::silu(qg(g[i]), coef, umax) * qu(u[i]);
    if (threadIdx.x == 0) {
        sgm[r] = sg.m;
        sgk[r] = sg.k;
        sum[r] = su.m;
        suk[r] = su.k;
    }
}

// Launch: grid (rows), block 256.  The residual add (reference.residual_add) and the DI-Norm of its
// sum (reference.di_rmsnorm), what every block does twice: x int64 [rows, n] (the residual,
// |x| < 2^20) with row scale (xm, xk) plus a branch's output b int64 [rows, n] with (bm, bk), b
// requantized to [-qmax, qmax] first; both terms aligned to the smaller exponent kmin by rounded
// shifts (a term whose mantissa is 0 is 0 and its exponent left out), their sum requantized -> h
// int64 [rows, n] and the row scale (hm, hk); then h's DI-Norm with gamma int64 [n] (exponent gk)
// -> q int8 [rows, n] in [-nqmax, nqmax] (clip as in illm_requant_rows) and its scale (sm, sk).
// The shifts are clamped to [-62, 62]: a term is below 2^36 (a right shift of 62 leaves 0, as the
// exact quotient rounds to) and only a zero term is shifted left.  The norm reads the h this CTA
// wrote (each thread its own elements, then a barrier).
extern "C" __global__ void __launch_bounds__(illm::ROW_THREADS) illm_residual_norm(
        const long long* __restrict__ x, const long long* __restrict__ xm, const long long* __restrict__ xk,
        const long long* __restrict__ b, const long long* __restrict__ bm, const long long* __restrict__ bk, int qmax,
        long long* __restrict__ h, long long* __restrict__ hm, long long* __restrict__ hk,
        const long long* __restrict__ gamma, int gk, int nqmax, int clip, signed char* __restrict__ q,
        long long* __restrict__ sm, long long* __restrict__ sk, int rows, int n) {
    __shared__ long long red[illm::ROW_THREADS / 32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long* xr = x + static_cast<long long>(r) * n;
    const long long* br = b + static_cast<long long>(r) * n;
    illm::RowQuant<61> qb;
    qb.init([&](int i) { return br[i]; }, n, qmax, 1LL << illm::CLIP_BITS, red);
    const illm::Dy sx = {xm[r], xk[r]};
    const illm::Dy sb = illm::mul(qb.scale(), {bm[r], bk[r]});
    const long long kmin = sb.m == 0 ? sx.k : sx.m == 0 ? sb.k : min(sx.k, sb.k);
    const int shx = static_cast<int>(max(min(sx.k - kmin, 62LL), -62LL));
    const int shb = static_cast<int>(max(min(sb.k - kmin, 62LL), -62LL));
    auto total = [&](int i) { return illm::shift(xr[i] * sx.m, shx) + illm::shift(qb(br[i]) * sb.m, shb); };
    illm::RowQuant<61> qh;
    qh.init(total, n, qmax, 1LL << illm::CLIP_BITS, red);
    long long* out = h + static_cast<long long>(r) * n;
    for (int i = threadIdx.x; i < n; i += illm::ROW_THREADS) out[i] = qh(total(i));
    if (threadIdx.x == 0) {
        const illm::Dy d = qh.scale();
        hm[r] = d.m;
        hk[r] = d.k + kmin;
    }
    __syncthreads();
    illm::norm_row(h, gamma, gk, nqmax, q, sm, sk, r, n, clip, red);
}

// Launch: grid (T, group, HR), block 256 (two CTAs per SM asked for: ptxas's default of 64
// registers spilled on sm_90); d a multiple of 4, at most ATTN_MAX_D.  The
// attention of query row r of query head j over the keys of head-row hh (a row's KV head:
// reference.attention): q int8 [HR, group, T, d] with the row's scale (qm, qk) [HR / qdiv, T] (head-row
// hh reads row hh / qdiv: qdiv head-rows, a sequence's KV heads, share their query's scale); keys and
// values int8 [HR, n, d] with one scale per column (km, kk), (vm, vk) [HR, n]; mask uint8
// [HR or 1, T, n] (mask_hr: 1 or 0, whether it is per head-row): the columns the row sees.
// ps int64 [HR, group, T, n] is scratch, the row's n values from one pass to the next: each seen
// column's score (its dot product taken once), then its exponential, then every column's P with
// the value's scale folded in (0 where unseen), then that requantized to 16 bits; thread x of the
// CTA owns columns x, x + 256, ... through the four passes (the block reductions between them are
// its barriers), and P V reads the CTA's row after a barrier.  Out: o int64 [HR, group, T, d] = P V
// times P's mantissa, e int64 [HR, group, T] its exponent (NO_EXPONENT for an all-zero row);
// the scores' scale is the query's times 1 / sqrt(d) (sdm, sdk) times 2^-(smallest key exponent).
extern "C" __global__ void __launch_bounds__(illm::ROW_THREADS, 2) illm_attention(
        const signed char* __restrict__ q, const long long* __restrict__ qm, const long long* __restrict__ qk,
        const signed char* __restrict__ k8, const long long* __restrict__ km, const long long* __restrict__ kk,
        const signed char* __restrict__ v8, const long long* __restrict__ vm, const long long* __restrict__ vk,
        const unsigned char* __restrict__ mask, int mask_hr, long long sdm, long long sdk, long long umax,
        long long* __restrict__ ps, long long* __restrict__ o, long long* __restrict__ e, int T, int group, int n, int d,
        int qdiv) {
    __shared__ long long part[illm::ROW_THREADS];  // P V's partial sums
    __shared__ int qs[illm::ATTN_MAX_D / 4];         // the query row, d / 4 words
    __shared__ long long red[illm::ROW_THREADS / 32];
    const int r = blockIdx.x, j = blockIdx.y, hh = blockIdx.z;
    const long long row = (static_cast<long long>(hh) * group + j) * T + r;  // this CTA's (hh, j, r)
    const int words = d / 4;
    for (int w = threadIdx.x; w < words; w += illm::ROW_THREADS) qs[w] = reinterpret_cast<const int*>(q + row * d)[w];
    const unsigned char* mrow = mask + (static_cast<long long>(mask_hr ? hh : 0) * T + r) * n;
    const long long col0 = static_cast<long long>(hh) * n;
    long long* prow = ps + row * n;
    // the smallest exponent among the live keys and values (seen, scale not zero)
    long long ek = illm::NO_EXPONENT, ev = illm::NO_EXPONENT;
    for (int c = threadIdx.x; c < n; c += illm::ROW_THREADS)
        if (mrow[c]) {
            if (km[col0 + c] > 0) ek = min(ek, kk[col0 + c]);
            if (vm[col0 + c] > 0) ev = min(ev, vk[col0 + c]);
        }
    ek = -illm::block_max(-ek, red);
    ev = -illm::block_max(-ev, red);
    if (ek == illm::NO_EXPONENT) ek = 0;
    if (ev == illm::NO_EXPONENT) ev = 0;
    // (qs is read from here on: the barriers of the two block_max calls above came after its writes)
    // pass 1: each seen column's score, in 2^-ek units of the key scales, and their max
    long long mx = -(1LL << 62);
    for (int c = threadIdx.x; c < n; c += illm::ROW_THREADS)
        if (mrow[c]) {
            const int* kw = reinterpret_cast<const int*>(k8 + (col0 + c) * d);
            int acc = 0;
            for (int w = 0; w < words; ++w) acc = __dp4a(qs[w], kw[w], acc);
            const long long m = km[col0 + c];
            const int sh = m > 0 ? static_cast<int>(min(max(kk[col0 + c] - ek, 0LL), 62LL)) : 0;
            const long long s = illm::rshift_round(acc * m, sh);
            prow[c] = s;
            mx = max(mx, s);
        }
    mx = illm::block_max(mx, red);
    const long long qrow = static_cast<long long>(qk::udiv_u32(hh, qdiv)) * T + r;  // the query scale's row
    const illm::Dy scale = illm::normalize(qm[qrow] * sdm, qk[qrow] + ek + sdk);
    const illm::Dy coef = illm::normalize(scale.m * illm::LOG2E_M, scale.k + illm::LOG2E_K);
    // pass 2: the seen columns' exponentials in place of their scores, and their sum
    long long total = 0;
    for (int c = threadIdx.x; c < n; c += illm::ROW_THREADS)
        if (mrow[c]) {
            const long long x = illm::di_exp2(illm::exp_arg(mx - prow[c], coef, umax));
            prow[c] = x;
            total += x;
        }
    total = illm::block_sum(total, red);
    qk::DivBy by;  // numerator (e << 15) + total / 2 < 2^48 as in illm_softmax
    by.init(static_cast<unsigned long long>(total > 0 ? total : 1), 48);
    // pass 3: P with the value's scale folded in, every column (0 where unseen), and the row's max
    long long amax = 0;
    for (int c = threadIdx.x; c < n; c += illm::ROW_THREADS) {
        long long pv = 0;
        if (mrow[c]) {
            const long long p = static_cast<long long>(by.div(static_cast<unsigned long long>((prow[c] << illm::PROB_BITS) + total / 2)));
            const long long m = vm[col0 + c];
            const int sh = m > 0 ? static_cast<int>(min(max(vk[col0 + c] - ev, 0LL), 62LL)) : 0;
            pv = illm::rshift_round(p * m, sh);  // p <= 2^15, m < 2^16: 0 <= pv < 2^31
        }
        prow[c] = pv;
        amax = max(amax, llabs(pv));  // (init's |v|: pv < 0 only for a negative vm, which the model never has)
    }
    illm::RowQuant<61> rq;
    rq.finish(illm::block_max(amax, red), [&](int c) { return prow[c]; }, n, illm::WIDE_QMAX, 1LL << illm::CLIP_BITS, red);
    // pass 4: P requantized to 16 bits
    for (int c = threadIdx.x; c < n; c += illm::ROW_THREADS) prow[c] = rq(prow[c]);
    __syncthreads();  // prow written by the CTA, read across it below
    // P V: thread (g, dd) sums column group g (columns g, g + groups, ...) of dimension dd, then the
    // groups' sums are added (d <= ATTN_MAX_D = ROW_THREADS, so groups >= 1; integer divisions by
    // udiv_u32: nvcc's own would take the float unit's reciprocal)
    static_assert(illm::ATTN_MAX_D <= illm::ROW_THREADS, "illm_attention: one dimension per thread needs d <= ROW_THREADS");
    const int groups = qk::udiv_u32(illm::ROW_THREADS, d);
    const int g = qk::udiv_u32(threadIdx.x, d);
    const int dd = threadIdx.x - g * d;
    long long acc = 0;
    if (g < groups)
        for (int c = g; c < n; c += groups) acc += prow[c] * v8[(col0 + c) * d + dd];
    part[threadIdx.x] = acc;
    __syncthreads();
    const illm::Dy rp = rq.scale();
    if (threadIdx.x < d) {
        long long sum = 0;
        for (int gg = 0; gg < groups; ++gg) sum += part[gg * d + threadIdx.x];
        o[row * d + threadIdx.x] = sum * rp.m;
    }
    if (threadIdx.x == 0) e[row] = rp.m > 0 ? rp.k + ev : illm::NO_EXPONENT;
}

// Launch: grid (rows), block 256.  The online Hadamard transform of int64 rows, unnormalized
// (reference.hadamard_rows): x [rows, n] (n = m * 2^lp) times A (x) H_p, A = sign int8 [m, m].  The
// butterflies (u, v) -> (u + v, u - v) of every [m, p] view run in place in t (int64 [rows, n]
// scratch, written from x first), a barrier after each stage; then y[a' p + b] = sum over a of
// A[a, a'] t[a p + b] (t itself when m = 1: y may be t).  Integer sums are exact, so any order
// gives the reference's integers (|x| n < 2^63).
extern "C" __global__ void __launch_bounds__(illm::ROW_THREADS) illm_hadamard(
        const long long* __restrict__ x, const signed char* __restrict__ sign, long long* t, long long* y,
        int rows, int m, int lp) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int p = 1 << lp, n = m << lp;
    const long long* xr = x + static_cast<long long>(r) * n;
    long long* tr = t + static_cast<long long>(r) * n;
    for (int i = threadIdx.x; i < n; i += illm::ROW_THREADS) tr[i] = xr[i];
    __syncthreads();
    const int half = p >> 1;  // pairs per row of the view
    for (int s = 0; s < lp; ++s) {
        const int h = 1 << s;
        for (int q = threadIdx.x; q < m * half; q += illm::ROW_THREADS) {
            const int a = q >> (lp - 1), b = q & (half - 1);
            const int i = a * p + (((b >> s) << (s + 1)) | (b & (h - 1)));
            const long long u = tr[i], v = tr[i + h];
            tr[i] = u + v;
            tr[i + h] = u - v;
        }
        __syncthreads();
    }
    if (m == 1) return;  // y is t (the launcher passes the same buffer)
    long long* yr = y + static_cast<long long>(r) * n;
    for (int o = threadIdx.x; o < n; o += illm::ROW_THREADS) {
        const int a2 = o >> lp, b = o & (p - 1);
        long long acc = 0;
        for (int a = 0; a < m; ++a) acc += sign[a * m + a2] > 0 ? tr[a * p + b] : -tr[a * p + b];
        yr[o] = acc;
    }
}
