/* Parallel loops of the C kernels on a pool of worker threads (work_pool.c says why not OpenMP). */
#ifndef SERVE_APP_WORK_POOL_H
#define SERVE_APP_WORK_POOL_H

#include <stdint.h>

/* Runs items [begin, end) of a loop. */
typedef void (*pool_fn)(void *ctx, int64_t begin, int64_t end);

/* fn over items [0, items) in chunks of `chunk` items, on the calling thread and the pool's
 * workers; returns when every item is done. A thread calling while another's loop runs runs
 * its own loop alone. */
void work_pool_for(int64_t items, int64_t chunk, pool_fn fn, void *ctx);

/* Threads taking part in each loop, the calling thread included (1: it runs them alone). */
void work_pool_set_threads(int threads);
int work_pool_threads(void);

/* 1 where the workers are SCHED_IDLE (this process may lift them back), else 0 (work_pool.c). */
int work_pool_idle_workers(void);

/* Times a caller lifted its workers to SCHED_OTHER to finish a chunk (work_pool.c). */
int64_t work_pool_lifts(void);

/* A chunk size giving each thread about `per_thread` chunks of `items`. */
static inline int64_t work_pool_chunk(int64_t items, int per_thread) {
    const int64_t parts = (int64_t)work_pool_threads() * per_thread;
    const int64_t chunk = (items + parts - 1) / parts;
    return chunk < 1 ? 1 : chunk;
}

#endif
