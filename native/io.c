/* Parallel positional file I/O: pread_into / pwrite_from.
 *
 * The range is cut into `block`-sized pieces handed to threads: several
 * preads in flight is what saturates NVMe (queue depth) and page-cache copies
 * (one core memcpy's ~10 GB/s). Each piece loops on short transfers and EINTR.
 *
 * O_DIRECT: the caller aligns. addr, offset, length and block must all be
 * multiples of 4096 (the logical block size of any device we target), so that
 * every piece and every pread is aligned; otherwise the kernel returns EINVAL,
 * raised as OSError. */
#include "args.h"
#include "methods.h"

#include <errno.h>
#include <limits.h>
#include <unistd.h>

typedef struct {
    int fd;
    char *addr;
    size_t length;
    long long offset;
    size_t block;
    int write;
} io_job;

static int io_piece(void *ctx, size_t task, thaw_err_t *err)
{
    const io_job *j = ctx;
    size_t start = task * j->block;
    size_t len = j->length - start < j->block ? j->length - start : j->block;
    size_t done = 0;
    while (done < len) {
        char *p = j->addr + start + done;
        off_t off = (off_t)(j->offset + (long long)(start + done));
        ssize_t n = j->write ? pwrite(j->fd, p, len - done, off) : pread(j->fd, p, len - done, off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            thaw_err_os(err, errno, "%s(fd=%d, offset=%lld, length=%zu)",
                        j->write ? "pwrite" : "pread", j->fd, (long long)off, len - done);
            return -1;
        }
        if (n == 0) {
            if (j->write) {
                /* pwrite of >0 bytes returning 0 is not supposed to happen;
                 * treat it like a full device rather than spin forever. */
                thaw_err_os(err, ENOSPC, "pwrite(fd=%d, offset=%lld, length=%zu)", j->fd,
                            (long long)off, len - done);
            } else {
                thaw_err_eof(err,
                             "pread(fd=%d, offset=%lld, length=%zu): end of file, "
                             "%zu bytes missing",
                             j->fd, (long long)off, len - done, len - done);
            }
            return -1;
        }
        done += (size_t)n;
    }
    return 0;
}

static PyObject *io_call(PyObject *args, PyObject *kwargs, int write)
{
    static char *kwlist[] = {"fd", "addr", "length", "offset", "threads", "block", NULL};
    int fd, threads = 1;
    uintptr_t addr;
    Py_ssize_t length, block = (Py_ssize_t)8 << 20;
    long long offset;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs,
                                     write ? "iO&nL|in:pwrite_from" : "iO&nL|in:pread_into",
                                     kwlist, &fd, thaw_addr_converter, &addr, &length, &offset,
                                     &threads, &block))
        return NULL;
    if (thaw_check_nonneg("length", length) || thaw_check_nonneg("offset", offset) ||
        thaw_check_threads(threads) || thaw_check_range("addr", addr, length))
        return NULL;
    if (block <= 0) {
        PyErr_Format(PyExc_ValueError, "block must be positive, got %zd", block);
        return NULL;
    }
    if (offset > LLONG_MAX - length) {
        PyErr_SetString(PyExc_ValueError, "offset + length overflows a file offset");
        return NULL;
    }
    if (length == 0)
        Py_RETURN_NONE;

    io_job j = {fd, (char *)addr, (size_t)length, offset, (size_t)block, write};
    size_t ntasks = ((size_t)length + (size_t)block - 1) / (size_t)block;
    thaw_err_t err;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = thaw_parallel_for(ntasks, threads, io_piece, &j, &err);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return thaw_err_raise(&err);
    Py_RETURN_NONE;
}

const char thaw_pread_into_doc[] =
    "pread_into(fd, addr, length, offset, threads=1, block=8<<20) -> None\n\n"
    "Read exactly `length` bytes at file `offset` into memory at address `addr`,\n"
    "in `block`-sized pieces spread over `threads` threads (GIL released).\n"
    "Raises EOFError (naming the offset and bytes missing) if the file ends\n"
    "early, OSError naming pread and its arguments on failure. For O_DIRECT fds\n"
    "the caller aligns addr, offset, length and block to 4096.";

PyObject *thaw_pread_into(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    return io_call(args, kwargs, 0);
}

const char thaw_pwrite_from_doc[] =
    "pwrite_from(fd, addr, length, offset, threads=1, block=8<<20) -> None\n\n"
    "Write exactly `length` bytes from memory at `addr` to file `offset`, in\n"
    "`block`-sized pieces spread over `threads` threads (GIL released). Raises\n"
    "OSError naming pwrite and its arguments on failure (ENOSPC, EIO, ...).\n"
    "For O_DIRECT fds the caller aligns addr, offset, length and block to 4096.";

PyObject *thaw_pwrite_from(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    return io_call(args, kwargs, 1);
}
