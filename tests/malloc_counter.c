/* A malloc counter for tests/test_memory.py, preloaded into a Python process (LD_PRELOAD).
 *
 * It defines bnkernel_kernel_probe, which bnkernel's kernel entry points call with +1 as a call
 * starts and -1 as it ends (csrc/bnkernel/dispatch.cpp), and counts every malloc-family call made
 * by any thread while a kernel call is running: the kernels' own scratch, C++'s operator new (which
 * calls malloc), and the OpenMP runtime's.  The allocations go on to glibc's own functions
 * (__libc_malloc and friends), so nothing else changes.  glibc only. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

extern void* __libc_malloc(size_t size);
extern void* __libc_calloc(size_t count, size_t size);
extern void* __libc_realloc(void* p, size_t size);
extern void* __libc_memalign(size_t alignment, size_t size);
extern void* __libc_valloc(size_t size);
extern void* __libc_pvalloc(size_t size);
extern void __libc_free(void* p);

static atomic_long running_calls;
static atomic_long allocations;

void bnkernel_kernel_probe(int delta) {
  atomic_fetch_add(&running_calls, delta);
}

/* allocations made while a kernel call ran, since the process started */
long malloc_counter_allocations(void) {
  return atomic_load(&allocations);
}

static void count(void) {
  if (atomic_load_explicit(&running_calls, memory_order_relaxed) > 0) {
    atomic_fetch_add(&allocations, 1);
  }
}

void* malloc(size_t size) {
  count();
  return __libc_malloc(size);
}

void* calloc(size_t n, size_t size) {
  count();
  return __libc_calloc(n, size);
}

void* realloc(void* p, size_t size) {
  count();
  return __libc_realloc(p, size);
}

void* memalign(size_t alignment, size_t size) {
  count();
  return __libc_memalign(alignment, size);
}

void* aligned_alloc(size_t alignment, size_t size) {
  count();
  return __libc_memalign(alignment, size);
}

int posix_memalign(void** out, size_t alignment, size_t size) {
  count();
  void* p = __libc_memalign(alignment, size);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

void* valloc(size_t size) {
  count();
  return __libc_valloc(size);
}

void* pvalloc(size_t size) {
  count();
  return __libc_pvalloc(size);
}

void free(void* p) {
  __libc_free(p);
}
