// The QUIK byte main loop (W8A8 and int4 x int4 on 64 x 64 tiles) and the int8 GEMV main loop
// (M <= 8), shared by quik_gemm.cu and illm_gemm.cu (DI-MatMul w8).  Device code only; the fragment argument is written at the top of
// quik_gemm.cu.

#ifndef QCONVERT_KERNELS_QUIK_MAINLOOP_CUH
#define QCONVERT_KERNELS_QUIK_MAINLOOP_CUH

#include "../common.cuh"
#include "../w4a8/w4a8_mainloop.cuh"

namespace quik {

using qk::BM;
using qk::BN;
using qk::BK;
using qk::MT;
using qk::NT;
using qk::THREADS;
using qk::WM;
using qk::WN;
using qk::A_STRIDE;

constexpr int ROW_CHUNKS = BM * BK / 16;           // 16-byte pieces of one operand's stage (256)
constexpr int ROW_LOADS = ROW_CHUNKS / THREADS;     // per thread (2)
static_assert(BM == BN && ROW_CHUNKS % THREADS == 0, "both operands stage the same way");

// One m16n8k64 int4 tensor-core product, C += A * B (int32).
__device__ __forceinline__ void mma_s4(int (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Global -> registers: rows [r0, r0 + 64) of a byte matrix [rows, KB], bytes [k0, k0 + 64).
// Rows past `rows` and bytes past KB read as zeros (KB % 32 == 0: a 16-byte piece is all in or out).
__device__ __forceinline__ void load_rows(uint4 (&r)[ROW_LOADS], const signed char* __restrict__ src,
                                          int r0, int rows, int k0, int KB) {
#pragma unroll
    for (int i = 0; i < ROW_LOADS; ++i) {
        const int idx = threadIdx.x + i * THREADS;
        const int row = r0 + idx / (BK / 16), col = k0 + (idx % (BK / 16)) * 16;
        r[i] = make_uint4(0u, 0u, 0u, 0u);
        if (row < rows && col < KB)
            r[i] = *reinterpret_cast<const uint4*>(src + static_cast<long long>(row) * KB + col);
    }
}

__device__ __forceinline__ void store_rows(const uint4 (&r)[ROW_LOADS], unsigned char* s) {
#pragma unroll
    for (int i = 0; i < ROW_LOADS; ++i) {
        const int idx = threadIdx.x + i * THREADS;
        *reinterpret_cast<uint4*>(s + (idx / (BK / 16)) * A_STRIDE + (idx % (BK / 16)) * 16) = r[i];
    }
}

// 8 bytes of row `row` at byte `off` of a padded stage -> (low word, high word).
__device__ __forceinline__ uint2 frag8(const unsigned char* s, int row, int off) {
    return *reinterpret_cast<const uint2*>(s + row * A_STRIDE + off);
}

template <bool kS4>
__device__ __forceinline__ void mainloop_bytes(const signed char* __restrict__ xq, const signed char* __restrict__ qw,
                                               int M, int N, int KB, int bm, int bn, int (&P)[MT][NT][4]) {
    __shared__ __align__(16) unsigned char sA[BM * A_STRIDE];
    __shared__ __align__(16) unsigned char sB[BN * A_STRIDE];  // same padding: conflict-free 64-bit loads
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int wm = (warp >> 1) * WM, wn = (warp & 1) * WN;
    const int n_stages = (KB + BK - 1) / BK;

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) P[mt][nt][i] = 0;

    uint4 ra[ROW_LOADS], rb[ROW_LOADS];
    load_rows(ra, xq, bm, M, 0, KB);
    load_rows(rb, qw, bn, N, 0, KB);
    for (int s = 0; s < n_stages; ++s) {
        store_rows(ra, sA);
        store_rows(rb, sB);
        __syncthreads();
        if (s + 1 < n_stages) {  // next stage in flight during this one's mma
            load_rows(ra, xq, bm, M, (s + 1) * BK, KB);
            load_rows(rb, qw, bn, N, (s + 1) * BK, KB);
        }
#pragma unroll
        for (int ks = 0; ks < BK / 32; ++ks) {
            if (s * BK + ks * 32 >= KB) break;  // the zero half of a last stage (KB % 64 == 32)
            unsigned a[MT][4], b[NT][2];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const uint2 lo = frag8(sA, wm + mt * 16 + gid, ks * 32 + 8 * tig);
                const uint2 hi = frag8(sA, wm + mt * 16 + gid + 8, ks * 32 + 8 * tig);
                a[mt][0] = lo.x; a[mt][2] = lo.y;
                a[mt][1] = hi.x; a[mt][3] = hi.y;
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const uint2 v = frag8(sB, wn + nt * 8 + gid, ks * 32 + 8 * tig);
                b[nt][0] = v.x; b[nt][1] = v.y;
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    if (kS4) mma_s4(P[mt][nt], a[mt], b[nt]);
                    else qk::mma_s8(P[mt][nt], a[mt], b[nt]);
                }
        }
        __syncthreads();
    }
}

// The W4A8 main loop folds every group; QUIK has one group spanning Kbp and reads P after it.
struct NoFold {
    __device__ __forceinline__ void operator()(int, int (&)[MT][NT][4]) {}
};

// ---------------------------------------------------------------------------------------
// GEMV main loop (int8 x int8, M <= GV_ROWS rows: QUIK's W8A8 and I-LLM's DI-MatMul w8 at decode).
// Warp w of CTA b owns the GV_COLS output columns n0 = (b * GV_WARPS + w) * GV_COLS + c and reads
// their weight rows once, 16 bytes per lane per step: lane l takes the chunks l, l + 32, ... of the
// row (GV_UNROLL steps' loads issued together) and multiplies each by the M activation rows' same
// chunk (read through L1: every warp of the CTA reads the same x) with dp4a.  Integer sums are exact
// in any order, so after the xor butterfly every lane holds the tile kernel's int32 accumulators.
// KB (bytes per row) a multiple of 16, rows 16-byte aligned.  Launch: grid ceil(N / (GV_WARPS *
// GV_COLS)), block GV_THREADS.
// ---------------------------------------------------------------------------------------
constexpr int GV_ROWS = 8;
constexpr int GV_COLS = 2;
constexpr int GV_WARPS = 8;                                   // 256 threads
constexpr int GV_THREADS = GV_WARPS * 32;
constexpr int GV_UNROLL = 4;

__device__ __forceinline__ int gemv_n0() { return (blockIdx.x * GV_WARPS + (threadIdx.x >> 5)) * GV_COLS; }

__device__ __forceinline__ int dp4a16(const uint4& a, const uint4& b, int c) {  // 16 int8 products
    c = __dp4a(static_cast<int>(a.x), static_cast<int>(b.x), c);
    c = __dp4a(static_cast<int>(a.y), static_cast<int>(b.y), c);
    c = __dp4a(static_cast<int>(a.z), static_cast<int>(b.z), c);
    return __dp4a(static_cast<int>(a.w), static_cast<int>(b.w), c);
}

// Packed int4 weights (two per byte, low nibble = even k; KB = K / 2 bytes per weight row, the
// activations K int8 per row): lane l takes the weight chunks l, l + 32, ... (32 values each) and
// the activation chunks 2c and 2c + 1 they multiply.  Per weight word (k 8i .. 8i + 7):
// the even k's nibbles (w & 0x0F0F0F0F) and the odd k's (w >> 4 & 0x0F0F0F0F), each sign-extended
// bytewise ((v ^ 8) - 8 in __vsub4), against the activation bytes PRMT-gathered in the same order
// (x0 x2 x4 x6 and x1 x3 x5 x7): dp4a takes any pairing of the same four products.
__device__ __forceinline__ int dp4a_w4word(unsigned w, unsigned x_lo, unsigned x_hi, int c) {
    const unsigned even = __vsub4((w & 0x0F0F0F0Fu) ^ 0x08080808u, 0x08080808u);
    const unsigned odd = __vsub4(((w >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u, 0x08080808u);
    c = __dp4a(static_cast<int>(__byte_perm(x_lo, x_hi, 0x6420)), static_cast<int>(even), c);
    return __dp4a(static_cast<int>(__byte_perm(x_lo, x_hi, 0x7531)), static_cast<int>(odd), c);
}

__device__ __forceinline__ int dp4a_w4chunk(const uint4& w, const uint4& xa, const uint4& xb, int c) {
    c = dp4a_w4word(w.x, xa.x, xa.y, c);  // k 0..7 of the chunk
    c = dp4a_w4word(w.y, xa.z, xa.w, c);  // k 8..15
    c = dp4a_w4word(w.z, xb.x, xb.y, c);  // k 16..23
    return dp4a_w4word(w.w, xb.z, xb.w, c);
}

// The sums: kW4 false, int8 weights (KB = K bytes per row, one activation chunk per weight chunk);
// true, packed int4 weights (KB = K / 2, activation chunks 2c and 2c + 1 per weight chunk c).
template <bool kW4>
__device__ __forceinline__ void gemv_sums(const signed char* __restrict__ xq, const void* __restrict__ qw, int M, int N,
                                          int KB, int n0, int (&acc)[GV_ROWS][GV_COLS]) {
    const int lane = threadIdx.x & 31;
    const int chunks = KB / 16;  // weight chunks per row
    const uint4* x4 = reinterpret_cast<const uint4*>(xq);
    const uint4* w4[GV_COLS];
#pragma unroll
    for (int c = 0; c < GV_COLS; ++c)  // a column past N reads column n0's row again (its sums are never stored)
        w4[c] = reinterpret_cast<const uint4*>(qw) + static_cast<long long>(n0 + c < N ? n0 + c : n0) * chunks;
#pragma unroll
    for (int m = 0; m < GV_ROWS; ++m)
#pragma unroll
        for (int c = 0; c < GV_COLS; ++c) acc[m][c] = 0;
    for (int k0 = lane; k0 < chunks; k0 += 32 * GV_UNROLL) {
        uint4 wv[GV_UNROLL][GV_COLS];
#pragma unroll
        for (int u = 0; u < GV_UNROLL; ++u)  // issued together, before the first sum (a step past the row: none)
#pragma unroll
            for (int c = 0; c < GV_COLS; ++c)
                wv[u][c] = k0 + 32 * u < chunks ? __ldg(w4[c] + k0 + 32 * u) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < GV_UNROLL; ++u) {
            const int k = k0 + 32 * u;
            if (k >= chunks) break;
#pragma unroll
            for (int m = 0; m < GV_ROWS; ++m) {
                if (m >= M) break;
                if (kW4) {
                    const uint4 xa = __ldg(x4 + (static_cast<long long>(m) * chunks + k) * 2);
                    const uint4 xb = __ldg(x4 + (static_cast<long long>(m) * chunks + k) * 2 + 1);
#pragma unroll
                    for (int c = 0; c < GV_COLS; ++c) acc[m][c] = dp4a_w4chunk(wv[u][c], xa, xb, acc[m][c]);
                } else {
                    const uint4 xv = __ldg(x4 + static_cast<long long>(m) * chunks + k);
#pragma unroll
                    for (int c = 0; c < GV_COLS; ++c) acc[m][c] = dp4a16(xv, wv[u][c], acc[m][c]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < GV_ROWS; ++m)
#pragma unroll
        for (int c = 0; c < GV_COLS; ++c)
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[m][c] += __shfl_xor_sync(0xffffffffu, acc[m][c], o);
}

// Lane j's output sum: (j / GV_COLS, j % GV_COLS) for j < GV_ROWS * GV_COLS (an unrolled select: no
// local memory).
__device__ __forceinline__ int gemv_pick(const int (&acc)[GV_ROWS][GV_COLS], int lane) {
    int a = acc[0][0];
#pragma unroll
    for (int j = 1; j < GV_ROWS * GV_COLS; ++j)
        if (lane == j) a = acc[j / GV_COLS][j % GV_COLS];
    return a;
}

}  // namespace quik

#endif  // QCONVERT_KERNELS_QUIK_MAINLOOP_CUH
