// ZeroQuant-FP fp4-fp8 at decode on load-time repacked weights (sm_89+): w4a8_repacked.cu's decode
// kernel instantiated for KIND_ZQ, so an FP4 layer at M <= 64 gets the same split-K, the deep
// cp.async weight pipeline and the fused per-token quantizer as the W4A8 layers, in one launch.
//
//   y = fp4_fp8_gemm(x) of qconvert_kernels/fp8/reference.py, in the split order of
//   reference.fp4_fp8_gemm_split (one split: fp4_fp8_gemm), rounded to fp16 / bf16:
//     xq, t = E4M3 per-token quantization of x (amax / 448; fused, as w4r::decode does for int8)
//     P[j] = sum_{k in group j} xq[m, k] * w[n, k]     FP8 tensor cores, float32, zeroed per group
//     acc = sum over the split's groups of P[j] * 2^e[n, j], splits added in split order
//     y = acc * (t[m] * cscale[n])
//
// The weights are fp4-fp8's stored E2M1 nibbles repacked by w4a8/repack.py exactly like int4
// (the on-disk nibble order is the same); w4r::fp4x8r_to_e4m3 widens them to E4M3 in registers.
// The group exponents are repacked to int8 [G, N128], cscale padded to float32 [N128].
// Launcher: qconvert_kernels/w4a8/cuda.py (prepare("fp4-fp8", ...), linear); emulator:
// w4a8/emulate.py (decode_cta with zq).  As with fp8_gemm.cu, the FP8 tensor cores' own
// accumulation inside a group is unspecified by PTX: the GPU tests hold P to the tolerance of
// reference.py, the emulator keeps it exact.
//
// M > 64 runs fp8_gemm.cu's fp4_fp8_gemm_*: there is no ZQ prefill kernel.  On sm_90 ptxas turns
// each FP8 mma.sync into two fp16 HMMA plus the operands' widening (Hopper reaches its FP8 units
// through wgmma only), and w4r::prefill's 128 x 128 tile instantiated for KIND_ZQ then needed more
// than 255 registers and spilled (NVRTC 13.0, 2026-12-05).

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
#error "fp8_repacked.cu needs sm_89 or newer (FP8 tensor-core mma, e4m3 cvt)"
#endif

#define W4R_NO_ENTRIES
#include "../w4a8/w4a8_repacked.cu"

// Decode: grid (S, N128 / 128), block 256, dynamic shared memory w4r::decode_smem(MT8); the
// arguments are W4R_DECODE's (scales int8 [G, N128], cscale float32 [N128], alpha_log2 0, acc_out
// null).
W4R_DECODE(w4a8r_decode_zq_m8, 1, w4r::KIND_ZQ)
W4R_DECODE(w4a8r_decode_zq_m16, 2, w4r::KIND_ZQ)
W4R_DECODE(w4a8r_decode_zq_m32, 4, w4r::KIND_ZQ)
W4R_DECODE(w4a8r_decode_zq_m64, 8, w4r::KIND_ZQ)
