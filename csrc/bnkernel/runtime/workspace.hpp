// Scratch memory for the kernels without a heap allocation per call.
//
// Each thread has an arena: one block of memory, kept from call to call, used as a stack.  A
// Workspace is a frame on the calling thread's arena: take<U>(n) hands out room for n U's
// (uninitialized, 64-byte aligned), and the frame's end gives back everything taken in it.  When
// a thread needs more than its block holds, the rest comes from extra heap blocks until its
// outermost frame ends; the block is then replaced, at the next take, by one as large as the most
// the thread ever held at once.  So a kernel call allocates only the first time a thread meets a
// shape larger than any before it, and a call with its outputs given (out=) allocates nothing
// once its thread has run it (tests/test_memory.py counts the process's mallocs to show it).
//
// What is kept: per thread that has run a kernel, the most one call needed, which is a few doubles
// per channel (the per-channel coefficients and sums; C * inner for the short-run column pattern)
// plus the reduction trees' accumulators and the streamed output's chunk buffers (a few KiB a
// thread).  It is freed when the thread exits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace bnkernel {

struct Arena;

class Workspace {
 public:
  Workspace() noexcept;
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // Room for n values of U, uninitialized.  Throws std::bad_alloc when the memory cannot be had.
  template <typename U>
  U* take(int64_t n) {
    static_assert(std::is_trivially_destructible_v<U> && std::is_trivially_copyable_v<U>,
                  "a workspace holds plain values only");
    return static_cast<U*>(take_bytes(static_cast<size_t>(n) * sizeof(U)));
  }

 private:
  void* take_bytes(size_t bytes);

  Arena* arena_;
  // the arena's state when the frame opened, restored when it closes
  size_t used_;
  void* overflow_;
  size_t demand_;
};

// The heap allocations every thread's workspace has made so far (for the tests).
int64_t workspace_allocations();

}  // namespace bnkernel
