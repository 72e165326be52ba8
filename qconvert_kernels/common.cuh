// Device helpers shared by every kernel family of qconvert (w4a8, fp8, quik, illm, hadamard).
//
// Nothing here is an entry point: each family's .cu includes this file (`#include "../common.cuh"`)
// and declares its own extern "C" kernels, so a module never carries another family's kernels.
// NVRTC gets no include path: qconvert_kernels/compile.py:kernel_source() inlines the includes
// (each file once; the guard below makes a second inclusion harmless for nvcc too).
//
// No header is included (no cuda_fp16.h / cuda_bf16.h / cuda_pipeline.h): fp16 and bf16 travel as
// their 16-bit patterns and are converted with cvt PTX; async copies and memory-ordered accesses
// are written in PTX.  The same text compiles with nvcc and with NVRTC.
//
// Floating point without flush-to-zero.  The launchers build every module themselves with
// `--ftz=false --prec-div=true --fmad=false` (qconvert_kernels/launch.py), and the code below
// avoids the compiler's own helper sequences that use FTZ instructions internally: the IEEE
// float32 reciprocal / division routines (__frcp_rn, __fdiv_rn: FADD.FTZ, FSETP.*.FTZ in their
// slow paths) and integer division by a run-time value (F2I.FTZ in the reciprocal estimate).
// tests/test_kernels_families.py reads the SASS of the exact cubins the launchers load and fails
// on any .FTZ instruction.

#ifndef QCONVERT_KERNELS_COMMON_CUH
#define QCONVERT_KERNELS_COMMON_CUH

namespace qk {

// ------------------------------------------------------------------------------- tensor cores

// One m16n8k32 int8 tensor-core product, C += A * B (int32, wrapping, no saturation: the converter
// proves no int32 overflow for W4A8-IS; wrapping is also what torch's int32 does).
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k32", .s8), gid = lane >> 2, tig = lane & 3:
//   a0 = A[gid][4tig..4tig+3]   a1 = A[gid+8][4tig..]   a2 = A[gid][16+4tig..]   a3 = A[gid+8][16+4tig..]
//   b0 = B[4tig..4tig+3][gid]   b1 = B[16+4tig..16+4tig+3][gid]
//   c0 = C[gid][2tig]  c1 = C[gid][2tig+1]  c2 = C[gid+8][2tig]  c3 = C[gid+8][2tig+1]
// (byte 0 of a register = the lowest k).
__device__ __forceinline__ void mma_s8(int (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The same product on a constant accumulator input, C = A * B + init in every register (int32,
// wrapping): w4a8_repacked.cu's g = 128 float-scale prefill starts each group at a float bias, so
// the group's sum comes out as the bits of a float (w4r::biased_to_float).
__device__ __forceinline__ void mma_s8_init(int (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2], int init) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(init));
}

// With a zero accumulator input, C = A * B: the first k step of a group starts its partial this
// way, so no instruction has to clear P after a fold.
__device__ __forceinline__ void mma_s8_zero(int (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    mma_s8_init(c, a, b, 0);
}

// ------------------------------------------------------------------------------- int4 unpacking

// 8 packed two's-complement nibbles -> 8 sign-extended int8 in two registers, in order:
// nibble i (bits 4i..4i+3) -> byte i of b0 (i < 4) / byte i-4 of b1.
// Why this way: a per-byte sign extension of a 4-bit value v is ((v ^ 8) + 0x78) ^ 0x80
// (the xor maps v to v+8 in 0..15, +0x78 lands in 0x78..0x87 without a carry into the
// next byte, ^0x80 recentres: 0x78 -> -8 ... 0x87 -> 7), so 4 lanes go at once in 32-bit
// integer ops, and __byte_perm (PRMT) interleaves even / odd nibbles back into k order.
// (The native-layout kernels of w4a8_gemm.cu use this; the repacked kernels use the 3-op
// unpack_int4x8_hi below.)
__device__ __forceinline__ void unpack_int4x8(unsigned w, unsigned (&b)[2]) {
    const unsigned u = w ^ 0x88888888u;             // v ^ 8 in every nibble
    const unsigned lo = u & 0x0F0F0F0Fu;            // bytes: n0 n2 n4 n6
    const unsigned hi = (u >> 4) & 0x0F0F0F0Fu;     // bytes: n1 n3 n5 n7
    const unsigned e0 = __byte_perm(lo, hi, 0x5140); // bytes: n0 n1 n2 n3
    const unsigned e1 = __byte_perm(lo, hi, 0x7362); // bytes: n4 n5 n6 n7
    b[0] = (e0 + 0x78787878u) ^ 0x80808080u;
    b[1] = (e1 + 0x78787878u) ^ 0x80808080u;
}

// 8 nibbles of a *repacked* word -> 8 int8 equal to 16 * q, in three integer ops.
// The repack (w4a8/repack.py) stores nibble position 2i = q[k + i] and 2i + 1 = q[k + 4 + i]
// (i = 0..3), so masking the high nibble of every byte gives bytes 16 * q[k+4..k+7] and shifting
// the low nibble up gives 16 * q[k..k+3]: the sign bit of q lands on bit 7 of its byte, no sign
// extension needed.  The tensor cores then compute 16 * P exactly (|16 P| <= 16 * 127 * 8 * g
// < 2^24 for g <= 1024), and the fold divides by 16 exactly (an arithmetic shift for int32, a
// power-of-two factor folded into the float scale).
__device__ __forceinline__ unsigned int4x4_lo16(unsigned w) { return (w << 4) & 0xF0F0F0F0u; }
__device__ __forceinline__ unsigned int4x4_hi16(unsigned w) { return w & 0xF0F0F0F0u; }

// ------------------------------------------------------------------------------- conversions

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
// The same with the type chosen at run time (a uniform branch; the repacked kernels take the
// activation dtype as a flag instead of doubling their instantiations).
__device__ __forceinline__ unsigned short to_out_rt(float f, bool bf16) {
    return bf16 ? f32_to_bf16_rn(f) : f32_to_f16_rn(f);
}
__device__ __forceinline__ float from_in_rt(unsigned short h, bool bf16) {
    return bf16 ? bf16_to_f32(h) : f16_to_f32(h);
}

// 2^-a as a float, exactly (a in [-126, 126]; the launcher checks): dividing cscale by 2^a
// is then an exact multiplication, as the reference's cscale / 2.0**a is exact.
__device__ __forceinline__ float exp2_neg(int a) {
    return __int_as_float((127 - a) << 23);
}

// Correctly rounded float32 reciprocal and quotient, computed in double and rounded once to
// float.  Exact: for +, -, *, / of float32 operands, rounding first to double (53 bits >= 2 * 24
// + 2) then to float32 gives the correctly rounded float32 result (double rounding is innocuous;
// subnormal float32 results included).  Why not __frcp_rn / __fdiv_rn: their slow paths use FTZ
// instructions (see the top of this file); the double routines (MUFU.RCP64H, DFMA) have none.
__device__ __forceinline__ float rcp_rn(float x) { return __double2float_rn(__drcp_rn(static_cast<double>(x))); }
__device__ __forceinline__ float div_rn(float a, float b) {
    return __double2float_rn(__ddiv_rn(static_cast<double>(a), static_cast<double>(b)));
}

// ------------------------------------------------------------------------------- integer division

// floor(n / d) for d > 0, by restoring binary long division in integer instructions only (no
// float reciprocal estimate).  For per-thread set-up values (a group count, a per-row divisor),
// not inner loops: one iteration per quotient bit.
__device__ __forceinline__ unsigned long long udiv_u64(unsigned long long n, unsigned long long d) {
    if (d == 0ull || n < d) return 0ull;
    const int sh = __clzll(d) - __clzll(n);  // d << sh <= n < d << (sh + 1)
    unsigned long long q = 0ull, r = n;
#pragma unroll 1
    for (int i = sh; i >= 0; --i) {
        const unsigned long long ds = d << i;
        q <<= 1;
        if (r >= ds) {
            r -= ds;
            q |= 1ull;
        }
    }
    return q;
}
__device__ __forceinline__ int udiv_u32(int n, int d) {
    return static_cast<int>(udiv_u64(static_cast<unsigned long long>(n), static_cast<unsigned long long>(d)));
}

// Division by a divisor fixed for many numerators (Granlund & Montgomery, "Division by invariant
// integers using multiplication", 1994, Theorem 4.2): for 0 <= n < 2^nbits and d >= 1 with
// l = ceil(log2 d), s = nbits + l and m = ceil(2^s / d) (< 2^(nbits+1)), floor(n / d) =
// floor(n * m / 2^s).  Here s is raised to at least 64 (still valid: a larger nbits) so the
// quotient is the high word of the 128-bit product shifted right by s - 64, one __umul64hi.
// Requires nbits + l <= 127 and m < 2^64, i.e. s - l <= 63 (checked by the caller's bounds).
struct DivBy {
    unsigned long long m;
    int shift;  // s - 64
    bool one;   // d == 1
    __device__ __forceinline__ void init(unsigned long long d, int nbits) {
        one = d <= 1ull;
        int l = 64 - __clzll(d - 1ull);        // ceil(log2 d) for d >= 2
        if (one) l = 0;
        int s = nbits + l;
        if (s < 64) s = 64;
        shift = s - 64;
        // m = ceil(2^s / d) = floor((2^s - 1) / d) + 1, 2^s up to 2^127: 128-bit restoring division
        // (the remainder stays below d < 2^64; `carry` is its bit 64 after the shift, and then the
        // subtraction wraps to the right value; the quotient fits 64 bits by the bound on m)
        unsigned long long q = 0ull, r = 0ull;
#pragma unroll 1
        for (int i = s - 1; i >= 0; --i) {  // the s one-bits of the numerator 2^s - 1
            const bool carry = (r >> 63) != 0ull;
            r = (r << 1) | 1ull;
            q <<= 1;
            if (carry || r >= d) {
                r -= d;
                q |= 1ull;
            }
        }
        m = q + 1ull;
    }
    __device__ __forceinline__ unsigned long long div(unsigned long long n) const {
        return one ? n : (__umul64hi(n, m) >> shift);
    }
};

// ------------------------------------------------------------------------------- stores

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

// ------------------------------------------------------------------------------- async copies

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without passing through registers (sm_80 cp.async, L1 bypassed),
// `src_bytes` of them read (16, or 0: the 16 bytes are zero-filled and nothing is read).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes));
}
// All 16 bytes read (no zero fill).  No L2 cache-policy operand (`.L2::cache_hint` with a
// `createpolicy` descriptor): on an H200 (2026-12-04) the decode kernels built with one faulted with
// CUDA_ERROR_ILLEGAL_INSTRUCTION at the hinted LDGSTS, whose descriptor ptxas had put in uniform
// registers that no instruction wrote (desc[UR1]); compile.unwritten_uniform_registers finds such reads.
__device__ __forceinline__ void cp_async16_all(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
// Bring the line holding `p` (global memory) into L2: a hint, no register is written and nothing waits
// on it.  PTX `prefetch.global.L2`.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ------------------------------------------------------------------------------- memory order

// Loads that see other CTAs' writes (L1 is not coherent across SMs: these go to L2).
__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ int ld_relaxed_gpu(const int* p) {
    int v;
    asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ int4 ld_cg_int4(const int4* p) {
    int4 v;
    asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}

// ------------------------------------------------------------------------------- per-token int8

// Per-token int8 quantizer, one CTA of QUANT_THREADS per row:
//   amax = max_k |x[m, k]| (float32; a max is exact in any order), inv = rn(rn(1 / amax) * 127)
//   (0 for amax == 0; see below), xq = clamp(rint(x * inv), -127, 127), t = rn(amax / 127);
//   columns K..Kp-1 of xq are written as 0.  (NaN inputs are not supported: fmaxf drops them.)
// This is qconvert_kernels/w4a8/reference.py:quantize_per_token_int8 bit for bit.
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
    const float inv = amax > 0.0f ? __fmul_rn(rcp_rn(amax), 127.0f) : 0.0f;
    for (int k = threadIdx.x; k < Kp; k += QUANT_THREADS) {
        float q = 0.0f;
        if (k < K) {
            q = rintf(__fmul_rn(from_in<kBF16>(xr[k]), inv));   // round half to even, as torch.round
            q = q == q ? q : 0.0f;                              // 0 * inf (amax < 127 / FLT_MAX): 0, as the reference
            q = fminf(fmaxf(q, -127.0f), 127.0f);
        }
        qr[k] = static_cast<signed char>(__float2int_rn(q));
    }
    if (threadIdx.x == 0) t[m] = div_rn(amax, 127.0f);
}

}  // namespace qk

#endif  // QCONVERT_KERNELS_COMMON_CUH
