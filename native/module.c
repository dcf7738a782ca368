/* thaw._native: the method table and module init only. The functions live in
 * topic files (io.c, readhash.c, readdevice.c, memcpy.c, checksum.c, residency.c); Python owns policy,
 * C owns the loops. */
#include "methods.h"

#include <fcntl.h>

static PyMethodDef methods[] = {
    {"pread_into", (PyCFunction)(void (*)(void))thaw_pread_into, METH_VARARGS | METH_KEYWORDS,
     thaw_pread_into_doc},
    {"pwrite_from", (PyCFunction)(void (*)(void))thaw_pwrite_from, METH_VARARGS | METH_KEYWORDS,
     thaw_pwrite_from_doc},
    {"pread_hashed", (PyCFunction)(void (*)(void))thaw_pread_hashed,
     METH_VARARGS | METH_KEYWORDS, thaw_pread_hashed_doc},
    {"read_to_device", (PyCFunction)(void (*)(void))thaw_read_to_device,
     METH_VARARGS | METH_KEYWORDS, thaw_read_to_device_doc},
    {"copy", (PyCFunction)(void (*)(void))thaw_copy, METH_VARARGS | METH_KEYWORDS, thaw_copy_doc},
    {"copy_many", (PyCFunction)(void (*)(void))thaw_copy_many, METH_VARARGS | METH_KEYWORDS,
     thaw_copy_many_doc},
    {"prefault", (PyCFunction)(void (*)(void))thaw_prefault, METH_VARARGS | METH_KEYWORDS,
     thaw_prefault_doc},
    {"block_hashes", (PyCFunction)(void (*)(void))thaw_block_hashes,
     METH_VARARGS | METH_KEYWORDS, thaw_block_hashes_doc},
    {"tree_hash", (PyCFunction)(void (*)(void))thaw_tree_hash, METH_VARARGS | METH_KEYWORDS,
     thaw_tree_hash_doc},
    {"xxh3", thaw_xxh3, METH_O, thaw_xxh3_doc},
    {"resident_bytes", (PyCFunction)(void (*)(void))thaw_resident_bytes,
     METH_VARARGS | METH_KEYWORDS, thaw_resident_bytes_doc},
    {"fadvise", (PyCFunction)(void (*)(void))thaw_fadvise, METH_VARARGS | METH_KEYWORDS,
     thaw_fadvise_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "thaw._native",
    .m_doc = "Native loops of thaw: parallel file I/O, memcpy, prefault, xxh3 checksums and "
             "page-cache residency. All bulk calls release the GIL.",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "BLOCK_HASH_SIZE", THAW_BLOCK_HASH_SIZE) ||
        PyModule_AddIntConstant(m, "BOUNCE_SIZE", THAW_BOUNCE_SIZE) ||
        PyModule_AddIntConstant(m, "FADV_DONTNEED", POSIX_FADV_DONTNEED) ||
        PyModule_AddIntConstant(m, "FADV_WILLNEED", POSIX_FADV_WILLNEED) ||
        PyModule_AddIntConstant(m, "FADV_SEQUENTIAL", POSIX_FADV_SEQUENTIAL)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
