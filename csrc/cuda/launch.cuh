// Host-side helpers of the launchers: the storage type behind a DType, and cached device limits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <mutex>

#include "kernels.h"

namespace nanomoe::cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with T the storage type of dtype.
template <typename Fn>
void with_storage_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      fn(TypeTag<float>{});
      break;
    case DType::kFloat16:
      fn(TypeTag<__half>{});
      break;
    case DType::kBFloat16:
      fn(TypeTag<__nv_bfloat16>{});
      break;
  }
}

struct DeviceLimits {
  int multiprocessors;
  int max_shared_memory;  // per block, with the opt-in attribute
};

constexpr int kMaxDevices = 64;

inline int current_device() {
  int device = 0;
  cudaGetDevice(&device);
  return device % kMaxDevices;
}

// The current device's limits, queried once per device.
inline DeviceLimits device_limits() {
  static DeviceLimits cache[kMaxDevices] = {};
  static std::once_flag queried[kMaxDevices];
  const int device = current_device();
  std::call_once(queried[device], [&] {
    cudaDeviceGetAttribute(&cache[device].max_shared_memory,
                           cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cudaDeviceGetAttribute(&cache[device].multiprocessors, cudaDevAttrMultiProcessorCount, device);
  });
  return cache[device];
}

// Lets kKernel use all of the device's opt-in shared memory, once per device and kernel: the
// kernel is the template argument, since kernels of one signature share a pointer type (keyed on
// that type, only the first of them got the attribute). A failure here surfaces as the launch's
// error.
template <auto kKernel>
void allow_max_shared_memory() {
  static std::once_flag done[kMaxDevices];
  const int device = current_device();
  std::call_once(done[device], [&] {
    cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         device_limits().max_shared_memory);
  });
}

}  // namespace nanomoe::cuda
