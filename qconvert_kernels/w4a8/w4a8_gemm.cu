// W4A8 GEMM kernels of qconvert: int8 activations x packed int4 group weights on int8 tensor cores.
//
// The arithmetic is the one of qconvert_kernels/w4a8/reference.py, bit for bit (docs/format.md):
//
//   xq int8 [M, Kp]   per-token symmetric activations, t float32 [M]   (quantize_per_token_int8_*)
//   q  int4 [N, Kp]   packed two per byte, uint8 [N, Kp/2], low nibble = even column
//   P[j, m, n] = sum_{k in group j} xq[m, k] * q[n, k]                  (int32, tensor cores)
//
//   w4a8_is_gemm_*  (layout w4a8-is, Integer Scale):
//     A[m, n] = sum_j iscale[n, j] * P[j, m, n]                          (int32, j = 0..G-1)
//     y[m, n] = float(A[m, n]) * (t[m] * (cscale[n] / 2^alpha_log2))     (float32, in this order)
//   w4a8_fs_gemm_*  (layout w4a8-fs, float scale, the counterpart the paper compares against):
//     acc = 0; for j = 0..G-1: acc = acc + float(scales[n, j]) * float(P[j, m, n])  (no FMA)
//     y[m, n] = acc * t[m]
//   then y is rounded to fp16 / bf16 (round to nearest even).
//
// Every float operation is written with __fmul_rn / __fadd_rn (common.cuh: rcp_rn / div_rn for
// the quantizer's reciprocal and quotient), which the compiler never contracts into an FMA, so
// the results equal torch's CPU float32 results; the launcher builds the module without
// flush-to-zero (qconvert_kernels/launch.py), so subnormal values are kept as torch keeps them.
//
// The source includes no system header (no cuda_fp16.h / cuda_bf16.h): fp16 and bf16 are carried
// as their 16-bit patterns (unsigned short) and converted with cvt PTX (common.cuh), so the same
// text compiles with nvcc and with NVRTC (compile.py:kernel_source inlines ../common.cuh and
// w4a8_mainloop.cuh, the 64 x 64 main loop this file shares with quik_gemm.cu and illm_gemm.cu).
//
// These kernels read the on-disk layout directly.  The decode / prefill kernels of
// w4a8_repacked.cu (qconvert_kernels/w4a8/cuda.py: prepare / linear) are the fast path.
//
// Requirements (checked by the launcher, qconvert_kernels/w4a8/cuda.py): sm_80 or newer;
// group size g a multiple of 32 (the mma K); Kp a multiple of g; xq / qweight / iscale /
// scales / outputs contiguous row-major, xq and qweight 16-byte aligned.  M and N are
// arbitrary (bounds-checked; rows / columns out of range are zero-filled and never written).
//
// ---------------------------------------------------------------------------------------
// Fragment layout of mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (PTX ISA, "Matrix
// fragments for mma.m16n8k32", .s8), with lane = threadIdx.x % 32,
// gid = lane >> 2 (0..7, "groupID"), tig = lane & 3 (0..3, "threadID_in_group"):
//
//   A (16 x 32, row major), 4 x .b32 registers, 4 int8 each (byte 0 = lowest column):
//     a0 = A[gid    ][4*tig + 0..3]      a1 = A[gid + 8][4*tig + 0..3]
//     a2 = A[gid    ][16 + 4*tig + 0..3] a3 = A[gid + 8][16 + 4*tig + 0..3]
//   B (32 x 8, "col": K x N stored N-major), 2 x .b32 registers, 4 int8 each:
//     b0 = B[4*tig + 0..3][gid]          b1 = B[16 + 4*tig + 0..3][gid]
//   C / D (16 x 8, int32), 4 registers:
//     c0 = C[gid][2*tig]   c1 = C[gid][2*tig + 1]   c2 = C[gid + 8][2*tig]   c3 = C[gid + 8][2*tig + 1]
//
// K permutation.  A dot product over the 32 k of one mma is invariant under any permutation
// of k applied to both operands, so each thread feeds the mma real k in this order:
//     mma k 4*tig + 0..3      <- real k 8*tig + 0..3
//     mma k 16 + 4*tig + 0..3 <- real k 8*tig + 4..7
// Thread tig then needs the 8 contiguous real k 8*tig..8*tig+7 of its rows: one 64-bit shared
// load per A row (low word = a0 / a1, high word = a2 / a3), and one 32-bit shared load of
// packed B (8 nibbles = real k 8*tig..8*tig+7: nibbles 0..3 -> b0, nibbles 4..7 -> b1).
// P (and everything after it) is exactly the unpermuted sum.
// ---------------------------------------------------------------------------------------

#include "../common.cuh"
#include "w4a8_mainloop.cuh"

namespace qk {

// Integer-scale fold: A += iscale[n, j] * P (int32 multiply-add, wrapping like torch int32).
// The scales of the next group are prefetched into registers right after a fold.
struct FoldInt {
    int acc[MT][NT][4];
    int sc[NT][2];                       // iscale[col, group] of this thread's 8 columns
    const int* __restrict__ iscale;      // int32 [N, G]
    int N, G, col0;                      // col0: this thread's first column (nt = 0, +0)

    __device__ __forceinline__ void load_scales(int j) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int n = col0 + nt * 8 + h;
                sc[nt][h] = (n < N && j < G) ? __ldg(iscale + static_cast<long long>(n) * G + j) : 0;
            }
    }
    __device__ __forceinline__ void operator()(int j, int (&P)[MT][NT][4]) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    // c0/c2: col 2tig, c1/c3: col 2tig+1; unsigned arithmetic = defined int32 wrapping
                    acc[mt][nt][i] = static_cast<int>(static_cast<unsigned>(acc[mt][nt][i]) +
                                                      static_cast<unsigned>(sc[nt][i & 1]) * static_cast<unsigned>(P[mt][nt][i]));
                    P[mt][nt][i] = 0;
                }
        load_scales(j + 1);
    }
};

// Float-scale fold: acc = acc + float(P) * float(scale), rounded twice (no FMA), in group order.
struct FoldFloat {
    float acc[MT][NT][4];
    float sc[NT][2];                              // float(scales[col, group])
    const unsigned short* __restrict__ scales;    // fp16 bits [N, G]
    int N, G, col0;

    __device__ __forceinline__ void load_scales(int j) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int n = col0 + nt * 8 + h;
                sc[nt][h] = (n < N && j < G) ? f16_to_f32(__ldg(scales + static_cast<long long>(n) * G + j)) : 0.0f;
            }
    }
    __device__ __forceinline__ void operator()(int j, int (&P)[MT][NT][4]) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    // exact: |P| <= 127 * 8 * g < 2^24
                    acc[mt][nt][i] = __fadd_rn(acc[mt][nt][i], __fmul_rn(__int2float_rn(P[mt][nt][i]), sc[nt][i & 1]));
                    P[mt][nt][i] = 0;
                }
        load_scales(j + 1);
    }
};

template <bool kBF16>
__device__ __forceinline__ void is_gemm(const signed char* __restrict__ xq, const float* __restrict__ t,
                                        const unsigned char* __restrict__ qw, const int* __restrict__ iscale,
                                        const float* __restrict__ cscale, int alpha_log2,
                                        unsigned short* __restrict__ y, int* __restrict__ acc_out,
                                        int M, int N, int Kp, int group_size) {
    const int bm = blockIdx.y * BM, bn = blockIdx.x * BN;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int wm = (warp >> 1) * WM, wn = (warp & 1) * WN;

    FoldInt fold;
    fold.iscale = iscale;
    fold.N = N;
    fold.G = udiv_u32(Kp, group_size);  // integer-only division (common.cuh: no FTZ helper code)
    fold.col0 = bn + wn + 2 * tig;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) fold.acc[mt][nt][i] = 0;
    fold.load_scales(0);

    int P[MT][NT][4];
    mainloop(xq, qw, M, N, Kp, group_size, bm, bn, P, fold);

    // Epilogue: y = float(A) * (t[m] * (cscale[n] * 2^-a)), each product rounded (no FMA).
    const float inv_alpha = exp2_neg(alpha_log2);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int n = bn + wn + nt * 8 + 2 * tig;
        const float cs0 = n < N ? __fmul_rn(__ldg(cscale + n), inv_alpha) : 0.0f;
        const float cs1 = n + 1 < N ? __fmul_rn(__ldg(cscale + n + 1), inv_alpha) : 0.0f;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {                       // h = 0: row gid (c0, c1); 1: row gid + 8 (c2, c3)
                const int m = bm + wm + mt * 16 + gid + 8 * h;
                if (m >= M || n >= N) continue;
                const float tm = __ldg(t + m);
                const int A0 = fold.acc[mt][nt][2 * h], A1 = fold.acc[mt][nt][2 * h + 1];
                const float y0 = __fmul_rn(__int2float_rn(A0), __fmul_rn(tm, cs0));
                const float y1 = __fmul_rn(__int2float_rn(A1), __fmul_rn(tm, cs1));
                store_pair(y, m, n, N, to_out<kBF16>(y0), to_out<kBF16>(y1));
                if (acc_out != nullptr) {                       // debug: the int32 accumulator
                    int* pa = acc_out + static_cast<long long>(m) * N + n;
                    pa[0] = A0;
                    if (n + 1 < N) pa[1] = A1;
                }
            }
    }
}

template <bool kBF16>
__device__ __forceinline__ void fs_gemm(const signed char* __restrict__ xq, const float* __restrict__ t,
                                        const unsigned char* __restrict__ qw, const unsigned short* __restrict__ scales,
                                        unsigned short* __restrict__ y, int M, int N, int Kp, int group_size) {
    const int bm = blockIdx.y * BM, bn = blockIdx.x * BN;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int wm = (warp >> 1) * WM, wn = (warp & 1) * WN;

    FoldFloat fold;
    fold.scales = scales;
    fold.N = N;
    fold.G = udiv_u32(Kp, group_size);  // integer-only division (common.cuh: no FTZ helper code)
    fold.col0 = bn + wn + 2 * tig;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) fold.acc[mt][nt][i] = 0.0f;
    fold.load_scales(0);

    int P[MT][NT][4];
    mainloop(xq, qw, M, N, Kp, group_size, bm, bn, P, fold);

    // Epilogue: y = acc * t[m] (one rounding), then to fp16 / bf16.
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int n = bn + wn + nt * 8 + 2 * tig;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int m = bm + wm + mt * 16 + gid + 8 * h;
                if (m >= M || n >= N) continue;
                const float tm = __ldg(t + m);
                const float y0 = __fmul_rn(fold.acc[mt][nt][2 * h], tm);
                const float y1 = __fmul_rn(fold.acc[mt][nt][2 * h + 1], tm);
                store_pair(y, m, n, N, to_out<kBF16>(y0), to_out<kBF16>(y1));
            }
    }
}

}  // namespace qk

// ---------------------------------------------------------------------------------------
// Entry points (extern "C": unmangled names for cupy.RawModule.get_function).
// Launch: grid (ceil(N / 64), ceil(M / 64)), block 128, no dynamic shared memory.
// ---------------------------------------------------------------------------------------

#define QK_IS_GEMM(NAME, BF16)                                                                         \
    extern "C" __global__ void __launch_bounds__(qk::THREADS, 1) NAME(                                     \
        const signed char* __restrict__ xq,     /* int8 [M, Kp], row-major, 16-byte aligned */          \
        const float* __restrict__ t,            /* float32 [M], per-token scale */                      \
        const unsigned char* __restrict__ qw,   /* uint8 [N, Kp/2], packed int4, low nibble = even k */ \
        const int* __restrict__ iscale,         /* int32 [N, G], G = Kp / group_size */                 \
        const float* __restrict__ cscale,       /* float32 [N] */                                       \
        int alpha_log2,                         /* a: cscale is divided by 2^a, in [-126, 126] */       \
        unsigned short* __restrict__ y,         /* fp16 / bf16 bits [M, N] */                           \
        int* __restrict__ acc_out,              /* int32 [M, N] accumulator A, or null (debug) */       \
        int M, int N,                           /* rows of xq / y; rows of qw = columns of y */         \
        int Kp,                                 /* padded K, a multiple of group_size */                \
        int group_size) {                       /* g, a multiple of 32 */                               \
        qk::is_gemm<BF16>(xq, t, qw, iscale, cscale, alpha_log2, y, acc_out, M, N, Kp, group_size);    \
    }

#define QK_FS_GEMM(NAME, BF16)                                                                         \
    extern "C" __global__ void __launch_bounds__(qk::THREADS, 1) NAME(                                     \
        const signed char* __restrict__ xq,     /* int8 [M, Kp], row-major, 16-byte aligned */          \
        const float* __restrict__ t,            /* float32 [M], per-token scale */                      \
        const unsigned char* __restrict__ qw,   /* uint8 [N, Kp/2], packed int4, low nibble = even k */ \
        const unsigned short* __restrict__ scales, /* fp16 bits [N, G], G = Kp / group_size */          \
        unsigned short* __restrict__ y,         /* fp16 / bf16 bits [M, N] */                           \
        int M, int N,                           /* rows of xq / y; rows of qw = columns of y */         \
        int Kp,                                 /* padded K, a multiple of group_size */                \
        int group_size) {                       /* g, a multiple of 32 */                               \
        qk::fs_gemm<BF16>(xq, t, qw, scales, y, M, N, Kp, group_size);                                 \
    }

// Launch: grid (M), block qk::QUANT_THREADS (256), no dynamic shared memory.
#define QK_QUANT(NAME, BF16)                                                                           \
    extern "C" __global__ void __launch_bounds__(qk::QUANT_THREADS) NAME(                               \
        const unsigned short* __restrict__ x,   /* fp16 / bf16 bits [M, K], row-major */                \
        signed char* __restrict__ xq,           /* int8 [M, Kp] out, columns K..Kp-1 = 0 */             \
        float* __restrict__ t,                  /* float32 [M] out, amax / 127 */                       \
        int M, int K, int Kp) {                 /* Kp >= K */                                           \
        qk::quantize_row<BF16>(x, xq, t, M, K, Kp);                                                    \
    }

QK_IS_GEMM(w4a8_is_gemm_f16, false)
QK_IS_GEMM(w4a8_is_gemm_bf16, true)
QK_FS_GEMM(w4a8_fs_gemm_f16, false)
QK_FS_GEMM(w4a8_fs_gemm_bf16, true)
QK_QUANT(quantize_per_token_int8_f16, false)
QK_QUANT(quantize_per_token_int8_bf16, true)
