// The deterministic pairwise tree: the leaves a channel's values are cut into, and the fixed tree
// that combines them, on one thread or several, bit for bit the same.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "bnkernel/core/parallel.hpp"
#include "bnkernel/dispatch/isa.hpp"
#include "bnkernel/runtime/workspace.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

// Values per leaf of a channel when the channel's values are contiguous runs (inner > 1).  Small
// enough that the corrected two-pass over a leaf re-reads it from L1, large enough that the merges
// cost nothing next to the data.
constexpr int64_t kPlanarLeaf = 4096;
// Rows per leaf for the interleaved pattern (inner == 1): more when C is small, so that a leaf
// holds about kPlanarLeaf values of the row-block, and at least kInterleavedRowStreams / (arrays
// read): a leaf of many channels ends in a merge as wide as a row, which more rows amortize.  (The
// leaf fixes the tree, so the bits of the results; how its rows are read is the chunks' business,
// below.)
constexpr int64_t kInterleavedRowStreams = 32;
inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline int64_t interleaved_leaf_rows(int64_t channels, int64_t arrays) {
  return std::max(kInterleavedRowStreams / arrays,
                  ceil_div(kPlanarLeaf, std::max<int64_t>(channels, 1)));
}

// The interleaved leaves walk their rows in chunks of 8 / (arrays read): a block of channels goes
// down one chunk's rows with its sums in registers, which are stored and picked up again by the
// next chunk, so the sums are the same as without chunks, bit for bit.  Fewer rows at a time are
// fewer streams for the prefetchers (and the next chunk's columns are fetched into L2 while a
// block is summed).  One thread, 98 MiB channels-last float32, passes of a same-size copy,
// medians of 3 interleaved runs (chunks of 32 / 16 / 8 / 4 rows for the statistics): C = 256
// statistics 3.7 / 2.4 / 2.3 / 2.9, backward sums 5.9 / 4.4 / 4.2 / 4.8; C = 2048 statistics
// 3.3 / 2.7 / 2.0 / 2.1, sums 6.5 / 4.9 / 3.5 / 3.7.
inline int64_t interleaved_chunk_rows(int64_t arrays) {
  return 8 / arrays;
}

// Ops describes an accumulator of `width` doubles with
//   void leaf(int64_t k, double* out) const;           // statistics of leaf k
//   void merge(double* into, const double* other) const;  // into <- into (+) other, in that order
// The tree over leaves [k0, k1) always splits at k0 + (k1 - k0) / 2, so its shape depends only on
// the number of leaves.  scratch holds one accumulator per tree level; it comes from a Workspace
// (runtime/workspace.hpp) and is left uninitialized: the tree writes every accumulator before it
// reads it, so zeroing it (wide for interleaved arrays: 1 + 3C doubles a level) would be wasted
// work.

inline int tree_levels(int64_t leaves) {
  int levels = 1;
  while ((int64_t{1} << (levels - 1)) < leaves) ++levels;
  return levels + 1;
}

template <class Ops>
void tree_reduce(const Ops& ops, int64_t k0, int64_t k1, double* out, double* scratch, int level) {
  if (k1 - k0 == 1) {
    ops.leaf(k0, out);
    return;
  }
  const int64_t mid = k0 + (k1 - k0) / 2;
  tree_reduce(ops, k0, mid, out, scratch, level + 1);
  // the right child lands in this level's slot; deeper levels use deeper slots, so nothing clashes
  double* right = scratch + static_cast<int64_t>(level) * ops.width;
  tree_reduce(ops, mid, k1, right, scratch, level + 1);
  ops.merge(out, right);
}

template <class Ops>
void serial_tree(const Ops& ops, int64_t leaves, double* out) {
  Workspace ws;
  tree_reduce(ops, 0, leaves, out, ws.take<double>(tree_levels(leaves) * ops.width), 0);
}

// A run of leaves [k0, k1).
struct LeafRange {
  int64_t k0, k1;
};

// The nodes `depth` levels below the root (or leaves, when the tree is shallower), in tree order,
// appended at nodes[count]: at most 2^depth of them.
inline void collect_nodes(int64_t k0, int64_t k1, int level, int depth, LeafRange* nodes,
                          int64_t& count) {
  if (level == depth || k1 - k0 == 1) {
    nodes[count++] = LeafRange{k0, k1};
    return;
  }
  const int64_t mid = k0 + (k1 - k0) / 2;
  collect_nodes(k0, mid, level + 1, depth, nodes, count);
  collect_nodes(mid, k1, level + 1, depth, nodes, count);
}

template <class Ops>
void combine_nodes(const Ops& ops, int64_t k0, int64_t k1, int level, int depth,
                   const double* results, size_t& next, double* out, double* scratch) {
  if (level == depth || k1 - k0 == 1) {
    const double* r = results + static_cast<int64_t>(next++) * ops.width;
    std::copy(r, r + ops.width, out);
    return;
  }
  const int64_t mid = k0 + (k1 - k0) / 2;
  combine_nodes(ops, k0, mid, level + 1, depth, results, next, out, scratch);
  double* right = scratch + static_cast<int64_t>(level) * ops.width;
  combine_nodes(ops, mid, k1, level + 1, depth, results, next, right, scratch);
  ops.merge(out, right);
}

// Same result as serial_tree, bit for bit: the subtrees below a fixed depth are computed by the
// threads, then combined along the same tree.
template <class Ops>
void parallel_tree(const Ops& ops, int64_t leaves, double* out, int threads) {
  int depth = 0;
  while ((int64_t{1} << depth) < std::min<int64_t>(leaves, int64_t{4} * threads)) ++depth;
  if (threads <= 1 || depth == 0) {
    serial_tree(ops, leaves, out);
    return;
  }
  Workspace ws;
  auto* nodes = ws.take<LeafRange>(int64_t{1} << depth);
  int64_t count = 0;
  collect_nodes(0, leaves, 0, depth, nodes, count);
  double* results = ws.take<double>(count * ops.width);
  RegionErrors errors;
#if BNKERNEL_HAVE_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    // each thread's own scratch, from its own arena (an allocation the first time: under run())
    Workspace thread_ws;
    double* scratch = nullptr;
    errors.run([&] { scratch = thread_ws.take<double>(tree_levels(leaves) * ops.width); });
#if BNKERNEL_HAVE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t t = 0; t < count; ++t) {
      if (errors.failed()) continue;
      errors.run(
          [&] { tree_reduce(ops, nodes[t].k0, nodes[t].k1, results + t * ops.width, scratch, 0); });
    }
  }
  errors.rethrow();
  size_t next = 0;
  combine_nodes(ops, 0, leaves, 0, depth, results, next, out,
                ws.take<double>(tree_levels(leaves) * ops.width));
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
