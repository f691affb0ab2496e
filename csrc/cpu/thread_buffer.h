// Scratch memory a thread keeps between calls.
#pragma once

#include <cstdint>
#include <vector>

namespace nanomoe::cpu {

// A buffer of this thread's (a thread_local vector) of at least n elements. Every tile of every
// call needs its buffers, some of hundreds of KiB: allocated afresh, they made threads queue on the
// kernel's memory map (see projected_forward.cpp).
template <typename U>
U* thread_buffer(std::vector<U>& buffer, int64_t n) {
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace nanomoe::cpu
