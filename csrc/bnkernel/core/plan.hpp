// Which path a shape takes (the planning policy): whole channels per thread, short runs reduced as
// columns, the fused per-channel kernels, streaming stores for their runs.  The choice depends on
// the shape and thread count alone, never on the data.
#pragma once

#include <cstdint>

#include "bnkernel/core/stores.hpp"
#include "bnkernel/dispatch/isa.hpp"
#include "bnkernel/kernels.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

// Whether the planar kernels should give each thread whole channels (and fuse the passes of a
// channel while it is in cache) rather than share every channel's subtrees among the threads.
inline bool whole_channels_per_thread(Shape s, int threads) {
  return threads <= 1 || s.channels >= int64_t{4} * threads;
}

// Below this many values per (batch, channel) run the planar pattern reads short runs that share
// their cache lines with other channels; such arrays are reduced as if interleaved instead:
// (outer, C * inner) columns, whose statistics are then merged per channel.
constexpr int64_t kMinPlanarRun = 256;

// (The per-column statistics take 24 bytes a column; with 8 or more rows that is less than the
// input itself, so the column path is kept to those.)
inline bool short_runs(Shape s) {
  return s.inner > 1 && s.inner < kMinPlanarRun && s.outer >= 8;
}

// The most bytes of input a channel may have (x, or dy and x) for the fused kernels, which read it
// a second time from cache: past that it no longer stays there (nor the next channel, fetched
// alongside), and the fused kernels read it twice from memory.  (N, 64, 64, 64) float32, two
// threads, against a copy of x: at 8 MiB of x a channel (512 MiB in all) the fused forward took
// 9.3 passes, the split phases about 3.5; at 4 MiB (256 MiB) 3.6, at 2 MiB 3.0.  The backward's
// channels, dy and x, step up from 4 MiB (256 MiB in all: 6.8 passes, at 128 MiB 5.6).
constexpr int64_t kFusedChannelBytes = int64_t{4} << 20;

// The fused per-channel kernels (statistics or sums, then the elementwise pass, a channel at a
// time while it is in cache) pay off for long runs, enough channels to share, and channels that
// fit in the cache; `channel_bytes` is the input a channel has.
inline bool fuse_per_channel(Shape s, int threads, int64_t channel_bytes) {
  return s.inner >= kMinPlanarRun && whole_channels_per_thread(s, threads) &&
         channel_bytes <= kFusedChannelBytes;
}

// Streaming stores for the per-channel runs of the fused kernels' output y whenever the output is
// streamed: stream_blocks streams only whole aligned blocks inside a run, and the lines a run may
// share with its neighbours get plain stores, so no line gets both kinds (slow when mixed).  (Runs
// under 4 KiB got plain stores before, and paid a read for ownership of every line they wrote:
// float32, one thread, forward 32x512x28x28 10.3-10.9 -> 6.0-6.4 ms, 64x512x16x16 7.4 -> 6.4 ms.)
template <typename T>
inline bool stream_channel_runs(const T* y, Shape s) {
  return stream_output(y, s.size());
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
