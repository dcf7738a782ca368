/* XXH3-64 for thaw's loops, on the widest vector unit the CPU has.
 *
 * xxHash picks its vector code when it is compiled, and a plain x86-64 build (no -march)
 * gets SSE2, which every x86-64 has. The same code compiled for AVX2 hashes about 1.6-2x
 * faster (14.9 against 9.2 GB/s a core on the dev box), and every checksum of a verified
 * restore or pin goes through it. So it is compiled twice (xxh.c, and xxh_avx2.c for AVX2)
 * and each call takes the AVX2 one where the CPU has it. XXH3's output does not depend on
 * the vector unit: the two give the same hashes (tests/test_native.py checks known answers).
 *
 * The streaming state is opaque here: xxhash.h is only included, inlined, by xxh.c and
 * xxh_avx2.c. */
#ifndef THAW_XXH_H
#define THAW_XXH_H

#include <stddef.h>
#include <stdint.h>

/* At least sizeof(XXH3_state_t) (576 in xxHash 0.8), checked where it is defined. */
#define THAW_HASH_STATE_BYTES 640

typedef struct {
    _Alignas(64) unsigned char opaque[THAW_HASH_STATE_BYTES];
} thaw_hash_state;

uint64_t thaw_hash64(const void *data, size_t length);
void thaw_hash_reset(thaw_hash_state *state);
void thaw_hash_update(thaw_hash_state *state, const void *data, size_t length);
uint64_t thaw_hash_digest(const thaw_hash_state *state);

/* The AVX2 builds (xxh_avx2.c; absent off x86-64). */
uint64_t thaw_hash64_avx2(const void *data, size_t length);
void thaw_hash_update_avx2(thaw_hash_state *state, const void *data, size_t length);
uint64_t thaw_hash_digest_avx2(const thaw_hash_state *state);

#endif
