// A decoder block's new keys and values into its static KV cache, in one launch: what the decode
// engine (qconvert/engine.py, StaticKVCache.update) runs as two index_copy_ kernels, one for the
// keys and one for the values.  A copy of 16-bit words, so fp16 and bf16 alike and exact whatever
// the values; qconvert_kernels/kvcache/reference.py is the definition:
//
//   kc[b, h, cols[t], i] = k[b, h, t, i]     i < Dk
//   vc[b, h, cols[t], i] = v[b, h, t, i]     i < Dv
//
// Work split, with no integer division: CTA (t, y, b) takes token t of batch row b and heads
// y * H' .. y * H' + H' - 1 (H' = blockDim.y, chosen by the launcher: H' * W <= 128 threads where a
// head allows, W = max(Dk, Dv) = blockDim.x); thread (i, j) copies element i of head y * H' + j's
// key (if i < Dk) and value (if i < Dv), so a warp's loads and stores of one head are contiguous.
// At batch 1 a Llama-3-8B token is 8 KV heads of 128: 8 CTAs of 128 threads, one round of loads.
//
//   CTA (t, y, b):  threadIdx.y = j  ->  head y * H' + j
//                   threadIdx.x = i  ->  element i of that head's key and value
//
// Every tensor is read and written through its strides (in elements; the last dimension's is 1):
// k and v may be views of a joined q/k/v projection or a RoPE output laid out [B, T, H, D], the
// caches are any [B, H, L, D] views.  The column of token t is read from device memory (cols, int64),
// so a CUDA graph replays the launch for every new column; a column outside 0 .. L - 1 is not written
// (the engine never gives one; torch's index_copy_ would stop the device with an assert instead).

namespace kv {

constexpr int MAX_THREADS = 1024;  // W x H' threads a CTA (W <= 1024: head sizes up to 1024)

}  // namespace kv

#define KV_ARGS                                                                                                      \
    const unsigned short *__restrict__ k /* [B, H, T, Dk] strided */,                                              \
        const unsigned short *__restrict__ v /* [B, H, T, Dv] strided */,                                            \
        const long long *__restrict__ cols /* [T] int64: the cache column of token t */,                             \
        unsigned short *__restrict__ kc /* [B, H, L, Dk] strided */,                                                 \
        unsigned short *__restrict__ vc /* [B, H, L, Dv] strided */,                                                 \
        int heads, int dk, int dv, long long len /* L */,                                                            \
        long long kb, long long kh, long long kt, long long vb, long long vh, long long vt, /* k's, v's strides */    \
        long long kcb, long long kch, long long kcl, long long vcb, long long vch, long long vcl /* the caches' */

extern "C" __global__ void __launch_bounds__(kv::MAX_THREADS) kv_write(KV_ARGS) {
    const int head = blockIdx.y * blockDim.y + threadIdx.y;
    if (head >= heads) return;  // the last CTA of a token: its spare heads
    const int t = blockIdx.x;
    const int b = blockIdx.z;
    const int i = threadIdx.x;  // blockDim.x == max(dk, dv)
    const long long col = cols[t];
    if (col < 0 || col >= len) return;
    if (i < dk) kc[b * kcb + head * kch + col * kcl + i] = k[b * kb + head * kh + t * kt + i];
    if (i < dv) vc[b * vcb + head * vch + col * vcl + i] = v[b * vb + head * vh + t * vt + i];
}
