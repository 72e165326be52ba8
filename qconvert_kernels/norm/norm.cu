// RMSNorm of fp16 / bf16 rows, one launch, for the float glue of a decode step (the Llama-family
// RMSNorm: y = w * to_dtype(x * rsqrt(mean(x^2) + eps)), where eager transformers runs eight torch
// ops).  Bit for bit qconvert_kernels/norm/reference.py, which states the order of every float
// operation; its docstring is the definition.
//
// One CTA per row, 256 threads.  Thread t sums the squares of elements t, t + 256, ... in that
// order (a product, then an add, each rounded: no FMA); each warp adds its 32 partial sums by the
// xor butterfly (offsets 16, 8, 4, 2, 1: every lane ends with the same sum, as a + b == b + a
// exactly); the 8 warp sums are added in warp order by every thread.  Then var = sum / n and
// r = 1 / sqrt(var + eps), each correctly rounded to float32 (no approximate rsqrt, whose bits no
// CPU could reproduce), h = dtype(x * r) and y = dtype(w * h).  The row is read twice (the
// second time from L1/L2) rather than staged: any width fits.
#include "../common.cuh"

namespace qn {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;

template <bool kBF16>
__device__ __forceinline__ void rms_norm_row(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                                             unsigned short* __restrict__ y, int rows, int n, float eps) {
    __shared__ float red[WARPS];
    const int row = blockIdx.x;
    if (row >= rows) return;  // uniform per CTA
    const unsigned short* xr = x + static_cast<long long>(row) * n;
    unsigned short* yr = y + static_cast<long long>(row) * n;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n; i += THREADS) {
        const float v = qk::from_in<kBF16>(xr[i]);
        acc = __fadd_rn(acc, __fmul_rn(v, v));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
    __syncthreads();
    float total = red[0];
#pragma unroll
    for (int k = 1; k < WARPS; ++k) total = __fadd_rn(total, red[k]);
    // each of /, sqrt, / in float64, rounded once to float32: the correctly rounded float32 result
    // (53 >= 2 * 24 + 2 bits: the double rounding is innocuous), with no float32 division or
    // square-root routine, whose slow paths carry flush-to-zero instructions
    const float var = __double2float_rn(__ddiv_rn(static_cast<double>(total), static_cast<double>(n)));
    const float root = __double2float_rn(__dsqrt_rn(static_cast<double>(__fadd_rn(var, eps))));
    const float r = __double2float_rn(__ddiv_rn(1.0, static_cast<double>(root)));
    for (int i = threadIdx.x; i < n; i += THREADS) {
        const float h = qk::from_in<kBF16>(qk::to_out<kBF16>(__fmul_rn(qk::from_in<kBF16>(xr[i]), r)));
        yr[i] = qk::to_out<kBF16>(__fmul_rn(qk::from_in<kBF16>(w[i]), h));
    }
}

}  // namespace qn

extern "C" __global__ void __launch_bounds__(qn::THREADS) rms_norm_f16(
    const unsigned short* x, const unsigned short* w, unsigned short* y, int rows, int n, float eps) {
    qn::rms_norm_row<false>(x, w, y, rows, n, eps);
}

extern "C" __global__ void __launch_bounds__(qn::THREADS) rms_norm_bf16(
    const unsigned short* x, const unsigned short* w, unsigned short* y, int rows, int n, float eps) {
    qn::rms_norm_row<true>(x, w, y, rows, n, eps);
}
