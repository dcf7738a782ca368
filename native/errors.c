/* errno -> OSError whose message names the failing call and its arguments. */
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

void thaw_err_eof(thaw_err_t *e, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->kind = THAW_ERR_EOF;
    e->errnum = 0;
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
