// Rotary position embedding of a decoder block's q and k, fp16 / bf16, in one launch: what eager
// transformers runs as ten small kernels (apply_rotary_pos_emb: q * cos, rotate_half(q) (a
// negation and a concatenation), its product with sin and the sum; the same for k).  Bit for bit
// qconvert_kernels/rope/reference.py, whose docstring is the definition; it equals transformers'
// formula exactly, since each of its torch ops rounds once to the dtype and so does each step here:
//
//   out[i]     = dtype(dtype(x[i] * cos[i])         + dtype(-x[i + h] * sin[i]))       i < h = D / 2
//   out[i + h] = dtype(dtype(x[i + h] * cos[i + h]) + dtype(x[i] * sin[i + h]))
//
// (Each step is torch's own: a float32 product or sum of values widened from the dtype, rounded to
// nearest even, then rounded to the dtype, so the two agree bit for bit whatever the values.  It
// is also the correctly rounded dtype result: a product of two fp16 values is exact in float32,
// and so is one of two bf16 values unless it falls below float32's normal range; a sum rounded
// twice is, 24 >= 2 * 11 + 2 bits making the double rounding innocuous.  No FMA: the build has
// --fmad=false, and __fmul_rn / __fadd_rn say so here.)
//
// Work split, with no integer division (a runtime divisor compiles to a float reciprocal whose
// F2I carries .FTZ, which the build checks refuse): CTA (t, y, b) takes token t of batch row b
// and heads y * H' .. y * H' + H' - 1 (H' = blockDim.y, chosen by the launcher: H' * h <= 128
// threads where a head's pairs allow), heads 0 .. Hq - 1 being q's, then Hk of k's; thread
// (i, j) rotates pair i of head y * H' + j (two inputs, four table values, two outputs), so a
// warp's loads of one head are coalesced.  At batch 1 a Llama-3-8B token is 40 heads of 64 pairs:
// 20 CTAs of 2 heads, one pair per thread, no loop: one round of loads, the latency of a decode
// step's small kernel.
//
//   CTA (t, y, b):  threadIdx.y = j  ->  head y * H' + j  (q heads first, then k heads)
//                   threadIdx.x = i  ->  pair (i, i + h) of that head's D values
//
// Every tensor is read and written through its strides (in elements; the last dimension's is 1):
// q and k may be views of a joined q/k/v projection, cos and sin may broadcast over the batch
// (stride 0), and the outputs take the layout eager torch would give them (the caller's choice).
#include "../common.cuh"

namespace qr {

constexpr int MAX_THREADS = 1024;  // h x H' threads a CTA (h <= 1024: D up to 2048)

template <bool kBF16>
__device__ __forceinline__ float rnd(float v) {  // round to the dtype and widen back (exact)
    return qk::from_in<kBF16>(qk::to_out<kBF16>(v));
}

template <bool kBF16>
__device__ __forceinline__ void rope_pair(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                                          const unsigned short* __restrict__ cos, const unsigned short* __restrict__ sin,
                                          unsigned short* __restrict__ qo, unsigned short* __restrict__ ko,
                                          int hq, int hk, int half, long long qb, long long qh,
                                          long long qt, long long kb, long long kh, long long kt, long long qob,
                                          long long qoh, long long qot, long long kob, long long koh, long long kot,
                                          long long cb, long long ct, long long sb, long long st) {
    const int head = blockIdx.y * blockDim.y + threadIdx.y;
    if (head >= hq + hk) return;  // the last CTA of a token: its spare heads
    const int t = blockIdx.x;
    const int b = blockIdx.z;
    const int i = threadIdx.x;  // blockDim.x == half
    const bool is_q = head < hq;
    const int h = is_q ? head : head - hq;
    const unsigned short* x = is_q ? q + b * qb + h * qh + t * qt : k + b * kb + h * kh + t * kt;
    unsigned short* y = is_q ? qo + b * qob + h * qoh + t * qot : ko + b * kob + h * koh + t * kot;
    const unsigned short* c = cos + b * cb + t * ct;
    const unsigned short* s = sin + b * sb + t * st;
    const float x1 = qk::from_in<kBF16>(x[i]);
    const float x2 = qk::from_in<kBF16>(x[i + half]);
    const float c1 = qk::from_in<kBF16>(c[i]), c2 = qk::from_in<kBF16>(c[i + half]);
    const float s1 = qk::from_in<kBF16>(s[i]), s2 = qk::from_in<kBF16>(s[i + half]);
    // rotate_half(x) = cat(-x2, x1): the first half's sine term multiplies -x2 (negation exact)
    y[i] = qk::to_out<kBF16>(__fadd_rn(rnd<kBF16>(__fmul_rn(x1, c1)), rnd<kBF16>(__fmul_rn(-x2, s1))));
    y[i + half] = qk::to_out<kBF16>(__fadd_rn(rnd<kBF16>(__fmul_rn(x2, c2)), rnd<kBF16>(__fmul_rn(x1, s2))));
}

}  // namespace qr

#define QR_ARGS                                                                                                     \
    const unsigned short *q /* [B, Hq, T, D] strided */, const unsigned short *k /* [B, Hk, T, D] strided */,      \
        const unsigned short *cos /* [B or 1, T, D] strided */, const unsigned short *sin /* as cos */,            \
        unsigned short *qo /* [B, Hq, T, D] strided */, unsigned short *ko /* [B, Hk, T, D] strided */,            \
        int hq, int hk, int half /* D / 2 == blockDim.x */,                                                        \
        long long qb, long long qh, long long qt, long long kb, long long kh, long long kt, /* q's, k's strides */  \
        long long qob, long long qoh, long long qot, long long kob, long long koh, long long kot, /* outputs' */    \
        long long cb, long long ct, long long sb, long long st /* cos's and sin's b, t strides */

extern "C" __global__ void __launch_bounds__(qr::MAX_THREADS) rope_f16(QR_ARGS) {
    qr::rope_pair<false>(q, k, cos, sin, qo, ko, hq, hk, half, qb, qh, qt, kb, kh, kt, qob, qoh, qot, kob, koh, kot, cb,
                         ct, sb, st);
}

extern "C" __global__ void __launch_bounds__(qr::MAX_THREADS) rope_bf16(QR_ARGS) {
    qr::rope_pair<true>(q, k, cos, sin, qo, ko, hq, hk, half, qb, qh, qt, kb, kh, kt, qob, qoh, qot, kob, koh, kot, cb,
                        ct, sb, st);
}
