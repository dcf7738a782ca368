/* read_to_device: read ranges of a file into GPU memory through small pinned bounce buffers,
 * hashing each read as it lands, every step in native threads.
 *
 * The Python pipeline this replaces (64 MB staging slots, four reader threads, one thread
 * issuing the copies) restored a page-cache-resident 16 GB snapshot at 25-29 GB/s verified on
 * the H200 host, while that host reads the cache at 45-54 GB/s and copies pinned memory to
 * the GPU at 55. A probe of this loop on the same host: each of 12-16 threads reads and hashes
 * 4 MiB into one of its own two pinned buffers, issues that buffer's copy on its own stream
 * and goes on with the other, 52.8-53.0 GB/s hashed (2 MiB: 49-50, 1 MiB: 42-43, 64 MB
 * buffers: 38.6). Per-chunk driver calls from many threads cannot go through Python (the
 * GIL), so they are made here.
 *
 * The driver's entry points come from the caller: thaw.mem.cuda resolves them through
 * cuda-python (cuGetProcAddress), so this file needs no CUDA headers or library and calls the
 * libcuda that cuda-python loaded. The caller makes the device's context current; the
 * workers make the same one current in their threads.
 *
 * Each task is one 16 MiB hash block of a range (readhash.h). Its worker reads it in BOUNCE
 * chunks, alternating its two buffers; before refilling a buffer it waits for that buffer's
 * last copy (an event). What is hashed is the bounce buffer's bytes, and the copy reads the
 * same bytes after the hash: the bytes checked are the bytes restored, never the file's pages.
 * Every stream is synchronized before the call returns, failed or not, so the caller's buffers
 * are idle again and the device memory holds what was read. */
#include "args.h"
#include "methods.h"
#include "readhash.h"

#include <stdint.h>

#define BLOCK ((size_t)THAW_BLOCK_HASH_SIZE)
#define BOUNCE ((size_t)THAW_BOUNCE_SIZE)
#define DEPTH 2 /* bounce buffers per worker: one filled while the other's copy runs */

/* The driver's types as its ABI has them (cuda.h): handles are pointers, CUresult an int. */
typedef int CUresult;
typedef void *CUcontext;
typedef void *CUstream;
typedef void *CUevent;
typedef unsigned long long CUdeviceptr;
#define CU_STREAM_NON_BLOCKING 1
#define CU_EVENT_DISABLE_TIMING 2

/* The entry points, in the order of thaw.mem.cuda._NATIVE_CALLS (tests/test_driver_abi.py
 * checks them against cuda.h). */
typedef struct {
    CUresult (*get_error_name)(CUresult, const char **);
    CUresult (*ctx_get_current)(CUcontext *);
    CUresult (*ctx_set_current)(CUcontext);
    CUresult (*stream_create)(CUstream *, unsigned);
    CUresult (*stream_destroy)(CUstream);
    CUresult (*stream_synchronize)(CUstream);
    CUresult (*event_create)(CUevent *, unsigned);
    CUresult (*event_destroy)(CUevent);
    CUresult (*event_record)(CUevent, CUstream);
    CUresult (*event_synchronize)(CUevent);
    CUresult (*memcpy_htod_async)(CUdeviceptr, const void *, size_t, CUstream);
} driver_t;

#define DRIVER_CALLS 11

typedef struct {
    CUstream stream;
    CUevent events[DEPTH];
    char *bounce[DEPTH];
    int turn;
} worker_t;

typedef struct {
    int fd;
    size_t align;
    int verify;
    const driver_t *cu;
    CUcontext context;
    thaw_ranges ranges;
    worker_t *workers;
} job_t;

static int failed(const driver_t *cu, CUresult rc, thaw_err_t *err, const char *call)
{
    if (rc == 0)
        return 0;
    const char *name = NULL;
    if (cu->get_error_name(rc, &name) != 0 || !name)
        name = "unknown CUDA error";
    thaw_err_cuda(err, "%s failed: %s (%d)", call, name, rc);
    return -1;
}

static int rd_block(void *ctx, size_t worker, size_t task, thaw_err_t *err)
{
    const job_t *j = ctx;
    const driver_t *cu = j->cu;
    worker_t *w = &j->workers[worker];
    size_t start, n;
    const thaw_range *r = thaw_range_of(&j->ranges, task, &start, &n);
    if (failed(cu, cu->ctx_set_current(j->context), err, "cuCtxSetCurrent"))
        return -1;
    thaw_hash_state state;
    thaw_hash_reset(&state);
    for (size_t at = 0; at < n; at += BOUNCE) {
        size_t len = n - at < BOUNCE ? n - at : BOUNCE;
        int b = w->turn;
        w->turn = (b + 1) % DEPTH;
        if (failed(cu, cu->event_synchronize(w->events[b]), err, "cuEventSynchronize"))
            return -1;
        if (thaw_read_span(j->fd, w->bounce[b], r->offset + (long long)(start + at), len,
                           j->align, j->verify ? &state : NULL, err))
            return -1;
        CUdeviceptr dst = (CUdeviceptr)(uintptr_t)(r->dst + start + at);
        if (failed(cu, cu->memcpy_htod_async(dst, w->bounce[b], len, w->stream), err,
                   "cuMemcpyHtoDAsync") ||
            failed(cu, cu->event_record(w->events[b], w->stream), err, "cuEventRecord"))
            return -1;
    }
    if (j->verify)
        thaw_put_digest(r, start / BLOCK, &state);
    return 0;
}

/* Streams and events for `count` workers; on failure, those made so far are destroyed. */
static int make_workers(const driver_t *cu, worker_t *workers, size_t count, char **bounce,
                        thaw_err_t *err)
{
    size_t made = 0;
    int rc = 0;
    for (; made < count && rc == 0; made++) {
        worker_t *w = &workers[made];
        *w = (worker_t){0};
        rc = failed(cu, cu->stream_create(&w->stream, CU_STREAM_NON_BLOCKING), err,
                    "cuStreamCreate");
        for (int b = 0; b < DEPTH && rc == 0; b++) {
            w->bounce[b] = bounce[made * DEPTH + b];
            rc = failed(cu, cu->event_create(&w->events[b], CU_EVENT_DISABLE_TIMING), err,
                        "cuEventCreate");
        }
    }
    if (rc != 0) {
        for (size_t i = 0; i < made; i++) {
            for (int b = 0; b < DEPTH; b++)
                if (workers[i].events[b])
                    cu->event_destroy(workers[i].events[b]);
            if (workers[i].stream)
                cu->stream_destroy(workers[i].stream);
        }
    }
    return rc;
}

/* Wait for every copy (whatever happened), then free the streams and events. The first
 * failure is reported unless the loop already failed. */
static int finish_workers(const driver_t *cu, worker_t *workers, size_t count, int rc,
                          thaw_err_t *err)
{
    for (size_t i = 0; i < count; i++) {
        CUresult s = cu->stream_synchronize(workers[i].stream);
        if (rc == 0)
            rc = failed(cu, s, err, "cuStreamSynchronize");
        for (int b = 0; b < DEPTH; b++)
            cu->event_destroy(workers[i].events[b]);
        cu->stream_destroy(workers[i].stream);
    }
    return rc;
}

static int parse_driver(PyObject *obj, driver_t *cu)
{
    PyObject *seq = PySequence_Fast(obj, "driver must be a sequence of entry points");
    if (!seq)
        return -1;
    int rc = -1;
    if ((size_t)PySequence_Fast_GET_SIZE(seq) != DRIVER_CALLS) {
        PyErr_Format(PyExc_ValueError, "driver must hold %zu entry points, got %zd",
                     DRIVER_CALLS, PySequence_Fast_GET_SIZE(seq));
        goto done;
    }
    uintptr_t fn[DRIVER_CALLS];
    for (size_t i = 0; i < DRIVER_CALLS; i++) {
        if (!thaw_addr_converter(PySequence_Fast_GET_ITEM(seq, (Py_ssize_t)i), &fn[i]))
            goto done;
        if (!fn[i]) {
            PyErr_Format(PyExc_ValueError, "driver entry point %zu is NULL", i);
            goto done;
        }
    }
    /* An address to a function pointer: what dlsym's callers do, defined on every ABI thaw
     * builds for. */
    cu->get_error_name = (CUresult(*)(CUresult, const char **))fn[0];
    cu->ctx_get_current = (CUresult(*)(CUcontext *))fn[1];
    cu->ctx_set_current = (CUresult(*)(CUcontext))fn[2];
    cu->stream_create = (CUresult(*)(CUstream *, unsigned))fn[3];
    cu->stream_destroy = (CUresult(*)(CUstream))fn[4];
    cu->stream_synchronize = (CUresult(*)(CUstream))fn[5];
    cu->event_create = (CUresult(*)(CUevent *, unsigned))fn[6];
    cu->event_destroy = (CUresult(*)(CUevent))fn[7];
    cu->event_record = (CUresult(*)(CUevent, CUstream))fn[8];
    cu->event_synchronize = (CUresult(*)(CUevent))fn[9];
    cu->memcpy_htod_async = (CUresult(*)(CUdeviceptr, const void *, size_t, CUstream))fn[10];
    rc = 0;
done:
    Py_DECREF(seq);
    return rc;
}

/* The bounce buffers' addresses; at least DEPTH, page aligned, BOUNCE bytes each. */
static char **parse_bounce(PyObject *obj, size_t *count)
{
    PyObject *seq = PySequence_Fast(obj, "bounce must be a sequence of addresses");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    char **out = NULL;
    if (n < DEPTH) {
        PyErr_Format(PyExc_ValueError, "bounce must hold at least %d buffers, got %zd", DEPTH, n);
        goto done;
    }
    out = PyMem_Calloc((size_t)n, sizeof *out);
    if (!out) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        uintptr_t addr;
        if (!thaw_addr_converter(PySequence_Fast_GET_ITEM(seq, i), &addr) ||
            thaw_check_range("bounce buffer", addr, (Py_ssize_t)BOUNCE)) {
            PyMem_Free(out);
            out = NULL;
            goto done;
        }
        if (addr & 4095) {
            PyErr_Format(PyExc_ValueError, "bounce buffer %zd is not page aligned", i);
            PyMem_Free(out);
            out = NULL;
            goto done;
        }
        out[i] = (char *)addr;
    }
    *count = (size_t)n;
done:
    Py_DECREF(seq);
    return out;
}

const char thaw_read_to_device_doc[] =
    "read_to_device(fd, dsts, offsets, lengths, bounce, driver, threads=1, align=0,\n"
    "               verify=True) -> list[bytes] | None\n\n"
    "Read lengths[i] bytes at file offset offsets[i] into device memory at dsts[i] (CUDA\n"
    "device addresses in the context current in the calling thread), through `bounce`\n"
    "(addresses of pinned, page-aligned host buffers of BOUNCE_SIZE bytes; two per thread).\n"
    "With `verify`, returns each range's block hashes as pread_hashed does, hashed in the\n"
    "bounce buffers before their copy. `driver`: the CUDA driver entry points in the order of\n"
    "thaw.mem.cuda._NATIVE_CALLS. Up to `threads` threads, GIL released; every copy\n"
    "has finished when it returns or raises. align=4096 for O_DIRECT fds, as pread_hashed.\n"
    "Raises EOFError or OSError naming pread, RuntimeError naming a failed CUDA call.";

PyObject *thaw_read_to_device(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"fd",     "dsts",    "offsets", "lengths", "bounce",
                             "driver", "threads", "align",   "verify",  NULL};
    int fd, threads = 1, verify = 1;
    Py_ssize_t align = 0;
    PyObject *dsts, *offsets, *lengths, *bounce_obj, *driver_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iOOOOO|inp:read_to_device", kwlist, &fd,
                                     &dsts, &offsets, &lengths, &bounce_obj, &driver_obj,
                                     &threads, &align, &verify))
        return NULL;
    if (thaw_check_threads(threads))
        return NULL;
    driver_t cu;
    if (parse_driver(driver_obj, &cu))
        return NULL;
    size_t nbounce = 0;
    char **bounce = parse_bounce(bounce_obj, &nbounce);
    if (!bounce)
        return NULL;
    job_t job = {fd, (size_t)align, verify, &cu, NULL, {0}, NULL};
    PyObject *result = NULL;
    if (thaw_ranges_parse(dsts, offsets, lengths, align, 0, verify, "read_to_device",
                          &job.ranges))
        goto done;
    size_t most = nbounce / DEPTH;
    size_t count = thaw_worker_count(job.ranges.blocks, threads < (int)most ? threads : (int)most);
    job.workers = PyMem_Calloc(count ? count : 1, sizeof *job.workers);
    if (!job.workers) {
        PyErr_NoMemory();
        goto done;
    }
    thaw_err_t err;
    int rc = 0;
    if (count) {
        Py_BEGIN_ALLOW_THREADS
        rc = failed(&cu, cu.ctx_get_current(&job.context), &err, "cuCtxGetCurrent");
        if (rc == 0 && !job.context)
            rc = failed(&cu, 201 /* CUDA_ERROR_INVALID_CONTEXT */, &err,
                        "read_to_device: no CUDA context is current; cuCtxGetCurrent");
        if (rc == 0)
            rc = make_workers(&cu, job.workers, count, bounce, &err);
        if (rc == 0) {
            rc = thaw_parallel_for_workers(job.ranges.blocks, (int)count, rd_block, &job, &err);
            rc = finish_workers(&cu, job.workers, count, rc, &err);
        }
        Py_END_ALLOW_THREADS
    }
    if (rc != 0)
        thaw_err_raise(&err);
    else
        result = verify ? Py_NewRef(job.ranges.hashes) : Py_NewRef(Py_None);
done:
    PyMem_Free(job.workers);
    PyMem_Free(bounce);
    thaw_ranges_free(&job.ranges);
    return result;
}
