// Streaming (non-temporal) stores: when an output gets them, the aligned block store, and the
// fence after a thread's share of them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "bnkernel/dispatch/isa.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

// An output larger than the caches is written with streaming (non-temporal) stores: a plain store
// to a line that is not cached first reads that line (write-allocate), so a plain-store output
// costs a read and a write of DRAM, a streaming one only the write.  Smaller outputs stay in cache
// for whoever reads them next, so they get plain stores.
constexpr int64_t kStreamMinBytes = int64_t{16} << 20;

// stream_block(dst, src): kStreamAlign bytes from src (any alignment) to dst (aligned) with a
// streaming store
#if defined(__AVX512F__)
constexpr int64_t kStreamAlign = 64;
inline void stream_block(void* dst, const void* src) {
  _mm512_stream_si512(static_cast<__m512i*>(dst), _mm512_loadu_si512(src));
}
#elif defined(__AVX__)
constexpr int64_t kStreamAlign = 32;
inline void stream_block(void* dst, const void* src) {
  _mm256_stream_si256(static_cast<__m256i*>(dst),
                      _mm256_loadu_si256(static_cast<const __m256i*>(src)));
}
#elif defined(__SSE2__)
constexpr int64_t kStreamAlign = 16;
inline void stream_block(void* dst, const void* src) {
  _mm_stream_si128(static_cast<__m128i*>(dst), _mm_loadu_si128(static_cast<const __m128i*>(src)));
}
#else
constexpr int64_t kStreamAlign = 0;  // no streaming stores here: plain stores only
inline void stream_block(void*, const void*) {}
#endif

// Copies n values from src (cached, e.g. a chunk buffer) to dst with streaming stores for the
// whole kStreamAlign-byte blocks of dst and plain ones for its partial lines at either end (so
// that no line gets both kinds); dst is element-aligned (see element_aligned) or gets plain
// stores throughout.  The values are copied as bytes: no conversion on the way.
template <typename T>
inline void stream_copy(T* dst, const T* src, int64_t n) {
  auto* d = reinterpret_cast<char*>(dst);
  const auto* q = reinterpret_cast<const char*>(src);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  int64_t head = bytes;
  if constexpr (kStreamAlign > 0) {
    if (reinterpret_cast<uintptr_t>(dst) % sizeof(T) == 0) {
      head = std::min<int64_t>(
          bytes,
          static_cast<int64_t>((kStreamAlign - reinterpret_cast<uintptr_t>(d) % kStreamAlign) %
                               kStreamAlign));
    }
  }
  std::memcpy(d, q, static_cast<size_t>(head));
  int64_t b = head;
  if constexpr (kStreamAlign > 0) {
    for (; b + kStreamAlign <= bytes; b += kStreamAlign) stream_block(d + b, q + b);
  }
  std::memcpy(d + b, q + b, static_cast<size_t>(bytes - b));
}

// Whether y is aligned to its element size.  The bindings refuse arrays that are not (NumPy's
// ALIGNED flag), so the kernels never see one; but no store below assumes more alignment than it
// checks: the streamed paths peel plain stores up to a kStreamAlign boundary, which only an
// element-aligned address ever reaches, so an output that is not gets plain stores throughout.
template <typename T>
inline bool element_aligned(const T* y) {
  return reinterpret_cast<uintptr_t>(y) % sizeof(T) == 0;
}

// Streaming stores for the `elements` values of an output at y: where there are any, for an
// output past the caches, aligned to its element size.
template <typename T>
inline bool stream_output(const T* y, int64_t elements) {
  return kStreamAlign > 0 && elements * static_cast<int64_t>(sizeof(T)) >= kStreamMinBytes &&
         element_aligned(y);
}

// Streaming (non-temporal) stores are weakly ordered: each thread that may have issued some fences
// once, after its share of a pass and before the region ends, so that the output is complete for
// whoever reads it next.
inline void stream_fence(bool stream) {
#if defined(__SSE2__)
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
