/* A minimal fork-join parallel loop on pthreads: no pool, threads live for one call. The
 * kernels' work per call (milliseconds to seconds) dwarfs the ~50 us of thread start-up. */
#include <pthread.h>

#include "nm_internal.h"

typedef struct {
    nm_task_fn fn;
    void *ctx;
    int64_t ntasks;
    int64_t grain;
    int64_t next; /* first item not yet handed out (atomic) */
} nm_loop;

static void run_chunks(nm_loop *loop)
{
    for (;;) {
        int64_t lo = __atomic_fetch_add(&loop->next, loop->grain, __ATOMIC_RELAXED);
        if (lo >= loop->ntasks)
            return;
        int64_t hi = loop->ntasks - lo > loop->grain ? lo + loop->grain : loop->ntasks;
        loop->fn(loop->ctx, lo, hi);
    }
}

static void *worker(void *arg)
{
    run_chunks((nm_loop *)arg);
    return NULL;
}

void nm_parallel_for(int nthreads, int64_t ntasks, int64_t grain, nm_task_fn fn, void *ctx)
{
    if (ntasks <= 0)
        return;
    if (grain < 1)
        grain = 1;
    int64_t chunks = ntasks / grain + (ntasks % grain != 0);
    if (nthreads > NM_MAX_THREADS)
        nthreads = NM_MAX_THREADS;
    if ((int64_t)nthreads > chunks)
        nthreads = (int)chunks;
    if (nthreads <= 1) {
        fn(ctx, 0, ntasks);
        return;
    }
    nm_loop loop = {fn, ctx, ntasks, grain, 0};
    pthread_t tids[NM_MAX_THREADS];
    int started = 0;
    for (int i = 1; i < nthreads; i++) {
        if (pthread_create(&tids[started], NULL, worker, &loop) == 0)
            started++;
    }
    run_chunks(&loop);
    for (int i = 0; i < started; i++)
        pthread_join(tids[i], NULL);
}
