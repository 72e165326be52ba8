// The gated activation of a Llama-family MLP, silu(gate) * up, fp16 / bf16, in one launch: what
// eager transformers runs as two kernels (act_fn(gate_proj(x)), then its product with up_proj(x)).
// qconvert_kernels/swiglu/reference.py is the definition; each step is the one torch's CUDA
// kernels take, rounded where theirs round:
//
//   s      = dtype(g / (1 + expf(-g)))        torch's silu: float math, one rounding to the dtype
//   out[i] = dtype(s * u)                     torch's product: float32 (exact for two dtype values)
//
// g / (1 + e) is IEEE division, correctly rounded, as torch's (built without fast math) is; it is
// computed here in float64 and rounded once to float32, which gives the correctly rounded float32
// quotient (53 >= 2 * 24 + 2 bits: the double rounding is innocuous) without the float32 division
// routine, whose slow path carries flush-to-zero instructions the build checks refuse.  expf is
// CUDA's own (libdevice, no fast math), the function torch's silu calls: equal to torch's result
// bit for bit on a GPU (tests/test_kernels_swiglu_gpu.py); no CPU computes CUDA's expf, so the CPU
// emulator and reference take float64 exp rounded to float32 in its place.
//
// Work split: CTA (m, y) takes row m and columns y * 256 .. y * 256 + 255 (the last CTA of a row
// its spare threads idle); thread i one column: three 16-bit accesses, coalesced along the row.
// Rows through their strides: gate and up may be the two halves of one joined gate/up GEMM.
// At batch 1 a Llama-3-8B MLP (I = 14336) is 56 CTAs.
#include "../common.cuh"

namespace qs {

constexpr int THREADS = 256;

template <bool kBF16>
__device__ __forceinline__ void swiglu_elem(const unsigned short* __restrict__ g, const unsigned short* __restrict__ u,
                                            unsigned short* __restrict__ out, int cols, long long gs, long long us,
                                            long long os) {
    const int col = blockIdx.y * THREADS + threadIdx.x;
    if (col >= cols) return;  // the last CTA of a row: its spare threads
    const long long m = blockIdx.x;
    const float x = qk::from_in<kBF16>(g[m * gs + col]);
    const float e = expf(-x);
    const float s = __double2float_rn(__ddiv_rn(static_cast<double>(x), static_cast<double>(__fadd_rn(1.0f, e))));
    const float h = qk::from_in<kBF16>(qk::to_out<kBF16>(s));  // silu's output in the dtype
    out[m * os + col] = qk::to_out<kBF16>(__fmul_rn(h, qk::from_in<kBF16>(u[m * us + col])));
}

}  // namespace qs

#define QS_ARGS                                                                                                      \
    const unsigned short *g /* [M, I] rows strided */, const unsigned short *u /* [M, I] rows strided */,            \
        unsigned short *out /* [M, I] rows strided */, int cols /* I */,                                             \
        long long gs, long long us, long long os /* the row strides of g, u and out, in elements */

extern "C" __global__ void __launch_bounds__(qs::THREADS) swiglu_f16(QS_ARGS) {
    qs::swiglu_elem<false>(g, u, out, cols, gs, us, os);
}

extern "C" __global__ void __launch_bounds__(qs::THREADS) swiglu_bf16(QS_ARGS) {
    qs::swiglu_elem<true>(g, u, out, cols, gs, us, os);
}
