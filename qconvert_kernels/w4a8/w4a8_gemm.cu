// W4A8 GEMM kernels of qconvert: int8 activations x packed int4 group weights on int8 tensor cores.
//
// The arithmetic is the one of qconvert_kernels/reference.py, bit for bit (docs/format.md):
//
//   xq int8 [M, Kp]   per-token symmetric activations, t float32 [M]   (quantize_per_token_int8_*)
//   q  int4 [N, Kp]   packed two per byte, uint8 [N, Kp/2], low nibble = even column
//   P[j, m, n] = sum_{k in group j} xq[m, k] * q[n, k]                  (int32, tensor cores)
//
//   w4a8_is_gemm_*  (layout w4a8-is, Integer Scale):
//     A[m, n] = sum_j iscale[n, j] * P[j, m, n]                          (int32, j = 0..G-1)
//     y[m, n] = float(A[m, n]) * (t[m] * (cscale[n] / 2^alpha_log2))     (float32, in this order)
//   w4a8_fs_gemm_*  (layout w4a8-fs, float scale, the counterpart the paper compares against):
//     acc = 0; for j = 0..G-1: acc = acc + float(scales[n, j]) * float(P[j, m, n])  (no FMA)
//     y[m, n] = acc * t[m]
//   then y is rounded to fp16 / bf16 (round to nearest even).
//
// Every float operation is written with __fmul_rn / __fadd_rn / __fdiv_rn / __frcp_rn, which the
// compiler never contracts into an FMA, so the results equal torch's CPU float32 results.
//
// The source includes no header (no cuda_fp16.h / cuda_bf16.h): fp16 and bf16 are carried as
// their 16-bit patterns (unsigned short) and converted with cvt PTX, so the same text compiles
// with nvcc (tests/test_kernels_compile.py) and with NVRTC through cupy.RawModule
// (qconvert_kernels/cuda.py) without include paths.
//
// Requirements (checked by the launcher, qconvert_kernels/cuda.py): sm_80 or newer;
// group size g a multiple of 32 (the mma K); Kp a multiple of g; xq / qweight / iscale /
// scales / outputs contiguous row-major, xq and qweight 16-byte aligned.  M and N are
// arbitrary (bounds-checked; rows / columns out of range are zero-filled and never written).
//
// ---------------------------------------------------------------------------------------
// Fragment layout of mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (PTX ISA, "Matrix
// fragments for mma.m16n8k32", .s8), with lane = threadIdx.x % 32,
// gid = lane >> 2 (0..7, "groupID"), tig = lane & 3 (0..3, "threadID_in_group"):
//
//   A (16 x 32, row major), 4 x .b32 registers, 4 int8 each (byte 0 = lowest column):
//     a0 = A[gid    ][4*tig + 0..3]      a1 = A[gid + 8][4*tig + 0..3]
//     a2 = A[gid    ][16 + 4*tig + 0..3] a3 = A[gid + 8][16 + 4*tig + 0..3]
//   B (32 x 8, "col": K x N stored N-major), 2 x .b32 registers, 4 int8 each:
//     b0 = B[4*tig + 0..3][gid]          b1 = B[16 + 4*tig + 0..3][gid]
//   C / D (16 x 8, int32), 4 registers:
//     c0 = C[gid][2*tig]   c1 = C[gid][2*tig + 1]   c2 = C[gid + 8][2*tig]   c3 = C[gid + 8][2*tig + 1]
//
// K permutation.  A dot product over the 32 k of one mma is invariant under any permutation
// of k applied to both operands, so each thread feeds the mma real k in this order:
//     mma k 4*tig + 0..3      <- real k 8*tig + 0..3
//     mma k 16 + 4*tig + 0..3 <- real k 8*tig + 4..7
// Thread tig then needs the 8 contiguous real k 8*tig..8*tig+7 of its rows: one 64-bit shared
// load per A row (low word = a0 / a1, high word = a2 / a3), and one 32-bit shared load of
// packed B (8 nibbles = real k 8*tig..8*tig+7: nibbles 0..3 -> b0, nibbles 4..7 -> b1).
// P (and everything after it) is exactly the unpermuted sum.
// ---------------------------------------------------------------------------------------

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

// One m16n8k32 int8 tensor-core product, C += A * B (int32, wrapping, no saturation: the
// converter proves no int32 overflow; wrapping is also what torch's int32 does).
__device__ __forceinline__ void mma_s8(int (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 8 packed two's-complement nibbles -> 8 sign-extended int8 in two registers, in order:
// nibble i (bits 4i..4i+3, real k 8*tig + i) -> byte i of b0 (i < 4) / byte i-4 of b1.
// Why this way: a per-byte sign extension of a 4-bit value v is ((v ^ 8) + 0x78) ^ 0x80
// (the xor maps v to v+8 in 0..15, +0x78 lands in 0x78..0x87 without a carry into the
// next byte, ^0x80 recentres: 0x78 -> -8 ... 0x87 -> 7), so 4 lanes go at once in 32-bit
// integer ops, and __byte_perm (PRMT) interleaves even / odd nibbles back into k order.
__device__ __forceinline__ void unpack_int4x8(unsigned w, unsigned (&b)[2]) {
    const unsigned u = w ^ 0x88888888u;             // v ^ 8 in every nibble
    const unsigned lo = u & 0x0F0F0F0Fu;            // bytes: n0 n2 n4 n6
    const unsigned hi = (u >> 4) & 0x0F0F0F0Fu;     // bytes: n1 n3 n5 n7
    const unsigned e0 = __byte_perm(lo, hi, 0x5140); // bytes: n0 n1 n2 n3
    const unsigned e1 = __byte_perm(lo, hi, 0x7362); // bytes: n4 n5 n6 n7
    b[0] = (e0 + 0x78787878u) ^ 0x80808080u;
    b[1] = (e1 + 0x78787878u) ^ 0x80808080u;
}

// float -> fp16 / bf16 bit pattern, round to nearest even (what torch's .to() does).
__device__ __forceinline__ unsigned short f32_to_f16_rn(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ unsigned short f32_to_bf16_rn(float f) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));  // sm_80+
    return h;
}
// fp16 / bf16 bit pattern -> float (both exact).
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return __uint_as_float(static_cast<unsigned>(h) << 16);
}

template <bool kBF16>
__device__ __forceinline__ unsigned short to_out(float f) {
    return kBF16 ? f32_to_bf16_rn(f) : f32_to_f16_rn(f);
}
template <bool kBF16>
__device__ __forceinline__ float from_in(unsigned short h) {
    return kBF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

// 2^-a as a float, exactly (a in [-126, 126]; the launcher checks): dividing cscale by 2^a
// is then an exact multiplication, as the reference's cscale / 2.0**a is exact.
__device__ __forceinline__ float exp2_neg(int a) {
    return __int_as_float((127 - a) << 23);
}

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

// Integer-scale fold: A += iscale[n, j] * P (int32 multiply-add, wrapping like torch int32).
// The scales of the next group are prefetched into registers right after a fold.
struct FoldInt {
    int acc[MT][NT][4];
    int sc[NT][2];                       // iscale[col, group] of this thread's 8 columns
    const int* __restrict__ iscale;      // int32 [N, G]
    int N, G, col0;                      // col0: this thread's first column (nt = 0, +0)

    __device__ __forceinline__ void load_scales(int j) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int n = col0 + nt * 8 + h;
                sc[nt][h] = (n < N && j < G) ? __ldg(iscale + static_cast<long long>(n) * G + j) : 0;
            }
    }
    __device__ __forceinline__ void operator()(int j, int (&P)[MT][NT][4]) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    // c0/c2: col 2tig, c1/c3: col 2tig+1; unsigned arithmetic = defined int32 wrapping
                    acc[mt][nt][i] = static_cast<int>(static_cast<unsigned>(acc[mt][nt][i]) +
                                                      static_cast<unsigned>(sc[nt][i & 1]) * static_cast<unsigned>(P[mt][nt][i]));
                    P[mt][nt][i] = 0;
                }
        load_scales(j + 1);
    }
};

// Float-scale fold: acc = acc + float(P) * float(scale), rounded twice (no FMA), in group order.
struct FoldFloat {
    float acc[MT][NT][4];
    float sc[NT][2];                              // float(scales[col, group])
    const unsigned short* __restrict__ scales;    // fp16 bits [N, G]
    int N, G, col0;

    __device__ __forceinline__ void load_scales(int j) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int n = col0 + nt * 8 + h;
                sc[nt][h] = (n < N && j < G) ? f16_to_f32(__ldg(scales + static_cast<long long>(n) * G + j)) : 0.0f;
            }
    }
    __device__ __forceinline__ void operator()(int j, int (&P)[MT][NT][4]) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    // exact: |P| <= 127 * 8 * g < 2^24
                    acc[mt][nt][i] = __fadd_rn(acc[mt][nt][i], __fmul_rn(__int2float_rn(P[mt][nt][i]), sc[nt][i & 1]));
                    P[mt][nt][i] = 0;
                }
        load_scales(j + 1);
    }
};

// Writes two horizontally adjacent outputs (cols n, n+1 of row m), as one 32-bit store when
// both exist and the address is 4-byte aligned (N even), else element by element.
__device__ __forceinline__ void store_pair(unsigned short* __restrict__ y, int m, int n, int N,
                                           unsigned short v0, unsigned short v1) {
    unsigned short* p = y + static_cast<long long>(m) * N + n;
    if (n + 1 < N && (N & 1) == 0) {
        *reinterpret_cast<unsigned*>(p) = static_cast<unsigned>(v0) | (static_cast<unsigned>(v1) << 16);
    } else {
        if (n < N) p[0] = v0;
        if (n + 1 < N) p[1] = v1;
    }
}

template <bool kBF16>
__device__ __forceinline__ void is_gemm(const signed char* __restrict__ xq, const float* __restrict__ t,
                                        const unsigned char* __restrict__ qw, const int* __restrict__ iscale,
                                        const float* __restrict__ cscale, int alpha_log2,
                                        unsigned short* __restrict__ y, int* __restrict__ acc_out,
                                        int M, int N, int Kp, int group_size) {
    const int bm = blockIdx.y * BM, bn = blockIdx.x * BN;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int wm = (warp >> 1) * WM, wn = (warp & 1) * WN;

    FoldInt fold;
    fold.iscale = iscale;
    fold.N = N;
    fold.G = Kp / group_size;
    fold.col0 = bn + wn + 2 * tig;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) fold.acc[mt][nt][i] = 0;
    fold.load_scales(0);

    int P[MT][NT][4];
    mainloop(xq, qw, M, N, Kp, group_size, bm, bn, P, fold);

    // Epilogue: y = float(A) * (t[m] * (cscale[n] * 2^-a)), each product rounded (no FMA).
    const float inv_alpha = exp2_neg(alpha_log2);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int n = bn + wn + nt * 8 + 2 * tig;
        const float cs0 = n < N ? __fmul_rn(__ldg(cscale + n), inv_alpha) : 0.0f;
        const float cs1 = n + 1 < N ? __fmul_rn(__ldg(cscale + n + 1), inv_alpha) : 0.0f;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {                       // h = 0: row gid (c0, c1); 1: row gid + 8 (c2, c3)
                const int m = bm + wm + mt * 16 + gid + 8 * h;
                if (m >= M || n >= N) continue;
                const float tm = __ldg(t + m);
                const int A0 = fold.acc[mt][nt][2 * h], A1 = fold.acc[mt][nt][2 * h + 1];
                const float y0 = __fmul_rn(__int2float_rn(A0), __fmul_rn(tm, cs0));
                const float y1 = __fmul_rn(__int2float_rn(A1), __fmul_rn(tm, cs1));
                store_pair(y, m, n, N, to_out<kBF16>(y0), to_out<kBF16>(y1));
                if (acc_out != nullptr) {                       // debug: the int32 accumulator
                    int* pa = acc_out + static_cast<long long>(m) * N + n;
                    pa[0] = A0;
                    if (n + 1 < N) pa[1] = A1;
                }
            }
    }
}

template <bool kBF16>
__device__ __forceinline__ void fs_gemm(const signed char* __restrict__ xq, const float* __restrict__ t,
                                        const unsigned char* __restrict__ qw, const unsigned short* __restrict__ scales,
                                        unsigned short* __restrict__ y, int M, int N, int Kp, int group_size) {
    const int bm = blockIdx.y * BM, bn = blockIdx.x * BN;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int wm = (warp >> 1) * WM, wn = (warp & 1) * WN;

    FoldFloat fold;
    fold.scales = scales;
    fold.N = N;
    fold.G = Kp / group_size;
    fold.col0 = bn + wn + 2 * tig;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) fold.acc[mt][nt][i] = 0.0f;
    fold.load_scales(0);

    int P[MT][NT][4];
    mainloop(xq, qw, M, N, Kp, group_size, bm, bn, P, fold);

    // Epilogue: y = acc * t[m] (one rounding), then to fp16 / bf16.
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int n = bn + wn + nt * 8 + 2 * tig;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int m = bm + wm + mt * 16 + gid + 8 * h;
                if (m >= M || n >= N) continue;
                const float tm = __ldg(t + m);
                const float y0 = __fmul_rn(fold.acc[mt][nt][2 * h], tm);
                const float y1 = __fmul_rn(fold.acc[mt][nt][2 * h + 1], tm);
                store_pair(y, m, n, N, to_out<kBF16>(y0), to_out<kBF16>(y1));
            }
    }
}

// Per-token int8 quantizer, one CTA of QUANT_THREADS per row:
//   amax = max_k |x[m, k]| (float32; a max is exact in any order), inv = (1 / amax) * 127
//   (0 for amax == 0; see below), xq = clamp(rint(x * inv), -127, 127), t = amax / 127 (IEEE
//   division, as torch's tensor / scalar);
//   columns K..Kp-1 of xq are written as 0.  (NaN inputs are not supported: fmaxf drops them.)
constexpr int QUANT_THREADS = 256;

template <bool kBF16>
__device__ __forceinline__ void quantize_row(const unsigned short* __restrict__ x, signed char* __restrict__ xq,
                                             float* __restrict__ t, int M, int K, int Kp) {
    __shared__ float warp_max[QUANT_THREADS / 32];
    const int m = blockIdx.x;
    if (m >= M) return;  // uniform per CTA
    const unsigned short* xr = x + static_cast<long long>(m) * K;
    signed char* qr = xq + static_cast<long long>(m) * Kp;

    float amax = 0.0f;
    for (int k = threadIdx.x; k < K; k += QUANT_THREADS) amax = fmaxf(amax, fabsf(from_in<kBF16>(xr[k])));
    // Why shuffles: a warp reduces its 32 partial maxima in registers (5 steps), then the 8
    // warp maxima meet in shared memory; a single __syncthreads for the whole reduction.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = warp_max[0];
#pragma unroll
    for (int w = 1; w < QUANT_THREADS / 32; ++w) amax = fmaxf(amax, warp_max[w]);

    // inv exactly as the reference computes it: torch evaluates `127 / amax` (python scalar
    // over tensor) as `amax.reciprocal() * 127`, two roundings, NOT the correctly rounded
    // quotient (they differ for ~25% of amax values), so: IEEE reciprocal, then multiply.
    const float inv = amax > 0.0f ? __fmul_rn(__frcp_rn(amax), 127.0f) : 0.0f;
    for (int k = threadIdx.x; k < Kp; k += QUANT_THREADS) {
        float q = 0.0f;
        if (k < K) {
            q = rintf(__fmul_rn(from_in<kBF16>(xr[k]), inv));   // round half to even, as torch.round
            q = fminf(fmaxf(q, -127.0f), 127.0f);
        }
        qr[k] = static_cast<signed char>(__float2int_rn(q));
    }
    if (threadIdx.x == 0) t[m] = __fdiv_rn(amax, 127.0f);
}

}  // namespace qk

// ---------------------------------------------------------------------------------------
// Entry points (extern "C": unmangled names for cupy.RawModule.get_function).
// Launch: grid (ceil(N / 64), ceil(M / 64)), block 128, no dynamic shared memory.
// ---------------------------------------------------------------------------------------

#define QK_IS_GEMM(NAME, BF16)                                                                         \
    extern "C" __global__ void __launch_bounds__(qk::THREADS, 1) NAME(                                     \
        const signed char* __restrict__ xq,     /* int8 [M, Kp], row-major, 16-byte aligned */          \
        const float* __restrict__ t,            /* float32 [M], per-token scale */                      \
        const unsigned char* __restrict__ qw,   /* uint8 [N, Kp/2], packed int4, low nibble = even k */ \
        const int* __restrict__ iscale,         /* int32 [N, G], G = Kp / group_size */                 \
        const float* __restrict__ cscale,       /* float32 [N] */                                       \
        int alpha_log2,                         /* a: cscale is divided by 2^a, in [-126, 126] */       \
        unsigned short* __restrict__ y,         /* fp16 / bf16 bits [M, N] */                           \
        int* __restrict__ acc_out,              /* int32 [M, N] accumulator A, or null (debug) */       \
        int M, int N,                           /* rows of xq / y; rows of qw = columns of y */         \
        int Kp,                                 /* padded K, a multiple of group_size */                \
        int group_size) {                       /* g, a multiple of 32 */                               \
        qk::is_gemm<BF16>(xq, t, qw, iscale, cscale, alpha_log2, y, acc_out, M, N, Kp, group_size);    \
    }

#define QK_FS_GEMM(NAME, BF16)                                                                         \
    extern "C" __global__ void __launch_bounds__(qk::THREADS, 1) NAME(                                     \
        const signed char* __restrict__ xq,     /* int8 [M, Kp], row-major, 16-byte aligned */          \
        const float* __restrict__ t,            /* float32 [M], per-token scale */                      \
        const unsigned char* __restrict__ qw,   /* uint8 [N, Kp/2], packed int4, low nibble = even k */ \
        const unsigned short* __restrict__ scales, /* fp16 bits [N, G], G = Kp / group_size */          \
        unsigned short* __restrict__ y,         /* fp16 / bf16 bits [M, N] */                           \
        int M, int N,                           /* rows of xq / y; rows of qw = columns of y */         \
        int Kp,                                 /* padded K, a multiple of group_size */                \
        int group_size) {                       /* g, a multiple of 32 */                               \
        qk::fs_gemm<BF16>(xq, t, qw, scales, y, M, N, Kp, group_size);                                 \
    }

// Launch: grid (M), block qk::QUANT_THREADS (256), no dynamic shared memory.
#define QK_QUANT(NAME, BF16)                                                                           \
    extern "C" __global__ void __launch_bounds__(qk::QUANT_THREADS) NAME(                               \
        const unsigned short* __restrict__ x,   /* fp16 / bf16 bits [M, K], row-major */                \
        signed char* __restrict__ xq,           /* int8 [M, Kp] out, columns K..Kp-1 = 0 */             \
        float* __restrict__ t,                  /* float32 [M] out, amax / 127 */                       \
        int M, int K, int Kp) {                 /* Kp >= K */                                           \
        qk::quantize_row<BF16>(x, xq, t, M, K, Kp);                                                    \
    }

QK_IS_GEMM(w4a8_is_gemm_f16, false)
QK_IS_GEMM(w4a8_is_gemm_bf16, true)
QK_FS_GEMM(w4a8_fs_gemm_f16, false)
QK_FS_GEMM(w4a8_fs_gemm_bf16, true)
QK_QUANT(quantize_per_token_int8_f16, false)
QK_QUANT(quantize_per_token_int8_bf16, true)
