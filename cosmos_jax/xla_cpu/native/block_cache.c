/* Keeps a few freed large blocks for reuse, for XLA:CPU's per-step temporaries.
 *
 * XLA:CPU allocates each step's temporaries as one block (about 280 MB for the tiny config,
 * GBs for ViT-B/16) from a worker thread and frees it when the step ends. glibc maps blocks
 * that large afresh every time (no tunable changes that for threads other than the main one),
 * so each step page-faults the whole block again and the kernel zeroes it first. Preloaded
 * (LD_PRELOAD), this file keeps up to SLOTS freed blocks of at least MIN_BYTES and hands one
 * back to an allocation of about its size (at most 1/8 larger) and alignment.
 *
 * The kept blocks are glibc's own chunks, returned unchanged: realloc, malloc_usable_size and a
 * final free work on them as on any other. Only freed blocks that glibc mapped by themselves
 * (the IS_MMAPPED bit of the chunk header) are kept; calloc is left to glibc (its blocks must
 * be zero).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define MIN_BYTES ((size_t)64 << 20)
#define SLOTS 4
#define CHUNK_IS_MMAPPED 0x2

static void *(*next_malloc)(size_t);
static void (*next_free)(void *);
static int (*next_posix_memalign)(void **, size_t, size_t);
static void *(*next_aligned_alloc)(size_t, size_t);
static void *(*next_memalign)(size_t, size_t);

static pthread_once_t resolved = PTHREAD_ONCE_INIT;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static void *kept[SLOTS];
static size_t kept_size[SLOTS];
static unsigned long kept_when[SLOTS], clock_ticks;

static void reset_lock_in_child(void) { pthread_mutex_init(&lock, NULL); }

static void resolve(void) {
  next_malloc = dlsym(RTLD_NEXT, "malloc");
  next_free = dlsym(RTLD_NEXT, "free");
  next_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
  next_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
  next_memalign = dlsym(RTLD_NEXT, "memalign");
  pthread_atfork(NULL, NULL, reset_lock_in_child);
}

/* A kept block for `size` bytes at `align`, or NULL (also for an invalid alignment, which
 * glibc then rejects as it should). */
static void *take(size_t size, size_t align) {
  void *block = NULL;
  if (size < MIN_BYTES || align == 0 || (align & (align - 1))) return NULL;
  pthread_mutex_lock(&lock);
  for (int i = 0; i < SLOTS; i++) {
    if (kept[i] && kept_size[i] >= size && kept_size[i] - size <= size / 8 &&
        (uintptr_t)kept[i] % align == 0) {
      block = kept[i];
      kept[i] = NULL;
      break;
    }
  }
  pthread_mutex_unlock(&lock);
  return block;
}

/* Keeps `block` if it is a large mapped chunk (evicting the oldest kept one); 0 if not. */
static int keep(void *block) {
  size_t header = ((size_t *)block)[-1];
  if (!(header & CHUNK_IS_MMAPPED) || (header & ~(size_t)7) < MIN_BYTES) return 0;
  size_t usable = malloc_usable_size(block);
  pthread_mutex_lock(&lock);
  int slot = 0;
  for (int i = 0; i < SLOTS; i++) {
    if (!kept[i]) { slot = i; break; }
    if (kept_when[i] < kept_when[slot]) slot = i;
  }
  void *evicted = kept[slot];
  kept[slot] = block;
  kept_size[slot] = usable;
  kept_when[slot] = ++clock_ticks;
  pthread_mutex_unlock(&lock);
  if (evicted) next_free(evicted);
  return 1;
}

void *malloc(size_t size) {
  pthread_once(&resolved, resolve);
  void *block = take(size, 16);
  return block ? block : next_malloc(size);
}

int posix_memalign(void **out, size_t align, size_t size) {
  pthread_once(&resolved, resolve);
  void *block = take(size, align);
  if (!block) return next_posix_memalign(out, align, size);
  *out = block;
  return 0;
}

void *aligned_alloc(size_t align, size_t size) {
  pthread_once(&resolved, resolve);
  void *block = take(size, align);
  return block ? block : next_aligned_alloc(align, size);
}

void *memalign(size_t align, size_t size) {
  pthread_once(&resolved, resolve);
  void *block = take(size, align);
  return block ? block : next_memalign(align, size);
}

void free(void *block) {
  if (!block) return;
  pthread_once(&resolved, resolve);
  if (!keep(block)) next_free(block);
}
