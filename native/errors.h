/* One place that turns errno into Python exceptions naming the failing call.
 *
 * Worker threads run without the GIL, so they cannot raise: they fill a
 * thaw_err_t (call description + errno) and the calling thread turns it into
 * an exception once all workers have joined. */
#ifndef THAW_ERRORS_H
#define THAW_ERRORS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

typedef enum {
    THAW_ERR_NONE = 0,
    THAW_ERR_OS,  /* OSError(errnum, "<call>: <strerror>") */
    THAW_ERR_EOF, /* EOFError("<call>: ...") */
    THAW_ERR_CUDA, /* RuntimeError("<call> failed: CUDA_ERROR_..."): thaw turns it to CudaError */
} thaw_err_kind;

typedef struct {
    thaw_err_kind kind;
    int errnum;
    char msg[256]; /* e.g. "pread(fd=5, offset=4096, length=8388608)" */
} thaw_err_t;

/* Record an OS failure; fmt describes the call and its arguments. No GIL needed. */
void thaw_err_os(thaw_err_t *e, int errnum, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Record an unexpected end of file; fmt is the whole message. No GIL needed. */
void thaw_err_eof(thaw_err_t *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Record a failed CUDA driver call; fmt is the whole message. No GIL needed. */
void thaw_err_cuda(thaw_err_t *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Raise the recorded error (GIL held). Always returns NULL. */
PyObject *thaw_err_raise(const thaw_err_t *e);

/* Raise OSError for errnum right away (GIL held), e.g.
 * "mmap(fd=3, offset=0, length=4096): No such device". Always returns NULL. */
PyObject *thaw_raise_errno(int errnum, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
