// The online Hadamard transform of ``--rotate hadamard+online`` (qconvert/online_hadamard.py):
// y = (x @ (A (x) H_p)) * scale over each row of x [M, n], n = m * p, p = 2^lp, A [m, m] +-1.
// Bit for bit qconvert_kernels/hadamard/reference.py (its docstring is the definition).
//
// One CTA per row.  The row is widened to float32 in shared memory (n * 4 bytes of dynamic
// shared memory; the launcher opts in above 48 KB), the lp butterfly stages run in place, one
// barrier after each (a stage's pairs are disjoint, so its threads never touch the same word),
// and the dense m x m factor reads the butterflies' result and writes y straight to global
// memory.  All index math is shifts and masks: no run-time integer division (whose reciprocal
// estimate would bring an F2I.FTZ instruction), no FMA (adds, subtracts, one multiply).
#include "../common.cuh"

namespace qh {

constexpr int THREADS = 256;

template <bool kBF16>
__device__ __forceinline__ void hadamard_row(const unsigned short* __restrict__ x, unsigned short* __restrict__ y,
                                             const signed char* __restrict__ sign, int M, int m, int lp,
                                             float scale) {
    extern __shared__ float buf[];
    const int row = blockIdx.x;
    if (row >= M) return;  // uniform per CTA
    const int n = m << lp;
    const unsigned short* xr = x + static_cast<long long>(row) * n;
    unsigned short* yr = y + static_cast<long long>(row) * n;
    for (int i = threadIdx.x; i < n; i += THREADS) buf[i] = qk::from_in<kBF16>(xr[i]);
    __syncthreads();
    // stage s: pair q (0 <= q < n / 2) is (i, i + 2^s), i = q with a zero bit inserted at bit s
    for (int s = 0; s < lp; ++s) {
        const int h = 1 << s;
        for (int q = threadIdx.x; q < (n >> 1); q += THREADS) {
            const int i = ((q >> s) << (s + 1)) | (q & (h - 1));
            const float u = buf[i], v = buf[i + h];
            buf[i] = __fadd_rn(u, v);
            buf[i + h] = __fsub_rn(u, v);
        }
        __syncthreads();
    }
    const int pmask = (1 << lp) - 1;
    for (int o = threadIdx.x; o < n; o += THREADS) {
        const int ap = o >> lp, b = o & pmask;
        float acc = 0.0f;
        for (int a = 0; a < m; ++a) {
            const float v = buf[(a << lp) | b];
            acc = sign[a * m + ap] > 0 ? __fadd_rn(acc, v) : __fsub_rn(acc, v);
        }
        yr[o] = qk::to_out<kBF16>(__fmul_rn(acc, scale));
    }
}

}  // namespace qh

extern "C" __global__ void __launch_bounds__(qh::THREADS) online_hadamard_f16(
    const unsigned short* x, unsigned short* y, const signed char* sign, int M, int m, int lp, float scale) {
    qh::hadamard_row<false>(x, y, sign, M, m, lp, scale);
}

extern "C" __global__ void __launch_bounds__(qh::THREADS) online_hadamard_bf16(
    const unsigned short* x, unsigned short* y, const signed char* sign, int M, int m, int lp, float scale) {
    qh::hadamard_row<true>(x, y, sign, M, m, lp, scale);
}
