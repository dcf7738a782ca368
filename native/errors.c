/* errno -> OSError whose message names the failing call and its arguments (and EOFError,
 * RuntimeError for a failed CUDA call, likewise named). */
#include "errors.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

void thaw_err_os(thaw_err_t *e, int errnum, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->kind = THAW_ERR_OS;
    e->errnum = errnum;
}

static void err_message(thaw_err_t *e, thaw_err_kind kind, const char *fmt, va_list ap)
{
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    e->kind = kind;
    e->errnum = 0;
}

void thaw_err_eof(thaw_err_t *e, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    err_message(e, THAW_ERR_EOF, fmt, ap);
    va_end(ap);
}

void thaw_err_cuda(thaw_err_t *e, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    err_message(e, THAW_ERR_CUDA, fmt, ap);
    va_end(ap);
}

static PyObject *raise_os(int errnum, const char *call)
{
    /* OSError(errnum, text) picks the errno subclass (FileNotFoundError, ...)
     * and keeps .errno; .strerror is the full "call: reason" text. */
    char text[384];
    PyOS_snprintf(text, sizeof text, "%s: %s", call, strerror(errnum));
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", errnum, text);
    if (exc == NULL)
        return NULL;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return NULL;
}

PyObject *thaw_err_raise(const thaw_err_t *e)
{
    switch (e->kind) {
    case THAW_ERR_EOF:
        PyErr_SetString(PyExc_EOFError, e->msg);
        return NULL;
    case THAW_ERR_OS:
        return raise_os(e->errnum, e->msg);
    case THAW_ERR_CUDA:
        PyErr_SetString(PyExc_RuntimeError, e->msg);
        return NULL;
    default:
        PyErr_SetString(PyExc_SystemError, "thaw._native: error raised without a recorded error");
        return NULL;
    }
}

PyObject *thaw_raise_errno(int errnum, const char *fmt, ...)
{
    char call[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(call, sizeof call, fmt, ap);
    va_end(ap);
    return raise_os(errnum, call);
}
