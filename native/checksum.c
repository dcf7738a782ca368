/* XXH3-64 checksums: "xxh3-tree-16M", the snapshot format's tensor checksum.
 *
 * A tensor is cut into 16 MiB blocks (the last one shorter); each block gets
 * XXH3_64bits, and the tensor's checksum is XXH3_64bits of the concatenated
 * little-endian block hashes. Why a tree and why 16 MiB:
 *  - one large tensor (GBs of embeddings) hashes on all cores, block per task;
 *  - a pipelined restore hashes each 16 MiB-aligned staging slot as it lands,
 *    independently of the others, and combines the block hashes at the end;
 *  - 16 MiB keeps the block-hash list tiny (8 bytes per 16 MiB) while still
 *    giving enough blocks to balance a few threads on a 100 MB tensor.
 *
 * xxHash is vendored (third_party/xxhash.h, BSD-2) and built twice, for the
 * CPU's widest vector unit (xxh.h). */
#include "args.h"
#include "methods.h"
#include "xxh.h"

#include <stdlib.h>

#define BLOCK ((size_t)THAW_BLOCK_HASH_SIZE)

typedef struct {
    const unsigned char *addr;
    size_t length;
    unsigned char *out; /* 8 bytes per block, little-endian */
} hash_job;

static int hash_block(void *ctx, size_t task, thaw_err_t *err)
{
    (void)err;
    const hash_job *j = ctx;
    size_t start = task * BLOCK;
    size_t len = j->length - start < BLOCK ? j->length - start : BLOCK;
    uint64_t h = thaw_hash64(j->addr + start, len);
    unsigned char *o = j->out + 8 * task;
    for (int b = 0; b < 8; b++)
        o[b] = (unsigned char)(h >> (8 * b));
    return 0;
}

/* Parse (addr, length, threads=1) shared by block_hashes and tree_hash. */
static int parse_hash_args(PyObject *args, PyObject *kwargs, const char *fmt, hash_job *j,
                           int *threads)
{
    static char *kwlist[] = {"addr", "length", "threads", NULL};
    uintptr_t addr;
    Py_ssize_t length;
    *threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, fmt, kwlist, thaw_addr_converter, &addr,
                                     &length, threads))
        return -1;
    if (thaw_check_nonneg("length", length) || thaw_check_threads(*threads) ||
        thaw_check_range("addr", addr, length))
        return -1;
    j->addr = (const unsigned char *)addr;
    j->length = (size_t)length;
    return 0;
}

static void hash_blocks(hash_job *j, int threads)
{
    size_t nblocks = (j->length + BLOCK - 1) / BLOCK;
    thaw_err_t err;
    Py_BEGIN_ALLOW_THREADS
    thaw_parallel_for(nblocks, threads, hash_block, j, &err);
    Py_END_ALLOW_THREADS
}

const char thaw_block_hashes_doc[] =
    "block_hashes(addr, length, threads=1) -> bytes\n\n"
    "XXH3_64bits of each BLOCK_HASH_SIZE (16 MiB) block of [addr, addr+length)\n"
    "(the last block shorter), concatenated as little-endian uint64: 8 bytes per\n"
    "block, b'' for length 0. Blocks are hashed on up to `threads` threads\n"
    "(GIL released); the result does not depend on `threads`.";

PyObject *thaw_block_hashes(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    hash_job j;
    int threads;
    if (parse_hash_args(args, kwargs, "O&n|i:block_hashes", &j, &threads))
        return NULL;
    size_t nblocks = (j.length + BLOCK - 1) / BLOCK;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(8 * nblocks));
    if (out == NULL)
        return NULL;
    /* Filling a bytes object without the GIL is safe: nobody else holds it. */
    j.out = (unsigned char *)PyBytes_AS_STRING(out);
    hash_blocks(&j, threads);
    return out;
}

const char thaw_tree_hash_doc[] =
    "tree_hash(addr, length, threads=1) -> int\n\n"
    "The \"xxh3-tree-16M\" checksum: xxh3(block_hashes(addr, length, threads)).";

PyObject *thaw_tree_hash(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    hash_job j;
    int threads;
    if (parse_hash_args(args, kwargs, "O&n|i:tree_hash", &j, &threads))
        return NULL;
    size_t nblocks = (j.length + BLOCK - 1) / BLOCK;
    unsigned char stack[8 * 64];
    unsigned char *buf = stack;
    if (nblocks > 64 && (buf = malloc(8 * nblocks)) == NULL)
        return PyErr_NoMemory();
    j.out = buf;
    hash_blocks(&j, threads);
    uint64_t h = thaw_hash64(buf, 8 * nblocks);
    if (buf != stack)
        free(buf);
    return PyLong_FromUnsignedLongLong((unsigned long long)h);
}

const char thaw_xxh3_doc[] =
    "xxh3(data) -> int\n\n"
    "XXH3_64bits of a bytes-like object (any contiguous buffer). Used for\n"
    "headers, manifests and to combine block hashes. The GIL is released for\n"
    "buffers of 1 MiB or more.";

PyObject *thaw_xxh3(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) != 0)
        return NULL;
    uint64_t h;
    if (view.len >= ((Py_ssize_t)1 << 20)) {
        Py_BEGIN_ALLOW_THREADS
        h = thaw_hash64(view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        h = thaw_hash64(view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong((unsigned long long)h);
}
