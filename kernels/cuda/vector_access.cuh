// V adjacent values moved as one access (16 bytes is the widest a thread issues), converted to and from
// fp32 registers: the memory-bound kernels read and write their rows through these. The caller checks
// that pointers are aligned to the access width.
#pragma once
#include <cuda_bf16.h>

#include <cstddef>

namespace ssmtune::cuda {

template <int V>
struct alignas(sizeof(__nv_bfloat16) * V) Bf16Vec {
  __nv_bfloat16 v[V];
};
template <int V>
struct alignas(sizeof(float) * V < 16 ? sizeof(float) * V : 16) FloatVec {
  float v[V];
};

template <int V>
__device__ __forceinline__ Bf16Vec<V> load_raw(const __nv_bfloat16* p) {
  return *reinterpret_cast<const Bf16Vec<V>*>(p);
}
template <int V>
__device__ __forceinline__ void to_float(const Bf16Vec<V>& packed, float (&out)[V]) {
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = __bfloat162float(packed.v[e]);
}

template <int V>
__device__ __forceinline__ void load(const float* p, float (&out)[V]) {
  const FloatVec<V> packed = *reinterpret_cast<const FloatVec<V>*>(p);
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = packed.v[e];
}
template <int V>
__device__ __forceinline__ void load(const __nv_bfloat16* p, float (&out)[V]) {
  to_float(load_raw<V>(p), out);
}

template <int V>
__device__ __forceinline__ void store(float* p, const float (&in)[V]) {
  FloatVec<V> packed;
#pragma unroll
  for (int e = 0; e < V; ++e) packed.v[e] = in[e];
  *reinterpret_cast<FloatVec<V>*>(p) = packed;
}
template <int V>
__device__ __forceinline__ void store(__nv_bfloat16* p, const float (&in)[V]) {
  Bf16Vec<V> packed;
#pragma unroll
  for (int e = 0; e < V; ++e) packed.v[e] = __float2bfloat16_rn(in[e]);
  *reinterpret_cast<Bf16Vec<V>*>(p) = packed;
}

}  // namespace ssmtune::cuda
