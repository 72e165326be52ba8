// The online Hadamard transform of ``--rotate hadamard+online`` (qconvert/online_hadamard.py):
// y = (x @ (A (x) H_p)) * scale over each row of x [M, n], n = m * p, p = 2^lp, A [m, m] +-1.
// Bit for bit qconvert_kernels/hadamard/reference.py (its docstring is the definition).
//
// Grid (M, C): CTA (row, c) reads its row whole and widens it to float32 in shared memory (n * 4
// bytes of dynamic shared memory; the launcher opts in above 48 KB), runs all lp butterfly stages
// on it, then writes the outputs of A's column chunks j = c, c + C, ... (R = 8 columns a chunk):
// the C CTAs of a row share the dense m x m factor, the part that grows as m * n (the first
// kernel, one CTA a row and one output a thread, took 47 us for one row of 14336 on an H200).
//
// - Butterflies, up to three stages per pass (one barrier a pass, not a stage): a thread takes
//   2^S words i0 + r * 2^s0 into registers and runs stages s0 .. s0 + S - 1 on them, the same
//   (u + v, u - v) on the same pairs as stage by stage.  With lp >= 3 the first pass is fused into
//   the load: eight consecutive inputs are one 16-byte load and stages 0 .. 2 among themselves.
// - Dense factor: one work item is (chunk, column b), b fastest; it keeps R accumulators and for
//   a = 0 .. m - 1 in order adds t[a, b] times A[a, jR .. jR + 7] from ``table``, A as float32
//   rows padded with zeros to a multiple of R columns (two 16-byte loads, uniform across a warp
//   when p >= 32).  fmaf(t, +-1, acc) is acc +- t with one rounding: the reference's addcmul.
// All index math is shifts and masks: no run-time integer division, no contraction of the
// butterflies (explicit __fadd_rn / __fsub_rn).
#include "../common.cuh"

namespace qh {

constexpr int THREADS = 256;
constexpr int R = 8;  // A's columns per chunk: accumulators per work item
static_assert(R == 8, "the chunk index math shifts by 3");

// stages s0 .. s0 + S - 1 on the 2^S words v[r] = t[i0 + r * 2^s0]: stage s0 + u pairs r and
// r + 2^u (bit u of r clear)
template <int S>
__device__ __forceinline__ void stages(float (&v)[1 << S]) {
#pragma unroll
    for (int u = 0; u < S; ++u) {
#pragma unroll
        for (int r = 0; r < (1 << S); ++r) {
            if (r & (1 << u)) continue;
            const float a = v[r], b = v[r + (1 << u)];
            v[r] = __fadd_rn(a, b);
            v[r + (1 << u)] = __fsub_rn(a, b);
        }
    }
}

// one pass over the shared row: groups q = 0 .. n / 2^S - 1, i0 = q with S zero bits inserted at s0
template <int S>
__device__ __forceinline__ void pass(float* buf, int n, int s0) {
    const int h = 1 << s0;
    for (int q = threadIdx.x; q < (n >> S); q += THREADS) {
        const int i0 = ((q >> s0) << (s0 + S)) | (q & (h - 1));
        float v[1 << S];
#pragma unroll
        for (int r = 0; r < (1 << S); ++r) v[r] = buf[i0 + r * h];
        stages<S>(v);
#pragma unroll
        for (int r = 0; r < (1 << S); ++r) buf[i0 + r * h] = v[r];
    }
}

template <bool kBF16>
__device__ __forceinline__ void hadamard_row(const unsigned short* __restrict__ x, unsigned short* __restrict__ y,
                                             const float* __restrict__ table, int M, int m, int lp,
                                             float scale) {
    extern __shared__ float buf[];
    const int row = blockIdx.x;
    if (row >= M) return;  // uniform per CTA
    const int n = m << lp;
    const unsigned short* xr = x + static_cast<long long>(row) * n;
    unsigned short* yr = y + static_cast<long long>(row) * n;
    int s = 0;
    if (lp >= 3) {  // n is a multiple of 8: eight inputs a 16-byte load, stages 0 .. 2 in registers
        const uint4* x8 = reinterpret_cast<const uint4*>(xr);
        for (int g = threadIdx.x; g < (n >> 3); g += THREADS) {
            const uint4 w = x8[g];
            const unsigned int u[4] = {w.x, w.y, w.z, w.w};
            float v[8];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                v[2 * r] = qk::from_in<kBF16>(static_cast<unsigned short>(u[r] & 0xFFFFu));
                v[2 * r + 1] = qk::from_in<kBF16>(static_cast<unsigned short>(u[r] >> 16));
            }
            stages<3>(v);
            float4* b4 = reinterpret_cast<float4*>(buf + (g << 3));
            b4[0] = make_float4(v[0], v[1], v[2], v[3]);
            b4[1] = make_float4(v[4], v[5], v[6], v[7]);
        }
        s = 3;
    } else {
        for (int i = threadIdx.x; i < n; i += THREADS) buf[i] = qk::from_in<kBF16>(xr[i]);
    }
    __syncthreads();
    for (; s + 3 <= lp; s += 3) {
        pass<3>(buf, n, s);
        __syncthreads();
    }
    if (lp - s == 2) {
        pass<2>(buf, n, s);
        __syncthreads();
    } else if (lp - s == 1) {
        pass<1>(buf, n, s);
        __syncthreads();
    }

    // dense factor: the chunks c, c + C, ... of this CTA as (chunk, column) items, column fastest;
    // C = 2^cl CTAs a row (the launcher keeps C a power of two and at most the chunk count)
    const int c = blockIdx.y, cl = __ffs(gridDim.y) - 1;
    const int chunks = (m + R - 1) >> 3;                       // R = 8
    const int mine = (chunks - c + (1 << cl) - 1) >> cl;       // chunks c + k * C below `chunks`
    const int mp = chunks << 3;                                // the table's padded row length
    const int pmask = (1 << lp) - 1;
    for (int w = threadIdx.x; w < (mine << lp); w += THREADS) {
        const int b = w & pmask, j = c + ((w >> lp) << cl);
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = 0.0f;
        // t[a, b] = buf[(a << lp) | b] and A[a, 8j ..] = table[a * mp + 8j ..], walked by pointer
        const float* tp = table + (j << 3);
        const float* bp = buf + b;
#pragma unroll 2
        for (int a = 0; a < m; ++a, tp += mp, bp += (1 << lp)) {
            const float v = *bp;
            const float4 s0 = __ldg(reinterpret_cast<const float4*>(tp));
            const float4 s1 = __ldg(reinterpret_cast<const float4*>(tp + 4));
            acc[0] = __fmaf_rn(v, s0.x, acc[0]);
            acc[1] = __fmaf_rn(v, s0.y, acc[1]);
            acc[2] = __fmaf_rn(v, s0.z, acc[2]);
            acc[3] = __fmaf_rn(v, s0.w, acc[3]);
            acc[4] = __fmaf_rn(v, s1.x, acc[4]);
            acc[5] = __fmaf_rn(v, s1.y, acc[5]);
            acc[6] = __fmaf_rn(v, s1.z, acc[6]);
            acc[7] = __fmaf_rn(v, s1.w, acc[7]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int ap = (j << 3) + r;
            if (ap < m) yr[(ap << lp) | b] = qk::to_out<kBF16>(__fmul_rn(acc[r], scale));
        }
    }
}

}  // namespace qh

extern "C" __global__ void __launch_bounds__(qh::THREADS) online_hadamard_f16(
    const unsigned short* x, unsigned short* y, const float* table, int M, int m, int lp, float scale) {
    qh::hadamard_row<false>(x, y, table, M, m, lp, scale);
}

extern "C" __global__ void __launch_bounds__(qh::THREADS) online_hadamard_bf16(
    const unsigned short* x, unsigned short* y, const float* table, int M, int m, int lp, float scale) {
    qh::hadamard_row<true>(x, y, table, M, m, lp, scale);
}
