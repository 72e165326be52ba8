// ZeroQuant-FP fp4-fp8 at decode on load-time repacked weights (sm_89+): w4a8_repacked.cu's decode
// kernel instantiated for KIND_ZQ, so an FP4 layer at M <= 64 gets the same split-K, the deep
// cp.async weight pipeline and the fused per-token quantizer as the W4A8 layers, in one launch.
//
//   y = fp4_fp8_gemm(x) of qconvert_kernels/fp8/reference.py, in the split order of
//   reference.fp4_fp8_gemm_split (one split: fp4_fp8_gemm), rounded to fp16 / bf16:
//     xq, t = E4M3 per-token quantization of x (amax / 448; fused, as w4r::decode does for int8)
//     P[j] = sum_{k in group j} xq[m, k] * w[n, k]     FP8 tensor cores, float32, zeroed per group
//     acc = sum over the split's groups of P[j] * 2^e[n, j], splits added in split order
//     y = acc * (t[m] * cscale[n])
//
// The weights are fp4-fp8's stored E2M1 nibbles repacked by w4a8/repack.py exactly like int4
// (the on-disk nibble order is the same); w4r::fp4x8r_to_e4m3 widens them to E4M3 in registers.
// The group exponents are repacked to int8 [G, N128], cscale padded to float32 [N128].
// Launcher: qconvert_kernels/w4a8/cuda.py (prepare("fp4-fp8", ...), linear); emulator:
// w4a8/emulate.py (decode_cta with zq).  As with fp8_gemm.cu, the FP8 tensor cores' own
// accumulation inside a group is unspecified by PTX: the GPU tests hold P to the tolerance of
// reference.py, the emulator keeps it exact.
//
// M > 64 is not a kernel of its own: w4a8r_widen_zq (below) writes the weights as E4M3 values and
// torch._scaled_mm runs the FP8 GEMM.  On sm_90 ptxas turns each FP8 mma.sync into two fp16 HMMA
// plus the operands' widening (Hopper reaches its FP8 units through wgmma only), and w4r::prefill's
// 128 x 128 tile instantiated for KIND_ZQ then spilled (a trial build, NVRTC 13.0, 2026-12-05).

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
#error "fp8_repacked.cu needs sm_89 or newer (FP8 tensor-core mma, e4m3 cvt)"
#endif

#define W4R_NO_ENTRIES
#include "../w4a8/w4a8_repacked.cu"

// Decode: grid (S, N128 / 128), block 256, dynamic shared memory w4r::decode_smem(MT8); the
// arguments are W4R_DECODE's (scales int8 [G, N128], cscale float32 [N128], alpha_log2 0, acc_out
// null), then LoRC's: h float32 [M, R] (w4a8r_lorc_h_zq) and U float32 [N128, R], or null and R = 0.
#define W4R_DECODE_ZQ(NAME, MT8)                                                                         \
    extern "C" __global__ void __launch_bounds__(w4r::THREADS, 2) NAME(                                  \
        const unsigned short* __restrict__ x, const uint4* __restrict__ wq, const void* __restrict__ scales, \
        const float* __restrict__ cscale, int alpha_log2, unsigned short* __restrict__ y,                \
        int* __restrict__ acc_out, int4* __restrict__ part, int* __restrict__ ws,                        \
        int M, int N, int K, int N128, int G, int spg, int KB, int S, int gq, int gr, int A, int ak_log2,  \
        int flags,                                                                                        \
        const float* __restrict__ lorc_h,     /* float32 [M, R] or null */                               \
        const float* __restrict__ lorc_u,     /* float32 [N128, R] or null */                            \
        int lorc_r) {                         /* R, 0 without LoRC */                                    \
        w4r::decode<MT8, w4r::KIND_ZQ>(x, wq, scales, cscale, alpha_log2, y, acc_out, part, ws, M, N, K, N128, G, spg, \
                                       KB, S, gq, gr, A, ak_log2, flags, nullptr, nullptr, nullptr, nullptr, \
                                       nullptr, lorc_h, lorc_u, lorc_r);                                 \
    }

W4R_DECODE_ZQ(w4a8r_decode_zq_m8, 1)
W4R_DECODE_ZQ(w4a8r_decode_zq_m16, 2)
W4R_DECODE_ZQ(w4a8r_decode_zq_m32, 4)
W4R_DECODE_ZQ(w4a8r_decode_zq_m64, 8)

// ---------------------------------------------------------------------------------------
// LoRC's first product at decode (M <= 64): h[m, r] = sum_k (float(xq[m, k]) * t[m]) * V[r, k], r < R,
// with xq, t the per-token E4M3 quantization the decode kernel makes of the same x (token_scales,
// the clamp, cvt: the same bits), V the LoRC factor (fp16 [R, K]).  One CTA of 256 threads per token:
// thread i sums k = i, i + 256, ... in order (each product and sum rounded once), a warp's 32 lanes
// meet in an xor butterfly (offsets 16 .. 1), then thread r adds the 8 warps' sums in warp order.
// The decode kernel adds sum_r h[m, r] U[n, r] in its epilogue (w4r::lorc_tail).     [emulate.lorc_h]
namespace zql {
constexpr int MAX_R = 32;
__device__ __forceinline__ float e4m3_to_f32(unsigned b) {
    unsigned h2;
    const unsigned short in = static_cast<unsigned short>(b & 0xFFu);
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(in));
    return qk::f16_to_f32(static_cast<unsigned short>(h2 & 0xFFFFu));
}
}  // namespace zql

// Launch: grid (M), block 256.
extern "C" __global__ void __launch_bounds__(256) w4a8r_lorc_h_zq(
    const unsigned short* __restrict__ x,  /* fp16 / bf16 bits [M, K] */
    const unsigned short* __restrict__ v,  /* fp16 [R, K], the LoRC factor V */
    float* __restrict__ h,                 /* float32 [M, R] out */
    int M, int K, int R,                   /* R <= zql::MAX_R */
    int flags) {                           /* 1: bf16 */
    __shared__ float s_max[8];
    __shared__ float s_part[8][zql::MAX_R];
    const int m = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (m >= M) return;  // uniform per CTA
    const bool bf16 = (flags & 1) != 0;
    const unsigned short* row = x + static_cast<long long>(m) * K;
    float amax = 0.0f;
    for (int k = tid; k < K; k += 256) amax = fmaxf(amax, fabsf(qk::from_in_rt(row[k], bf16)));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (lane == 0) s_max[warp] = amax;
    __syncthreads();
    amax = s_max[0];
#pragma unroll
    for (int w = 1; w < 8; ++w) amax = fmaxf(amax, s_max[w]);
    float inv, t;
    w4r::token_scales<w4r::KIND_ZQ>(amax, inv, t);
    float part[zql::MAX_R];
#pragma unroll
    for (int r = 0; r < zql::MAX_R; ++r) part[r] = 0.0f;
    for (int k = tid; k < K; k += 256) {
        const float q = zql::e4m3_to_f32(w4r::f32_to_e4m3(fminf(fmaxf(__fmul_rn(qk::from_in_rt(row[k], bf16), inv), -448.0f), 448.0f)));
        const float xd = __fmul_rn(q, t);
#pragma unroll
        for (int r = 0; r < zql::MAX_R; ++r)
            if (r < R) part[r] = __fadd_rn(part[r], __fmul_rn(xd, qk::f16_to_f32(__ldg(v + static_cast<long long>(r) * K + k))));
    }
#pragma unroll
    for (int r = 0; r < zql::MAX_R; ++r) {
        if (r >= R) break;  // uniform: the ranks past R have nothing to sum
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) part[r] = __fadd_rn(part[r], __shfl_xor_sync(0xffffffffu, part[r], o));
        if (lane == 0) s_part[warp][r] = part[r];
    }
    __syncthreads();
    if (tid < R) {
        float s = s_part[0][tid];
#pragma unroll
        for (int w = 1; w < 8; ++w) s = __fadd_rn(s, s_part[w][tid]);
        h[static_cast<long long>(m) * R + tid] = s;
    }
}

// ---------------------------------------------------------------------------------------
// Prefill (M > 64): the repacked E2M1 weights widened to E4M3 once per call, for an FP8 GEMM with
// per-row scales (torch._scaled_mm: cuBLASLt / CUTLASS, Hopper's FP8 tensor cores through wgmma):
//   w8[n, k] = e4m3(w[n, k] * 2^(e[n, k / g] + s[n]))   exact: every such value is an E4M3 value
// where s[n] = 6 - max_j e[n, j] (the launcher's shift, folded into the row scale c[n] * 2^-s[n]) and
// every row's exponents span at most 14 (so e + s lies in [-8, 6]: |w| 2^(e+s) <= 6 * 64 = 384 <= 448,
// and w 2^(e+s), a multiple of 2^(e+s-1) >= 2^-9, is a multiple of E4M3's least subnormal 2^-9).
// Then y = (xq * t[m]) (w8 * c[n] 2^-s[n])^T: one GEMM over all of K instead of fp4_fp8_gemm's fold of
// group partials, the same products, summed in another order (reference.fp4_fp8_gemm_widened).
// One thread per 16-byte chunk of the repacked layout; its 4 words are rows 16 t + gid (+ 8), k steps
// 2 kb (+ 1), k0 = 32 ks + 8 tig .. + 7, stored as 8 bytes at w8[n, k0].        [emulate.widen_zq]
namespace zqw {

// An E4M3 byte that is 0 or normal (what fp4x8r_to_e4m3 gives: E2M1's magnitudes are E4M3 normals)
// -> its float value, in integer instructions: exponent E - 7 + 127, mantissa m << 20, the sign.
__device__ __forceinline__ float e4m3_normal_to_f32(unsigned b) {
    const unsigned mag = b & 0x7Fu;
    const unsigned bits = mag == 0u ? 0u : ((((mag >> 3) + 120u) << 23) | ((mag & 7u) << 20));
    return __int_as_float(static_cast<int>(bits | ((b & 0x80u) << 24)));
}

// 4 E4M3 bytes of w -> the 4 E4M3 bytes of w * 2^e (exact by the launcher's range check).
__device__ __forceinline__ unsigned scale4(unsigned b4, float p) {
    unsigned out = 0u;
#pragma unroll
    for (int i = 0; i < 4; ++i)
        out |= w4r::f32_to_e4m3(__fmul_rn(e4m3_normal_to_f32((b4 >> (8 * i)) & 0xFFu), p)) << (8 * i);
    return out;
}

}  // namespace zqw

// Launch: grid (ceil(KB * 32 / 256), N16 / 16), block 256: blockIdx.y is the n16 tile, so no thread
// divides (a division by a run-time value is a loop of integer instructions here, common.cuh).
extern "C" __global__ void __launch_bounds__(256) w4a8r_widen_zq(
    const uint4* __restrict__ wq,          /* repacked weights [N128/16][KB][32][4] uint32 */
    const signed char* __restrict__ ew,    /* int8 [G, N128]: e + s[n], in [-8, 6] */
    const int* __restrict__ step_group,    /* int32 [2 KB]: the group of each k step (the last for the padding) */
    unsigned char* __restrict__ w8,        /* e4m3 [N16, Kq] out, Kq = 64 KB */
    int N16, int N128, int KB) {           /* N16: N rounded up to 16 (the rows written) */
    const int t16 = blockIdx.y;
    const int i = blockIdx.x * 256 + threadIdx.x;              // kb * 32 + lane
    if (i >= KB * 32) return;
    const int kb = i >> 5, lane = i & 31, gid = lane >> 2, tig = lane & 3;
    const uint4 r = __ldg(wq + (static_cast<long long>(t16) * KB * 32 + i));
    const unsigned words[4] = {r.x, r.y, r.z, r.w};
    const long long Kq = static_cast<long long>(KB) * 64;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int n = 16 * t16 + gid + 8 * (j & 1);
        if (n >= N16) continue;
        const int ks = 2 * kb + (j >> 1);
        const float p = w4r::Scale<w4r::KIND_ZQ>::exp2i(__ldg(ew + static_cast<long long>(__ldg(step_group + ks)) * N128 + n));
        unsigned lo, hi;
        w4r::fp4x8r_to_e4m3(words[j], lo, hi);
        *reinterpret_cast<uint2*>(w8 + n * Kq + 32 * ks + 8 * tig) = make_uint2(zqw::scale4(lo, p), zqw::scale4(hi, p));
    }
}
