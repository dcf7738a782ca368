/* Argument checks shared by the topic files: Python passes raw addresses and
 * sizes as ints, and a bad one must become ValueError, never a crash in C. */
#ifndef THAW_ARGS_H
#define THAW_ARGS_H

#include "errors.h"
#include "parallel.h"

#include <stdint.h>

/* "O&" converter: a non-negative int that fits in a pointer. */
static inline int thaw_addr_converter(PyObject *obj, void *out)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "address must be int, not %.100s", Py_TYPE(obj)->tp_name);
        return 0;
    }
    int overflow = 0;
    long long sv = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (sv == -1 && PyErr_Occurred())
        return 0;
    if (overflow < 0 || (overflow == 0 && sv < 0)) {
        PyErr_SetString(PyExc_ValueError, "address must be non-negative");
        return 0;
    }
    unsigned long long v = (unsigned long long)sv;
    if (overflow > 0) {
        v = PyLong_AsUnsignedLongLong(obj);
        if (v == (unsigned long long)-1 && PyErr_Occurred())
            return 0;
    }
    if (v > UINTPTR_MAX) {
        PyErr_SetString(PyExc_ValueError, "address does not fit in a pointer");
        return 0;
    }
    *(uintptr_t *)out = (uintptr_t)v;
    return 1;
}

static inline int thaw_check_nonneg(const char *name, long long v)
{
    if (v < 0) {
        PyErr_Format(PyExc_ValueError, "%s must be non-negative, got %lld", name, v);
        return -1;
    }
    return 0;
}

static inline int thaw_check_threads(int threads)
{
    if (threads < 1 || threads > THAW_MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be in [1, %d], got %d", THAW_MAX_THREADS,
                     threads);
        return -1;
    }
    return 0;
}

/* [addr, addr+length) must not wrap, and NULL is never a valid buffer. */
static inline int thaw_check_range(const char *name, uintptr_t addr, Py_ssize_t length)
{
    if (length > 0 && addr == 0) {
        PyErr_Format(PyExc_ValueError, "%s is NULL", name);
        return -1;
    }
    if ((uintptr_t)length > UINTPTR_MAX - addr) {
        PyErr_Format(PyExc_ValueError, "%s + length overflows the address space", name);
        return -1;
    }
    return 0;
}

#endif
