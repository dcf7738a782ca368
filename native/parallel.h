/* A per-call pool of pthreads running a parallel for-loop over task indices.
 *
 * Header-only so every topic file can use it without another source in
 * setup.py. Threads are created and joined per call: the bulk calls move
 * megabytes to gigabytes, so the ~20 us of pthread_create is noise, and there
 * is no pool state to leak, to inherit across fork() or to shut down.
 *
 * The calling thread works too, so threads=1 never creates a thread. Tasks
 * are handed out in increasing order from an atomic counter (dynamic load
 * balance: one slow pread does not stall a whole static slice). On failure no
 * new tasks start; of the failed tasks the lowest index wins, which makes the
 * reported error deterministic (e.g. the first offset that hit EOF). */
#ifndef THAW_PARALLEL_H
#define THAW_PARALLEL_H

#include "errors.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define THAW_MAX_THREADS 256

/* Run task `task`; return 0, or -1 after filling *err. Called without the GIL. */
typedef int (*thaw_task_fn)(void *ctx, size_t task, thaw_err_t *err);
/* The same, told which worker runs it (0 = the calling thread, up to threads - 1): for loops
 * whose workers own state across tasks (readdevice.c: a stream and bounce buffers each). */
typedef int (*thaw_worker_task_fn)(void *ctx, size_t worker, size_t task, thaw_err_t *err);

typedef struct {
    thaw_worker_task_fn fn;
    void *ctx;
    size_t ntasks;
    atomic_size_t next;
    atomic_int failed;
    pthread_mutex_t lock;
    size_t err_task;
    thaw_err_t err;
} thaw_pool_t;

typedef struct {
    thaw_pool_t *pool;
    size_t index;
} thaw_worker_t;

static inline void *thaw_pool_worker(void *arg)
{
    thaw_worker_t *w = arg;
    thaw_pool_t *p = w->pool;
    thaw_err_t local;
    while (!atomic_load_explicit(&p->failed, memory_order_relaxed)) {
        size_t t = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        if (t >= p->ntasks)
            break;
        if (p->fn(p->ctx, w->index, t, &local) != 0) {
            pthread_mutex_lock(&p->lock);
            if (!atomic_load_explicit(&p->failed, memory_order_relaxed) || t < p->err_task) {
                p->err = local;
                p->err_task = t;
            }
            atomic_store_explicit(&p->failed, 1, memory_order_relaxed);
            pthread_mutex_unlock(&p->lock);
        }
    }
    return NULL;
}

/* The number of workers thaw_parallel_for_workers runs for `threads` and `ntasks`. */
static inline size_t thaw_worker_count(size_t ntasks, int threads)
{
    size_t want = (size_t)(threads < 1 ? 1 : threads);
    if (want > ntasks)
        want = ntasks;
    return want > THAW_MAX_THREADS ? THAW_MAX_THREADS : want;
}

/* Run fn(ctx, worker, 0..ntasks-1) on up to thaw_worker_count(ntasks, threads) threads (the
 * caller is worker 0). Returns 0, or -1 with *err set. Call it with the GIL released. */
static inline int thaw_parallel_for_workers(size_t ntasks, int threads, thaw_worker_task_fn fn,
                                            void *ctx, thaw_err_t *err)
{
    thaw_pool_t p = {.fn = fn, .ctx = ctx, .ntasks = ntasks, .err_task = SIZE_MAX};
    atomic_init(&p.next, 0);
    atomic_init(&p.failed, 0);
    pthread_mutex_init(&p.lock, NULL);

    size_t want = thaw_worker_count(ntasks, threads);
    pthread_t tids[THAW_MAX_THREADS];
    thaw_worker_t workers[THAW_MAX_THREADS];
    size_t started = 0;
    /* A failed pthread_create (EAGAIN under a thread limit) only costs
     * parallelism: the threads we did get, and the caller, finish the work. */
    for (size_t i = 1; i < want; i++) {
        workers[i] = (thaw_worker_t){&p, i};
        if (pthread_create(&tids[started], NULL, thaw_pool_worker, &workers[i]) != 0)
            break;
        started++;
    }
    workers[0] = (thaw_worker_t){&p, 0};
    thaw_pool_worker(&workers[0]);
    for (size_t i = 0; i < started; i++)
        pthread_join(tids[i], NULL);
    pthread_mutex_destroy(&p.lock);

    if (atomic_load(&p.failed)) {
        *err = p.err;
        return -1;
    }
    return 0;
}

typedef struct {
    thaw_task_fn fn;
    void *ctx;
} thaw_plain_t;

static inline int thaw_plain_task(void *ctx, size_t worker, size_t task, thaw_err_t *err)
{
    (void)worker;
    const thaw_plain_t *p = ctx;
    return p->fn(p->ctx, task, err);
}

/* Run fn(ctx, 0..ntasks-1) on up to `threads` threads (the caller included).
 * Returns 0, or -1 with *err set. Call it with the GIL released. */
static inline int thaw_parallel_for(size_t ntasks, int threads, thaw_task_fn fn, void *ctx,
                                    thaw_err_t *err)
{
    thaw_plain_t plain = {fn, ctx};
    return thaw_parallel_for_workers(ntasks, threads, thaw_plain_task, &plain, err);
}

#endif
