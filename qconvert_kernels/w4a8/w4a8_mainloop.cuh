// The native-layout W4A8 main loop (64 x 64 CTA tile, register-staged, one shared stage),
// shared by w4a8_gemm.cu (both W4A8 GEMMs), quik_gemm.cu (the W4A4 s8 path) and illm_gemm.cu
// (DI-MatMul w4).  Device code only, no entry point; the fragment layout and the K permutation
// it relies on are written at the top of w4a8_gemm.cu.

#ifndef QCONVERT_KERNELS_W4A8_MAINLOOP_CUH
#define QCONVERT_KERNELS_W4A8_MAINLOOP_CUH

#include "../common.cuh"

namespace qk {

// CTA tile: 64 (M) x 64 (N), K staged 64 at a time; 4 warps in a 2 x 2 grid, each warp
// 32 (M) x 32 (N) = 2 m16 tiles x 4 n8 tiles = 8 mma per 32-wide k step.
constexpr int BM = 64;
constexpr int BN = 64;
constexpr int BK = 64;             // k per shared-memory stage (2 mma k steps)
constexpr int THREADS = 128;
constexpr int WM = 32;             // warp tile M
constexpr int WN = 32;             // warp tile N
constexpr int MT = WM / 16;        // m16 tiles per warp
constexpr int NT = WN / 8;         // n8 tiles per warp
constexpr int KSTEPS = BK / 32;    // mma k steps per stage
// Shared row strides (bytes), padded so the fragment loads are bank-conflict free:
//  A: 64 data bytes + 32 pad = 96 B = 24 words; a half warp's 64-bit loads (rows gid 0..3,
//     8 bytes at 8*tig) hit words 24*gid + 2*tig + {0,1}: banks {0-7, 24-31, 16-23, 8-15}.
//  B: 32 packed bytes + 16 pad = 48 B = 12 words; a warp's 32-bit loads (rows gid 0..7,
//     word tig) hit banks 12*gid + tig mod 32: all 32 distinct.
// Both strides are multiples of 16 so the 16-byte staging stores stay aligned.
constexpr int A_STRIDE = 96;
constexpr int B_STRIDE = 48;
constexpr int A_CHUNKS = BM * BK / 16;        // 16-byte pieces of an A stage (256)
constexpr int B_CHUNKS = BN * BK / 2 / 16;    // 16-byte pieces of a packed B stage (128)
constexpr int A_LOADS = A_CHUNKS / THREADS;   // per thread (2)
constexpr int B_LOADS = B_CHUNKS / THREADS;   // per thread (1)
static_assert(A_CHUNKS % THREADS == 0 && B_CHUNKS % THREADS == 0, "staging must split evenly");
static_assert(A_LOADS >= 1 && B_LOADS >= 1, "every thread loads");

// Global -> registers: this thread's 16-byte pieces of the A (xq) and packed B (qweight)
// stage starting at k0.  Rows past M / N and k past Kp read as zeros (zeros add nothing to P).
// Why registers: the next stage's loads are issued before the current stage's mma, so
// their latency hides behind the tensor-core work with a single shared buffer.
struct StageRegs {
    uint4 a[A_LOADS];
    uint4 b[B_LOADS];
};

__device__ __forceinline__ void load_stage(StageRegs& r, const signed char* __restrict__ xq,
                                           const unsigned char* __restrict__ qw, int bm, int bn,
                                           int k0, int M, int N, int Kp) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < A_LOADS; ++i) {
        const int idx = tid + i * THREADS;
        const int row = idx / (BK / 16);
        const int col = (idx % (BK / 16)) * 16;           // byte (= k) offset in the stage
        const int gm = bm + row, gk = k0 + col;
        r.a[i] = make_uint4(0u, 0u, 0u, 0u);
        if (gm < M && gk < Kp)                             // Kp % 32 == 0: all 16 bytes valid
            r.a[i] = *reinterpret_cast<const uint4*>(xq + static_cast<long long>(gm) * Kp + gk);
    }
#pragma unroll
    for (int i = 0; i < B_LOADS; ++i) {
        const int idx = tid + i * THREADS;
        const int row = idx / (BK / 32);
        const int col = (idx % (BK / 32)) * 16;           // packed byte offset in the stage
        const int gn = bn + row, gkb = k0 / 2 + col;
        r.b[i] = make_uint4(0u, 0u, 0u, 0u);
        if (gn < N && gkb < Kp / 2)
            r.b[i] = *reinterpret_cast<const uint4*>(qw + static_cast<long long>(gn) * (Kp / 2) + gkb);
    }
}

// Registers -> shared memory (16-byte stores into the padded rows).
__device__ __forceinline__ void store_stage(const StageRegs& r, unsigned char* sA, unsigned char* sB) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < A_LOADS; ++i) {
        const int idx = tid + i * THREADS;
        *reinterpret_cast<uint4*>(sA + (idx / (BK / 16)) * A_STRIDE + (idx % (BK / 16)) * 16) = r.a[i];
    }
#pragma unroll
    for (int i = 0; i < B_LOADS; ++i) {
        const int idx = tid + i * THREADS;
        *reinterpret_cast<uint4*>(sB + (idx / (BK / 32)) * B_STRIDE + (idx % (BK / 32)) * 16) = r.b[i];
    }
}

// The shared main loop of both GEMMs.  Per 32-wide k step: the warp's 8 mma accumulate the
// group partial P in registers; when the step closes a group (every g / 32 steps) `fold(j)`
// moves P into the layout's accumulator (int32 x iscale, or float x fp16 scale) and zeroes P.
// The accumulator arrays are indexed only by compile-time constants (all loops unrolled), so
// they live in registers: tests/test_kernels_compile.py checks the SASS has no LDL / STL.
template <typename Fold>
__device__ __forceinline__ void mainloop(const signed char* __restrict__ xq, const unsigned char* __restrict__ qw,
                                         int M, int N, int Kp, int group_size, int bm, int bn,
                                         int (&P)[MT][NT][4], Fold& fold) {
    __shared__ __align__(16) unsigned char sA[BM * A_STRIDE];  // xq stage   [64 rows][64 k] int8
    __shared__ __align__(16) unsigned char sB[BN * B_STRIDE];  // qw stage   [64 rows][64 k] packed int4

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int wm = (warp >> 1) * WM, wn = (warp & 1) * WN;    // warp tile origin in the CTA tile
    const int steps_per_group = group_size / 32;
    const int n_stages = (Kp + BK - 1) / BK;                  // last stage zero-padded if Kp % 64 == 32

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) P[mt][nt][i] = 0;

    int step = 0;   // k steps done in the current group
    int group = 0;  // current group j
    StageRegs regs;
    load_stage(regs, xq, qw, bm, bn, 0, M, N, Kp);
    for (int s = 0; s < n_stages; ++s) {
        store_stage(regs, sA, sB);
        __syncthreads();
        if (s + 1 < n_stages) load_stage(regs, xq, qw, bm, bn, (s + 1) * BK, M, N, Kp);
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks) {
            unsigned a[MT][4], b[NT][2];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const unsigned char* p = sA + (wm + mt * 16 + gid) * A_STRIDE + ks * 32 + 8 * tig;
                const uint2 lo = *reinterpret_cast<const uint2*>(p);                 // row gid
                const uint2 hi = *reinterpret_cast<const uint2*>(p + 8 * A_STRIDE);  // row gid + 8
                a[mt][0] = lo.x; a[mt][2] = lo.y;   // real k 8tig+0..3 / 8tig+4..7 (see top)
                a[mt][1] = hi.x; a[mt][3] = hi.y;
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                unpack_int4x8(*reinterpret_cast<const unsigned*>(sB + (wn + nt * 8 + gid) * B_STRIDE + ks * 16 + 4 * tig), b[nt]);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma_s8(P[mt][nt], a[mt], b[nt]);
            // A step past Kp (the zero half of the last stage when Kp % 64 == 32) added zeros
            // to P and must not count: with g == 32 it would otherwise fold a group G.
            if (s * BK + ks * 32 < Kp && ++step == steps_per_group) {
                fold(group, P);
                step = 0;
                ++group;
            }
        }
        __syncthreads();
    }
}

}  // namespace qk

#endif  // QCONVERT_KERNELS_W4A8_MAINLOOP_CUH
