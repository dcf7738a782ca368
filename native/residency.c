/* Page-cache residency and advice: how much of a snapshot file is "warm".
 *
 * resident_bytes maps the range (no I/O: mmap+mincore only inspect the page
 * cache) in windows of at most 1 GiB, so a 100 GB file needs a 256 KiB vector
 * rather than 25 MB, and each mapping is unmapped before the next. */
#include "args.h"
#include "methods.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define WINDOW ((size_t)1 << 30)

/* Count resident bytes of [offset, offset+length) in one window; -1 on error. */
static int count_window(int fd, long long offset, size_t length, size_t page,
                        unsigned char *vec, unsigned long long *total, thaw_err_t *err)
{
    long long start = offset & ~(long long)(page - 1);
    long long end = offset + (long long)length;
    size_t maplen = (size_t)(end - start);
    void *m = mmap(NULL, maplen, PROT_READ, MAP_SHARED, fd, (off_t)start);
    if (m == MAP_FAILED) {
        thaw_err_os(err, errno, "mmap(fd=%d, offset=%lld, length=%zu)", fd, start, maplen);
        return -1;
    }
    if (mincore(m, maplen, vec) != 0) {
        int e = errno;
        munmap(m, maplen);
        thaw_err_os(err, e, "mincore(fd=%d, offset=%lld, length=%zu)", fd, start, maplen);
        return -1;
    }
    munmap(m, maplen);
    size_t npages = (maplen + page - 1) / page;
    for (size_t i = 0; i < npages; i++) {
        if (!(vec[i] & 1))
            continue;
        /* Clip the page to the asked range: the first and last pages may be
         * partly outside it. */
        long long lo = start + (long long)(i * page), hi = lo + (long long)page;
        if (lo < offset)
            lo = offset;
        if (hi > end)
            hi = end;
        *total += (unsigned long long)(hi - lo);
    }
    return 0;
}

const char thaw_resident_bytes_doc[] =
    "resident_bytes(fd, offset, length) -> int\n\n"
    "How many bytes of the file range [offset, offset+length) are in the page\n"
    "cache (mmap + mincore, no I/O). Pages past end of file count as not\n"
    "resident. Raises OSError naming mmap/mincore on failure.";

PyObject *thaw_resident_bytes(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"fd", "offset", "length", NULL};
    int fd;
    long long offset, length;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iLL:resident_bytes", kwlist, &fd, &offset,
                                     &length))
        return NULL;
    if (thaw_check_nonneg("offset", offset) || thaw_check_nonneg("length", length))
        return NULL;
    if (offset > LLONG_MAX - length) {
        PyErr_SetString(PyExc_ValueError, "offset + length overflows a file offset");
        return NULL;
    }
    if (length == 0)
        return PyLong_FromLong(0);

    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    unsigned char *vec = malloc(WINDOW / page + 1);
    if (vec == NULL)
        return PyErr_NoMemory();
    unsigned long long total = 0;
    thaw_err_t err;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    /* Windows start on WINDOW boundaries (page-aligned), so only the first one
     * can begin mid-page. */
    for (long long pos = offset, end = offset + length; pos < end && rc == 0;) {
        long long wend = (pos / (long long)WINDOW + 1) * (long long)WINDOW;
        if (wend > end)
            wend = end;
        rc = count_window(fd, pos, (size_t)(wend - pos), page, vec, &total, &err);
        pos = wend;
    }
    Py_END_ALLOW_THREADS
    free(vec);
    if (rc != 0)
        return thaw_err_raise(&err);
    return PyLong_FromUnsignedLongLong(total);
}

const char thaw_fadvise_doc[] =
    "fadvise(fd, offset, length, advice) -> None\n\n"
    "posix_fadvise(fd, offset, length, advice); advice is FADV_DONTNEED,\n"
    "FADV_WILLNEED or FADV_SEQUENTIAL. length 0 means to end of file. Raises\n"
    "OSError naming posix_fadvise on failure.";

PyObject *thaw_fadvise(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"fd", "offset", "length", "advice", NULL};
    int fd, advice;
    long long offset, length;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iLLi:fadvise", kwlist, &fd, &offset, &length,
                                     &advice))
        return NULL;
    if (thaw_check_nonneg("offset", offset) || thaw_check_nonneg("length", length))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = posix_fadvise(fd, (off_t)offset, (off_t)length, advice);
    Py_END_ALLOW_THREADS
    if (rc != 0) /* posix_fadvise returns the error number; errno is untouched */
        return thaw_raise_errno(rc, "posix_fadvise(fd=%d, offset=%lld, length=%lld, advice=%d)",
                                fd, offset, length, advice);
    Py_RETURN_NONE;
}
