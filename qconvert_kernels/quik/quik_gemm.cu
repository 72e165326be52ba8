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

// QUIK's value before the outlier product: (float(acc) * (s[m] * ws[n])) + (z[m] * wr[n]), wr[n] =
// ws[n] * float(R[n]); each operation rounded to float32 (no FMA).  The tile epilogue, the GEMVs and
// epilogue_rows all make it so.
__device__ __forceinline__ float value(int acc, float sm, float zm, float ws, float wr) {
    return __fadd_rn(__fmul_rn(__int2float_rn(acc), __fmul_rn(sm, ws)), __fmul_rn(zm, wr));
}

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
                    float v = value(acc, sm, zm, ws[c], wr[c]);
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


// ---------------------------------------------------------------------------------------
// The wide split (quik_split_wide_*): the same arithmetic as split_row, one CTA of WIDE_THREADS per
// row, each base channel read once into registers.  Thread t holds the pairs p = t + WIDE_THREADS * j
// (j < WIDE_SLOTS) of channels 2p and 2p + 1: every index and x load of the row is issued before
// the first is used, where split_row walks the row twice in a loop of dependent loads (Kb up to
// WIDE_MAX_KB; one CTA per row is all a decode step has, so its latency is the kernel's time).
//
// With w_out (M <= FUSED_ROWS, n_out <= FUSED_MAX_OUT) the same launch also makes the outlier
// product y_out = x_out W_outᵀ in x's dtype, in CTAs M .. M + ceil(N / 32) - 1: the CTA gathers the
// M rows' outlier channels into shared memory (float32) and warp w takes column n = 32 * c + w.
// Lane l sums the products of channels l, l + 32, ... in that order, each product and sum rounded
// to float32 (__fmul_rn, __fadd_rn: the product of a fp16 value and a fp16 weight is exact in
// float32; of a bf16 value, too, away from float32's overflow and underflow), then the 32 lane sums
// are added by the xor butterfly (16, 8, 4, 2, 1), and the total is rounded once to fp16 / bf16.
// qconvert_kernels/quik/reference.py:outlier_product_lanes computes the same sums.  This replaces
// the cuBLAS launch of the outlier product at decode.  The bounds (M <= FUSED_ROWS and n_out <=
// FUSED_MAX_OUT with w_out: the shared rows; Kbp <= WIDE_MAX_KB: the register slots) are the
// launcher's checks (quik/cuda.py: fuses_outliers, split_quantize); the kernel does not repeat them.
// ---------------------------------------------------------------------------------------
constexpr int WIDE_THREADS = 1024;
constexpr int WIDE_SLOTS = 8;                                 // channel pairs per thread
constexpr int WIDE_MAX_KB = 2 * WIDE_THREADS * WIDE_SLOTS;    // 16384 base channels
constexpr int FUSED_ROWS = 8;
constexpr int FUSED_MAX_OUT = WIDE_THREADS;                   // one channel per thread
constexpr int GEMV_COLS = WIDE_THREADS / 32;                  // columns per product CTA: one per warp
constexpr int GEMV_BATCH = 8;                                 // a lane's weight loads issued together

template <bool kBF16>
__device__ __forceinline__ void split_wide_row(float* __restrict__ red, const unsigned short* __restrict__ x,
                                               const int* __restrict__ base_idx, const int* __restrict__ outlier_idx,
                                               unsigned char* __restrict__ xq, float* __restrict__ s,
                                               float* __restrict__ z, unsigned short* __restrict__ x_out, int m,
                                               int K, int Kb, int Kbp, int n_out, int bits, int pack, float clip) {
    const unsigned short* xr = x + static_cast<long long>(m) * K;
    const int t = threadIdx.x;
    float v[2 * WIDE_SLOTS];
    float lo = __int_as_float(0x7f800000), hi = -lo;  // +inf, -inf
#pragma unroll
    for (int j = 0; j < WIDE_SLOTS; ++j) {
        const int k0 = 2 * (t + WIDE_THREADS * j);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            v[2 * j + h] = k0 + h < Kb ? qk::from_in<kBF16>(xr[__ldg(base_idx + k0 + h)]) : 0.0f;
            if (k0 + h < Kb) {
                lo = fminf(lo, v[2 * j + h]);
                hi = fmaxf(hi, v[2 * j + h]);
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    if ((t & 31) == 0) {
        red[t >> 5] = lo;
        red[32 + (t >> 5)] = hi;
    }
    __syncthreads();
    lo = red[0];
    hi = red[32];
#pragma unroll
    for (int w = 1; w < WIDE_THREADS / 32; ++w) {
        lo = fminf(lo, red[w]);
        hi = fmaxf(hi, red[32 + w]);
    }
    lo = __fmul_rn(lo, clip);
    hi = __fmul_rn(hi, clip);
    const float levels = static_cast<float>((1 << bits) - 1);
    const int half = 1 << (bits - 1);
    const float r = __fsub_rn(hi, lo);
    const float inv = r > 0.0f ? __fmul_rn(qk::rcp_rn(r), levels) : 0.0f;
#pragma unroll
    for (int j = 0; j < WIDE_SLOTS; ++j) {
        const int p = t + WIDE_THREADS * j, k0 = 2 * p;
        int c[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float u = fminf(fmaxf(rintf(__fmul_rn(__fsub_rn(v[2 * j + h], lo), inv)), 0.0f), levels);
            c[h] = k0 + h < Kb ? __float2int_rn(u) - half : 0;  // padding: 0
        }
        if (k0 >= Kbp) continue;
        if (pack)
            xq[static_cast<long long>(m) * (Kbp / 2) + p] = static_cast<unsigned char>((c[0] & 0xF) | ((c[1] & 0xF) << 4));
        else  // two int8 codes as one 16-bit store (k0 even, Kbp a multiple of 64)
            reinterpret_cast<unsigned short*>(xq + static_cast<long long>(m) * Kbp)[p] =
                static_cast<unsigned short>((c[0] & 0xFF) | ((c[1] & 0xFF) << 8));
    }
    if (x_out != nullptr)
        for (int j = t; j < n_out; j += WIDE_THREADS)
            x_out[static_cast<long long>(m) * n_out + j] = xr[__ldg(outlier_idx + j)];
    if (t == 0) {
        const float sc = qk::div_rn(r, levels);
        s[m] = sc;
        z[m] = __fadd_rn(lo, __fmul_rn(sc, static_cast<float>(half)));
    }
}

// One product CTA: columns [GEMV_COLS * c, + GEMV_COLS) of y_out for the M (<= FUSED_ROWS) rows.
template <bool kBF16>
__device__ __forceinline__ void outlier_columns(float* __restrict__ sx, const unsigned short* __restrict__ x,
                                                const int* __restrict__ outlier_idx,
                                                const unsigned short* __restrict__ w_out,
                                                unsigned short* __restrict__ y_out, int c, int M, int K, int N,
                                                int n_out) {
    const int t = threadIdx.x, warp = t >> 5, lane = t & 31;
    if (t < n_out) {  // sx[r][t] = x[r, outlier_idx[t]] (n_out <= FUSED_MAX_OUT = WIDE_THREADS)
        const int col = __ldg(outlier_idx + t);
        for (int r = 0; r < M; ++r)
            sx[r * FUSED_MAX_OUT + t] = qk::from_in<kBF16>(x[static_cast<long long>(r) * K + col]);
    }
    __syncthreads();
    const int n = GEMV_COLS * c + warp;
    if (n >= N) return;  // after the only barrier
    const unsigned short* wr = w_out + static_cast<long long>(n) * n_out;
    float acc[FUSED_ROWS];
#pragma unroll
    for (int r = 0; r < FUSED_ROWS; ++r) acc[r] = 0.0f;
    for (int k0 = lane; k0 < n_out; k0 += 32 * GEMV_BATCH) {  // GEMV_BATCH weight loads in flight, then their sums
        unsigned short wb[GEMV_BATCH];
#pragma unroll
        for (int i = 0; i < GEMV_BATCH; ++i) wb[i] = k0 + 32 * i < n_out ? __ldg(wr + k0 + 32 * i) : 0;
#pragma unroll
        for (int i = 0; i < GEMV_BATCH; ++i) {
            const int k = k0 + 32 * i;
            if (k >= n_out) break;
            const float w = qk::f16_to_f32(wb[i]);  // W_out is stored fp16
#pragma unroll
            for (int r = 0; r < FUSED_ROWS; ++r)
                if (r < M) acc[r] = __fadd_rn(acc[r], __fmul_rn(sx[r * FUSED_MAX_OUT + k], w));
        }
    }
#pragma unroll
    for (int r = 0; r < FUSED_ROWS; ++r)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[r] = __fadd_rn(acc[r], __shfl_xor_sync(0xffffffffu, acc[r], o));
    float mine = acc[0];
#pragma unroll
    for (int r = 1; r < FUSED_ROWS; ++r)
        if (lane == r) mine = acc[r];
    if (lane < M) y_out[static_cast<long long>(lane) * N + n] = qk::to_out<kBF16>(mine);
}


// ---------------------------------------------------------------------------------------
// W8A8 at decode (quik_gemv_w8a8_*, M <= GV_ROWS): the 64 x 64 tile kernel gives an M = 1 product
// N / 64 CTAs that each stream 64 weight rows through one stage (the H200: 149 us for the 4096 x
// 14336 down_proj that cuBLAS FP16 reads in 32 us).  The GEMV main loop (quik_mainloop.cuh,
// gemv_sums) gives every lane of a warp the int32 sums of its GV_COLS columns; lane j < M * GV_COLS
// then applies quik::epilogue's formula to output (j / GV_COLS, j % GV_COLS).  kW4 (quik_gemv_w4a4_*,
// the 4-bit layers at decode on sm_80 .. sm_89, where the tile kernel is the int4 x int4 one): packed
// int4 weights [N, Kbp/2] against the split's codes one per byte (int8 [M, Kbp]), gemv_sums<true>.
// ---------------------------------------------------------------------------------------
template <bool kBF16, bool kW4>
__device__ __forceinline__ void gemv_quik(const signed char* __restrict__ xq, const float* __restrict__ s,
                                          const float* __restrict__ z, const signed char* __restrict__ qw,
                                          const float* __restrict__ wscale, const int* __restrict__ wsum,
                                          const unsigned short* __restrict__ y_out, unsigned short* __restrict__ y,
                                          int* __restrict__ acc_out, int M, int N, int Kbp) {
    const int lane = threadIdx.x & 31;
    const int n0 = gemv_n0();
    if (n0 >= N) return;  // no barrier in this kernel
    int acc[GV_ROWS][GV_COLS];
    gemv_sums<kW4>(xq, qw, M, N, kW4 ? Kbp / 2 : Kbp, n0, acc);
    const int a = gemv_pick(acc, lane);
    const int m = lane / GV_COLS, n = n0 + lane % GV_COLS;
    if (lane >= GV_ROWS * GV_COLS || m >= M || n >= N) return;
    const float ws = __ldg(wscale + n), wr = __fmul_rn(ws, __int2float_rn(__ldg(wsum + n)));
    float v = value(a, __ldg(s + m), __ldg(z + m), ws, wr);
    const long long o = static_cast<long long>(m) * N + n;
    if (y_out != nullptr) v = __fadd_rn(v, qk::from_in<kBF16>(y_out[o]));
    y[o] = qk::to_out<kBF16>(v);
    if (acc_out != nullptr) acc_out[o] = a;  // debug: the int32 accumulator
}
}  // namespace quik

// QUIK's epilogue alone, after an int32 product made elsewhere (torch._int_mm: cuBLASLt's int8 GEMM,
// W8A8 above the GEMV's rows): the epilogue's y, operation for operation, for acc's rows, ld apart
// (the GEMM's output may be padded).  Launch: grid (M), block EPI_THREADS; a strided loop over N.
#define QUIK_EPI_ARGS                                                                                  \
    const int* __restrict__ acc,            /* int32 [M, ld] */                                        \
    const float* __restrict__ s,            /* float32 [M] activation scale */                         \
    const float* __restrict__ z,            /* float32 [M] activation offset */                        \
    const float* __restrict__ wscale,       /* float32 [N] */                                          \
    const int* __restrict__ wsum,           /* int32 [N] */                                            \
    const unsigned short* __restrict__ y_out, /* fp16 / bf16 [M, N] outlier product, or null */        \
    unsigned short* __restrict__ y,         /* fp16 / bf16 [M, N] out */                               \
    int M, int N, int ld

namespace quik {
constexpr int EPI_THREADS = 256;
template <bool kBF16>
__device__ __forceinline__ void epilogue_rows(QUIK_EPI_ARGS) {
    const int m = blockIdx.x;
    if (m >= M) return;
    const float sm = __ldg(s + m), zm = __ldg(z + m);
    const int* a = acc + static_cast<long long>(m) * ld;
    const long long o = static_cast<long long>(m) * N;
    for (int n = threadIdx.x; n < N; n += EPI_THREADS) {
        const float ws = __ldg(wscale + n), wr = __fmul_rn(ws, __int2float_rn(__ldg(wsum + n)));
        float v = value(__ldg(a + n), sm, zm, ws, wr);
        if (y_out != nullptr) v = __fadd_rn(v, qk::from_in<kBF16>(y_out[o + n]));
        y[o + n] = qk::to_out<kBF16>(v);
    }
}
}  // namespace quik

#define QUIK_EPILOGUE_ROWS(NAME, BF16)                                                                 \
    extern "C" __global__ void __launch_bounds__(quik::EPI_THREADS) NAME(QUIK_EPI_ARGS) {             \
        quik::epilogue_rows<BF16>(acc, s, z, wscale, wsum, y_out, y, M, N, ld);                       \
    }

// ---------------------------------------------------------------------------------------
// Entry points.  GEMMs: grid (ceil(N / 64), ceil(M / 64)), block 128.  Split: grid (M), block 256.
// Wide split: grid (M + ceil(N / 32) with w_out, else M), block 1024.  GEMVs (M <= 8):
// grid (ceil(N / 16)), block 256.
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

#define QUIK_SPLIT_WIDE(NAME, BF16)                                                                    \
    extern "C" __global__ void __launch_bounds__(quik::WIDE_THREADS) NAME(                              \
        const unsigned short* __restrict__ x,   /* fp16 / bf16 [M, K] */                                \
        const int* __restrict__ base_idx,       /* int32 [Kb], ascending */                             \
        const int* __restrict__ outlier_idx,    /* int32 [n] */                                         \
        unsigned char* __restrict__ xq,         /* int8 [M, Kbp] or packed int4 [M, Kbp/2] out */      \
        float* __restrict__ s, float* __restrict__ z, /* float32 [M] out */                             \
        unsigned short* __restrict__ x_out,     /* fp16 / bf16 [M, n] out, or null */                   \
        const unsigned short* __restrict__ w_out, /* fp16 [N, n] outlier weights, or null */           \
        unsigned short* __restrict__ y_out,     /* fp16 / bf16 [M, N] out (with w_out) */               \
        int M, int K, int Kb, int Kbp, int n_out, int N,                                                \
        int bits,                               /* 4 or 8 */                                            \
        int pack,                               /* 1: two int4 per byte (bits == 4) */                  \
        float clip) {                           /* the token's min and max times this, (0, 1] */       \
        __shared__ float smem[quik::FUSED_ROWS * quik::FUSED_MAX_OUT];                                  \
        const int b = blockIdx.x;                                                                       \
        if (b < M)                                                                                      \
            quik::split_wide_row<BF16>(smem, x, base_idx, outlier_idx, xq, s, z, x_out, b, K, Kb, Kbp,  \
                                       n_out, bits, pack, clip);                                        \
        else                                                                                            \
            quik::outlier_columns<BF16>(smem, x, outlier_idx, w_out, y_out, b - M, M, K, N, n_out);     \
    }

#define QUIK_GEMV(NAME, BF16, W4)                                                                      \
    extern "C" __global__ void __launch_bounds__(quik::GV_THREADS) NAME(QUIK_GEMM_ARGS) {             \
        quik::gemv_quik<BF16, W4>(xq, s, z, qw, wscale, wsum, y_out, y, acc_out, M, N, Kbp);          \
    }

QUIK_BYTES_GEMM(quik_gemm_w4a4_s4_f16, true, false, Kbp / 2)
QUIK_BYTES_GEMM(quik_gemm_w4a4_s4_bf16, true, true, Kbp / 2)
QUIK_BYTES_GEMM(quik_gemm_w8a8_f16, false, false, Kbp)
QUIK_BYTES_GEMM(quik_gemm_w8a8_bf16, false, true, Kbp)
QUIK_W4A8_GEMM(quik_gemm_w4a4_s8_f16, false)
QUIK_W4A8_GEMM(quik_gemm_w4a4_s8_bf16, true)
QUIK_SPLIT(quik_split_f16, false)
QUIK_SPLIT(quik_split_bf16, true)
QUIK_SPLIT_WIDE(quik_split_wide_f16, false)
QUIK_SPLIT_WIDE(quik_split_wide_bf16, true)
QUIK_EPILOGUE_ROWS(quik_epilogue_rows_f16, false)
QUIK_EPILOGUE_ROWS(quik_epilogue_rows_bf16, true)
QUIK_GEMV(quik_gemv_w8a8_f16, false, false)
QUIK_GEMV(quik_gemv_w8a8_bf16, true, false)
QUIK_GEMV(quik_gemv_w4a4_f16, false, true)
QUIK_GEMV(quik_gemv_w4a4_bf16, true, true)
