/* The Python-facing functions of thaw._native. Each topic file defines its
 * functions and docstrings; module.c only lists them in the method table. */
#ifndef THAW_METHODS_H
#define THAW_METHODS_H

#include "errors.h"

/* Hash block of the "xxh3-tree-16M" tensor checksum (see checksum.c). */
#define THAW_BLOCK_HASH_SIZE ((Py_ssize_t)16 << 20)

/* io.c */
PyObject *thaw_pread_into(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *thaw_pwrite_from(PyObject *self, PyObject *args, PyObject *kwargs);
extern const char thaw_pread_into_doc[];
extern const char thaw_pwrite_from_doc[];

/* readhash.c */
PyObject *thaw_pread_hashed(PyObject *self, PyObject *args, PyObject *kwargs);
extern const char thaw_pread_hashed_doc[];

/* readdevice.c: its bounce buffers' size (4 MiB: see there for the measurements). */
#define THAW_BOUNCE_SIZE ((Py_ssize_t)4 << 20)
PyObject *thaw_read_to_device(PyObject *self, PyObject *args, PyObject *kwargs);
extern const char thaw_read_to_device_doc[];

/* memcpy.c */
PyObject *thaw_copy(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *thaw_prefault(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *thaw_copy_many(PyObject *self, PyObject *args, PyObject *kwargs);
extern const char thaw_copy_doc[];
extern const char thaw_copy_many_doc[];
extern const char thaw_prefault_doc[];

/* checksum.c */
PyObject *thaw_block_hashes(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *thaw_tree_hash(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *thaw_xxh3(PyObject *self, PyObject *arg);
extern const char thaw_block_hashes_doc[];
extern const char thaw_tree_hash_doc[];
extern const char thaw_xxh3_doc[];

/* residency.c */
PyObject *thaw_resident_bytes(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *thaw_fadvise(PyObject *self, PyObject *args, PyObject *kwargs);
extern const char thaw_resident_bytes_doc[];
extern const char thaw_fadvise_doc[];

#endif
