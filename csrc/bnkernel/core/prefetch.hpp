// Software prefetches: towards L2 for the access patterns the hardware prefetcher follows poorly,
// and ahead of the streaming loops, so that one core keeps enough misses in flight.
#pragma once

#include <cstdint>

#include "bnkernel/dispatch/isa.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

// Prefetches [p, p + bytes) into L2.  The interleaved leaves read their rows a block of channels
// at a time, a pattern the hardware prefetcher follows poorly: while a block of columns of this
// leaf is summed, the same columns of the next leaf are fetched (spread this way, the requests do
// not pile up in the miss queue as one burst of a whole leaf did: 2.1 -> 2.8 Gel/s at one thread
// on 32x56x56x256 float32).
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 2);
}
// The same for lines about to be written.
inline void prefetch_l2_write(void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 1, 2);
}

// Streaming loops: a software prefetch this far ahead of the values being read, one line per
// line consumed.  One core keeps too few misses in flight for DRAM on the hardware prefetcher
// alone; these requests let the loads of a run overlap its arithmetic.  Measured on the planar
// statistics (32x256x56x56 float32, one thread): 2 KiB into L1 8.9 -> 6.7 ms; 1 KiB or into L2
// no better, 4-8 KiB the same.
constexpr int64_t kPrefetchAhead = 2048;

// Prefetches into L1 the lines kPrefetchAhead bytes past the `count` values at p (the block a
// loop iteration reads).
template <typename T>
inline void prefetch_ahead(const T* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p) + kPrefetchAhead;
  const int64_t bytes = count * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 3);
}

// The same for a block of `count` values at value i of a run of len values at p, where the reading
// goes on at `next` after the run (for_channel_runs): past the run's end the lines ahead are
// next's, so that a run's first lines are on their way while the run before it is summed (the
// runs of a channel are a channel stride apart, where the hardware prefetcher has no stream).
template <typename T>
inline void prefetch_run_ahead(const T* p, int64_t i, int64_t len, const T* next, int64_t count) {
  constexpr int64_t kAhead = kPrefetchAhead / static_cast<int64_t>(sizeof(T));
  const int64_t at = i + kAhead;
  if (at < len) {
    prefetch_ahead(p + i, count);
  } else if (next != nullptr) {
    const char* c = reinterpret_cast<const char*>(next + (at - len));
    const int64_t bytes = count * static_cast<int64_t>(sizeof(T));
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 3);
  }
}

template <typename T>
inline void prefetch_values(const T* p, int64_t count) {
  prefetch_l2(p, count * static_cast<int64_t>(sizeof(T)));
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
