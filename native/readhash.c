/* pread_hashed: read ranges of a file into memory and hash them as they land.
 *
 * A verified restore or pin must hash every byte it reads ("xxh3-tree-16M", checksum.c). As a
 * second pass that costs one more trip through DRAM for every byte; here each 16 MiB hash block
 * is one task that reads its block in 256 KiB preads (1 MiB with O_DIRECT) and feeds each to a
 * streaming XXH3 state right after it lands, while it is still in the CPU's cache. The hash of a block is exactly
 * XXH3_64bits of the block (the streaming and one-shot functions agree), so the results are the
 * block hashes that block_hashes() would compute over the same memory.
 *
 * What is hashed is the memory the bytes landed in, never the file's pages: a file changed
 * during the read cannot make the hashed bytes differ from the ones the caller keeps.
 *
 * Each range starts a new tensor (or a 16 MiB multiple into one), so its blocks are the
 * tensor's blocks. With `align` (4096, for O_DIRECT fds) each block's read is rounded up to a
 * multiple of `align`: the caller's buffer and the file must hold the rounded length (a
 * snapshot's tensors start on 4 KiB boundaries, so the padding is the gap before the next). */
#include "args.h"
#include "methods.h"
#include "xxh.h"

#include <errno.h>
#include <limits.h>
#include <unistd.h>

#define BLOCK ((size_t)THAW_BLOCK_HASH_SIZE)
/* Each read is hashed right after it lands, while it is still in the core's cache. From the
 * page cache, 256 KiB reads: with 1 MiB ones, hashing cost the read a quarter of its rate
 * on the dev box (7.2 against 9.7 GB/s, 2 threads, a cached 1.6 GB file), with 256 KiB ones
 * an eighth (8.5), and 64-128 KiB gained nothing more. With O_DIRECT, 1 MiB reads: the disk
 * wants large requests (several tasks keep several in flight). */
#define SUB_CACHED ((size_t)256 << 10)
#define SUB_DIRECT ((size_t)1 << 20)

typedef struct {
    char *dst;
    long long offset;
    size_t length;
    size_t first; /* index of its first block among all tasks */
    unsigned char *out; /* 8 bytes per block, little-endian */
} rh_range;

typedef struct {
    int fd;
    size_t align;
    rh_range *ranges;
    size_t nranges;
} rh_job;

static const rh_range *range_of(const rh_job *j, size_t task)
{
    size_t lo = 0, hi = j->nranges; /* the last range whose first block <= task */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (j->ranges[mid].first <= task)
            lo = mid;
        else
            hi = mid;
    }
    return &j->ranges[lo];
}

static int rh_block(void *ctx, size_t task, thaw_err_t *err)
{
    const rh_job *j = ctx;
    const rh_range *r = range_of(j, task);
    size_t block = task - r->first;
    size_t start = block * BLOCK;
    size_t n = r->length - start < BLOCK ? r->length - start : BLOCK;
    size_t want = j->align ? (n + j->align - 1) / j->align * j->align : n;
    size_t sub = j->align ? SUB_DIRECT : SUB_CACHED;
    thaw_hash_state state;
    thaw_hash_reset(&state);
    size_t done = 0, hashed = 0;
    while (done < want) {
        size_t ask = want - done < sub ? want - done : sub;
        char *p = r->dst + start + done;
        off_t off = (off_t)(r->offset + (long long)(start + done));
        ssize_t got = pread(j->fd, p, ask, off);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            thaw_err_os(err, errno, "pread(fd=%d, offset=%lld, length=%zu)", j->fd,
                        (long long)off, ask);
            return -1;
        }
        if (got == 0) {
            if (done >= n)
                break; /* only the alignment padding is missing: nothing hashed lies there */
            thaw_err_eof(err, "pread(fd=%d, offset=%lld, length=%zu): end of file, %zu bytes "
                         "missing", j->fd, (long long)off, ask, n - done);
            return -1;
        }
        done += (size_t)got;
        size_t end = done < n ? done : n;
        if (end > hashed) {
            thaw_hash_update(&state, r->dst + start + hashed, end - hashed);
            hashed = end;
        }
    }
    uint64_t h = thaw_hash_digest(&state);
    unsigned char *o = r->out + 8 * block;
    for (int b = 0; b < 8; b++)
        o[b] = (unsigned char)(h >> (8 * b));
    return 0;
}

static int addr_at(PyObject *seq, Py_ssize_t i, uintptr_t *out)
{
    return thaw_addr_converter(PySequence_Fast_GET_ITEM(seq, i), out);
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
    PyObject *dsts_obj, *offsets_obj, *lengths_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iOOO|in:pread_hashed", kwlist, &fd, &dsts_obj,
                                     &offsets_obj, &lengths_obj, &threads, &align))
        return NULL;
    if (thaw_check_threads(threads))
        return NULL;
    if (align != 0 && (align < 512 || (align & (align - 1)))) {
        PyErr_Format(PyExc_ValueError, "align must be 0 or a power of two >= 512, got %zd", align);
        return NULL;
    }
    PyObject *dsts = PySequence_Fast(dsts_obj, "dsts must be a sequence");
    PyObject *offsets = dsts ? PySequence_Fast(offsets_obj, "offsets must be a sequence") : NULL;
    PyObject *lengths = offsets ? PySequence_Fast(lengths_obj, "lengths must be a sequence") : NULL;
    rh_range *ranges = NULL;
    PyObject *outs = NULL, *result = NULL;
    if (!lengths)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(dsts);
    if (PySequence_Fast_GET_SIZE(offsets) != n || PySequence_Fast_GET_SIZE(lengths) != n) {
        PyErr_SetString(PyExc_ValueError, "pread_hashed: dsts, offsets, lengths differ in length");
        goto done;
    }
    ranges = PyMem_Calloc(n ? (size_t)n : 1, sizeof *ranges);
    outs = PyList_New(n);
    if (!ranges || !outs) {
        PyErr_NoMemory();
        goto done;
    }
    size_t ntasks = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uintptr_t dst;
        Py_ssize_t len = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(lengths, i));
        long long off = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(offsets, i));
        if (PyErr_Occurred() || !addr_at(dsts, i, &dst))
            goto done;
        if (thaw_check_nonneg("length", len) || thaw_check_nonneg("offset", off))
            goto done;
        Py_ssize_t reach = align ? (len + align - 1) / align * align : len;
        if (thaw_check_range("dst", dst, reach))
            goto done;
        if (off > LLONG_MAX - reach) {
            PyErr_SetString(PyExc_ValueError, "offset + length overflows a file offset");
            goto done;
        }
        if (align && ((dst | (uintptr_t)off) & (uintptr_t)(align - 1))) {
            PyErr_Format(PyExc_ValueError, "range %zd: dst and offset must be %zd-aligned", i,
                         align);
            goto done;
        }
        size_t blocks = ((size_t)len + BLOCK - 1) / BLOCK;
        PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(8 * blocks));
        if (!out)
            goto done;
        PyList_SET_ITEM(outs, i, out);
        ranges[i] = (rh_range){(char *)dst, off, (size_t)len, ntasks,
                               (unsigned char *)PyBytes_AS_STRING(out)};
        ntasks += blocks;
    }
    /* Ranges of length 0 have no blocks: drop them so every task finds a range with blocks. */
    size_t kept = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (ranges[i].length)
            ranges[kept++] = ranges[i];
    rh_job job = {fd, (size_t)align, ranges, kept};
    thaw_err_t err;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = thaw_parallel_for(ntasks, threads, rh_block, &job, &err);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        thaw_err_raise(&err);
        goto done;
    }
    result = outs;
    outs = NULL;
done:
    PyMem_Free(ranges);
    Py_XDECREF(outs);
    Py_XDECREF(dsts);
    Py_XDECREF(offsets);
    Py_XDECREF(lengths);
    return result;
}
