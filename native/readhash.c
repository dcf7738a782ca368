/* pread_hashed: read ranges of a file into memory and hash them as they land.
 *
 * A verified restore or pin must hash every byte it reads ("xxh3-tree-16M", checksum.c). As a
 * second pass that costs one more trip through DRAM for every byte; here each 16 MiB hash block
 * is one task that reads its block in 256 KiB preads (1 MiB with O_DIRECT) and feeds each to a
 * streaming XXH3 state right after it lands, while it is still in the CPU's cache. The hash of
 * a block is exactly XXH3_64bits of the block (the streaming and one-shot functions agree), so
 * the results are the block hashes that block_hashes() would compute over the same memory.
 *
 * What is hashed is the memory the bytes landed in, never the file's pages: a file changed
 * during the read cannot make the hashed bytes differ from the ones the caller keeps.
 *
 * Each range starts a new tensor (or a 16 MiB multiple into one), so its blocks are the
 * tensor's blocks. With `align` (4096, for O_DIRECT fds) each block's read is rounded up to a
 * multiple of `align`: the caller's buffer and the file must hold the rounded length (a
 * snapshot's tensors start on 4 KiB boundaries, so the padding is the gap before the next). */
#include "readhash.h"

#include "args.h"
#include "methods.h"

#include <errno.h>
#include <limits.h>
#include <unistd.h>

#define BLOCK ((size_t)THAW_BLOCK_HASH_SIZE)
/* Each read is hashed right after it lands, while it is still in the core's cache. From the
 * page cache, 256 KiB reads: with 1 MiB ones, hashing cost the read a quarter of its rate
 * on the dev box (7.2 against 9.7 GB/s, 2 threads, a cached 1.6 GB file), with 256 KiB ones
 * an eighth (8.5), and 64-128 KiB gained nothing more; on the H200 host, 4 x 4 threads into
 * pinned slots, 47.2 GB/s hashed at 256 KiB against 42.6 at 1 MiB and 36.3-43.7 at 32-128
 * KiB. With O_DIRECT, 1 MiB reads: the disk wants large requests (several tasks keep several
 * in flight). */
#define SUB_CACHED ((size_t)256 << 10)
#define SUB_DIRECT ((size_t)1 << 20)

int thaw_ranges_parse(PyObject *dsts_obj, PyObject *offsets_obj, PyObject *lengths_obj,
                      Py_ssize_t align, int host_dst, int hashed, const char *caller,
                      thaw_ranges *out)
{
    *out = (thaw_ranges){0};
    if (align != 0 && (align < 512 || (align & (align - 1)))) {
        PyErr_Format(PyExc_ValueError, "align must be 0 or a power of two >= 512, got %zd", align);
        return -1;
    }
    PyObject *dsts = PySequence_Fast(dsts_obj, "dsts must be a sequence");
    PyObject *offsets = dsts ? PySequence_Fast(offsets_obj, "offsets must be a sequence") : NULL;
    PyObject *lengths = offsets ? PySequence_Fast(lengths_obj, "lengths must be a sequence") : NULL;
    int rc = -1;
    if (!lengths)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(dsts);
    if (PySequence_Fast_GET_SIZE(offsets) != n || PySequence_Fast_GET_SIZE(lengths) != n) {
        PyErr_Format(PyExc_ValueError, "%s: dsts, offsets, lengths differ in length", caller);
        goto done;
    }
    out->ranges = PyMem_Calloc(n ? (size_t)n : 1, sizeof *out->ranges);
    out->hashes = hashed ? PyList_New(n) : NULL;
    if (!out->ranges || (hashed && !out->hashes)) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        uintptr_t dst;
        Py_ssize_t len = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(lengths, i));
        long long off = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(offsets, i));
        if (PyErr_Occurred() || !thaw_addr_converter(PySequence_Fast_GET_ITEM(dsts, i), &dst))
            goto done;
        if (thaw_check_nonneg("length", len) || thaw_check_nonneg("offset", off))
            goto done;
        Py_ssize_t reach = align ? (len + align - 1) / align * align : len;
        if (thaw_check_range("dst", dst, host_dst ? reach : len))
            goto done;
        if (off > LLONG_MAX - reach) {
            PyErr_SetString(PyExc_ValueError, "offset + length overflows a file offset");
            goto done;
        }
        if (align && (((host_dst ? dst : 0) | (uintptr_t)off) & (uintptr_t)(align - 1))) {
            PyErr_Format(PyExc_ValueError, "range %zd: %s must be %zd-aligned", i,
                         host_dst ? "dst and offset" : "offset", align);
            goto done;
        }
        size_t blocks = ((size_t)len + BLOCK - 1) / BLOCK;
        unsigned char *digests = NULL;
        if (hashed) {
            PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(8 * blocks));
            if (!b)
                goto done;
            PyList_SET_ITEM(out->hashes, i, b);
            digests = (unsigned char *)PyBytes_AS_STRING(b);
        }
        /* Ranges of length 0 have no blocks: left out, so every task finds a range. */
        if (len)
            out->ranges[out->count++] = (thaw_range){(char *)dst, off, (size_t)len,
                                                     out->blocks, digests};
        out->blocks += blocks;
    }
    rc = 0;
done:
    if (rc)
        thaw_ranges_free(out);
    Py_XDECREF(dsts);
    Py_XDECREF(offsets);
    Py_XDECREF(lengths);
    return rc;
}

void thaw_ranges_free(thaw_ranges *r)
{
    PyMem_Free(r->ranges);
    Py_XDECREF(r->hashes);
    *r = (thaw_ranges){0};
}

const thaw_range *thaw_range_of(const thaw_ranges *r, size_t task, size_t *start, size_t *n)
{
    size_t lo = 0, hi = r->count; /* the last range whose first block <= task */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (r->ranges[mid].first <= task)
            lo = mid;
        else
            hi = mid;
    }
    const thaw_range *range = &r->ranges[lo];
    *start = (task - range->first) * BLOCK;
    *n = range->length - *start < BLOCK ? range->length - *start : BLOCK;
    return range;
}

int thaw_read_span(int fd, char *p, long long off, size_t n, size_t align,
                   thaw_hash_state *state, thaw_err_t *err)
{
    size_t want = align ? (n + align - 1) / align * align : n;
    size_t sub = align ? SUB_DIRECT : SUB_CACHED;
    size_t done = 0, hashed = 0;
    while (done < want) {
        size_t ask = want - done < sub ? want - done : sub;
        off_t at = (off_t)(off + (long long)done);
        ssize_t got = pread(fd, p + done, ask, at);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            thaw_err_os(err, errno, "pread(fd=%d, offset=%lld, length=%zu)", fd, (long long)at,
                        ask);
            return -1;
        }
        if (got == 0) {
            if (done >= n)
                break; /* only the alignment padding is missing: nothing hashed lies there */
            thaw_err_eof(err, "pread(fd=%d, offset=%lld, length=%zu): end of file, %zu bytes "
                         "missing", fd, (long long)at, ask, n - done);
            return -1;
        }
        done += (size_t)got;
        size_t end = done < n ? done : n;
        if (state && end > hashed) {
            thaw_hash_update(state, p + hashed, end - hashed);
            hashed = end;
        }
    }
    return 0;
}

void thaw_put_digest(const thaw_range *r, size_t block, const thaw_hash_state *state)
{
    uint64_t h = thaw_hash_digest(state);
    unsigned char *o = r->out + 8 * block;
    for (int b = 0; b < 8; b++)
        o[b] = (unsigned char)(h >> (8 * b));
}

typedef struct {
    int fd;
    size_t align;
    thaw_ranges ranges;
} rh_job;

static int rh_block(void *ctx, size_t task, thaw_err_t *err)
{
    const rh_job *j = ctx;
    size_t start, n;
    const thaw_range *r = thaw_range_of(&j->ranges, task, &start, &n);
    thaw_hash_state state;
    thaw_hash_reset(&state);
    if (thaw_read_span(j->fd, r->dst + start, r->offset + (long long)start, n, j->align, &state,
                       err))
        return -1;
    thaw_put_digest(r, start / BLOCK, &state);
    return 0;
}

const char thaw_pread_hashed_doc[] =
    "pread_hashed(fd, dsts, offsets, lengths, threads=1, align=0) -> list[bytes]\n\n"
    "Read lengths[i] bytes at file offset offsets[i] into memory at dsts[i], for every i,\n"
    "and return for each range its block hashes as block_hashes() would compute them over\n"
    "the memory read into (8 bytes per 16 MiB block), hashing each read as it lands.\n"
    "All ranges' blocks are shared by one pool of up to `threads` threads (GIL released).\n"
    "align=4096 (O_DIRECT): each block's read is rounded up to 4096 bytes; dsts and offsets\n"
    "must then be aligned and the buffers hold the rounded length. Raises EOFError naming the\n"
    "offset when the file ends early, OSError naming pread on failure.";

PyObject *thaw_pread_hashed(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"fd", "dsts", "offsets", "lengths", "threads", "align", NULL};
    int fd, threads = 1;
    Py_ssize_t align = 0;
    PyObject *dsts, *offsets, *lengths;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iOOO|in:pread_hashed", kwlist, &fd, &dsts,
                                     &offsets, &lengths, &threads, &align))
        return NULL;
    if (thaw_check_threads(threads))
        return NULL;
    rh_job job = {fd, (size_t)align, {0}};
    if (thaw_ranges_parse(dsts, offsets, lengths, align, 1, 1, "pread_hashed", &job.ranges))
        return NULL;
    thaw_err_t err;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = thaw_parallel_for(job.ranges.blocks, threads, rh_block, &job, &err);
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (rc != 0)
        thaw_err_raise(&err);
    else
        result = Py_NewRef(job.ranges.hashes);
    thaw_ranges_free(&job.ranges);
    return result;
}
