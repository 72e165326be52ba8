// QUIK kernels of qconvert: split-and-quantize of the activations, and the low-bit GEMM whose
// epilogue dequantizes and adds the fp16 outlier product.
//
// The arithmetic is the one of qconvert_kernels/reference_quik.py, bit for bit:
//
//   quik_split_*      x [M, K] fp16 / bf16  ->  xq (the base channels, b-bit, per token, asymmetric),
//                     s, z float32 [M] (x ~= s * xq + z), x_out [M, n] (the outlier channels, as is)
//   quik_gemm_*       acc[m, n] = sum_k xq[m, k] * q[n, k]                       (int32, tensor cores)
//                     y = ((float(acc) * (s[m] * ws[n])) + (z[m] * (ws[n] * float(R[n])))) + y_out[m, n]
//                     y_out = x_out W_outᵀ comes from cuBLAS (fp16 / bf16) or is absent (no outliers)
//
// Which integer path runs (chosen by qconvert_kernels/cuda_quik.py from the device):
//   quik_gemm_w4a4_s4_*  sm_80 / sm_86 / sm_89: int4 x int4 on the int4 tensor cores,
//                        mma.m16n8k64.s4.s4, activations packed two per byte (quik_split with pack = 1);
//   quik_gemm_w4a4_s8_*  sm_90 (Hopper has no int4 tensor-core instruction: ptxas would emulate
//                        the s4 mma): activations one int4 value per int8 byte, weights widened
//                        from packed int4 in registers, mma.m16n8k32.s8.s8 (the W4A8 main loop of
//                        w4a8_gemm.cu with a single group);
//   quik_gemm_w8a8_*     every arch: int8 x int8, mma.m16n8k32.s8.s8 (down_proj in quik-w4a4,
//                        every layer in quik-w8a8).
//
// Requirements (checked by the launcher): Kbp (the base channels padded) a multiple of 64;
// operands contiguous, row-major, 16-byte aligned.  M and N arbitrary (bounds-checked).
//
// This file includes ../common.cuh (mma wrappers, conversions, stores), the W4A8 64 x 64 main
// loop (../w4a8/w4a8_mainloop.cuh, the s8 path) and its own byte main loop (quik_mainloop.cuh,
// shared with illm_gemm.cu); NVRTC gets the texts inlined (compile.py:kernel_source).
//
// ---------------------------------------------------------------------------------------
// Byte main loop (W8A8 and int4 x int4).  Both operands are rows of bytes, KB bytes per row:
// int8 values (KB = Kbp) or packed int4 pairs (KB = Kbp / 2, low nibble = even k).  Per 32-byte
// k step a warp issues one mma per (m16, n8) tile: m16n8k32 s8 (32 values) or m16n8k64 s4
// (64 values).  The two fragment layouts agree byte for byte (PTX ISA, "Matrix fragments for
// mma.m16n8k32" .s8 and "mma.m16n8k64" .s4): a0 / a1 take bytes 4*tig..4*tig+3 of rows gid /
// gid+8, a2 / a3 bytes 16+4*tig..; b0 / b1 the same bytes of column gid.  With the K permutation
// of w4a8_gemm.cu (thread tig feeds its 8 contiguous bytes 8*tig..8*tig+7: the low word as
// a0 / b0, the high word as a2 / b1) one 64-bit shared load per row serves both widths, and the
// dot products are unchanged (the same permutation on both operands).
// ---------------------------------------------------------------------------------------

#include "../common.cuh"
#include "../w4a8/w4a8_mainloop.cuh"
#include "quik_mainloop.cuh"

namespace quik {

// Epilogue: y = ((float(acc) * (s[m] * ws[n])) + (z[m] * (ws[n] * float(R[n])))) + y_out[m, n],
// each operation rounded to float32 (no FMA), then to fp16 / bf16.
template <bool kBF16>
__device__ __forceinline__ void epilogue(const int (&P)[MT][NT][4], const float* __restrict__ s, const float* __restrict__ z,
                                         const float* __restrict__ wscale, const int* __restrict__ wsum,
                                         const unsigned short* __restrict__ y_out, unsigned short* __restrict__ y,
                                         int* __restrict__ acc_out, int M, int N, int bm, int bn) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int wm = (warp >> 1) * WM, wn = (warp & 1) * WN;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int n = bn + wn + nt * 8 + 2 * tig;
        float ws[2], wr[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            ws[h] = n + h < N ? __ldg(wscale + n + h) : 0.0f;
            wr[h] = n + h < N ? __fmul_rn(ws[h], __int2float_rn(__ldg(wsum + n + h))) : 0.0f;
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // h = 0: row gid (c0, c1); 1: row gid + 8 (c2, c3)
                const int m = bm + wm + mt * 16 + gid + 8 * h;
                if (m >= M || n >= N) continue;
                const float sm = __ldg(s + m), zm = __ldg(z + m);
                unsigned short out[2];
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int acc = P[mt][nt][2 * h + c];
                    float v = __fadd_rn(__fmul_rn(__int2float_rn(acc), __fmul_rn(sm, ws[c])), __fmul_rn(zm, wr[c]));
                    if (y_out != nullptr && n + c < N)
                        v = __fadd_rn(v, qk::from_in<kBF16>(y_out[static_cast<long long>(m) * N + n + c]));
                    out[c] = qk::to_out<kBF16>(v);
                }
                qk::store_pair(y, m, n, N, out[0], out[1]);
                if (acc_out != nullptr) {  // debug: the int32 accumulator
                    int* pa = acc_out + static_cast<long long>(m) * N + n;
                    pa[0] = P[mt][nt][2 * h];
                    if (n + 1 < N) pa[1] = P[mt][nt][2 * h + 1];
                }
            }
    }
}

// Split and quantize one token (one CTA of QUANT_THREADS per row); see reference_quik.py.
template <bool kBF16>
__device__ __forceinline__ void split_row(const unsigned short* __restrict__ x, const int* __restrict__ base_idx,
                                          const int* __restrict__ outlier_idx, unsigned char* __restrict__ xq,
                                          float* __restrict__ s, float* __restrict__ z, unsigned short* __restrict__ x_out,
                                          int M, int K, int Kb, int Kbp, int n_out, int bits, int pack, float clip) {
    constexpr int T = qk::QUANT_THREADS;
    __shared__ float red_lo[T / 32], red_hi[T / 32];
    const int m = blockIdx.x;
    if (m >= M) return;  // uniform per CTA
    const unsigned short* xr = x + static_cast<long long>(m) * K;

    // min and max over the base channels: shuffles within a warp, then the 8 warps in shared memory
    float lo = __int_as_float(0x7f800000), hi = -lo;  // +inf, -inf
    for (int k = threadIdx.x; k < Kb; k += T) {
        const float v = qk::from_in<kBF16>(xr[__ldg(base_idx + k)]);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    if ((threadIdx.x & 31) == 0) {
        red_lo[threadIdx.x >> 5] = lo;
        red_hi[threadIdx.x >> 5] = hi;
    }
    __syncthreads();
    lo = red_lo[0];
    hi = red_hi[0];
#pragma unroll
    for (int w = 1; w < T / 32; ++w) {
        lo = fminf(lo, red_lo[w]);
        hi = fmaxf(hi, red_hi[w]);
    }
    lo = __fmul_rn(lo, clip);  // the activation clip (1: exact); values beyond saturate below
    hi = __fmul_rn(hi, clip);

    const float levels = static_cast<float>((1 << bits) - 1);
    const int half = 1 << (bits - 1);
    const float r = __fsub_rn(hi, lo);
    const float inv = r > 0.0f ? __fmul_rn(qk::rcp_rn(r), levels) : 0.0f;  // as torch: reciprocal, then product
    auto code = [&](int k) -> int {                                        // the signed level of base channel k
        if (k >= Kb) return 0;                                             // padding
        const float v = qk::from_in<kBF16>(xr[__ldg(base_idx + k)]);
        const float u = fminf(fmaxf(rintf(__fmul_rn(__fsub_rn(v, lo), inv)), 0.0f), levels);
        return __float2int_rn(u) - half;
    };
    if (pack) {  // two int4 per byte, low nibble = even k
        unsigned char* row = xq + static_cast<long long>(m) * (Kbp / 2);
        for (int j = threadIdx.x; j < Kbp / 2; j += T)
            row[j] = static_cast<unsigned char>((code(2 * j) & 0xF) | ((code(2 * j + 1) & 0xF) << 4));
    } else {
        signed char* row = reinterpret_cast<signed char*>(xq) + static_cast<long long>(m) * Kbp;
        for (int k = threadIdx.x; k < Kbp; k += T) row[k] = static_cast<signed char>(code(k));
    }
    for (int j = threadIdx.x; j < n_out; j += T)
        x_out[static_cast<long long>(m) * n_out + j] = xr[__ldg(outlier_idx + j)];
    if (threadIdx.x == 0) {
        const float sc = qk::div_rn(r, levels);
        s[m] = sc;
        z[m] = __fadd_rn(lo, __fmul_rn(sc, static_cast<float>(half)));  // the product is exact (2^(b-1))
    }
}

}  // namespace quik

// ---------------------------------------------------------------------------------------
// Entry points.  GEMMs: grid (ceil(N / 64), ceil(M / 64)), block 128.  Split: grid (M), block 256.
// ---------------------------------------------------------------------------------------

#define QUIK_GEMM_ARGS                                                                                 \
    const signed char* __restrict__ xq,     /* activations: int8 [M, Kbp] or packed int4 [M, Kbp/2] */ \
    const float* __restrict__ s,            /* float32 [M] activation scale */                         \
    const float* __restrict__ z,            /* float32 [M] activation offset */                        \
    const signed char* __restrict__ qw,     /* weights: int8 [N, Kbp] or packed int4 [N, Kbp/2] */     \
    const float* __restrict__ wscale,       /* float32 [N] */                                          \
    const int* __restrict__ wsum,           /* int32 [N], row sums of the integer weights */           \
    const unsigned short* __restrict__ y_out, /* fp16 / bf16 [M, N] outlier product, or null */        \
    unsigned short* __restrict__ y,         /* fp16 / bf16 [M, N] out */                               \
    int* __restrict__ acc_out,              /* int32 [M, N] accumulator, or null (debug) */            \
    int M, int N, int Kbp

#define QUIK_BYTES_GEMM(NAME, S4, BF16, KB)                                                            \
    extern "C" __global__ void __launch_bounds__(quik::THREADS, 1) NAME(QUIK_GEMM_ARGS) {             \
        const int bm = blockIdx.y * quik::BM, bn = blockIdx.x * quik::BN;                             \
        int P[quik::MT][quik::NT][4];                                                                  \
        quik::mainloop_bytes<S4>(xq, qw, M, N, KB, bm, bn, P);                                        \
        quik::epilogue<BF16>(P, s, z, wscale, wsum, y_out, y, acc_out, M, N, bm, bn);                  \
    }

#define QUIK_W4A8_GEMM(NAME, BF16)                                                                     \
    extern "C" __global__ void __launch_bounds__(quik::THREADS, 1) NAME(QUIK_GEMM_ARGS) {             \
        const int bm = blockIdx.y * quik::BM, bn = blockIdx.x * quik::BN;                             \
        int P[quik::MT][quik::NT][4];                                                                  \
        quik::NoFold fold;                                                                             \
        qk::mainloop(xq, reinterpret_cast<const unsigned char*>(qw), M, N, Kbp, Kbp, bm, bn, P, fold); \
        quik::epilogue<BF16>(P, s, z, wscale, wsum, y_out, y, acc_out, M, N, bm, bn);                  \
    }

#define QUIK_SPLIT(NAME, BF16)                                                                         \
    extern "C" __global__ void __launch_bounds__(qk::QUANT_THREADS) NAME(                               \
        const unsigned short* __restrict__ x,   /* fp16 / bf16 [M, K] */                                \
        const int* __restrict__ base_idx,       /* int32 [Kb], ascending */                             \
        const int* __restrict__ outlier_idx,    /* int32 [n] */                                         \
        unsigned char* __restrict__ xq,         /* int8 [M, Kbp] or packed int4 [M, Kbp/2] out */      \
        float* __restrict__ s, float* __restrict__ z, /* float32 [M] out */                             \
        unsigned short* __restrict__ x_out,     /* fp16 / bf16 [M, n] out */                            \
        int M, int K, int Kb, int Kbp, int n_out,                                                       \
        int bits,                               /* 4 or 8 */                                            \
        int pack,                               /* 1: two int4 per byte (bits == 4) */                  \
        float clip) {                           /* the token's min and max times this, (0, 1] */       \
        quik::split_row<BF16>(x, base_idx, outlier_idx, xq, s, z, x_out, M, K, Kb, Kbp, n_out, bits, pack, clip); \
    }

QUIK_BYTES_GEMM(quik_gemm_w4a4_s4_f16, true, false, Kbp / 2)
QUIK_BYTES_GEMM(quik_gemm_w4a4_s4_bf16, true, true, Kbp / 2)
QUIK_BYTES_GEMM(quik_gemm_w8a8_f16, false, false, Kbp)
QUIK_BYTES_GEMM(quik_gemm_w8a8_bf16, false, true, Kbp)
QUIK_W4A8_GEMM(quik_gemm_w4a4_s8_f16, false)
QUIK_W4A8_GEMM(quik_gemm_w4a4_s8_bf16, true)
QUIK_SPLIT(quik_split_f16, false)
QUIK_SPLIT(quik_split_bf16, true)
