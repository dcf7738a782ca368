/* Parallel memory copy and page prefaulting.
 *
 * One core copies ~5-10 GB/s; a pinned staging buffer or a fresh mapping of
 * tens of GB wants several. Small copies stay on the calling thread: a task is
 * at least 2 MiB, below which thread start-up costs more than it saves. */
#include "args.h"
#include "methods.h"

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#define COPY_MIN_CHUNK ((size_t)2 << 20)
/* Copies of at least this many bytes write with non-temporal stores (below). */
#define STREAM_MIN ((size_t)1 << 20)

/* memcpy, with non-temporal stores for large copies on x86-64. A cached store first reads
 * the destination line (read-for-ownership), so a copy moves three bytes per byte copied;
 * a streaming store skips that read. glibc's memcpy streams only above a threshold tied to
 * the cache size, so the 8 MiB tasks of copy_many were copied with cached stores: 10.0
 * against 16.9 GB/s for the same bytes in one call on the 2-core dev box, and a CPU client
 * restoring 291 tensors got 47 GB/s where a 4 GB memcpy got 74 (H200 host). */
static void bulk_copy(char *dst, const char *src, size_t n)
{
#if defined(__x86_64__)
    if (n >= STREAM_MIN) {
        size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
        memcpy(dst, src, head);
        dst += head;
        src += head;
        n -= head;
        for (; n >= 64; n -= 64, dst += 64, src += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)src);
            __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
            _mm_stream_si128((__m128i *)dst, a);
            _mm_stream_si128((__m128i *)(dst + 16), b);
            _mm_stream_si128((__m128i *)(dst + 32), c);
            _mm_stream_si128((__m128i *)(dst + 48), d);
        }
        _mm_sfence(); /* streaming stores are weakly ordered: done before we return */
    }
#endif
    memcpy(dst, src, n);
}
/* Touch 4 KiB pages: the smallest page size on x86-64, so every page of any
 * mapping (4 KiB or huge) is hit at least once. */
#define PREFAULT_PAGE ((size_t)4096)

/* Split `length` into at most `threads` chunks of at least COPY_MIN_CHUNK,
 * rounded to 4 KiB so chunks start on page (and cache line) boundaries. */
static size_t chunk_size(size_t length, int threads)
{
    size_t chunk = (length + (size_t)threads - 1) / (size_t)threads;
    chunk = (chunk + PREFAULT_PAGE - 1) & ~(PREFAULT_PAGE - 1);
    return chunk < COPY_MIN_CHUNK ? COPY_MIN_CHUNK : chunk;
}

typedef struct {
    char *dst;
    const char *src;
    size_t length;
    size_t chunk;
} copy_job;

static int copy_chunk(void *ctx, size_t task, thaw_err_t *err)
{
    (void)err;
    const copy_job *j = ctx;
    size_t start = task * j->chunk;
    size_t len = j->length - start < j->chunk ? j->length - start : j->chunk;
    bulk_copy(j->dst + start, j->src + start, len);
    return 0;
}

const char thaw_copy_doc[] =
    "copy(dst, src, length, threads=1) -> None\n\n"
    "memcpy `length` bytes from address `src` to address `dst` on up to\n"
    "`threads` threads (GIL released; tasks of at least 2 MiB). The ranges must\n"
    "not overlap (ValueError if they do).";

PyObject *thaw_copy(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"dst", "src", "length", "threads", NULL};
    uintptr_t dst, src;
    Py_ssize_t length;
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O&n|i:copy", kwlist, thaw_addr_converter,
                                     &dst, thaw_addr_converter, &src, &length, &threads))
        return NULL;
    if (thaw_check_nonneg("length", length) || thaw_check_threads(threads) ||
        thaw_check_range("dst", dst, length) || thaw_check_range("src", src, length))
        return NULL;
    if (length == 0)
        Py_RETURN_NONE;
    if (dst < src + (uintptr_t)length && src < dst + (uintptr_t)length) {
        PyErr_SetString(PyExc_ValueError, "copy: dst and src ranges overlap");
        return NULL;
    }

    copy_job j = {(char *)dst, (const char *)src, (size_t)length, 0};
    j.chunk = chunk_size(j.length, threads);
    size_t ntasks = (j.length + j.chunk - 1) / j.chunk;
    thaw_err_t err;
    Py_BEGIN_ALLOW_THREADS
    thaw_parallel_for(ntasks, threads, copy_chunk, &j, &err);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

typedef struct {
    char *addr;
    size_t length;
    size_t chunk;
    int write;
} prefault_job;

static int prefault_chunk(void *ctx, size_t task, thaw_err_t *err)
{
    (void)err;
    const prefault_job *j = ctx;
    size_t start = task * j->chunk;
    size_t end = j->length - start < j->chunk ? j->length : start + j->chunk;
    /* volatile: the compiler must not drop a load whose value is unused, nor
     * a store of the value just loaded. Read-then-write of the same byte makes
     * the kernel allocate a writable page without changing its contents. */
    volatile char *p = (volatile char *)j->addr;
    for (size_t i = start; i < end; i += PREFAULT_PAGE) {
        char v = p[i];
        if (j->write)
            p[i] = v;
    }
    /* An unaligned addr can leave the range's last page untouched by the
     * stride above; touching the last byte covers it. */
    char v = p[end - 1];
    if (j->write)
        p[end - 1] = v;
    return 0;
}

const char thaw_prefault_doc[] =
    "prefault(addr, length, threads=1, write=True) -> None\n\n"
    "Touch every 4 KiB page of [addr, addr+length) on up to `threads` threads\n"
    "(GIL released) so a fresh mapping is faulted in before the hot path.\n"
    "write=True reads each touched byte and writes the same value back (faults\n"
    "pages in writable; the mapping must be writable and not concurrently\n"
    "written); write=False only reads.";

PyObject *thaw_prefault(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"addr", "length", "threads", "write", NULL};
    uintptr_t addr;
    Py_ssize_t length;
    int threads = 1, write = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&n|ip:prefault", kwlist,
                                     thaw_addr_converter, &addr, &length, &threads, &write))
        return NULL;
    if (thaw_check_nonneg("length", length) || thaw_check_threads(threads) ||
        thaw_check_range("addr", addr, length))
        return NULL;
    if (length == 0)
        Py_RETURN_NONE;

    prefault_job j = {(char *)addr, (size_t)length, 0, write};
    j.chunk = chunk_size(j.length, threads);
    size_t ntasks = (j.length + j.chunk - 1) / j.chunk;
    thaw_err_t err;
    Py_BEGIN_ALLOW_THREADS
    thaw_parallel_for(ntasks, threads, prefault_chunk, &j, &err);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* copy_many: one pool of threads over many (dst, src, length) segments. A model restore is
 * hundreds of tensors; one parallel copy per tensor starts and joins threads hundreds of
 * times and leaves cores idle on the small ones (47% of memcpy speed on a 16-core host). */
#define COPY_MANY_TASK ((size_t)8 << 20)

typedef struct {
    char *dst;
    const char *src;
    size_t length;
} copy_task;

static int copy_many_task(void *ctx, size_t task, thaw_err_t *err)
{
    (void)err;
    const copy_task *t = (const copy_task *)ctx + task;
    bulk_copy(t->dst, t->src, t->length);
    return 0;
}

static int addr_at(PyObject *seq, Py_ssize_t i, uintptr_t *out)
{
    return thaw_addr_converter(PySequence_Fast_GET_ITEM(seq, i), out);
}

const char thaw_copy_many_doc[] =
    "copy_many(dsts, srcs, lengths, threads=1) -> None\n\n"
    "memcpy each lengths[i] bytes from srcs[i] to dsts[i] (addresses), all segments cut\n"
    "into 8 MiB tasks shared by one pool of up to `threads` threads (GIL released).\n"
    "No range may overlap its own source (ValueError).";

PyObject *thaw_copy_many(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"dsts", "srcs", "lengths", "threads", NULL};
    PyObject *dsts_obj, *srcs_obj, *lengths_obj;
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|i:copy_many", kwlist, &dsts_obj,
                                     &srcs_obj, &lengths_obj, &threads))
        return NULL;
    if (thaw_check_threads(threads))
        return NULL;
    PyObject *dsts = PySequence_Fast(dsts_obj, "dsts must be a sequence");
    PyObject *srcs = dsts ? PySequence_Fast(srcs_obj, "srcs must be a sequence") : NULL;
    PyObject *lengths = srcs ? PySequence_Fast(lengths_obj, "lengths must be a sequence") : NULL;
    copy_task *tasks = NULL;
    PyObject *result = NULL;
    if (!lengths)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(dsts);
    if (PySequence_Fast_GET_SIZE(srcs) != n || PySequence_Fast_GET_SIZE(lengths) != n) {
        PyErr_SetString(PyExc_ValueError, "copy_many: dsts, srcs and lengths differ in length");
        goto done;
    }
    size_t ntasks = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t len = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(lengths, i));
        if (len == -1 && PyErr_Occurred())
            goto done;
        if (thaw_check_nonneg("length", len))
            goto done;
        ntasks += ((size_t)len + COPY_MANY_TASK - 1) / COPY_MANY_TASK;
    }
    tasks = PyMem_Calloc(ntasks ? ntasks : 1, sizeof *tasks);
    if (!tasks) {
        PyErr_NoMemory();
        goto done;
    }
    size_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uintptr_t dst, src;
        Py_ssize_t len = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(lengths, i));
        if (!addr_at(dsts, i, &dst) || !addr_at(srcs, i, &src))
            goto done;
        if (thaw_check_range("dst", dst, len) || thaw_check_range("src", src, len))
            goto done;
        if (len && dst < src + (uintptr_t)len && src < dst + (uintptr_t)len) {
            PyErr_Format(PyExc_ValueError, "copy_many: segment %zd overlaps its source", i);
            goto done;
        }
        for (size_t off = 0; off < (size_t)len; off += COPY_MANY_TASK, k++) {
            size_t left = (size_t)len - off;
            tasks[k] = (copy_task){(char *)dst + off, (const char *)src + off,
                                   left < COPY_MANY_TASK ? left : COPY_MANY_TASK};
        }
    }
    thaw_err_t err;
    Py_BEGIN_ALLOW_THREADS
    thaw_parallel_for(k, threads, copy_many_task, tasks, &err);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(tasks);
    Py_XDECREF(dsts);
    Py_XDECREF(srcs);
    Py_XDECREF(lengths);
    return result;
}
