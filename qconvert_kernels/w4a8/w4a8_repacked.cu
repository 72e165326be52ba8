// W4A8 kernels on load-time repacked weights: a decode GEMM (M <= 64, bandwidth-bound: split-K,
// deep cp.async pipeline, per-token int8 quantization fused in, one launch per linear) and a
// prefill GEMM (M > 64, tensor-core-bound: 128 x 128 tiles, 8 warps, 4-stage pipeline, swizzled
// shared memory, banded raster).  Both compute layout w4a8-is (Integer Scale) and w4a8-fs (float
// scale) exactly as qconvert_kernels/w4a8/reference.py:
//
//   xq, t = quantize_per_token_int8(x)        (reference.py; fused into the decode kernel)
//   P[j, m, n] = sum_{k in group j} xq[m, k] * q[n, k]                        (int32)
//   IS:  A = sum_j iscale[n, j] * P[j]   (int32, wrapping)   y = float(A) * (t[m] * (cscale[n] * 2^-a))
//   FS:  acc = sum_j float(P[j]) * float(scales[n, j])  (float32, group order, no FMA)   y = acc * t[m]
//   y rounded to fp16 / bf16.
// IS is bit-exact for any split; FS is bit-exact when a launch has one split (S == 1), and with
// S > 1 it is the fixed-order sum of the splits' sequential sums (deterministic run to run;
// reference.py:w4a8_fs_gemm_split is that order; see docs/kernels.md).
//
// The CPU emulator qconvert_kernels/w4a8/emulate.py mirrors this file function by function (the
// index math is written once in each language; each helper names its twin).  Change both.
//
// ---------------------------------------------------------------------------------------
// Roles.  The WEIGHTS are the mma's A operand (16 output channels x 32 k) and the ACTIVATIONS its
// B operand (32 k x 8 tokens), so the accumulator C[n][m] is y transposed: at decode (M <= 8) one
// n8 token tile is 1/8 used, against 1/16 with the roles the other way round.
//
// mma.m16n8k32.row.col.s32.s8.s8.s32 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k32",
// .s8), lane = 4 gid + tig:
//   a0 = W[gid][k 4tig..+3]   a1 = W[gid+8][k 4tig..+3]   a2 = W[gid][k 16+4tig..+3]   a3 = W[gid+8][k 16+4tig..]
//   b0 = X[k 4tig..+3][tok gid]                           b1 = X[k 16+4tig..+3][tok gid]
//   c0 = C[n gid][tok 2tig]  c1 = C[gid][2tig+1]  c2 = C[gid+8][2tig]  c3 = C[gid+8][2tig+1]
// K permutation (as in w4a8_gemm.cu): mma k 4tig+i <- real k 8tig+i, mma k 16+4tig+i <- real k
// 8tig+4+i (i < 4): a lane needs the 8 consecutive real k 8tig..8tig+7 of its rows / token.
//
// Repacked weights (repack.py, the "W4R" layout), uint32 words [N128/16][KB][32 lanes][4]:
//   word j of lane (gid, tig) for n16 tile t, k64 block kb:
//     j = 0: row 16t + gid,     k step 2kb      j = 1: row 16t + gid + 8, k step 2kb
//     j = 2: row 16t + gid,     k step 2kb + 1  j = 3: row 16t + gid + 8, k step 2kb + 1
//   each word the 8 nibbles of real k 32*ks + 8tig + 0..7, interleaved: nibble 2i = k+i, 2i+1 = k+4+i.
// So one 16-byte load per lane per (n16 tile, k64 block) IS the A fragment of two k steps, a
// warp's 512 bytes are contiguous, and qk::int4x4_lo16 / hi16 turn a word into a0 / a2 (or a1 /
// a3) in three integer ops (values 16 q; the fold divides by 16 exactly).
// Scales are repacked to [G, N128] (a CTA's 128 channels of one group are contiguous).
// N is padded to N128 (a multiple of 128) and K to Kq (a multiple of 64) with zero weights.
// ---------------------------------------------------------------------------------------

#include "../common.cuh"

namespace w4r {

// The accumulations the kernels are instantiated for (template argument kKind):
//   KIND_FS  W4A8 float scale: int8 tensor cores, int32 P, acc += float(P) * s (layout w4a8-fs)
//   KIND_IS  W4A8 Integer Scale: int8 tensor cores, A += iscale * P in int32 (w4a8-is; QUIK's 4-bit path)
//   KIND_ZQ  ZeroQuant-FP fp4-fp8 (sm_89+): the same repacked nibbles read as E2M1 codes and widened
//            to E4M3, FP8 tensor cores, float32 P, acc += P * 2^e (exact product, one rounding), then
//            y = acc * (t[m] * cscale[n]) (qconvert_kernels/fp8/reference.py: fp4_fp8_gemm)
constexpr int KIND_FS = 0;
constexpr int KIND_IS = 1;
constexpr int KIND_ZQ = 2;

constexpr int THREADS = 256;             // 8 warps
constexpr int WARPS = 8;
constexpr int BN = 128;                  // output channels per CTA = 8 n16 tiles
constexpr int LANE_CHUNK = 16;           // bytes per lane per (n16 tile, k64 block)
constexpr int BLOCK_BYTES = 32 * LANE_CHUNK;  // one warp's (n16 tile, k64 block): 512 contiguous bytes

// Decode.  One CTA = 128 channels x one split of K's groups; warp w owns n16 tile 8*tile + w and
// streams its own weights (no other warp reads them, so the weight pipeline needs no barrier).
//
//        K (groups) ->   split 0       split 1     ...  split S-1
//   N   tile 0      | CTA (0,0)   | CTA (1,0)   | ... |           each CTA: 8 warps x 16 channels,
//   |   tile 1      | CTA (0,1)   | ...         |     |           all M (<= 64) tokens, k steps of
//   v   ...         |             |             |     |           its groups; partials -> the last
//                                                                 CTA of the tile sums them in
//                                                                 split order (int32 / float32)
// k64 blocks in flight per warp (8 x 512 B x 8 warps = 32 KB), a power of two (a block's slot is
// blk & (D_STAGES - 1)); -D W4R_D_STAGES=16 is benchmarks/decode_variants.py's deeper-pipeline build
// (64 KB; the launcher's shared memory must follow: cuda.D_W_BYTES).
#ifndef W4R_D_STAGES
#define W4R_D_STAGES 8
#endif
constexpr int D_STAGES = W4R_D_STAGES;
static_assert(D_STAGES >= 2 && D_STAGES <= 16 && (D_STAGES & (D_STAGES - 1)) == 0, "W4R_D_STAGES: 2, 4, 8 or 16");
constexpr int D_STAGE_BYTES = WARPS * BLOCK_BYTES;   // one weight stage of the CTA (4 KB)
constexpr int D_W_BYTES = D_STAGES * D_STAGE_BYTES;
// Group scales: read one group ahead (__ldg into registers), and each lane prefetches the L2 line of its
// entries (a warp's 16 channels share one) D_SCALE_AHEAD groups before that read (0: no prefetch).
// The weights are 7 k64 blocks ahead; the scales' one-group read alone left their DRAM latency on
// each group's fold (at g = 128 a group is 2 blocks).  A -D W4R_SCALE_AHEAD=n build is the A/B
// variant of benchmarks/decode_variants.py.                                      [emulate.decode_cta]
#ifndef W4R_SCALE_AHEAD
#define W4R_SCALE_AHEAD 4
#endif
constexpr int D_SCALE_AHEAD = W4R_SCALE_AHEAD;
static_assert(D_SCALE_AHEAD >= 0 && D_SCALE_AHEAD <= 16, "W4R_SCALE_AHEAD: 0..16 groups");
constexpr int D_XQ_BYTES = 32768;        // quantized activation chunk: ROWS x XK int8
constexpr int D_AUX_BYTES = 3 * 64 * 4 + 16;  // s_inv, s_t, s_amax [64] + flag
// Workspace (int32, one per prepared layer, zero at rest; each launch returns it to zero):
constexpr int WS_AMAX = 0;               // [64] float bits of the rows' amax (atomicMax)
constexpr int WS_ARRIVE = 64;            // amax CTAs that have published
constexpr int WS_DONE = 65;              // CTAs that have read the amax
constexpr int WS_TILES = 128;            // [tiles] split-K tickets

// Prefill.  CTA tile 128 channels x BM tokens; warp (wn = w & 3, wm = w >> 2) owns channels
// 32 wn .. +31 (2 n16 tiles) x tokens BM/2 wm .. +BM/2-1 (BM/16 n8 tiles): BM/8 mma per k step.
// BM = 128 (P_BM, what the launchers run): 16 mma per k step, one CTA per SM (about 218 registers).
// BM = 64 (the *_bm64 entries, timed beside it by qconvert bench): half the accumulators, <= 128
// registers and 64 KB of shared memory, so two CTAs (16 warps) share an H100 / H200 SM.
constexpr int P_BM = 128;
constexpr int P_STAGES = 4;
constexpr int P_BK = 128;                         // k per stage = 2 k64 blocks = 4 k steps
constexpr int P_W_STAGE = 8 * 2 * BLOCK_BYTES;    // 8192 B: 8 n16 tiles x 2 blocks
constexpr int P_X_STAGE = P_BM * P_BK;            // 16384 B: 128 tokens x 128 k
constexpr int P_SMEM = P_STAGES * (P_W_STAGE + P_X_STAGE);  // 98304 B
__host__ __device__ constexpr int p_smem(int bm) { return P_STAGES * (P_W_STAGE + bm * P_BK); }  // [emulate.p_smem]
static_assert(p_smem(P_BM) == P_SMEM, "p_smem");

__host__ __device__ constexpr int decode_rows(int mt8) { return 8 * mt8; }
__host__ __device__ constexpr int decode_xk(int mt8) { return D_XQ_BYTES / decode_rows(mt8); }  // k per chunk
__host__ __device__ constexpr int decode_xs(int mt8) { return decode_xk(mt8) + 32; }            // padded row stride
__host__ __device__ constexpr int decode_smem(int mt8) {
    return D_W_BYTES + decode_rows(mt8) * decode_xs(mt8) + D_AUX_BYTES;
}

// ------------------------------------------------------------------ index math (emulate.py twins)

// Repacked weight chunk (16-byte units) of lane `lane`, n16 tile t16, k64 block kb.   [emulate.w_chunk]
__device__ __forceinline__ long long w_chunk(int t16, int kb, int lane, int KB) {
    return (static_cast<long long>(t16) * KB + kb) * 32 + lane;
}
// Decode: this lane's shared slot of stage `st` (bytes).                                [emulate.d_w_slot]
__device__ __forceinline__ int d_w_slot(int st, int warp, int lane) {
    return ((st * WARPS + warp) * 32 + lane) * LANE_CHUNK;
}
// Split s of S over G groups (G = gq * S + gr): groups [g0, g1).                         [emulate.split_groups]
__device__ __forceinline__ int split_g0(int s, int gq, int gr) { return s * gq + min(s, gr); }
__device__ __forceinline__ int split_g1(int s, int gq, int gr) { return split_g0(s, gq, gr) + gq + (s < gr ? 1 : 0); }
// ceil(log2(v)) for v >= 1.
__device__ __forceinline__ int ceil_log2(int v) { return v <= 1 ? 0 : 32 - __clz(v - 1); }
// Prefill: byte offset of (row, 16-byte chunk c) in an x stage, XOR-swizzled.             [emulate.p_x_off]
// Rows are 128 B; a fragment read takes chunk 2ks + (tig >> 1) of rows gid (+ 8 j): xoring the
// chunk with 2 (row & 3) gives the 4 rows of a half warp 4 distinct 32-byte bank groups.
__device__ __forceinline__ int p_x_off(int row, int c) { return row * P_BK + ((c ^ ((row & 3) << 1)) << 4); }
// Split-K partial slot (int4 units) of (split, tile, warp, fragment f, lane).             [emulate.part_slot]
__device__ __forceinline__ long long part_slot(int s, int tiles, int tile, int warp, int f, int nfrag, int lane) {
    return ((static_cast<long long>(s) * tiles + tile) * WARPS + warp) * nfrag * 32 + f * 32 + lane;
}

// ------------------------------------------------------------------ shared pieces

// 16 bytes of activations (8 fp16 / bf16, low half first) as floats.
__device__ __forceinline__ void unpack_x8(const uint4& r, bool bf16, float (&v)[8]) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = qk::from_in_rt(static_cast<unsigned short>(w[e >> 1] >> (16 * (e & 1))), bf16);
}

// 8 activations x[m, k..k+7] as floats (zeros past K).  vec: one 16-byte load (K % 8 == 0 and x
// 16-byte aligned, so k..k+7 is all in or all out).                                       [emulate.load_x8]
__device__ __forceinline__ void load_x8(const unsigned short* __restrict__ x, int m, int k, int K, bool vec, bool bf16,
                                        float (&v)[8]) {
    const unsigned short* row = x + static_cast<long long>(m) * K;
    if (vec) {
        uint4 r = make_uint4(0u, 0u, 0u, 0u);
        if (k < K) r = __ldg(reinterpret_cast<const uint4*>(row + k));
        unpack_x8(r, bf16, v);
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = k + e < K ? qk::from_in_rt(__ldg(row + k + e), bf16) : 0.0f;
    }
}

// The 3-op unpack of two repacked words (rows gid, gid + 8) into an A fragment.          [emulate.a_frag]
__device__ __forceinline__ void a_frag(unsigned w_lo_row, unsigned w_hi_row, unsigned (&a)[4]) {
    a[0] = qk::int4x4_lo16(w_lo_row);  // row gid,     k 8tig+0..3 (x16)
    a[1] = qk::int4x4_lo16(w_hi_row);  // row gid + 8, k 8tig+0..3
    a[2] = qk::int4x4_hi16(w_lo_row);  // row gid,     k 8tig+4..7
    a[3] = qk::int4x4_hi16(w_hi_row);  // row gid + 8, k 8tig+4..7
}

// ZQ: 8 E2M1 codes of a repacked word (nibble position 2i = k + i, 2i + 1 = k + 4 + i) -> the E4M3
// bytes of the same values, k..k+3 in lo and k+4..k+7 in hi.  Every E2M1 value is an E4M3 value, so
// the widening is exact.  The magnitude (3 bits) is looked up 4 codes at a time by PRMT in the table
// {0, 0.5, 1, 1.5, 2, 3, 4, 6} as E4M3 bytes (T_LO: codes 0..3, T_HI: 4..7); each selector nibble has
// its bit 3 cleared, which would make PRMT replicate a sign bit instead.  The low 16 bits of w are the
// positions 0..3 = k, k+4, k+1, k+5 and the high 16 bits k+2, k+6, k+3, k+7, so two more PRMT gather
// bytes 0, 2, 4, 6 (k..k+3) and 1, 3, 5, 7 (k+4..k+7).  The sign of position 2i is bit 3 of byte i,
// shifted to bit 7; the sign of position 2i + 1 is bit 7 of byte i already.  [emulate.fp4x8r_to_e4m3]
__device__ __forceinline__ void fp4x8r_to_e4m3(unsigned w, unsigned& lo, unsigned& hi) {
    constexpr unsigned T_LO = 0x3C383000u;  // 0, 0.5, 1, 1.5
    constexpr unsigned T_HI = 0x4C484440u;  // 2, 3, 4, 6
    const unsigned l = __byte_perm(T_LO, T_HI, w & 0x7777u);          // k, k+4, k+1, k+5
    const unsigned h = __byte_perm(T_LO, T_HI, (w >> 16) & 0x7777u);  // k+2, k+6, k+3, k+7
    lo = __byte_perm(l, h, 0x6420) | ((w << 4) & 0x80808080u);
    hi = __byte_perm(l, h, 0x7531) | (w & 0x80808080u);
}
// ZQ: two repacked words (rows gid, gid + 8) -> an A fragment of E4M3 bytes.            [emulate.a_frag]
__device__ __forceinline__ void a_frag_fp4(unsigned w_lo_row, unsigned w_hi_row, unsigned (&a)[4]) {
    fp4x8r_to_e4m3(w_lo_row, a[0], a[2]);  // row gid:     k 8tig+0..3, 8tig+4..7
    fp4x8r_to_e4m3(w_hi_row, a[1], a[3]);  // row gid + 8
}

// FP8 tensor-core products (mma.m16n8k32 .e4m3, sm_89+; the same fragment layout as .s8), f32
// accumulator: C += A * B, and C = A * B from zero.  The ZQ entry points exist only for sm_89+;
// elsewhere these trap.
__device__ __forceinline__ void mma_e4m3(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}
__device__ __forceinline__ void mma_e4m3_zero(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(0.0f));
#else
    __trap();
#endif
}
// float -> E4M3 byte, round to nearest even, saturating (cvt.rn.satfinite, sm_89+), as zq::f32_to_e4m3.
__device__ __forceinline__ unsigned f32_to_e4m3(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned short pair;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %1;" : "=h"(pair) : "f"(f));
    return pair & 0xFFu;
#else
    __trap();
    return 0u;
#endif
}

// The tensor-core step of a kind: P's type, the A fragment from two repacked words, the mma
// (accumulating, and from a constant start: the int `init` of the W4A8 kinds; ZQ starts from 0).
template <bool kZq>
struct Tc {
    using P = int;
    static __device__ __forceinline__ void frag(unsigned lo, unsigned hi, unsigned (&a)[4]) { a_frag(lo, hi, a); }
    static __device__ __forceinline__ void mma(int (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) { qk::mma_s8(c, a, b); }
    static __device__ __forceinline__ void mma_init(int (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2], int init) {
        qk::mma_s8_init(c, a, b, init);
    }
};
template <>
struct Tc<true> {
    using P = float;
    static __device__ __forceinline__ void frag(unsigned lo, unsigned hi, unsigned (&a)[4]) { a_frag_fp4(lo, hi, a); }
    static __device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) { mma_e4m3(c, a, b); }
    static __device__ __forceinline__ void mma_init(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2], int) {
        mma_e4m3_zero(c, a, b);
    }
};

// Group scale of channel n (padded [G, N128] layout), as the fold uses it.
// IS: the int32 iscale (stored int16 when every value fits: half the bytes).  FS: float(s) / 16,
// exact, so float(16 P) * (s / 16) rounds like float(P) * s.  ZQ: 2^e from the int8 exponent e,
// exact (e in [-64, 63]).                                                                [emulate.load_scale]
template <int kKind>
struct Scale;
// load4 (prefill): a lane's four scales of one group, channels n_row + 0, 8, 16, 24 -> s[e >> 1][e & 1]
// (tile a = e >> 1, row gid + 8 (e & 1)), from a byte pointer to channel n_row's entry; entries are
// 1 << shift bytes.                                                              [emulate.p_scales]
template <>
struct Scale<KIND_IS> {
    using T = int;
    static __device__ __forceinline__ int load(const void* sc, long long idx, bool sc16) {
        return sc16 ? static_cast<int>(__ldg(reinterpret_cast<const short*>(sc) + idx)) : __ldg(reinterpret_cast<const int*>(sc) + idx);
    }
    static __device__ __forceinline__ int shift(bool sc16) { return sc16 ? 1 : 2; }
    static __device__ __forceinline__ void load4(const unsigned char* p, bool sc16, int (&s)[2][2]) {
#pragma unroll
        for (int e = 0; e < 4; ++e)
            s[e >> 1][e & 1] = sc16 ? static_cast<int>(__ldg(reinterpret_cast<const short*>(p) + 8 * e)) : __ldg(reinterpret_cast<const int*>(p) + 8 * e);
    }
};
template <>
struct Scale<KIND_ZQ> {
    using T = float;
    static __device__ __forceinline__ float exp2i(int e) { return __int_as_float((127 + e) << 23); }
    static __device__ __forceinline__ float load(const void* sc, long long idx, bool) {
        return exp2i(__ldg(reinterpret_cast<const signed char*>(sc) + idx));
    }
    static __device__ __forceinline__ int shift(bool) { return 0; }
    static __device__ __forceinline__ void load4(const unsigned char* p, bool, float (&s)[2][2]) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[e >> 1][e & 1] = exp2i(__ldg(reinterpret_cast<const signed char*>(p) + 8 * e));
    }
};
template <>
struct Scale<KIND_FS> {
    using T = float;
    static __device__ __forceinline__ float load(const void* sc, long long idx, bool) {
        return __fmul_rn(qk::f16_to_f32(__ldg(reinterpret_cast<const unsigned short*>(sc) + idx)), 0.0625f);
    }
    static __device__ __forceinline__ int shift(bool) { return 1; }
    static __device__ __forceinline__ void load4(const unsigned char* p, bool, float (&s)[2][2]) {
#pragma unroll
        for (int e = 0; e < 4; ++e)
            s[e >> 1][e & 1] = __fmul_rn(qk::f16_to_f32(__ldg(reinterpret_cast<const unsigned short*>(p) + 8 * e)), 0.0625f);
    }
};

// Bring the line of the entry at flat index idx into L2 (the decode's scale prefetch; a warp's 16
// entries, at most 64 B aligned to their size, share one line).
template <int kKind>
__device__ __forceinline__ void prefetch_scale(const void* sc, long long idx, bool sc16) {
    qk::prefetch_l2(static_cast<const unsigned char*>(sc) + (idx << Scale<kKind>::shift(sc16)));
}

// The group fold of one accumulator: IS A += s * (16P >> 4) (int32, wrapping: unsigned arithmetic);
// FS acc = acc + float(16P) * (s / 16) (two roundings, no FMA).                          [emulate.fold]
__device__ __forceinline__ void fold1(int& acc, int p16, int s) {
    acc = static_cast<int>(static_cast<unsigned>(acc) + static_cast<unsigned>(s) * static_cast<unsigned>(p16 >> 4));
}
__device__ __forceinline__ void fold1(float& acc, int p16, float s) {
    acc = __fadd_rn(acc, __fmul_rn(__int2float_rn(p16), s));
}
// ZQ: acc = acc + P * 2^e (the product is exact: one rounding).
__device__ __forceinline__ void fold1(float& acc, float p, float s) { acc = __fadd_rn(acc, __fmul_rn(p, s)); }
// The g = 128 fold.  IS: fold1, P from a zero accumulator.  FS: P starts from the bits of the float
// 2^23 + 2^22 (P_INIT) instead of zero, so that after the group's mma P holds the bits of the float
// 2^23 + 2^22 + 16P (exact while |16P| <= 2^22; at g = 128 |16P| <= 16 * 128 * 8 * 128 = 2^21), and
// float(16P) is one FADD away: no I2F, which sm_90 runs at 16 per clock and SM, a quarter of an FADD.
// The float equals __int2float_rn(16P) bit for bit.                              [emulate.biased_to_float]
template <int kKind>
struct G128 {
    static constexpr int P_INIT = kKind == KIND_FS ? 0x4B400000 : 0;  // ZQ: its mma_init starts from 0.0
};
__device__ __forceinline__ float biased_to_float(int bits) { return __fsub_rn(__int_as_float(bits), 12582912.0f); }
__device__ __forceinline__ void fold_g128(int& acc, int p16, int s) { fold1(acc, p16, s); }
__device__ __forceinline__ void fold_g128(float& acc, float p, float s) { fold1(acc, p, s); }
__device__ __forceinline__ void fold_g128(float& acc, int p_biased, float s) {
    acc = __fadd_rn(acc, __fmul_rn(biased_to_float(p_biased), s));
}
__device__ __forceinline__ int as_bits(int v) { return v; }
__device__ __forceinline__ int as_bits(float v) { return __float_as_int(v); }
__device__ __forceinline__ void from_bits(int& v, int b) { v = b; }
__device__ __forceinline__ void from_bits(float& v, int b) { v = __int_as_float(b); }
__device__ __forceinline__ int add_split(int a, int b) { return static_cast<int>(static_cast<unsigned>(a) + static_cast<unsigned>(b)); }
__device__ __forceinline__ float add_split(float a, float b) { return __fadd_rn(a, b); }

// One output value from the reduced accumulator.                                          [emulate.epilogue_value]
// IS: float(A) * (t * cs); FS: acc * t; ZQ: acc * (t * cs).
template <int kKind, typename Acc>
__device__ __forceinline__ float out_value(Acc acc, float tm, float cs) {
    if constexpr (kKind == KIND_IS) return __fmul_rn(__int2float_rn(acc), __fmul_rn(tm, cs));
    else if constexpr (kKind == KIND_ZQ) return __fmul_rn(acc, __fmul_rn(tm, cs));
    else return __fmul_rn(acc, tm);
}

// A token's quantization scales from its amax, as the reference's quantizer makes them:
// inv = rn(rn(1 / amax) * Q) (0 for an all-zero token), t = rn(amax / Q), with Q = 127 (int8) or
// 448 (E4M3, ZQ).                                                                [emulate.token_scales]
template <int kKind>
__device__ __forceinline__ void token_scales(float amax, float& inv, float& t) {
    constexpr float Q = kKind == KIND_ZQ ? 448.0f : 127.0f;
    inv = amax > 0.0f ? __fmul_rn(qk::rcp_rn(amax), Q) : 0.0f;
    t = qk::div_rn(amax, Q);
}

// The 4 outputs of one C fragment (n rows gid / gid+8, token columns 2tig / 2tig+1 of an n8 tile at
// m_base) -> y, as 32-bit pairs along n: lanes gid and gid ^ 1 swap halves (one shuffle), then the
// even-gid lane stores row 2tig at n = n0 + gid (+8), the odd one row 2tig + 1 at n0 + gid - 1 (+8).
//                                                                                           [emulate.store_frag]
__device__ __forceinline__ void store_frag(unsigned short* __restrict__ y, const unsigned short (&o)[4], int m_base, int n0,
                                           int M, int N, int gid, int tig) {
    const bool odd = (gid & 1) != 0;
    const unsigned send = odd ? (o[0] | (static_cast<unsigned>(o[2]) << 16)) : (o[1] | (static_cast<unsigned>(o[3]) << 16));
    const unsigned recv = __shfl_xor_sync(0xffffffffu, send, 4);
    const unsigned short r0 = static_cast<unsigned short>(recv & 0xFFFFu), r1 = static_cast<unsigned short>(recv >> 16);
    const int m = m_base + 2 * tig + (odd ? 1 : 0);
    const int n = n0 + gid - (odd ? 1 : 0);
    if (m < M) {
        qk::store_pair(y, m, n, N, odd ? r0 : o[0], odd ? o[1] : r0);
        qk::store_pair(y, m, n + 8, N, odd ? r1 : o[2], odd ? o[3] : r1);
    }
}

// Split-K: publish this CTA's accumulators, take a ticket; the last CTA of the tile gets true and
// then sums all splits in split order 0..S-1 (its own from registers), so the result does not
// depend on which CTA came last.  The tile's ticket is reset for the next launch.        [emulate.splitk]
template <typename Acc, int NF>
__device__ __forceinline__ bool splitk_reduce(Acc (&acc)[NF][4], int4* __restrict__ part, int* __restrict__ ticket,
                                              int* s_flag, int s, int S, int tiles, int tile, int warp, int lane) {
#pragma unroll
    for (int f = 0; f < NF; ++f)
        part[part_slot(s, tiles, tile, warp, f, NF, lane)] =
            make_int4(as_bits(acc[f][0]), as_bits(acc[f][1]), as_bits(acc[f][2]), as_bits(acc[f][3]));
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const int t = atomicAdd(ticket, 1);
        *s_flag = t == S - 1;
        if (t == S - 1) *ticket = 0;  // all S arrived: back to zero for the next launch
    }
    __syncthreads();
    if (!*s_flag) return false;
    __threadfence();
#pragma unroll
    for (int f = 0; f < NF; ++f) {
        Acc tot[4];
        for (int s2 = 0; s2 < S; ++s2) {
            Acc v[4];
            if (s2 == s) {
#pragma unroll
                for (int i = 0; i < 4; ++i) v[i] = acc[f][i];
            } else {
                const int4 b = qk::ld_cg_int4(part + part_slot(s2, tiles, tile, warp, f, NF, lane));
                from_bits(v[0], b.x);
                from_bits(v[1], b.y);
                from_bits(v[2], b.z);
                from_bits(v[3], b.w);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) tot[i] = s2 == 0 ? v[i] : add_split(tot[i], v[i]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[f][i] = tot[i];
    }
    return true;
}

// QUIK's epilogue on the IS decode and prefill (kQuik; qconvert_kernels/quik/reference.py quik_gemm): v,
// the integer sum A of output (m, n) times (s[m] * ws[n]) as out_value makes it (iscale 1 in every
// group, cscale = ws, a = 0), plus z[m] * (ws[n] * R[n]) (zcn = zc[n], the launcher's float32 product),
// plus the outlier product y_add[m, n] where there is one; each operation rounded once, as
// quik_gemm.cu's epilogue.  Outputs past M or N are not stored: z and y_add are not read for them.
//                                                                                   [emulate.quik_tail]
__device__ __forceinline__ float quik_tail(float v, int m, int n, int M, int N, const float* __restrict__ zq, float zcn,
                                           const unsigned short* __restrict__ y_add, bool bf16) {
    v = __fadd_rn(v, __fmul_rn(m < M ? __ldg(zq + m) : 0.0f, zcn));
    if (y_add != nullptr && m < M && n < N)
        v = __fadd_rn(v, qk::from_in_rt(__ldg(y_add + static_cast<long long>(m) * N + n), bf16));
    return v;
}

// ZeroQuant-FP's LoRC term at decode (KIND_ZQ with lh): v + z, z = sum_{r < R} h[m, r] * u[n, r] in r order
// (each product and sum rounded once), h float32 [M, R] from fp8_repacked.cu's w4a8r_lorc_h_zq, u float32
// [N128, R] (the LoRC factor U, zero past N).  Outputs past M or N are not stored: nothing is read for
// them.                                                                               [emulate.lorc_tail]
__device__ __forceinline__ float lorc_tail(float v, int m, int n, int M, int N, const float* __restrict__ lh,
                                           const float* __restrict__ lu, int R) {
    if (m >= M || n >= N) return v;
    float z = 0.0f;
    for (int r = 0; r < R; ++r)
        z = __fadd_rn(z, __fmul_rn(__ldg(lh + static_cast<long long>(m) * R + r), __ldg(lu + static_cast<long long>(n) * R + r)));
    return __fadd_rn(v, z);
}

// ------------------------------------------------------------------ decode

// kQuik (QUIK W4A4, w4a8r_decode_quik_m*): the activations come quantized (xq8 int8 [M, K], K = Kq,
// one int4 value per byte, and their scale tq [M], from quik_split): no amax, and each x chunk is
// copied from xq8 rather than quantized from x; the epilogue adds quik_tail.   [emulate.decode_cta]
template <int MT8, int kKind, bool kQuik = false>
__device__ __forceinline__ void decode(const unsigned short* __restrict__ x, const uint4* __restrict__ wq,
                                       const void* __restrict__ scales, const float* __restrict__ cscale, int alpha_log2,
                                       unsigned short* __restrict__ y, int* __restrict__ acc_out, int4* __restrict__ part,
                                       int* __restrict__ ws, int M, int N, int K, int N128, int G, int spg, int KB,
                                       int S, int gq, int gr, int A, int ak_log2, int flags,
                                       const signed char* __restrict__ xq8 = nullptr, const float* __restrict__ tq = nullptr,
                                       const float* __restrict__ zq = nullptr, const float* __restrict__ zc = nullptr,
                                       const unsigned short* __restrict__ y_add = nullptr,
                                       const float* __restrict__ lh = nullptr, const float* __restrict__ lu = nullptr,
                                       int lr = 0) {
    constexpr bool kIS = kKind == KIND_IS, kZq = kKind == KIND_ZQ;
    using Acc = typename Scale<kKind>::T;
    using TC = Tc<kZq>;
    constexpr int ROWS = decode_rows(MT8);
    constexpr int XK = decode_xk(MT8);
    constexpr int XS = decode_xs(MT8);
    // ZQ at 64 rows sits at the 128-register cap: with the prefetch ptxas (NVRTC, sm_90, 2026-12-05)
    // spilled one word into the group loop, so that kernel reads its scales one group ahead only.
    constexpr int AHEAD = kZq && MT8 == 8 ? 0 : D_SCALE_AHEAD;
    extern __shared__ uint4 smem_u4[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(smem_u4);
    unsigned char* sW = smem;                                   // [D_STAGES][8 warps][32 lanes] x 16 B
    unsigned char* sX = smem + D_W_BYTES;                       // [ROWS][XS] int8 (XK used)
    float* s_inv = reinterpret_cast<float*>(sX + ROWS * XS);    // [64] per-token 127 / amax
    float* s_t = s_inv + 64;                                    // [64] per-token scale amax / 127
    int* s_amax = reinterpret_cast<int*>(s_t + 64);             // [64] partial amax bits (amax CTAs)
    int* s_flag = s_amax + 64;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    const int s = blockIdx.x, tile = blockIdx.y, tiles = gridDim.y;
    const int cta = tile * S + s;                               // linear id = dispatch order
    const bool bf16 = (flags & 1) != 0, vec = (flags & 2) != 0, sc16 = (flags & 4) != 0;

    // This CTA's k steps: the groups of split s.
    const int g0 = split_g0(s, gq, gr), g1 = split_g1(s, gq, gr);
    const int kk0 = g0 * spg, kk1 = g1 * spg;                   // k steps of 32, [kk0, kk1)
    const int kb0 = kk0 >> 1, nblk = ((kk1 + 1) >> 1) - kb0;    // k64 blocks touched
    const int t16 = tile * WARPS + warp;                        // this warp's n16 tile

    // 1. Weights first: they do not depend on x, so D_STAGES - 1 blocks are in flight before the
    //    activations are even looked at.  Each lane copies exactly the 16 bytes it will read.
    // w_chunk and d_w_slot are linear in the block / stage: block i of this lane is wsrc + 32 i, and
    // stage st its slot wslot + st * D_STAGE_BYTES (the address math leaves the k loop).
    const uint4* wsrc = wq + w_chunk(t16, kb0, lane, KB);
    unsigned char* wslot = sW + d_w_slot(0, warp, lane);
#pragma unroll
    for (int i = 0; i < D_STAGES - 1; ++i) {
        if (i < nblk) qk::cp_async16_all(wslot + i * D_STAGE_BYTES, wsrc + 32 * i);
        qk::cp_async_commit();
    }

    // 1b. Group g0's scales before the amax, and the next AHEAD groups' lines into L2.
    const long long n_row = static_cast<long long>(t16) * 16 + gid;   // this lane's channels n_row, n_row + 8
    typename Scale<kKind>::T sc[2], nsc[2];
    sc[0] = Scale<kKind>::load(scales, static_cast<long long>(g0) * N128 + n_row, sc16);
    sc[1] = Scale<kKind>::load(scales, static_cast<long long>(g0) * N128 + n_row + 8, sc16);
    if (AHEAD > 0)
        for (int h = g0 + 1; h <= g0 + AHEAD && h < g1; ++h) prefetch_scale<kKind>(scales, static_cast<long long>(h) * N128 + n_row, sc16);

    // 2. Per-token amax over all of K.
    //    A = 0 (the plan: M <= 4 and at most 8 KB of activations): every CTA reads its rows whole,
    //    eight 16-byte loads in flight per thread, and takes the amax itself; nothing is exchanged,
    //    and the amax words of the workspace are not touched.                       [emulate.own_amax]
    //    A > 0: shared through the workspace: CTA c < A takes k chunk
    //    [c * AK, (c + 1) * AK) of every row, publishes max |x| with atomicMax on the float bits
    //    (non-negative floats order as their bit patterns), then counts itself in WS_ARRIVE.
    //    Everyone waits for A arrivals.  Deadlock-free: the A publishers are the first A CTAs of
    //    the grid in dispatch order and wait for nothing before publishing.
    if (kQuik) {  // quantized by quik_split: its per-token scale only
        if (tid < ROWS) s_t[tid] = tid < M ? __ldg(tq + tid) : 0.0f;
        __syncthreads();
    } else if (A == 0) {
        if (tid < 64) s_amax[tid] = 0;
        __syncthreads();
        const int upr_log2 = ak_log2 - 3;                       // 8-element units per row (2^ak_log2 >= K)
        const int units = M << upr_log2;
        for (int u0 = 0; u0 < units; u0 += 8 * THREADS) {
            float mx[8];
            if (vec) {  // all eight 16-byte loads issued before any is used: one L2 round trip, not eight
                uint4 r[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int u = u0 + j * THREADS + tid, m = u >> upr_log2, k = (u & ((1 << upr_log2) - 1)) << 3;
                    r[j] = make_uint4(0u, 0u, 0u, 0u);
                    if (u < units && k < K) r[j] = __ldg(reinterpret_cast<const uint4*>(x + static_cast<long long>(m) * K + k));
                }
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    float v[8];
                    unpack_x8(r[j], bf16, v);
                    mx[j] = 0.0f;
#pragma unroll
                    for (int e = 0; e < 8; ++e) mx[j] = fmaxf(mx[j], fabsf(v[e]));
                }
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int u = u0 + j * THREADS + tid;
                    float v[8];
                    mx[j] = 0.0f;
                    if (u < units) {
                        load_x8(x, u >> upr_log2, (u & ((1 << upr_log2) - 1)) << 3, K, vec, bf16, v);
#pragma unroll
                        for (int e = 0; e < 8; ++e) mx[j] = fmaxf(mx[j], fabsf(v[e]));
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int u = u0 + j * THREADS + tid;
                if (u < units && mx[j] > 0.0f) atomicMax(s_amax + (u >> upr_log2), __float_as_int(mx[j]));
            }
        }
        __syncthreads();
        if (tid < ROWS) token_scales<kKind>(tid < M ? __int_as_float(s_amax[tid]) : 0.0f, s_inv[tid], s_t[tid]);
        __syncthreads();
    } else {
        if (cta < A) {
            if (tid < 64) s_amax[tid] = 0;
            __syncthreads();
            const int upr_log2 = ak_log2 - 3;                       // 8-element units per row
            const int units = M << upr_log2;
            for (int u = tid; u < units; u += THREADS) {
                const int m = u >> upr_log2;
                const int k = (cta << ak_log2) + ((u & ((1 << upr_log2) - 1)) << 3);
                float v[8];
                load_x8(x, m, k, K, vec, bf16, v);
                float mx = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; ++e) mx = fmaxf(mx, fabsf(v[e]));
                if (mx > 0.0f) atomicMax(s_amax + m, __float_as_int(mx));
            }
            __syncthreads();
            if (tid < M && s_amax[tid] != 0) atomicMax(ws + WS_AMAX + tid, s_amax[tid]);
            __threadfence();
            __syncthreads();
            if (tid == 0) atomicAdd(ws + WS_ARRIVE, 1);
        }
        if (tid == 0) {
            while (qk::ld_acquire_gpu(ws + WS_ARRIVE) < A) __nanosleep(32);
        }
        __syncthreads();
        if (tid < ROWS) token_scales<kKind>(tid < M ? __int_as_float(qk::ld_acquire_gpu(ws + WS_AMAX + tid)) : 0.0f, s_inv[tid], s_t[tid]);
        __syncthreads();
        if (tid == 0 && atomicAdd(ws + WS_DONE, 1) == static_cast<int>(gridDim.x * gridDim.y) - 1) {
            // every CTA has read the amax: return the exchange to zero for the next launch
            for (int m = 0; m < M; ++m) ws[WS_AMAX + m] = 0;
            ws[WS_ARRIVE] = 0;
            ws[WS_DONE] = 0;
        }
    }

    // 3. Main loop over the split's groups; activations are quantized into shared memory one
    //    chunk of XC = min(XK, 64 * nblk rounded up to a power of two) k at a time.
    const int xc_log2 = min(ceil_log2(XK), ceil_log2(64 * nblk));  // chunk width, >= 64
    const int xb = 1 << (xc_log2 - 6);                             // k64 blocks per chunk
    int next_chunk_blk = 0, chunk_kk = 0;                          // block of the next chunk; k step of this chunk's start

    Acc acc[MT8][4];
    typename TC::P P[MT8][4];
#pragma unroll
    for (int mt = 0; mt < MT8; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][i] = Acc(0);
    uint4 wr = make_uint4(0u, 0u, 0u, 0u);

    // One k step: advance the pipeline at a new k64 block (and the x chunk at a new chunk), then
    // MT8 mma of this warp's 16 channels x 8 tokens each.                          [emulate.decode_kstep]
    auto kstep = [&](int kk, bool first) {
        const int blk = (kk >> 1) - kb0;
        if (kk == kk0 || (kk & 1) == 0) {
            if (blk == next_chunk_blk) {
                if (blk != 0) __syncthreads();                 // every warp is done with the old chunk
                const int kbase = (kb0 + blk) * 64;
                const int upr_log2 = xc_log2 - 3;
                for (int u = tid; u < (ROWS << upr_log2); u += THREADS) {
                    const int r = u >> upr_log2, kl = (u & ((1 << upr_log2) - 1)) << 3;
                    if (kQuik) {  // 8 int8 codes as they are; zeros past M and Kq
                        uint2 q8 = make_uint2(0u, 0u);
                        if (r < M && kbase + kl < K)
                            q8 = __ldg(reinterpret_cast<const uint2*>(xq8 + static_cast<long long>(r) * K + kbase + kl));
                        *reinterpret_cast<uint2*>(sX + r * XS + kl) = q8;
                        continue;
                    }
                    float v[8];
                    if (r < M) load_x8(x, r, kbase + kl, K, vec, bf16, v);
                    unsigned q[2] = {0u, 0u};
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        if constexpr (kZq) {  // as zq::quantize_row: e4m3(clamp(rn(x * inv), -448, 448)); 0 past M
                            if (r < M) q[e >> 2] |= f32_to_e4m3(fminf(fmaxf(__fmul_rn(v[e], s_inv[r]), -448.0f), 448.0f)) << (8 * (e & 3));
                        } else {
                            float f = 0.0f;
                            if (r < M) {  // as qk::quantize_row: rint, NaN (0 * inf) -> 0, clamp
                                f = rintf(__fmul_rn(v[e], s_inv[r]));
                                f = fminf(fmaxf(f == f ? f : 0.0f, -127.0f), 127.0f);
                            }
                            q[e >> 2] |= (static_cast<unsigned>(__float2int_rn(f)) & 0xFFu) << (8 * (e & 3));
                        }
                    }
                    *reinterpret_cast<uint2*>(sX + r * XS + kl) = make_uint2(q[0], q[1]);
                }
                __syncthreads();
                next_chunk_blk += xb;
                chunk_kk = (kb0 + blk) * 2;
            }
            qk::cp_async_wait<D_STAGES - 2>();                 // this lane's block `blk` has landed
            wr = *reinterpret_cast<const uint4*>(wslot + (blk & (D_STAGES - 1)) * D_STAGE_BYTES);
            const int nb = blk + D_STAGES - 1;                 // refill the slot read at the previous block
            if (nb < nblk) qk::cp_async16_all(wslot + (nb & (D_STAGES - 1)) * D_STAGE_BYTES, wsrc + 32 * nb);
            qk::cp_async_commit();
        }
        unsigned a[4];
        if (kk & 1) TC::frag(wr.z, wr.w, a);
        else TC::frag(wr.x, wr.y, a);
        const unsigned char* xp = sX + gid * XS + (kk - chunk_kk) * 32 + 8 * tig;
#pragma unroll
        for (int mt = 0; mt < MT8; ++mt) {
            const uint2 bb = *reinterpret_cast<const uint2*>(xp + mt * 8 * XS);
            const unsigned b[2] = {bb.x, bb.y};
            if (first) TC::mma_init(P[mt], a, b, 0);
            else TC::mma(P[mt], a, b);
        }
    };

    for (int g = g0; g < g1; ++g) {
        if (g + 1 < g1) {  // next group's scales, a group ahead; group g + 1 + AHEAD's line into L2
            const long long i1 = static_cast<long long>(g + 1) * N128 + n_row;
            nsc[0] = Scale<kKind>::load(scales, i1, sc16);
            nsc[1] = Scale<kKind>::load(scales, i1 + 8, sc16);
            if (AHEAD > 0 && g + 1 + AHEAD < g1) prefetch_scale<kKind>(scales, i1 + AHEAD * N128, sc16);
        }
        kstep(g * spg, true);
#pragma unroll 1
        for (int st = 1; st < spg; ++st) kstep(g * spg + st, false);
#pragma unroll
        for (int mt = 0; mt < MT8; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) fold1(acc[mt][i], P[mt][i], sc[i >> 1]);  // c0, c1: row gid; c2, c3: gid + 8
        sc[0] = nsc[0];
        sc[1] = nsc[1];
    }
    qk::cp_async_wait<0>();

    // 4. Split-K reduction (S > 1), then the epilogue in the last CTA of the tile.
    if (S > 1 && !splitk_reduce<Acc, MT8>(acc, part, ws + WS_TILES + tile, s_flag, s, S, tiles, tile, warp, lane)) return;
    const int n0 = t16 * 16;
    float cs[2] = {0.0f, 0.0f}, zcn[2] = {0.0f, 0.0f};
    if (kIS || kZq) {  // ZQ: alpha_log2 = 0, cs = cscale
        const float inv_alpha = qk::exp2_neg(alpha_log2);
        cs[0] = __fmul_rn(__ldg(cscale + n0 + gid), inv_alpha);
        cs[1] = __fmul_rn(__ldg(cscale + n0 + gid + 8), inv_alpha);
    }
    if (kQuik) {
        zcn[0] = __ldg(zc + n0 + gid);
        zcn[1] = __ldg(zc + n0 + gid + 8);
    }
#pragma unroll
    for (int mt = 0; mt < MT8; ++mt) {
        unsigned short o[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = mt * 8 + 2 * tig + (i & 1);             // < ROWS <= 64
            float v = out_value<kKind>(acc[mt][i], s_t[m], cs[i >> 1]);
            if (kQuik) v = quik_tail(v, m, n0 + gid + 8 * (i >> 1), M, N, zq, zcn[i >> 1], y_add, bf16);
            if (kZq && lh != nullptr) v = lorc_tail(v, m, n0 + gid + 8 * (i >> 1), M, N, lh, lu, lr);
            o[i] = qk::to_out_rt(v, bf16);
        }
        store_frag(y, o, mt * 8, n0, M, N, gid, tig);
        if (kIS && acc_out != nullptr) {                          // debug: the int32 accumulator A
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int m = mt * 8 + 2 * tig + (i & 1), n = n0 + gid + 8 * (i >> 1);
                if (m < M && n < N) acc_out[static_cast<long long>(m) * N + n] = as_bits(acc[mt][i]);
            }
        }
    }
}

// ------------------------------------------------------------------ prefill

template <int kKind, bool kQuik = false, int kBM = P_BM>
__device__ __forceinline__ void prefill(const signed char* __restrict__ xq, const float* __restrict__ t,
                                        const uint4* __restrict__ wq, const void* __restrict__ scales,
                                        const float* __restrict__ cscale, int alpha_log2, unsigned short* __restrict__ y,
                                        int* __restrict__ acc_out, int4* __restrict__ part, int* __restrict__ counters,
                                        int M, int N, int N128, int G, int spg, int KB, int S, int gq, int gr,
                                        int mtiles, int ntiles, int band_log2, int flags,
                                        const float* __restrict__ zq = nullptr, const float* __restrict__ zc = nullptr,
                                        const unsigned short* __restrict__ y_add = nullptr) {
    constexpr bool kIS = kKind == KIND_IS, kZq = kKind == KIND_ZQ;
    static_assert(kBM == 64 || kBM == 128, "prefill: BM 64 or 128");
    constexpr int NJ = kBM / 16;                               // n8 token tiles per warp
    constexpr int WROWS = kBM / 2;                             // token rows per warp
    constexpr int XR = kBM / 32;                               // activation copies per thread per stage
    constexpr int X_STAGE = kBM * P_BK;                        // activation bytes per stage
    using Acc = typename Scale<kKind>::T;
    using TC = Tc<kZq>;
    extern __shared__ uint4 smem_u4[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(smem_u4);
    unsigned char* sW = smem;                                  // [P_STAGES][8 tiles][2 blocks][32][16 B]
    unsigned char* sX = smem + P_STAGES * P_W_STAGE;           // [P_STAGES][BM rows][128 B] swizzled
    __shared__ int s_flag;

    // Banded raster (CUTLASS-style): consecutive CTAs take 2^band consecutive n tiles of one m
    // tile, then the next m tile; the resident CTAs share a band of weights (2^band x 128 x K/2
    // bytes) and a few activation panels, both L2-resident.                        [emulate.p_tile]
    const int mti = blockIdx.x >> band_log2;
    const int nti = (blockIdx.y << band_log2) + (blockIdx.x & ((1 << band_log2) - 1));
    if (mti >= mtiles || nti >= ntiles) return;
    const int s = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    const int wn = warp & 3, wm = warp >> 2;
    const bool bf16 = (flags & 1) != 0, sc16 = (flags & 4) != 0;
    const int m0 = mti * kBM, t16_0 = nti * 8, Kq = KB * 64;
    const int g0 = split_g0(s, gq, gr), g1 = split_g1(s, gq, gr);
    const int kk0 = g0 * spg, kk1 = g1 * spg;
    const int st0 = kk0 >> 2, nst = ((kk1 + 3) >> 2) - st0;   // k128 stages touched

    // Stage i of the slice -> buffer i % P_STAGES: weights 2 x 16 B, activations BM / 32 x 16 B per
    // thread, zero-filled past Kq (weights) or M / Kq (activations).  A thread copies the same
    // chunks of every stage, k128 further on each time, so its sources and destinations are worked
    // out once here and a stage adds 64 weight chunks (2 k64 blocks) and 128 activation bytes.
    // Weights: chunk q = tid + 256 r is (n16 tile (q >> 6), block bit (q >> 5) & 1, lane q & 31): r = 1
    // is 4 tiles on.  Activations: chunk q = tid + 256 r is (row q >> 3, 16-byte chunk q & 7): r is 32
    // rows on, the same chunk and swizzle (row & 3 unchanged).  A zero-filled copy (src-size 0) still
    // names a real address: rows past M as row M - 1, a weight block past KB as block 0 of the tile,
    // an activation chunk past Kq as the row's first, so no 64-bit pointer has to be selected per
    // copy (a 32-bit offset is).                                                    [emulate.p_copy_plan]
    const int w_bit = (tid >> 5) & 1;
    const int x_row = tid >> 3, x_c = tid & 7;
    const uint4* w_src[2];
    const signed char* x_src[XR];
    bool x_in[XR];
#pragma unroll
    for (int r = 0; r < 2; ++r) w_src[r] = wq + w_chunk(t16_0 + (tid >> 6) + 4 * r, w_bit, lane, KB);
#pragma unroll
    for (int r = 0; r < XR; ++r) {
        x_in[r] = m0 + x_row + 32 * r < M;
        x_src[r] = xq + static_cast<long long>(min(m0 + x_row + 32 * r, M - 1)) * Kq + x_c * 16;
    }
    const int x_dst = p_x_off(x_row, x_c);
    auto load_stage = [&](int i) {
        const int buf = i & (P_STAGES - 1), kst = st0 + i;
        const bool okw = 2 * kst + w_bit < KB;
        const int wk = okw ? kst * 64 : -32 * w_bit;            // else: block 0 of the same tile
        unsigned char* dw = sW + buf * P_W_STAGE + tid * 16;
#pragma unroll
        for (int r = 0; r < 2; ++r) qk::cp_async16(dw + r * THREADS * 16, w_src[r] + wk, okw ? 16 : 0);
        const bool okk = kst * P_BK + x_c * 16 < Kq;
        const int xk = okk ? kst * P_BK : -16 * x_c;            // else: the row's first chunk
        unsigned char* dx = sX + buf * X_STAGE + x_dst;
#pragma unroll
        for (int r = 0; r < XR; ++r) qk::cp_async16(dx + r * 32 * P_BK, x_src[r] + xk, okk && x_in[r] ? 16 : 0);
    };

#pragma unroll
    for (int i = 0; i < P_STAGES - 1; ++i) {
        if (i < nst) load_stage(i);
        qk::cp_async_commit();
    }
    // Stage i begins: its copies have landed (each thread's own; the barrier makes everyone's
    // visible, and frees the buffer stage i - 1 used), and stage i + P_STAGES - 1 is copied into it.
    //                                                                                [emulate.begin_stage]
    auto begin_stage = [&](int i) {
        qk::cp_async_wait<P_STAGES - 2>();
        __syncthreads();
        if (i + P_STAGES - 1 < nst) load_stage(i + P_STAGES - 1);
        qk::cp_async_commit();
    };

    Acc acc[2][NJ][4];
    typename TC::P P[2][NJ][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[a][j][i] = Acc(0);
    // Group scales: this lane's channels are n_row + 0, 8, 16, 24 (tiles a = 0, 1; rows gid, gid + 8),
    // one group's four at one pointer plus constants, the next group N128 entries on.
    const long long n_row = static_cast<long long>(t16_0 + 2 * wn) * 16 + gid;
    typename Scale<kKind>::T sc[2][2], nsc[2][2];
    const int sc_shift = Scale<kKind>::shift(sc16);
    const unsigned char* sc_ptr = static_cast<const unsigned char*>(scales) + ((static_cast<long long>(g0) * N128 + n_row) << sc_shift);
    const long long sc_step = static_cast<long long>(N128) << sc_shift;
    Scale<kKind>::load4(sc_ptr, sc16, sc);
    // This lane's fragment addresses within a stage: weights (tile a, block b2) at w_off + 512 (2a +
    // b2); activations of k step ks, n8 tile j at x_off[ks] + 1024 j (rows 8 j on keep row & 3, so
    // the swizzle of row wm * BM / 2 + gid holds for all NJ).                       [emulate.p_frag_offsets]
    const int w_off = ((4 * wn) * 32 + lane) * 16;
    int x_off[4];
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) x_off[ks] = p_x_off(wm * WROWS + gid, 2 * ks + (tig >> 1)) + ((tig & 1) << 3);

    // The two main loops' common steps.  read_w: both tiles' weight chunks of k64 block b2 of the
    // stage in buffer buf.  mma_step: one k step's 2 x NJ mma on activations at xs (+ 1024 j per n8
    // tile), the weights' low (k step even) or high half, from the constant `init` on a group's
    // first step.  end_group: the fold of the group's sums and the next group's scales.
    uint4 wr[2] = {make_uint4(0u, 0u, 0u, 0u), make_uint4(0u, 0u, 0u, 0u)};
    auto read_w = [&](int buf, int b2) {
#pragma unroll
        for (int a = 0; a < 2; ++a) wr[a] = *reinterpret_cast<const uint4*>(sW + buf * P_W_STAGE + w_off + (2 * a + b2) * BLOCK_BYTES);
    };
    auto mma_step = [&](const unsigned char* xs, bool odd, bool first, int init) {
        unsigned af[2][4];
#pragma unroll
        for (int a = 0; a < 2; ++a) {
            if (odd) TC::frag(wr[a].z, wr[a].w, af[a]);
            else TC::frag(wr[a].x, wr[a].y, af[a]);
        }
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const uint2 bb = *reinterpret_cast<const uint2*>(xs + j * 8 * P_BK);
            const unsigned b[2] = {bb.x, bb.y};
#pragma unroll
            for (int a = 0; a < 2; ++a) {
                if (first) TC::mma_init(P[a][j], af[a], b, init);
                else TC::mma(P[a][j], af[a], b);
            }
        }
    };
    auto end_group = [&](bool g128) {
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int j = 0; j < NJ; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    if (g128) fold_g128(acc[a][j][i], P[a][j][i], sc[a][i >> 1]);
                    else fold1(acc[a][j][i], P[a][j][i], sc[a][i >> 1]);
                }
#pragma unroll
        for (int a = 0; a < 2; ++a) {
            sc[a][0] = nsc[a][0];
            sc[a][1] = nsc[a][1];
        }
    };
    auto next_scales = [&](int g) {  // group g + 1's, a group ahead
        if (g + 1 < g1) {
            sc_ptr += sc_step;
            Scale<kKind>::load4(sc_ptr, sc16, nsc);
        }
    };

    if (spg == 4) {
        // g = 128 (the presets' group size): a stage is a group.  One iteration per stage: wait,
        // barrier, refill, the next group's scales, 4 unrolled k steps (the first from the constant
        // accumulator G128::P_INIT), the fold; every shared-memory address is a register plus a constant.
        //                                                                          [emulate.prefill_g128]
#pragma unroll 1
        for (int i = 0; i < nst; ++i) {
            const int buf = i & (P_STAGES - 1);
            begin_stage(i);
            next_scales(g0 + i);
#pragma unroll
            for (int ks = 0; ks < 4; ++ks) {
                if ((ks & 1) == 0) read_w(buf, ks >> 1);
                mma_step(sX + buf * X_STAGE + x_off[ks], ks & 1, ks == 0, G128<kKind>::P_INIT);
            }
            end_group(true);
        }
    } else {
        // Any other group size: one k step at a time (a group may end inside a stage, a split may
        // start inside one): a new stage every 4 steps, the weight chunks every 2.  [emulate.prefill_kstep]
        auto kstep = [&](int kk, bool first) {
            const int i = (kk >> 2) - st0, buf = i & (P_STAGES - 1), ks = kk & 3;
            if (kk == kk0 || ks == 0) begin_stage(i);
            if (kk == kk0 || (kk & 1) == 0) read_w(buf, (kk >> 1) & 1);
            mma_step(sX + buf * X_STAGE + p_x_off(wm * WROWS + gid, 2 * ks + (tig >> 1)) + ((tig & 1) << 3), kk & 1, first, 0);
        };
        for (int g = g0; g < g1; ++g) {
            next_scales(g);
            kstep(g * spg, true);
#pragma unroll 1
            for (int st = 1; st < spg; ++st) kstep(g * spg + st, false);
            end_group(false);
        }
    }
    qk::cp_async_wait<0>();

    const int tile = mti * ntiles + nti;
    if (S > 1) {
        Acc (&flat)[2 * NJ][4] = *reinterpret_cast<Acc (*)[2 * NJ][4]>(&acc);
        if (!splitk_reduce<Acc, 2 * NJ>(flat, part, counters + tile, &s_flag, s, S, mtiles * ntiles, tile, warp, lane)) return;
    }
#pragma unroll
    for (int a = 0; a < 2; ++a) {
        const int n0 = (t16_0 + 2 * wn + a) * 16;
        float cs[2] = {0.0f, 0.0f}, zcn[2] = {0.0f, 0.0f};
        if (kIS || kZq) {  // ZQ: alpha_log2 = 0, cs = cscale
            const float inv_alpha = qk::exp2_neg(alpha_log2);
            cs[0] = __fmul_rn(__ldg(cscale + n0 + gid), inv_alpha);
            cs[1] = __fmul_rn(__ldg(cscale + n0 + gid + 8), inv_alpha);
        }
        if (kQuik) {
            zcn[0] = __ldg(zc + n0 + gid);
            zcn[1] = __ldg(zc + n0 + gid + 8);
        }
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const int m_base = m0 + wm * WROWS + j * 8;
            unsigned short o[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int m = m_base + 2 * tig + (i & 1);
                const float tm = m < M ? __ldg(t + m) : 0.0f;
                float v = out_value<kKind>(acc[a][j][i], tm, cs[i >> 1]);
                if (kQuik) v = quik_tail(v, m, n0 + gid + 8 * (i >> 1), M, N, zq, zcn[i >> 1], y_add, bf16);
                o[i] = qk::to_out_rt(v, bf16);
            }
            store_frag(y, o, m_base, n0, M, N, gid, tig);
            if (kIS && acc_out != nullptr) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int m = m_base + 2 * tig + (i & 1), n = n0 + gid + 8 * (i >> 1);
                    if (m < M && n < N) acc_out[static_cast<long long>(m) * N + n] = as_bits(acc[a][j][i]);
                }
            }
        }
    }
}

}  // namespace w4r

// ---------------------------------------------------------------------------------------
// Entry points.  The launcher (cuda.py: plan) computes every launch parameter on the host from
// the shapes alone (no device value is read), so a linear is capturable in a CUDA graph.
// ---------------------------------------------------------------------------------------

// Decode: grid (S, N128 / 128), block 256, dynamic shared memory w4r::decode_smem(MT8).
// __launch_bounds__(256, 2): two CTAs per SM (<= 128 registers); without the second argument ptxas
// capped the M <= 8 kernels at 40 registers and spilled the group scales (NVRTC, CUDA 13.0).
#define W4R_DECODE(NAME, MT8, KIND)                                                                      \
    extern "C" __global__ void __launch_bounds__(w4r::THREADS, 2) NAME(                                  \
        const unsigned short* __restrict__ x, /* fp16 / bf16 bits [M, K] activations, row-major */     \
        const uint4* __restrict__ wq,         /* repacked weights [N128/16][KB][32][4] uint32 */         \
        const void* __restrict__ scales,      /* [G, N128]: IS int32 (int16 if flags & 4); FS fp16; ZQ int8 */ \
        const float* __restrict__ cscale,     /* float32 [N128] (IS, ZQ), or null (FS) */               \
        int alpha_log2,                       /* IS: cscale / 2^a, a in [-126, 126] */                   \
        unsigned short* __restrict__ y,       /* fp16 / bf16 bits [M, N] out */                          \
        int* __restrict__ acc_out,            /* int32 [M, N] accumulator A (IS debug), or null */      \
        int4* __restrict__ part,              /* split-K partials [S][tiles][8][MT8][32] int4 (S > 1) */ \
        int* __restrict__ ws,                 /* int32 [128 + tiles] workspace, zero at rest */          \
        int M, int N, int K, int N128,        /* M <= 8 * MT8; K = true K */                             \
        int G, int spg, int KB,               /* groups, k steps (32) per group, k64 blocks (Kq / 64) */ \
        int S, int gq, int gr,                /* splits; G = gq * S + gr */                               \
        int A, int ak_log2,                   /* amax CTAs, their k chunk 2^ak_log2 (>= 8) */            \
        int flags) {                          /* 1: bf16, 2: 16-byte x loads, 4: int16 iscale */         \
        w4r::decode<MT8, KIND>(x, wq, scales, cscale, alpha_log2, y, acc_out, part, ws, M, N, K, N128, G, spg, \
                               KB, S, gq, gr, A, ak_log2, flags);                                         \
    }

// QUIK W4A4 decode (M <= 64; qconvert_kernels/quik/cuda.py): as W4R_DECODE with x null and A = 0,
// the activations quantized by quik_split (xq int8 [M, Kq], K = Kq, t its scale s), QUIK's epilogue
// (zq, zc, y_add as in W4R_PREFILL_QUIK).
#define W4R_DECODE_QUIK(NAME, MT8)                                                                       \
    extern "C" __global__ void __launch_bounds__(w4r::THREADS, 2) NAME(                                  \
        const unsigned short* __restrict__ x, const uint4* __restrict__ wq, const void* __restrict__ scales, \
        const float* __restrict__ cscale, int alpha_log2, unsigned short* __restrict__ y,                \
        int* __restrict__ acc_out, int4* __restrict__ part, int* __restrict__ ws,                        \
        int M, int N, int K, int N128, int G, int spg, int KB, int S, int gq, int gr, int A, int ak_log2,  \
        int flags,                                                                                        \
        const signed char* __restrict__ xq,   /* int8 [M, K] */                                          \
        const float* __restrict__ t,          /* float32 [M] */                                          \
        const float* __restrict__ zq, const float* __restrict__ zc,                                       \
        const unsigned short* __restrict__ y_add) {                                                       \
        w4r::decode<MT8, w4r::KIND_IS, true>(x, wq, scales, cscale, alpha_log2, y, acc_out, part, ws, M, N, K, N128, G, spg, \
                                     KB, S, gq, gr, A, ak_log2, flags, xq, t, zq, zc, y_add);            \
    }

// Prefill: grid (mtiles << band, ceil(ntiles / 2^band), S), block 256, dynamic smem w4r::p_smem(BM),
// BM tokens per CTA: 128, one CTA per SM, or 64 with two (__launch_bounds__(256, 128 / BM): <= 128 registers).
#define W4R_PREFILL(NAME, KIND, BM)                                                                      \
    extern "C" __global__ void __launch_bounds__(w4r::THREADS, 128 / BM) NAME(                           \
        const signed char* __restrict__ xq,   /* int8 [M, Kq] (w4a8r_quantize_*), Kq = 64 KB */          \
        const float* __restrict__ t,          /* float32 [M] per-token scale */                          \
        const uint4* __restrict__ wq,         /* repacked weights */                                     \
        const void* __restrict__ scales,      /* [G, N128] as in decode */                               \
        const float* __restrict__ cscale,     /* float32 [N128] (IS) or null */                          \
        int alpha_log2,                                                                                  \
        unsigned short* __restrict__ y,       /* fp16 / bf16 bits [M, N] out */                          \
        int* __restrict__ acc_out,            /* int32 [M, N] (IS debug) or null */                      \
        int4* __restrict__ part,              /* [S][tiles][8][BM / 8][32] int4 (S > 1) */               \
        int* __restrict__ counters,           /* int32 [mtiles * ntiles], zero (S > 1) */                \
        int M, int N, int N128, int G, int spg, int KB, int S, int gq, int gr,                            \
        int mtiles, int ntiles, int band_log2,                                                            \
        int flags) {                          /* 1: bf16 out, 4: int16 iscale */                         \
        w4r::prefill<KIND, false, BM>(xq, t, wq, scales, cscale, alpha_log2, y, acc_out, part, counters, M, N, N128, G, spg, \
                         KB, S, gq, gr, mtiles, ntiles, band_log2, flags);                                \
    }

// QUIK W4A4 on sm_90 (qconvert_kernels/quik/cuda.py): the IS prefill with QUIK's epilogue (M > 64).
// xq: quik_split's int8 [M, Kq], one int4 value per byte; t: its per-token scale s; scales:
// int16 ones [G, N128] (g = 128); cscale: ws [N128]; alpha_log2 0; zq: its per-token z [M]; zc:
// float32 ws * R [N128]; y_add: the outlier product [M, N] (fp16 / bf16) or null.
#define W4R_PREFILL_QUIK(NAME)                                                                           \
    extern "C" __global__ void __launch_bounds__(w4r::THREADS, 1) NAME(                                  \
        const signed char* __restrict__ xq, const float* __restrict__ t, const uint4* __restrict__ wq,   \
        const void* __restrict__ scales, const float* __restrict__ cscale, int alpha_log2,               \
        unsigned short* __restrict__ y, int* __restrict__ acc_out, int4* __restrict__ part,              \
        int* __restrict__ counters,                                                                       \
        int M, int N, int N128, int G, int spg, int KB, int S, int gq, int gr,                            \
        int mtiles, int ntiles, int band_log2, int flags,                                                 \
        const float* __restrict__ zq,         /* float32 [M] */                                          \
        const float* __restrict__ zc,         /* float32 [N128] */                                       \
        const unsigned short* __restrict__ y_add) { /* fp16 / bf16 [M, N] or null */                    \
        w4r::prefill<w4r::KIND_IS, true>(xq, t, wq, scales, cscale, alpha_log2, y, acc_out, part, counters, M, N, N128, G, \
                                 spg, KB, S, gq, gr, mtiles, ntiles, band_log2, flags, zq, zc, y_add);   \
    }

// Per-token int8 quantizer for the prefill path: grid (M), block 256 (qk::quantize_row).
#define W4R_QUANT(NAME, BF16)                                                                            \
    extern "C" __global__ void __launch_bounds__(qk::QUANT_THREADS) NAME(                                \
        const unsigned short* __restrict__ x, /* fp16 / bf16 bits [M, K] */                              \
        signed char* __restrict__ xq,         /* int8 [M, Kq] out, columns K..Kq-1 = 0 */                \
        float* __restrict__ t,                /* float32 [M] out */                                      \
        int M, int K, int Kq) {                                                                           \
        qk::quantize_row<BF16>(x, xq, t, M, K, Kq);                                                      \
    }

// fp8/fp8_repacked.cu includes this file for the device code and the macros above, with
// W4R_NO_ENTRIES defined: its module then holds only its own (ZeroQuant-FP) entry points.
#ifndef W4R_NO_ENTRIES
W4R_DECODE(w4a8r_decode_is_m8, 1, w4r::KIND_IS)
W4R_DECODE(w4a8r_decode_is_m16, 2, w4r::KIND_IS)
W4R_DECODE(w4a8r_decode_is_m32, 4, w4r::KIND_IS)
W4R_DECODE(w4a8r_decode_is_m64, 8, w4r::KIND_IS)
W4R_DECODE(w4a8r_decode_fs_m8, 1, w4r::KIND_FS)
W4R_DECODE(w4a8r_decode_fs_m16, 2, w4r::KIND_FS)
W4R_DECODE(w4a8r_decode_fs_m32, 4, w4r::KIND_FS)
W4R_DECODE(w4a8r_decode_fs_m64, 8, w4r::KIND_FS)
W4R_DECODE_QUIK(w4a8r_decode_quik_m8, 1)
W4R_DECODE_QUIK(w4a8r_decode_quik_m16, 2)
W4R_DECODE_QUIK(w4a8r_decode_quik_m32, 4)
W4R_DECODE_QUIK(w4a8r_decode_quik_m64, 8)
W4R_PREFILL(w4a8r_prefill_is, w4r::KIND_IS, 128)
W4R_PREFILL(w4a8r_prefill_fs, w4r::KIND_FS, 128)
W4R_PREFILL(w4a8r_prefill_is_bm64, w4r::KIND_IS, 64)
W4R_PREFILL(w4a8r_prefill_fs_bm64, w4r::KIND_FS, 64)
W4R_PREFILL_QUIK(w4a8r_prefill_quik)
W4R_QUANT(w4a8r_quantize_f16, false)
W4R_QUANT(w4a8r_quantize_bf16, true)
#endif  // W4R_NO_ENTRIES
