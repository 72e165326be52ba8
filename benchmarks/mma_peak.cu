// The tensor-core ceiling of mma.sync on this GPU, for benchmarks/mma_peak.py: every warp issues
// CHAINS independent m16n8k32 int8 (IMMA) or m16n8k16 fp16 (HMMA, float accumulators) products per
// iteration, back to back, on register operands: no memory traffic in the loop, nothing but the
// products and the loop's own counter.  The W4A8 kernels (qconvert_kernels/w4a8) are built on
// mma.sync; cuBLAS on Hopper uses wgmma, which mma.sync cannot issue.  What the W4A8 prefill reaches
// is read against this ceiling, not the datasheet's (docs/kernels.md).

#include "../qconvert_kernels/common.cuh"

constexpr int CHAINS = 8;  // independent accumulators per warp: enough to cover the mma latency

// HMMA: D = A * B + C, m16n8k16, fp16 inputs, float32 accumulators (PTX ISA, "Matrix Fragments for
// mma.m16n8k16").
__device__ __forceinline__ void mma_f16(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Operands from the thread index and a seed (the compiler cannot fold them); every accumulator ends
// in out[] (nothing is dead code): IMMA's wrapping int32 sum, which mma_peak.py:imma_checksums
// predicts lane by lane (the GPU run compares), HMMA's float sum.  kInt: IMMA on int8, else HMMA
// on fp16 (finite values below 1).
template <bool kInt, typename Acc>
__device__ __forceinline__ void peak(Acc* __restrict__ out, int iters, unsigned seed) {
    const unsigned v0 = seed ^ (blockIdx.x * blockDim.x + threadIdx.x);
    const unsigned v = kInt ? v0 : v0 & 0x3BFF3BFFu;
    const unsigned a[4] = {v, v ^ 0x00010001u, v ^ 0x00020002u, v ^ 0x00030003u};
    const unsigned b[2] = {v ^ 0x00040004u, v ^ 0x00050005u};
    Acc c[CHAINS][4];
#pragma unroll
    for (int t = 0; t < CHAINS; ++t)
#pragma unroll
        for (int r = 0; r < 4; ++r) c[t][r] = Acc(0);
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int t = 0; t < CHAINS; ++t) {
            if constexpr (kInt) qk::mma_s8(c[t], a, b);
            else mma_f16(c[t], a, b);
        }
    }
    Acc s = Acc(0);
#pragma unroll
    for (int t = 0; t < CHAINS; ++t)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            if constexpr (kInt) s = static_cast<int>(static_cast<unsigned>(s) + static_cast<unsigned>(c[t][r]));
            else s = __fadd_rn(s, c[t][r]);
        }
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// grid: any; block: 256.
extern "C" __global__ void __launch_bounds__(256) imma_peak(int* __restrict__ out, int iters, unsigned seed) {
    peak<true>(out, iters, seed);
}
extern "C" __global__ void __launch_bounds__(256) hmma_peak(float* __restrict__ out, int iters, unsigned seed) {
    peak<false>(out, iters, seed);
}
