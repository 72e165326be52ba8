// ZeroQuant-FP GEMM kernels of qconvert: FP8 (E4M3) activations x FP4 (E2M1) or FP8 (E4M3)
// weights on FP8 tensor cores (sm_89 / sm_90).
//
// The arithmetic is the one of qconvert_kernels/reference_fp8.py (docs/format.md, layouts
// fp4-fp8 and fp8-fp8):
//
//   xq e4m3 [M, Kp]   per-token activations, t float32 [M]            (quantize_per_token_fp8_*)
//   fp4_fp8_gemm_*  (layout fp4-fp8): qw uint8 [N, Kp/2] packed E2M1 codes, low nibble = even k;
//                    sexp int8 [N, G] group exponents; cscale float32 [N]
//     P[j, m, n] = sum_{k in group j} xq[m, k] * w[n, k]        (FP8 tensor cores, f32 accumulator,
//                                                                  zeroed at every group start)
//     acc = 0; for j = 0..G-1: acc = acc + P[j] * 2^sexp[n, j]  (float32; the product is exact)
//     y[m, n] = acc * (t[m] * cscale[n])                        (float32, each product rounded)
//   fp8_fp8_gemm_*  (layout fp8-fp8): qw e4m3 [N, Kp], Kp % 64 == 0, wscale float32 [N]
//     P[c, m, n] = sum_{k in chunk c of 64} xq[m, k] * qw[n, k]    (tensor cores, zeroed per chunk)
//     acc = 0; for c: acc = acc + P[c]                             (float32, in k order)
//     y[m, n] = acc * (t[m] * wscale[n])
//     Why chunks: the FP8 tensor cores' accumulator is not a full float32 adder (PTX leaves it
//     unspecified); moving it into a float32 sum every 64 k (one shared stage) bounds its error
//     by 64 products whatever K is, and gives the reference an order to reproduce.
//   then y is rounded to fp16 / bf16 (round to nearest even).
//
// Exactness.  Each E4M3 x E4M3 product is exact in float32, and everything after P is written
// with __fmul_rn / __fadd_rn (never contracted into an FMA) in the reference's order.  P itself
// comes out of the tensor cores, whose internal accumulation (alignment, truncation of the
// partial sums) PTX does not specify, so P may differ from the reference's exactly computed,
// once-rounded P in its last bits; the GPU tests state the tolerance (reference_fp8.py).
// The power-of-two group scale is why the group fold adds no error of its own: P * 2^e is
// exact, so the fold rounds once, as the reference does.
//
// FP4 -> FP8 in registers.  Every E2M1 value is an E4M3 value: code s e1 e0 m (bias 1) is the
// E4M3 byte s (e + 6) m 0 0 (bias 7) for e >= 1, 0.5 = s 0110 000, 0 = 0.  The weight is widened
// with no scale folded in (the group's 2^e is applied to the group partial in float instead:
// folding it into the exponent would overflow E4M3's 4-bit exponent for large |e|).
//
// No system header is included (no cuda_fp8.h): E4M3 is carried as bytes and converted with the
// cvt.rn.satfinite.e4m3x2.f32 PTX instruction; the only include is ../common.cuh (inlined for
// NVRTC by compile.py:kernel_source).
//
// Requirements (checked by the launcher, qconvert_kernels/cuda_fp8.py): sm_89 or newer (FP8 mma
// and the e4m3 cvt do not exist on sm_80: compiling for it stops at the #error below); group
// size a multiple of 32 (the mma K); Kp a multiple of the group size (fp4-fp8) or of 64
// (fp8-fp8); operands contiguous row-major and 16-byte aligned.  M and N are arbitrary.
//
// ---------------------------------------------------------------------------------------
// Fragment layout of mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 (PTX ISA, "Matrix
// fragments for mma.m16n8k32": the 8-bit types .s8/.u8/.e4m3/.e5m2 share one layout), with
// lane = threadIdx.x % 32, gid = lane >> 2, tig = lane & 3:
//
//   A (16 x 32, row major), 4 x .b32, 4 bytes each (byte 0 = lowest column):
//     a0 = A[gid][4tig + 0..3]        a1 = A[gid + 8][4tig + 0..3]
//     a2 = A[gid][16 + 4tig + 0..3]   a3 = A[gid + 8][16 + 4tig + 0..3]
//   B (32 x 8, "col"), 2 x .b32:  b0 = B[4tig + 0..3][gid]   b1 = B[16 + 4tig + 0..3][gid]
//   C / D (16 x 8, f32), 4 registers:
//     c0 = C[gid][2tig]  c1 = C[gid][2tig + 1]  c2 = C[gid + 8][2tig]  c3 = C[gid + 8][2tig + 1]
//
// K permutation (as in w4a8_gemm.cu).  A dot product over the 32 k of one mma does not depend
// on the order of k, so thread tig feeds real k 8tig + 0..3 as mma k 4tig + 0..3 and real k
// 8tig + 4..7 as mma k 16 + 4tig + 0..3: it then needs 8 contiguous k of each of its rows, one
// 64-bit shared load per A row (and per B row in fp8-fp8), one 32-bit load of packed FP4.
// (The tensor cores may add the 32 products in another order than unpermuted k would; the
// exact value is the same, only the unspecified rounding inside the mma can see the order.)
// ---------------------------------------------------------------------------------------

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
#error "fp8_gemm.cu needs sm_89 or newer (FP8 tensor-core mma, e4m3 cvt); use the int8 kernels of w4a8_gemm.cu on sm_80"
#endif

#include "../common.cuh"

namespace zq {

// Work split.  One CTA per 64 x 64 output tile, grid (ceil(N / 64), ceil(M / 64)); each CTA
// walks all of K (no split-K: every output is summed in one place, in k order):
//
//                 N (weight rows) ->   bn      bn+32    bn+64
//        M          +----------------+--------+--------+
//   (tokens)   bm   | y tile 64 x 64 | warp 0 | warp 1 |    each warp: 32 x 32 outputs =
//        |          |                +--------+--------+    2 (m16) x 4 (n8) mma tiles,
//        v     bm+32|                | warp 2 | warp 3 |    4 f32 accumulators per tile per lane
//                   +----------------+--------+--------+
//
//   per stage (BK = 64 k): xq [64 x 64] bytes and the weights [64 x 64] (fp8) or [64 x 32]
//   packed bytes (fp4) go global -> registers -> shared; 2 k steps of 8 mma per warp; a group
//   (fp4-fp8) or a chunk of 64 k (fp8-fp8) closes -> fold into the float32 accumulators.
//
// CTA tile 64 (M) x 64 (N), K staged 64 at a time; 4 warps in 2 x 2, each warp 32 x 32 =
// 2 m16 tiles x 4 n8 tiles = 8 mma per 32-wide k step.  The same tile as the int8 kernels:
// the operand bytes per k step are the same (A: 1 byte per k; packed B: half a byte).
constexpr int BM = 64;
constexpr int BN = 64;
constexpr int BK = 64;
constexpr int THREADS = 128;
constexpr int WM = 32;
constexpr int WN = 32;
constexpr int MT = WM / 16;
constexpr int NT = WN / 8;
constexpr int KSTEPS = BK / 32;
// Shared row strides (bytes), padded so the fragment loads are bank-conflict free (the
// arithmetic is in w4a8_gemm.cu): 8-bit rows 64 + 32 pad = 96 B, packed rows 32 + 16 = 48 B.
constexpr int A_STRIDE = 96;
constexpr int B4_STRIDE = 48;
constexpr int A_CHUNKS = BM * BK / 16;       // 16-byte pieces of an 8-bit stage (256)
constexpr int B4_CHUNKS = BN * BK / 2 / 16;  // 16-byte pieces of a packed FP4 stage (128)
constexpr int A_LOADS = A_CHUNKS / THREADS;  // 2 per thread
constexpr int B4_LOADS = B4_CHUNKS / THREADS;  // 1 per thread
static_assert(A_CHUNKS % THREADS == 0 && B4_CHUNKS % THREADS == 0, "staging must split evenly");

// One m16n8k32 FP8 tensor-core product, C += A * B in the f32 accumulator.
__device__ __forceinline__ void mma_e4m3(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 8 packed E2M1 codes (nibble i = real k 8tig + i) -> 8 E4M3 bytes in k order, b0 = k 0..3,
// b1 = k 4..7.  Why this way: the magnitude (3 bits, 8 values) is a table lookup that PRMT
// does for 4 bytes at once — the table {0x00, 0x30, 0x38, 0x3C, 0x40, 0x44, 0x48, 0x4C} (0, 0.5,
// 1, 1.5, 2, 3, 4, 6 in E4M3) sits in two registers and each selector nibble is a code with its
// sign bit cleared (a set bit 3 would make PRMT replicate the sign of the byte instead).  The
// sign comes from the nibble split of w4a8_gemm.cu: after it, byte i holds 0000 s e e m, and
// a shift by 4 moves s to bit 7 of the same byte.
__device__ __forceinline__ void fp4x8_to_e4m3(unsigned w, unsigned (&b)[2]) {
    constexpr unsigned T_LO = 0x3C383000u;                 // codes 0..3 -> bytes 0..3
    constexpr unsigned T_HI = 0x4C484440u;                 // codes 4..7 -> bytes 4..7
    const unsigned lo = w & 0x0F0F0F0Fu;                   // bytes: n0 n2 n4 n6
    const unsigned hi = (w >> 4) & 0x0F0F0F0Fu;            // bytes: n1 n3 n5 n7
    const unsigned e0 = __byte_perm(lo, hi, 0x5140);       // bytes: n0 n1 n2 n3
    const unsigned e1 = __byte_perm(lo, hi, 0x7362);       // bytes: n4 n5 n6 n7
    b[0] = __byte_perm(T_LO, T_HI, w & 0x7777u) | ((e0 << 4) & 0x80808080u);
    b[1] = __byte_perm(T_LO, T_HI, (w >> 16) & 0x7777u) | ((e1 << 4) & 0x80808080u);
}

// fp16 / bf16 conversions, the pair store and the IEEE reciprocal / quotient: ../common.cuh.
using qk::from_in;
using qk::store_pair;
using qk::to_out;

// float -> E4M3 byte, round to nearest even, saturating to +-448 (satfinite); NaN stays NaN.
// cvt converts a pair into two bytes of one 16-bit register; the value goes in as both sources,
// so the low byte is it whichever source the hardware puts there.
__device__ __forceinline__ unsigned char f32_to_e4m3(float f) {
    unsigned short pair;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %1;" : "=h"(pair) : "f"(f));
    return static_cast<unsigned char>(pair & 0xFF);
}

// 2^e as a float, exactly (e in [-126, 127]; the stored exponents are in [-64, 63]).
__device__ __forceinline__ float exp2_int(int e) { return __int_as_float((127 + e) << 23); }

// Global -> registers: this thread's 16-byte pieces of the stage at k0 (zeros past M / N / Kp).
// Why registers: the next stage's loads are issued before the current stage's mma, so their
// latency hides behind the tensor-core work with a single shared buffer.
template <bool kFP4>
struct StageRegs {
    uint4 a[A_LOADS];
    uint4 b[kFP4 ? B4_LOADS : A_LOADS];
};

// 16-byte pieces of a [rows, BK] 8-bit tile (xq, or fp8 weights) starting at (r0, k0).
__device__ __forceinline__ void load_bytes(uint4 (&r)[A_LOADS], const unsigned char* __restrict__ src,
                                           int r0, int k0, int rows, int Kp) {
#pragma unroll
    for (int i = 0; i < A_LOADS; ++i) {
        const int idx = threadIdx.x + i * THREADS;
        const int row = idx / (BK / 16), col = (idx % (BK / 16)) * 16;
        const int gr = r0 + row, gk = k0 + col;
        r[i] = make_uint4(0u, 0u, 0u, 0u);
        if (gr < rows && gk < Kp)  // Kp % 32 == 0: all 16 bytes valid
            r[i] = *reinterpret_cast<const uint4*>(src + static_cast<long long>(gr) * Kp + gk);
    }
}

template <bool kFP4>
__device__ __forceinline__ void load_stage(StageRegs<kFP4>& r, const unsigned char* __restrict__ xq,
                                           const unsigned char* __restrict__ qw, int bm, int bn, int k0,
                                           int M, int N, int Kp) {
    load_bytes(r.a, xq, bm, k0, M, Kp);
    if constexpr (kFP4) {
#pragma unroll
        for (int i = 0; i < B4_LOADS; ++i) {
            const int idx = threadIdx.x + i * THREADS;
            const int row = idx / (BK / 32), col = (idx % (BK / 32)) * 16;  // packed byte offset
            const int gn = bn + row, gkb = k0 / 2 + col;
            r.b[i] = make_uint4(0u, 0u, 0u, 0u);
            if (gn < N && gkb < Kp / 2)
                r.b[i] = *reinterpret_cast<const uint4*>(qw + static_cast<long long>(gn) * (Kp / 2) + gkb);
        }
    } else {
        load_bytes(r.b, qw, bn, k0, N, Kp);
    }
}

template <bool kFP4>
__device__ __forceinline__ void store_stage(const StageRegs<kFP4>& r, unsigned char* sA, unsigned char* sB) {
#pragma unroll
    for (int i = 0; i < A_LOADS; ++i) {
        const int idx = threadIdx.x + i * THREADS;
        *reinterpret_cast<uint4*>(sA + (idx / (BK / 16)) * A_STRIDE + (idx % (BK / 16)) * 16) = r.a[i];
    }
    if constexpr (kFP4) {
#pragma unroll
        for (int i = 0; i < B4_LOADS; ++i) {
            const int idx = threadIdx.x + i * THREADS;
            *reinterpret_cast<uint4*>(sB + (idx / (BK / 32)) * B4_STRIDE + (idx % (BK / 32)) * 16) = r.b[i];
        }
    } else {
#pragma unroll
        for (int i = 0; i < A_LOADS; ++i) {
            const int idx = threadIdx.x + i * THREADS;
            *reinterpret_cast<uint4*>(sB + (idx / (BK / 16)) * A_STRIDE + (idx % (BK / 16)) * 16) = r.b[i];
        }
    }
}

// The main loop of both GEMMs.  Per 32-wide k step the warp's 8 mma accumulate P in registers;
// when a step closes a group (every group_size / 32 steps) `fold(j, P)` moves P into the
// layout's accumulator and zeroes it (fp8-fp8 passes group_size = 64: a fold per stage).
// All register arrays are indexed by compile-time constants only (loops unrolled), so they stay
// in registers: tests/test_kernels_fp8_compile.py checks the SASS has no LDL / STL.
template <bool kFP4, typename Fold>
__device__ __forceinline__ void mainloop(const unsigned char* __restrict__ xq, const unsigned char* __restrict__ qw,
                                         int M, int N, int Kp, int group_size, int bm, int bn,
                                         float (&P)[MT][NT][4], Fold& fold) {
    __shared__ __align__(16) unsigned char sA[BM * A_STRIDE];                          // xq stage [64][64] e4m3
    __shared__ __align__(16) unsigned char sB[BN * (kFP4 ? B4_STRIDE : A_STRIDE)];     // weight stage [64][64]

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int wm = (warp >> 1) * WM, wn = (warp & 1) * WN;
    const int steps_per_group = group_size / 32;
    const int n_stages = (Kp + BK - 1) / BK;  // the last stage is zero-padded if Kp % 64 == 32

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) P[mt][nt][i] = 0.0f;

    int step = 0, group = 0;
    StageRegs<kFP4> regs;
    load_stage<kFP4>(regs, xq, qw, bm, bn, 0, M, N, Kp);
    for (int s = 0; s < n_stages; ++s) {
        store_stage<kFP4>(regs, sA, sB);
        __syncthreads();
        if (s + 1 < n_stages) load_stage<kFP4>(regs, xq, qw, bm, bn, (s + 1) * BK, M, N, Kp);
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks) {
            unsigned a[MT][4], b[NT][2];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const unsigned char* p = sA + (wm + mt * 16 + gid) * A_STRIDE + ks * 32 + 8 * tig;
                const uint2 lo = *reinterpret_cast<const uint2*>(p);                 // row gid
                const uint2 hi = *reinterpret_cast<const uint2*>(p + 8 * A_STRIDE);  // row gid + 8
                a[mt][0] = lo.x; a[mt][2] = lo.y;  // real k 8tig+0..3 / 8tig+4..7 (see top)
                a[mt][1] = hi.x; a[mt][3] = hi.y;
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                if constexpr (kFP4) {
                    fp4x8_to_e4m3(*reinterpret_cast<const unsigned*>(sB + (wn + nt * 8 + gid) * B4_STRIDE + ks * 16 + 4 * tig), b[nt]);
                } else {
                    const uint2 w = *reinterpret_cast<const uint2*>(sB + (wn + nt * 8 + gid) * A_STRIDE + ks * 32 + 8 * tig);
                    b[nt][0] = w.x;  // real k 8tig+0..3 of column gid
                    b[nt][1] = w.y;  // real k 8tig+4..7
                }
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma_e4m3(P[mt][nt], a[mt], b[nt]);
            // a step past Kp (the zero half of the last stage) must not count towards a group
            if (s * BK + ks * 32 < Kp && ++step == steps_per_group) {
                fold(group, P);
                step = 0;
                ++group;
            }
        }
        __syncthreads();
    }
}

// fp4-fp8 fold: acc = acc + P * 2^e[n, j] (exact product, one rounding), in group order.
// The next group's exponents are prefetched into registers right after a fold.
struct FoldPow2 {
    float acc[MT][NT][4];
    float sc[NT][2];                        // 2^sexp[col, group] of this thread's 8 columns
    const signed char* __restrict__ sexp;   // int8 [N, G]
    int N, G, col0;                         // col0: this thread's first column (nt = 0, +0)

    __device__ __forceinline__ void load_scales(int j) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int n = col0 + nt * 8 + h;
                sc[nt][h] = (n < N && j < G) ? exp2_int(__ldg(sexp + static_cast<long long>(n) * G + j)) : 0.0f;
            }
    }
    __device__ __forceinline__ void operator()(int j, float (&P)[MT][NT][4]) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {  // c0/c2: column 2tig, c1/c3: column 2tig + 1
                    acc[mt][nt][i] = __fadd_rn(acc[mt][nt][i], __fmul_rn(P[mt][nt][i], sc[nt][i & 1]));
                    P[mt][nt][i] = 0.0f;
                }
        load_scales(j + 1);
    }
};

// fp8-fp8 fold, every 64 k (group_size = BK): acc = acc + P (one rounding), in k order.
struct FoldSum {
    float acc[MT][NT][4];
    __device__ __forceinline__ void operator()(int, float (&P)[MT][NT][4]) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    acc[mt][nt][i] = __fadd_rn(acc[mt][nt][i], P[mt][nt][i]);
                    P[mt][nt][i] = 0.0f;
                }
    }
};

// Epilogue shared by both layouts: y = acc * (t[m] * scale[n]), each product rounded.
template <bool kBF16>
__device__ __forceinline__ void epilogue(const float (&acc)[MT][NT][4], const float* __restrict__ t,
                                         const float* __restrict__ scale, unsigned short* __restrict__ y,
                                         int M, int N, int bm, int bn) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int wm = (warp >> 1) * WM, wn = (warp & 1) * WN;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int n = bn + wn + nt * 8 + 2 * tig;
        const float s0 = n < N ? __ldg(scale + n) : 0.0f;
        const float s1 = n + 1 < N ? __ldg(scale + n + 1) : 0.0f;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // h = 0: row gid (c0, c1); 1: row gid + 8 (c2, c3)
                const int m = bm + wm + mt * 16 + gid + 8 * h;
                if (m >= M || n >= N) continue;
                const float tm = __ldg(t + m);
                const float y0 = __fmul_rn(acc[mt][nt][2 * h], __fmul_rn(tm, s0));
                const float y1 = __fmul_rn(acc[mt][nt][2 * h + 1], __fmul_rn(tm, s1));
                store_pair(y, m, n, N, to_out<kBF16>(y0), to_out<kBF16>(y1));
            }
    }
}

template <bool kBF16>
__device__ __forceinline__ void fp4_gemm(const unsigned char* __restrict__ xq, const float* __restrict__ t,
                                         const unsigned char* __restrict__ qw, const signed char* __restrict__ sexp,
                                         const float* __restrict__ cscale, unsigned short* __restrict__ y,
                                         int M, int N, int Kp, int group_size) {
    const int bm = blockIdx.y * BM, bn = blockIdx.x * BN;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    FoldPow2 fold;
    fold.sexp = sexp;
    fold.N = N;
    fold.G = qk::udiv_u32(Kp, group_size);  // integer-only division (no FTZ helper code)
    fold.col0 = bn + (warp & 1) * WN + 2 * (lane & 3);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) fold.acc[mt][nt][i] = 0.0f;
    fold.load_scales(0);
    float P[MT][NT][4];
    mainloop<true>(xq, qw, M, N, Kp, group_size, bm, bn, P, fold);
    epilogue<kBF16>(fold.acc, t, cscale, y, M, N, bm, bn);
}

template <bool kBF16>
__device__ __forceinline__ void fp8_gemm(const unsigned char* __restrict__ xq, const float* __restrict__ t,
                                         const unsigned char* __restrict__ qw, const float* __restrict__ wscale,
                                         unsigned short* __restrict__ y, int M, int N, int Kp) {
    const int bm = blockIdx.y * BM, bn = blockIdx.x * BN;
    FoldSum fold;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) fold.acc[mt][nt][i] = 0.0f;
    float P[MT][NT][4];
    mainloop<false>(xq, qw, M, N, Kp, BK, bm, bn, P, fold);  // a chunk of 64 k = one stage
    epilogue<kBF16>(fold.acc, t, wscale, y, M, N, bm, bn);
}

// Per-token FP8 quantizer, one CTA of QUANT_THREADS per row:
//   amax = max_k |x[m, k]| (a max is exact in any order), inv = rn(rn(1 / amax) * 448) (0 for
//   amax == 0): what torch computes for `448 / tensor`, not the correctly rounded quotient;
//   xq = e4m3(clamp(rn(x * inv), -448, 448)) (cvt.rn.satfinite), t = rn(amax / 448);
//   columns K..Kp-1 of xq are 0.  (NaN inputs are not supported: fmaxf drops them.)
constexpr int QUANT_THREADS = 256;

template <bool kBF16>
__device__ __forceinline__ void quantize_row(const unsigned short* __restrict__ x, unsigned char* __restrict__ xq,
                                             float* __restrict__ t, int M, int K, int Kp) {
    __shared__ float warp_max[QUANT_THREADS / 32];
    const int m = blockIdx.x;
    if (m >= M) return;  // uniform per CTA
    const unsigned short* xr = x + static_cast<long long>(m) * K;
    unsigned char* qr = xq + static_cast<long long>(m) * Kp;

    float amax = 0.0f;
    for (int k = threadIdx.x; k < K; k += QUANT_THREADS) amax = fmaxf(amax, fabsf(from_in<kBF16>(xr[k])));
    // a warp reduces its 32 maxima with shuffles, the 8 warp maxima meet in shared memory
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = warp_max[0];
#pragma unroll
    for (int w = 1; w < QUANT_THREADS / 32; ++w) amax = fmaxf(amax, warp_max[w]);

    const float inv = amax > 0.0f ? __fmul_rn(qk::rcp_rn(amax), 448.0f) : 0.0f;
    for (int k = threadIdx.x; k < Kp; k += QUANT_THREADS) {
        unsigned char q = 0;
        if (k < K) q = f32_to_e4m3(fminf(fmaxf(__fmul_rn(from_in<kBF16>(xr[k]), inv), -448.0f), 448.0f));
        qr[k] = q;
    }
    if (threadIdx.x == 0) t[m] = qk::div_rn(amax, 448.0f);
}

}  // namespace zq

// ---------------------------------------------------------------------------------------
// Entry points (extern "C": unmangled names for cupy.RawModule.get_function).
// GEMMs: grid (ceil(N / 64), ceil(M / 64)), block 128, no dynamic shared memory.
// ---------------------------------------------------------------------------------------

#define ZQ_FP4_GEMM(NAME, BF16)                                                                        \
    extern "C" __global__ void __launch_bounds__(zq::THREADS, 1) NAME(                                  \
        const unsigned char* __restrict__ xq,   /* e4m3 [M, Kp], row-major, 16-byte aligned */           \
        const float* __restrict__ t,            /* float32 [M], per-token scale */                      \
        const unsigned char* __restrict__ qw,   /* uint8 [N, Kp/2], packed E2M1, low nibble = even k */ \
        const signed char* __restrict__ sexp,   /* int8 [N, G], group exponents, G = Kp / group_size */ \
        const float* __restrict__ cscale,       /* float32 [N], per-channel scale */                    \
        unsigned short* __restrict__ y,         /* fp16 / bf16 bits [M, N] */                           \
        int M, int N,                           /* rows of xq / y; rows of qw = columns of y */         \
        int Kp,                                 /* padded K, a multiple of group_size */                \
        int group_size) {                       /* g, a multiple of 32 */                               \
        zq::fp4_gemm<BF16>(xq, t, qw, sexp, cscale, y, M, N, Kp, group_size);                          \
    }

#define ZQ_FP8_GEMM(NAME, BF16)                                                                        \
    extern "C" __global__ void __launch_bounds__(zq::THREADS, 1) NAME(                                  \
        const unsigned char* __restrict__ xq,   /* e4m3 [M, Kp], row-major, 16-byte aligned */           \
        const float* __restrict__ t,            /* float32 [M], per-token scale */                      \
        const unsigned char* __restrict__ qw,   /* e4m3 [N, Kp], row-major, 16-byte aligned */           \
        const float* __restrict__ wscale,       /* float32 [N], per-channel scale */                    \
        unsigned short* __restrict__ y,         /* fp16 / bf16 bits [M, N] */                           \
        int M, int N,                                                                                   \
        int Kp) {                               /* padded K, a multiple of 64 */                        \
        zq::fp8_gemm<BF16>(xq, t, qw, wscale, y, M, N, Kp);                                            \
    }

// Launch: grid (M), block zq::QUANT_THREADS (256), no dynamic shared memory.
#define ZQ_QUANT(NAME, BF16)                                                                           \
    extern "C" __global__ void __launch_bounds__(zq::QUANT_THREADS) NAME(                               \
        const unsigned short* __restrict__ x,   /* fp16 / bf16 bits [M, K], row-major */                \
        unsigned char* __restrict__ xq,         /* e4m3 [M, Kp] out, columns K..Kp-1 = 0 */             \
        float* __restrict__ t,                  /* float32 [M] out, amax / 448 */                       \
        int M, int K, int Kp) {                 /* Kp >= K */                                           \
        zq::quantize_row<BF16>(x, xq, t, M, K, Kp);                                                    \
    }

ZQ_FP4_GEMM(fp4_fp8_gemm_f16, false)
ZQ_FP4_GEMM(fp4_fp8_gemm_bf16, true)
ZQ_FP8_GEMM(fp8_fp8_gemm_f16, false)
ZQ_FP8_GEMM(fp8_fp8_gemm_bf16, true)
ZQ_QUANT(quantize_per_token_fp8_f16, false)
ZQ_QUANT(quantize_per_token_fp8_bf16, true)
