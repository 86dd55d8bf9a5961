// The memory passes of each instruction set's copy: the copy, read and write that the benchmarks
// measure the kernels against (memory_pass), on the kernels' own threads and store policy.
#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "bnkernel/core/parallel.hpp"
#include "bnkernel/core/stores.hpp"
#include "bnkernel/dispatch/isa_kernels.hpp"
#include "bnkernel/runtime/threads.hpp"

namespace bnkernel::BNKERNEL_ISA_NS {

namespace {

constexpr int64_t kLine = 64;

#if defined(__AVX512F__)
using Block = __m512i;
inline Block load_block(const char* p) {
  return _mm512_loadu_si512(p);
}
inline void stream(char* p, Block v) {
  _mm512_stream_si512(reinterpret_cast<Block*>(p), v);
}
inline void store(char* p, Block v) {
  _mm512_storeu_si512(p, v);
}
inline Block add(Block a, Block b) {
  return _mm512_add_epi64(a, b);
}
inline Block zero_block() {
  return _mm512_setzero_si512();
}
inline uint64_t lanes_sum(Block v) {  // (not _mm512_reduce_add_epi64: GCC 12 warns inside it)
  alignas(64) uint64_t l[8];
  _mm512_store_si512(l, v);
  return l[0] + l[1] + l[2] + l[3] + l[4] + l[5] + l[6] + l[7];
}
#elif defined(__AVX__)
using Block = __m256i;
inline Block load_block(const char* p) {
  return _mm256_loadu_si256(reinterpret_cast<const Block*>(p));
}
inline void stream(char* p, Block v) {
  _mm256_stream_si256(reinterpret_cast<Block*>(p), v);
}
inline void store(char* p, Block v) {
  _mm256_storeu_si256(reinterpret_cast<Block*>(p), v);
}
inline Block add(Block a, Block b) {
  return _mm256_add_epi64(a, b);
}
inline Block zero_block() {
  return _mm256_setzero_si256();
}
inline uint64_t lanes_sum(Block v) {
  alignas(32) uint64_t l[4];
  _mm256_store_si256(reinterpret_cast<Block*>(l), v);
  return l[0] + l[1] + l[2] + l[3];
}
#elif defined(__SSE2__)
using Block = __m128i;
inline Block load_block(const char* p) {
  return _mm_loadu_si128(reinterpret_cast<const Block*>(p));
}
inline void stream(char* p, Block v) {
  _mm_stream_si128(reinterpret_cast<Block*>(p), v);
}
inline void store(char* p, Block v) {
  _mm_storeu_si128(reinterpret_cast<Block*>(p), v);
}
inline Block add(Block a, Block b) {
  return _mm_add_epi64(a, b);
}
inline Block zero_block() {
  return _mm_setzero_si128();
}
inline uint64_t lanes_sum(Block v) {
  alignas(16) uint64_t l[2];
  _mm_store_si128(reinterpret_cast<Block*>(l), v);
  return l[0] + l[1];
}
#else
struct Block {
  uint64_t v;
};
inline Block load_block(const char* p) {
  Block b;
  std::memcpy(&b.v, p, sizeof b.v);
  return b;
}
inline void stream(char* p, Block v) {
  std::memcpy(p, &v.v, sizeof v.v);
}
inline void store(char* p, Block v) {
  std::memcpy(p, &v.v, sizeof v.v);
}
inline Block add(Block a, Block b) {
  return {a.v + b.v};
}
inline Block zero_block() {
  return {0};
}
inline uint64_t lanes_sum(Block v) {
  return v.v;
}
#endif
constexpr int64_t kBlock = sizeof(Block);
static_assert(kLine % kBlock == 0);

// One thread's share [begin, end) of the bytes: cut at cache lines of dst (or src for a read).
struct Share {
  int64_t begin, end;
};
Share share_of(int64_t part, int64_t parts, int64_t bytes, uintptr_t base) {
  auto cut = [&](int64_t k) -> int64_t {
    if (k >= parts) return bytes;
    const int64_t at = bytes / parts * k;
    const int64_t line = static_cast<int64_t>((base + static_cast<uintptr_t>(at)) % kLine);
    return at - line < 0 ? 0 : at - line;
  };
  return {cut(part), cut(part + 1)};
}

// The bytes before p's next cache line (all of them if fewer)
int64_t head_bytes(const char* p, int64_t bytes) {
  const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % kLine);
  const int64_t head = misalign == 0 ? 0 : kLine - misalign;
  return head < bytes ? head : bytes;
}

// dst[0, bytes): its whole lines a block at a time, each block line(at) stored or streamed; the
// partial lines at the ends by edge(at, count)
template <bool Stream, class Edge, class Line>
void write_bytes(char* dst, int64_t bytes, Edge&& edge, Line&& line) {
  const int64_t head = head_bytes(dst, bytes);
  edge(0, head);
  int64_t i = head;
  for (; i + kLine <= bytes; i += kLine) {
    for (int64_t b = 0; b < kLine; b += kBlock) {
      if constexpr (Stream) {
        stream(dst + i + b, line(i + b));
      } else {
        store(dst + i + b, line(i + b));
      }
    }
  }
  edge(i, bytes - i);
}

// dst = src, or dst = 0 (src null)
template <bool Stream>
void write_pass(const char* src, char* dst, int64_t bytes) {
  if (src) {
    write_bytes<Stream>(
        dst, bytes,
        [&](int64_t at, int64_t n) { std::memcpy(dst + at, src + at, static_cast<size_t>(n)); },
        [&](int64_t at) { return load_block(src + at); });
  } else {
    const Block zero = zero_block();
    write_bytes<Stream>(
        dst, bytes,
        [&](int64_t at, int64_t n) { std::memset(dst + at, 0, static_cast<size_t>(n)); },
        [&](int64_t) { return zero; });
  }
}

// the bytes' sum as 64-bit integers, wrapping (a value the compiler cannot drop)
uint64_t read_bytes(const char* src, int64_t bytes) {
  const int64_t head = head_bytes(src, bytes);
  uint64_t total = 0;
  for (int64_t i = 0; i < head; ++i) total += static_cast<unsigned char>(src[i]);
  Block acc[kLine / kBlock];
  for (auto& a : acc) a = zero_block();
  int64_t i = head;
  for (; i + kLine <= bytes; i += kLine) {
    for (int64_t b = 0; b < kLine / kBlock; ++b)
      acc[b] = add(acc[b], load_block(src + i + b * kBlock));
  }
  for (; i < bytes; ++i) total += static_cast<unsigned char>(src[i]);
  for (const auto& a : acc) total += lanes_sum(a);
  return total;
}

}  // namespace

template <typename T>
double memory_pass(MemoryPass kind, const T* src, T* dst, int64_t n) {
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  const int threads = threads_for(n);
  const bool streamed = kind != MemoryPass::read && detail::stream_output(dst, n);
  const auto base = reinterpret_cast<uintptr_t>(
      kind == MemoryPass::read ? static_cast<const void*>(src) : static_cast<const void*>(dst));
  const auto* s = reinterpret_cast<const char*>(src);
  auto* d = reinterpret_cast<char*>(dst);
  uint64_t sums[kMaxThreads] = {};
  detail::parallel_region(threads, [&] {
#if BNKERNEL_HAVE_OPENMP
#pragma omp for schedule(static)
#endif
    for (int t = 0; t < threads; ++t) {
      const Share sh = share_of(t, threads, bytes, base);
      const int64_t len = sh.end - sh.begin;
      switch (kind) {
        case MemoryPass::copy:
        case MemoryPass::write: {
          const char* from = kind == MemoryPass::copy ? s + sh.begin : nullptr;
          if (streamed) {
            write_pass<true>(from, d + sh.begin, len);
          } else {
            write_pass<false>(from, d + sh.begin, len);
          }
          break;
        }
        case MemoryPass::read:
          sums[t] = read_bytes(s + sh.begin, len);
          break;
      }
    }
    detail::stream_fence(streamed);
  });
  uint64_t total = 0;
  for (int t = 0; t < threads; ++t) total += sums[t];
  return static_cast<double>(total);
}

BNKERNEL_INSTANTIATE(BNKERNEL_MEMORY_KERNELS)

}  // namespace bnkernel::BNKERNEL_ISA_NS
