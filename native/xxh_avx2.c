/* The AVX2 build of XXH3 (see xxh.h): the target pragma makes xxhash.h pick its AVX2 code.
 * Only called where the CPU has AVX2 (xxh.c checks). */
#if defined(__x86_64__)
#pragma GCC target("avx2")

#include "xxh.h"

#define XXH_INLINE_ALL
#include "xxhash.h"

_Static_assert(sizeof(XXH3_state_t) <= sizeof(thaw_hash_state), "thaw_hash_state too small");

uint64_t thaw_hash64_avx2(const void *data, size_t length)
{
    return XXH3_64bits(data, length);
}

void thaw_hash_update_avx2(thaw_hash_state *state, const void *data, size_t length)
{
    XXH3_64bits_update((XXH3_state_t *)state, data, length);
}

uint64_t thaw_hash_digest_avx2(const thaw_hash_state *state)
{
    return XXH3_64bits_digest((const XXH3_state_t *)state);
}
#endif
