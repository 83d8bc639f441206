/* The C kernels' parallel loops, on a pool of worker threads of our own instead of OpenMP.
 *
 * Why not OpenMP: a served engine shares this 2-core machine with Serve's proxy, the ingress and
 * the replica, which wake once per streamed token. An OpenMP loop ends at a barrier that every
 * thread of the team must reach, so when one of those processes preempts a worker, the calling
 * thread waits for it even if the worker had nothing left to do. Measured: served SmolLM2 on two
 * OpenMP threads used 1.8 cores for the tokens of one thread (docs/benchmarks.md, session 25),
 * and the thread governor kept it on one thread, while the offline engine ran 1.5x faster on two.
 *
 * Here a loop's items are claimed in chunks from one atomic ticket, by the calling thread and
 * by the workers alike, and the caller waits only for chunks a worker has claimed: a worker
 * that has not woken yet (or was preempted between chunks) finds nothing left and costs nothing.
 * Workers spin briefly for the next loop (a decode step runs hundreds), then sleep on a futex.
 *
 * The workers are SCHED_IDLE: they run only on a core nothing else wants, so the processes that
 * ship the tokens never wait for them, and the engine gets the rest of the machine without a
 * thread governor. A caller whose last chunks are still with a worker spins 20 us, then sleeps
 * until the worker's last chunk wakes it, leaving its own core idle for the worker to move to.
 * Served SmolLM2 beside the shipped OpenMP engine (governed): c=16 1.15x the tokens, TTFT p50
 * 0.97x, c=1 1.06x; sleeping rather than yielding: TTFT p50 0.85x (docs/benchmarks.md,
 * session 26).
 *
 * One hazard comes with SCHED_IDLE: a worker preempted in the middle of a chunk while every core
 * is wanted by ordinary threads gets no time at all, and its caller waits (measured: a 1.4 s gap
 * in a stream with two busy processes beside it). So a caller that has waited LIFT_NS for a
 * worker lifts that worker to SCHED_OTHER, and the worker goes back to SCHED_IDLE when its chunk
 * is done. Lifting needs CAP_SYS_NICE (or an RLIMIT_NICE of 20); where the process cannot, its
 * workers stay ordinary threads, and the thread governor judges the steps as it does OpenMP's
 * (work_pool_idle_workers says which).
 *
 * The pool is made on first use in the process that uses it (an engine forked from the zygote
 * makes its own: threads do not survive fork).
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "work_pool.h"

#define MAX_THREADS 64
#define SPIN_NS 2000000 /* a worker spins this long for the next loop before it sleeps */
#define WAIT_SPIN_NS 20000 /* the caller spins this long for claimed chunks, then sleeps */
#define LIFT_NS 1000000 /* a caller waiting this long for a worker lifts it to SCHED_OTHER */

/* ticket: generation (24 bits) | chunks (20 bits) | next chunk (20 bits) */
#define CHUNK_BITS 20
#define CHUNK_MASK ((UINT64_C(1) << CHUNK_BITS) - 1)
#define MAX_CHUNKS CHUNK_MASK

static struct {
    /* each on a cache line of its own: every claim writes the ticket, every chunk done */
    _Alignas(64) _Atomic uint64_t ticket;
    _Alignas(64) _Atomic int64_t done; /* chunks finished in this generation */
    _Alignas(64) pool_fn fn;
    void *ctx;
    int64_t items, chunk;
    _Atomic int active; /* threads taking part, the caller included */
    _Atomic int busy; /* a caller's loop is running */
    _Atomic int sleepers;
    _Atomic uint32_t wake; /* futex word: bumped when a loop is published to sleepers */
    int64_t num_chunks; /* of the current loop */
    _Alignas(64) _Atomic uint32_t finished; /* futex word: bumped when a sleeping caller's loop ends */
    _Atomic int caller_sleeps;
    _Atomic int64_t lifts; /* times a caller lifted the workers to SCHED_OTHER */
    _Atomic int started; /* workers that have set their scheduling policy */
    pid_t tids[MAX_THREADS]; /* the workers' thread ids (index 0, the caller, unused) */
    _Atomic int lifted[MAX_THREADS]; /* set by a caller that lifted worker i, cleared by it */
    int idle_workers; /* 1: workers are SCHED_IDLE (this process may lift them), 0: ordinary */
    pid_t probed_in; /* the process idle_workers was found for */
    int workers; /* worker threads made so far */
    pid_t owner; /* the process whose workers these are */
    pthread_mutex_t grow;
} pool = {.active = 1, .grow = PTHREAD_MUTEX_INITIALIZER};

static const struct sched_param no_priority = {0};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static uint64_t generation(uint64_t ticket) { return ticket >> (2 * CHUNK_BITS); }

/* Claims and runs chunks of the current loop until none are left. */
static void run_chunks(uint64_t gen) {
    uint64_t t = atomic_load(&pool.ticket);
    for (;;) {
        const uint64_t chunks = (t >> CHUNK_BITS) & CHUNK_MASK, next = t & CHUNK_MASK;
        if (generation(t) != gen || next >= chunks) return;
        if (!atomic_compare_exchange_weak(&pool.ticket, &t, t + 1)) continue;
        /* the claim is ours: the loop's fields stay as they are until every chunk is done */
        const int64_t begin = (int64_t)next * pool.chunk;
        const int64_t end = begin + pool.chunk < pool.items ? begin + pool.chunk : pool.items;
        const int64_t num_chunks = pool.num_chunks; /* before the last chunk frees the fields */
        pool.fn(pool.ctx, begin, end);
        if (atomic_fetch_add(&pool.done, 1) + 1 == num_chunks && atomic_load(&pool.caller_sleeps)) {
            atomic_fetch_add(&pool.finished, 1);
            syscall(SYS_futex, &pool.finished, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
        }
        t = atomic_load(&pool.ticket);
    }
}

/* A worker its caller lifted goes back to SCHED_IDLE (the caller lifts it before it sets the flag). */
static void settle(int index) {
    if (atomic_load(&pool.lifted[index]) && atomic_exchange(&pool.lifted[index], 0))
        sched_setscheduler(0, SCHED_IDLE, &no_priority);
}

static void *worker(void *arg) {
    const int index = (int)(intptr_t)arg; /* 1.. : the caller is 0 */
    pool.tids[index] = (pid_t)syscall(SYS_gettid);
    if (pool.idle_workers == 1) sched_setscheduler(0, SCHED_IDLE, &no_priority);
    atomic_fetch_add(&pool.started, 1);
    uint64_t seen = generation(atomic_load(&pool.ticket));
    for (;;) {
        int64_t spin_until = now_ns() + SPIN_NS;
        uint64_t gen;
        for (;;) {
            settle(index);
            gen = generation(atomic_load(&pool.ticket));
            if (gen != seen) break;
            if (now_ns() < spin_until) {
                _mm_pause();
                continue;
            }
            const uint32_t wake = atomic_load(&pool.wake);
            atomic_fetch_add(&pool.sleepers, 1);
            if (generation(atomic_load(&pool.ticket)) == seen)
                syscall(SYS_futex, &pool.wake, FUTEX_WAIT_PRIVATE, wake, NULL, NULL, 0);
            atomic_fetch_sub(&pool.sleepers, 1);
            spin_until = now_ns() + SPIN_NS;
        }
        seen = gen;
        if (index < atomic_load(&pool.active)) run_chunks(gen);
    }
    return NULL;
}

static void *probe_lifting(void *unused) {
    (void)unused;
    if (sched_setscheduler(0, SCHED_IDLE, &no_priority) != 0) return (void *)0;
    return (void *)(intptr_t)(sched_setscheduler(0, SCHED_OTHER, &no_priority) == 0);
}

/* Whether this process may lift a SCHED_IDLE thread back: tried on a thread that then ends. */
static int can_lift(void) {
    pthread_t thread;
    void *lifted = NULL;
    if (pthread_create(&thread, NULL, probe_lifting, NULL) != 0) return 0;
    pthread_join(thread, &lifted);
    return lifted != NULL;
}

int work_pool_idle_workers(void) {
    pthread_mutex_lock(&pool.grow);
    if (pool.probed_in != getpid()) {
        pool.idle_workers = can_lift();
        pool.probed_in = getpid();
    }
    const int idle = pool.idle_workers;
    pthread_mutex_unlock(&pool.grow);
    return idle;
}

/* The workers to SCHED_OTHER until their chunks are done: the caller has waited LIFT_NS. */
static void lift_workers(void) {
    for (int i = 1; i <= pool.workers; i++) {
        sched_setscheduler(pool.tids[i], SCHED_OTHER, &no_priority);
        atomic_store(&pool.lifted[i], 1);
    }
    atomic_fetch_add(&pool.lifts, 1);
}

/* Workers up to `threads` - 1 in this process (a forked child starts with none). */
static void ensure_workers(int threads) {
    const pid_t me = getpid();
    if (pool.owner == me && pool.workers >= threads - 1) return;
    work_pool_idle_workers();
    pthread_mutex_lock(&pool.grow);
    if (pool.owner != me) { /* forked: the parent's workers are not here */
        pool.owner = me;
        pool.workers = 0;
        atomic_store(&pool.started, 0);
    }
    while (pool.workers < threads - 1 && pool.workers < MAX_THREADS - 1) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&thread, &attr, worker, (void *)(intptr_t)(pool.workers + 1)) != 0) {
            pthread_attr_destroy(&attr);
            break;
        }
        pthread_attr_destroy(&attr);
        pool.workers++;
    }
    /* no loop runs before the new workers are SCHED_IDLE (a moment, once per process) */
    while (atomic_load(&pool.started) < pool.workers) sched_yield();
    pthread_mutex_unlock(&pool.grow);
}

void work_pool_set_threads(int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    atomic_store(&pool.active, threads);
}

int work_pool_threads(void) { return atomic_load(&pool.active); }

int64_t work_pool_lifts(void) { return atomic_load(&pool.lifts); }

void work_pool_for(int64_t items, int64_t chunk, pool_fn fn, void *ctx) {
    if (items <= 0) return;
    if (chunk < 1) chunk = 1;
    int64_t chunks = (items + chunk - 1) / chunk;
    if (chunks > (int64_t)MAX_CHUNKS) {
        chunk = (items + MAX_CHUNKS - 1) / MAX_CHUNKS;
        chunks = (items + chunk - 1) / chunk;
    }
    const int threads = atomic_load(&pool.active);
    /* One loop at a time (an engine has one inference thread); a second thread calling in the
     * meantime (two engines in one process) runs its loop alone. */
    if (threads < 2 || chunks < 2 || atomic_exchange(&pool.busy, 1)) {
        fn(ctx, 0, items);
        return;
    }
    ensure_workers(threads);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.items = items;
    pool.chunk = chunk;
    pool.num_chunks = chunks;
    atomic_store(&pool.done, 0);
    const uint64_t gen = (generation(atomic_load(&pool.ticket)) + 1) & 0xFFFFFF;
    atomic_store(&pool.ticket, (gen << (2 * CHUNK_BITS)) | ((uint64_t)chunks << CHUNK_BITS));
    if (atomic_load(&pool.sleepers) > 0) {
        atomic_fetch_add(&pool.wake, 1);
        syscall(SYS_futex, &pool.wake, FUTEX_WAKE_PRIVATE, MAX_THREADS, NULL, NULL, 0);
    }
    run_chunks(gen);
    /* every chunk is claimed; wait for the ones a worker is still running */
    const int64_t wait_started = now_ns(), sleep_after = wait_started + WAIT_SPIN_NS;
    int lifted = pool.idle_workers != 1; /* ordinary workers need no lift */
    while (atomic_load(&pool.done) < chunks) {
        const int64_t now = now_ns();
        if (now < sleep_after) {
            _mm_pause();
            continue;
        }
        if (!lifted && now - wait_started >= LIFT_NS) {
            lift_workers();
            lifted = 1;
        }
        /* asleep, this thread leaves its core idle, where a preempted SCHED_IDLE worker can run */
        const uint32_t seen = atomic_load(&pool.finished);
        atomic_store(&pool.caller_sleeps, 1);
        if (atomic_load(&pool.done) < chunks) {
            const struct timespec timeout = {0, 200000}; /* a safety net, and the lift's clock */
            syscall(SYS_futex, &pool.finished, FUTEX_WAIT_PRIVATE, seen, &timeout, NULL, 0);
        }
        atomic_store(&pool.caller_sleeps, 0);
    }
    atomic_store(&pool.busy, 0);
}
