// The per-thread arenas behind bnkernel::Workspace (see workspace.hpp).
#include "bnkernel/workspace.hpp"

#include <algorithm>
#include <atomic>
#include <new>

#include "bnkernel/kernels.hpp"

namespace bnkernel {

namespace {

constexpr size_t kAlign = 64;  // a cache line: no two threads' scratch share one
constexpr std::align_val_t kAlignment{kAlign};

std::atomic<int64_t> allocations{0};

char* allocate(size_t bytes) {
  if (test_allocation_fails()) throw std::bad_alloc();
  char* p = static_cast<char*>(::operator new(bytes, kAlignment));
  allocations.fetch_add(1, std::memory_order_relaxed);
  return p;
}

void release(void* p) {
  if (p) ::operator delete(p, kAlignment);
}

size_t round_up(size_t bytes) {
  return (std::max<size_t>(bytes, 1) + kAlign - 1) / kAlign * kAlign;
}

// An extra block taken when the arena's block is full: this header, then the memory handed out.
struct alignas(kAlign) Overflow {
  Overflow* next;
};

}  // namespace

struct Arena {
  char* block = nullptr;
  size_t capacity = 0;
  size_t used = 0;               // bytes of the block handed out
  Overflow* overflow = nullptr;  // the extra blocks, newest first
  size_t demand = 0;             // bytes handed out now, block and extra blocks
  size_t peak = 0;               // the most demand since the outermost frame opened
  size_t want = 0;               // the block size the arena grows to (the most demand ever)
  int depth = 0;                 // open frames

  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() {
    release(block);
    while (overflow) {
      Overflow* next = overflow->next;
      release(overflow);
      overflow = next;
    }
  }
};

namespace {
thread_local Arena arena;
}  // namespace

Workspace::Workspace() noexcept
    : arena_(&arena), used_(arena.used), overflow_(arena.overflow), demand_(arena.demand) {
  ++arena_->depth;
}

Workspace::~Workspace() {
  Arena& a = *arena_;
  while (a.overflow != overflow_) {
    Overflow* next = a.overflow->next;
    release(a.overflow);
    a.overflow = next;
  }
  a.used = used_;
  a.demand = demand_;
  if (--a.depth == 0) {
    a.want = std::max(a.want, a.peak);
    a.peak = 0;
  }
}

void* Workspace::take_bytes(size_t bytes) {
  Arena& a = *arena_;
  bytes = round_up(bytes);
  // Nothing of the block is in use: grow it now to the most this thread has needed (the growth
  // waits for this moment because the block cannot move while pointers into it are held).
  if (a.used == 0 && a.want > a.capacity) {
    char* grown = allocate(a.want);
    release(a.block);
    a.block = grown;
    a.capacity = a.want;
  }
  void* p = nullptr;
  if (a.used + bytes <= a.capacity) {
    p = a.block + a.used;
    a.used += bytes;
  } else {
    auto* extra = new (allocate(sizeof(Overflow) + bytes)) Overflow{a.overflow};
    a.overflow = extra;
    p = extra + 1;
  }
  a.demand += bytes;
  a.peak = std::max(a.peak, a.demand);
  return p;
}

int64_t workspace_allocations() {
  return allocations.load(std::memory_order_relaxed);
}

}  // namespace bnkernel
