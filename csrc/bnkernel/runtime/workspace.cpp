// The per-thread arenas behind bnkernel::Workspace (see workspace.hpp).
#include "bnkernel/runtime/workspace.hpp"

#include <algorithm>
#include <atomic>
#include <new>

#include "bnkernel/runtime/test_hooks.hpp"

// Under AddressSanitizer the arena marks what is not handed out as unaddressable, with a redzone
// after each take, so that an overrun of one take is caught as it would be between two separate
// heap allocations (BNKERNEL_SANITIZE builds; no code at all otherwise).
#if defined(__SANITIZE_ADDRESS__)
#define BNKERNEL_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define BNKERNEL_ASAN 1
#endif
#endif
#if defined(BNKERNEL_ASAN)
#include <sanitizer/asan_interface.h>
#endif

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

#if defined(BNKERNEL_ASAN)
constexpr size_t kRedzone = kAlign;
void poison(void* p, size_t bytes) {
  ASAN_POISON_MEMORY_REGION(p, bytes);
}
void unpoison(void* p, size_t bytes) {
  ASAN_UNPOISON_MEMORY_REGION(p, bytes);
}
#else
constexpr size_t kRedzone = 0;
void poison(void*, size_t) {}
void unpoison(void*, size_t) {}
#endif

// The room a take of `bytes` occupies: whole cache lines, and the redzone under ASan.
size_t slot_size(size_t bytes) {
  return (std::max<size_t>(bytes, 1) + kAlign - 1) / kAlign * kAlign + kRedzone;
}

// An extra block taken when the arena's block is full: this header, then the memory handed out.
struct alignas(kAlign) Overflow {
  Overflow* next;
  size_t bytes;  // after the header
};

// (memory goes back to the heap unpoisoned, as it came)
void release_block(char* block, size_t bytes) {
  unpoison(block, bytes);
  release(block);
}

void release_overflow(Overflow* extra) {
  unpoison(extra + 1, extra->bytes);
  release(extra);
}

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
    release_block(block, capacity);
    while (overflow) {
      Overflow* next = overflow->next;
      release_overflow(overflow);
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
    release_overflow(a.overflow);
    a.overflow = next;
  }
  poison(a.block + used_, a.used - used_);
  a.used = used_;
  a.demand = demand_;
  if (--a.depth == 0) {
    a.want = std::max(a.want, a.peak);
    a.peak = 0;
  }
}

void* Workspace::take_bytes(size_t bytes) {
  Arena& a = *arena_;
  const size_t slot = slot_size(bytes);
  // Nothing of the block is in use: grow it now to the most this thread has needed (the growth
  // waits for this moment because the block cannot move while pointers into it are held).
  if (a.used == 0 && a.want > a.capacity) {
    char* grown = allocate(a.want);
    poison(grown, a.want);
    release_block(a.block, a.capacity);
    a.block = grown;
    a.capacity = a.want;
  }
  char* p = nullptr;
  if (a.used + slot <= a.capacity) {
    p = a.block + a.used;
    a.used += slot;
  } else {
    auto* extra = new (allocate(sizeof(Overflow) + slot)) Overflow{a.overflow, slot};
    a.overflow = extra;
    p = reinterpret_cast<char*>(extra + 1);
    poison(p, slot);
  }
  unpoison(p, bytes);
  a.demand += slot;
  a.peak = std::max(a.peak, a.demand);
  return p;
}

int64_t workspace_allocations() {
  return allocations.load(std::memory_order_relaxed);
}

}  // namespace bnkernel
