/* What pread_hashed (readhash.c) and read_to_device (readdevice.c) share: the ranges a call
 * reads, cut into 16 MiB hash blocks (one task each), and the loop that reads one span of a
 * block and hashes it as it lands. */
#ifndef THAW_READHASH_H
#define THAW_READHASH_H

#include "errors.h"
#include "xxh.h"

#include <stddef.h>

typedef struct {
    char *dst; /* where the range lands: host memory, or a device address (read_to_device) */
    long long offset;
    size_t length;
    size_t first;       /* index of its first block among all tasks */
    unsigned char *out; /* 8 bytes per block, little-endian; NULL when not hashing */
} thaw_range;

typedef struct {
    thaw_range *ranges; /* the ranges with bytes, in call order */
    size_t count;
    size_t blocks;    /* tasks: 16 MiB hash blocks over all ranges */
    PyObject *hashes; /* list: each range's block hashes (bytes), or NULL when not hashing */
} thaw_ranges;

/* Parse parallel sequences dsts/offsets/lengths (GIL held). `align` (0, or a power of two >=
 * 512 for O_DIRECT): offsets must be aligned, and each read is rounded up to it; with
 * `host_dst` the reads land at dsts, which must be aligned too and hold the rounded length
 * (else dsts are device addresses that receive exactly the lengths). With `hashed`,
 * out->hashes holds a bytes object per range for its block hashes. Returns 0, or -1 with a
 * Python exception set (out is then empty). */
int thaw_ranges_parse(PyObject *dsts_obj, PyObject *offsets_obj, PyObject *lengths_obj,
                      Py_ssize_t align, int host_dst, int hashed, const char *caller,
                      thaw_ranges *out);
void thaw_ranges_free(thaw_ranges *r);

/* The range holding task (block) `task`, and that block's start and length within it. */
const thaw_range *thaw_range_of(const thaw_ranges *r, size_t task, size_t *start, size_t *n);

/* Read `n` bytes at file offset `off` into `p` (the read rounded up to `align`: p and the file
 * must hold the rounded length), feeding the n bytes to `state` (when not NULL) read by read,
 * while each is still in the core's cache. Returns 0, or -1 with *err filled (EOF names the
 * missing bytes). No GIL needed. */
int thaw_read_span(int fd, char *p, long long off, size_t n, size_t align,
                   thaw_hash_state *state, thaw_err_t *err);

/* A block's digest as the 8 little-endian bytes block_hashes() returns. */
void thaw_put_digest(const thaw_range *r, size_t block, const thaw_hash_state *state);

#endif
