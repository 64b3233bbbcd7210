// Small kernels that exercise the CUDA emulation's model (csrc/emulate/): barriers, warp collectives,
// shared memory, launch limits, half conversions, and the bugs it must report. Compiled for the
// host by tests/test_cuda_emulation.py; `kernels CASE` runs one case and prints its result, or
// "error: <message>".
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#ifndef LOSSFORGE_DYNAMIC_SMEM
#define LOSSFORGE_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

#include "mma.cuh"

using lossforge::emulate::launch;

// out[i] = in[n - 1 - i] through dynamic shared memory: every thread reads what another wrote.
__global__ void reverse_kernel(const float* in, float* out, bool sync) {
  LOSSFORGE_DYNAMIC_SMEM(float, buf);
  const int i = threadIdx.x, n = blockDim.x;
  buf[i] = in[blockIdx.x * n + i];
  if (sync) __syncthreads();
  out[blockIdx.x * n + i] = buf[n - 1 - i];
}

// Per block: the warp sums by xor shuffles, the ballot of odd lanes, and __syncthreads_count/_or.
__global__ void collectives_kernel(const float* in, float* warp_sums, unsigned* ballots, int* counts) {
  const int i = threadIdx.x, lane = i % 32, warp = i / 32;
  float v = in[blockIdx.x * blockDim.x + i];
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  const unsigned b = __ballot_sync(0xffffffffu, lane % 2 == 1);
  const int c = __syncthreads_count(i % 3 == 0);
  const int any = __syncthreads_or(i == 7);
  if (lane == 0) {
    warp_sums[blockIdx.x * (blockDim.x / 32) + warp] = v;
    ballots[blockIdx.x * (blockDim.x / 32) + warp] = b;
  }
  if (i == 0) counts[blockIdx.x * 2] = c, counts[blockIdx.x * 2 + 1] = any;
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void exited_barrier_kernel(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void two_barriers_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

__global__ void missing_lane_kernel(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x % 32 != 3) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void unwritten_smem_kernel(float* out) {
  LOSSFORGE_DYNAMIC_SMEM(float, buf);
  if (threadIdx.x > 0) buf[threadIdx.x] = 2.f;
  __syncthreads();
  out[threadIdx.x] = buf[(threadIdx.x + 1) % blockDim.x];
}

// Thread 0 reads a static shared slot no thread wrote in this launch.
__global__ void unwritten_static_smem_kernel(float* out) {
  __shared__ float slots[4];
  if (threadIdx.x > 0) slots[threadIdx.x] = 3.f;
  __syncthreads();
  out[threadIdx.x] = slots[(threadIdx.x + 1) % 4];
}

__global__ void out_of_bounds_kernel(const float* in, float* out) {
  out[threadIdx.x] = in[threadIdx.x + 1];  // the last thread reads one past the end
}

__global__ void empty_kernel() {}

// One m16n8k16 product (fp32: m16n8k8 tf32) per warp from given fragments: frags holds a[0..3], b[0..1]
// and C's d[0..3] (as float bits) of each lane; D's elements come back in place of C.
template <typename T>
__global__ void mma_fragments_kernel(uint32_t* frags) {
  uint32_t* mine = frags + threadIdx.x * 10;
  const uint32_t a[4] = {mine[0], mine[1], mine[2], mine[3]}, b[2] = {mine[4], mine[5]};
  float d[4];
  for (int i = 0; i < 4; ++i) d[i] = __uint_as_float(mine[6 + i]);
  if constexpr (sizeof(T) == 4) {
    lossforge::mma::mma_m16n8k8_tf32(d, a, b);
  } else {
    lossforge::mma::mma_m16n8k16<T>(d, a, b);
  }
  for (int i = 0; i < 4; ++i) mine[6 + i] = __float_as_uint(d[i]);
}

// D (16 x 8) = X (16 x k) Y (8 x k)^T through shared memory, the fragment loads and mma_step, k a
// multiple of a k step (16; fp32 8): x and y hold operand words by row (element pairs; fp32 bits).
template <typename T>
__global__ void mma_tile_kernel(const uint32_t* x, const uint32_t* y, int k, float* out) {
  constexpr int kMaxWords = 64;
  __shared__ uint32_t sx[16][kMaxWords + 4], sy[8][kMaxWords + 4];
  const int lane = threadIdx.x, words = k / lossforge::mma::kPerWord<T>;
  for (int i = lane; i < 16 * words; i += 32) sx[i / words][i % words] = x[i];
  for (int i = lane; i < 8 * words; i += 32) sy[i / words][i % words] = y[i];
  __syncwarp();
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  for (int p = 0; p < words; p += 8) {
    uint32_t a[4], b[2];
    lossforge::mma::load_a(a, &sx[0][p], kMaxWords + 4, lane);
    lossforge::mma::load_b(b, &sy[0][p], kMaxWords + 4, lane);
    lossforge::mma::mma_step<T>(d, a, b);
  }
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) out[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = d[i];
}

namespace {

void print_floats(const std::vector<float>& v) {
  for (float f : v) std::printf("%g ", f);
  std::printf("\n");
}

int run(const std::string& c) {
  std::vector<float> out(256, 0.f);
  if (c == "reverse" || c == "reverse_nosync") {
    std::vector<float> in(2 * 64);
    for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i);
    std::vector<float> o(in.size());
    launch(reverse_kernel, dim3(2), dim3(64), 64 * sizeof(float), in.data(), o.data(), c == "reverse");
    print_floats(o);
  } else if (c == "collectives") {
    std::vector<float> in(2 * 96);
    for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 7) + 0.5f;
    std::vector<float> sums(6);
    std::vector<unsigned> ballots(6);
    std::vector<int> counts(4);
    launch(collectives_kernel, dim3(2), dim3(96), 0, in.data(), sums.data(), ballots.data(), counts.data());
    print_floats(sums);
    for (unsigned b : ballots) std::printf("%x ", b);
    for (int k : counts) std::printf("%d ", k);
    std::printf("\n");
  } else if (c == "divergent_barrier") {
    launch(divergent_barrier_kernel, dim3(1), dim3(64), 0, out.data());
  } else if (c == "exited_barrier") {
    launch(exited_barrier_kernel, dim3(1), dim3(64), 0, out.data());
  } else if (c == "two_barriers") {
    launch(two_barriers_kernel, dim3(1), dim3(64), 0, out.data());
  } else if (c == "missing_lane") {
    launch(missing_lane_kernel, dim3(1), dim3(64), 0, out.data());
  } else if (c == "partial_warp") {
    launch(missing_lane_kernel, dim3(1), dim3(40), 0, out.data());
  } else if (c == "unwritten_smem") {
    launch(unwritten_smem_kernel, dim3(1), dim3(8), 8 * sizeof(float), out.data());
    print_floats(std::vector<float>(out.begin(), out.begin() + 8));
  } else if (c == "unwritten_static_smem") {
    launch(unwritten_static_smem_kernel, dim3(2), dim3(4), 0, out.data());  // block 1 sees block 0's writes?
    print_floats(std::vector<float>(out.begin(), out.begin() + 4));
  } else if (c == "smem_over_default") {
    launch(reverse_kernel, dim3(1), dim3(64), 64 * 1024, out.data(), out.data(), true);
  } else if (c == "smem_opted_in") {
    cudaFuncSetAttribute(reverse_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    std::vector<float> in(64, 1.f);
    launch(reverse_kernel, dim3(1), dim3(64), 64 * 1024, in.data(), out.data(), true);
    std::printf("ok\n");
  } else if (c == "too_many_threads") {
    launch(empty_kernel, dim3(1), dim3(1025), 0);
  } else if (c == "halves") {
    // Round to nearest even at the ties just above 1: half keeps 10 bits, bfloat16 7.
    const float h_tie = 1.f + std::ldexp(1.f, -11), h_above = 1.f + 3 * std::ldexp(1.f, -11);
    const float b_tie = 1.f + std::ldexp(1.f, -8), b_above = 1.f + 3 * std::ldexp(1.f, -8);
    std::printf("%04x %04x %04x %04x %g %g\n", __half_as_ushort(__float2half_rn(h_tie)),
                __half_as_ushort(__float2half_rn(h_above)), __bfloat16_as_ushort(__float2bfloat16_rn(b_tie)),
                __bfloat16_as_ushort(__float2bfloat16_rn(b_above)), __half2float(__ushort_as_half(0x7bff)),
                __expf(-100.f));
  } else if (c == "mma_fragments_bf16" || c == "mma_fragments_fp16" || c == "mma_fragments_tf32") {
    // stdin: 32 lanes x 10 hex words (a[0..3], b[0..1], C's d[0..3] as float bits); stdout: D's words
    std::vector<uint32_t> frags(32 * 10);
    for (uint32_t& w : frags) {
      if (std::scanf("%x", &w) != 1) return 2;
    }
    if (c == "mma_fragments_bf16") {
      launch(mma_fragments_kernel<c10::BFloat16>, dim3(1), dim3(32), 0, frags.data());
    } else if (c == "mma_fragments_fp16") {
      launch(mma_fragments_kernel<c10::Half>, dim3(1), dim3(32), 0, frags.data());
    } else {
      launch(mma_fragments_kernel<float>, dim3(1), dim3(32), 0, frags.data());
    }
    for (int l = 0; l < 32; ++l) {
      for (int i = 0; i < 4; ++i) std::printf("%08x ", frags[l * 10 + 6 + i]);
    }
    std::printf("\n");
  } else if (c == "mma_tile_bf16" || c == "mma_tile_fp16" || c == "mma_tile_fp32") {
    // stdin: k, then X (16 x k) and Y (8 x k) as hex operand words a row (k / 2 element pairs; fp32: k
    // float bits); stdout: D row by row
    const int per_word = c == "mma_tile_fp32" ? 1 : 2;
    int k = 0;
    if (std::scanf("%d", &k) != 1 || k % (8 * per_word) != 0 || k > 64 * per_word) return 2;
    std::vector<uint32_t> x(16 * k / per_word), y(8 * k / per_word);
    for (uint32_t& w : x) {
      if (std::scanf("%x", &w) != 1) return 2;
    }
    for (uint32_t& w : y) {
      if (std::scanf("%x", &w) != 1) return 2;
    }
    std::vector<float> d(16 * 8);
    if (c == "mma_tile_bf16") {
      launch(mma_tile_kernel<c10::BFloat16>, dim3(1), dim3(32), 0, x.data(), y.data(), k, d.data());
    } else if (c == "mma_tile_fp16") {
      launch(mma_tile_kernel<c10::Half>, dim3(1), dim3(32), 0, x.data(), y.data(), k, d.data());
    } else {
      launch(mma_tile_kernel<float>, dim3(1), dim3(32), 0, x.data(), y.data(), k, d.data());
    }
    for (float v : d) std::printf("%.9g ", v);
    std::printf("\n");
  } else if (c == "mma_partial_warp") {
    std::vector<uint32_t> frags(32 * 10, 0);
    launch(mma_fragments_kernel<c10::Half>, dim3(1), dim3(20), 0, frags.data());
  } else if (c == "out_of_bounds") {
    std::vector<float> in(32, 1.f);
    launch(out_of_bounds_kernel, dim3(1), dim3(32), 0, in.data(), out.data());
    std::printf("ok\n");
  } else {
    std::printf("unknown case %s\n", c.c_str());
    return 2;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  try {
    return run(argv[1]);
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    return 3;
  }
}
