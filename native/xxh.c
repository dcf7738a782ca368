/* XXH3 with the vector unit chosen per call (see xxh.h): AVX2 where the CPU has it, else
 * the build's default (SSE2 on x86-64, NEON on arm64). */
#include "xxh.h"

#define XXH_INLINE_ALL
#include "xxhash.h"

_Static_assert(sizeof(XXH3_state_t) <= sizeof(thaw_hash_state), "thaw_hash_state too small");

#if defined(__x86_64__)
/* One load of a word libgcc fills at start-up: cheap beside hashing a block. */
#define HAVE_AVX2() __builtin_cpu_supports("avx2")
#else
#define HAVE_AVX2() 0
#define thaw_hash64_avx2(d, n) 0
#define thaw_hash_update_avx2(s, d, n) ((void)0)
#define thaw_hash_digest_avx2(s) 0
#endif

uint64_t thaw_hash64(const void *data, size_t length)
{
    if (HAVE_AVX2())
        return thaw_hash64_avx2(data, length);
    return XXH3_64bits(data, length);
}

void thaw_hash_reset(thaw_hash_state *state)
{
    XXH3_64bits_reset((XXH3_state_t *)state); /* no vector code: one build serves both */
}

void thaw_hash_update(thaw_hash_state *state, const void *data, size_t length)
{
    if (HAVE_AVX2())
        thaw_hash_update_avx2(state, data, length);
    else
        XXH3_64bits_update((XXH3_state_t *)state, data, length);
}

uint64_t thaw_hash_digest(const thaw_hash_state *state)
{
    if (HAVE_AVX2())
        return thaw_hash_digest_avx2(state);
    return XXH3_64bits_digest((const XXH3_state_t *)state);
}
