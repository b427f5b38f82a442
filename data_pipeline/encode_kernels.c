/* Compiled loops of `manytask shards write` (data_pipeline/compiled_kernels.py loads this
 * with ctypes; the numpy code beside each caller computes the same values when it is absent).
 *
 * Each is one pass over a record batch where numpy needs several passes and temporaries:
 * the `hash=N` string hash (string_hash.py) and the fixed-width id lists of `multi` fields
 * (field_encoders.Vocabulary). Plain C99, no Python API: ctypes calls them without the GIL.
 */
#include <stdint.h>

#ifndef SOURCE_SHA256
#define SOURCE_SHA256 ""
#endif

/* The sha256 of this file as setup.py hashed it: compiled_kernels.py uses the library only when
 * it matches the source beside it. */
const char *source_sha256(void) { return SOURCE_SHA256; }

#define POLY64_P 0x100000001B3ULL

/* poly64-splitmix64 of each string: h = sum_j (byte_j + 1) * P^(len - 1 - j) mod 2^64 (Horner),
 * h ^= len, then splitmix64's finaliser; "" -> 0. offsets: [n + 1], int64, into data. */
void poly64_splitmix64(const uint8_t *data, const int64_t *offsets, int64_t n, uint64_t *out)
{
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *p = data + offsets[i];
        const uint8_t *end = data + offsets[i + 1];
        uint64_t h = 0;
        for (; p < end; p++)
            h = h * POLY64_P + (uint64_t)(*p) + 1u;
        h ^= (uint64_t)(offsets[i + 1] - offsets[i]);
        h ^= h >> 30;
        h *= 0xBF58476D1CE4E5B9ULL;
        h ^= h >> 27;
        h *= 0x94D049BB133111EBULL;
        h ^= h >> 31;
        out[i] = h;
    }
}

/* out[r, p] = ids[index[starts[r] + p]] for p < min(lengths[r], k), else pad: the rows of a
 * list column as a [n, k] id array. index: [m] (int32, as pyarrow's dictionaries hold it, or
 * int64) into ids (int64 [d]); out: [n * k] of `width` bytes per id (1, 2, 4 or 8; the ids are
 * known to fit). Returns the first row that points outside index or ids (nothing written from
 * it on), or -1 when all are inside. */
/* Branch-free per position (a row's length is random: a branch on it mispredicts often): a
 * position past the row's end reads the row's first value (or the last of index, for an empty
 * row) and writes pad instead. */
#define PAD_LISTS(OUT_T, IDX_T)                                                       \
    {                                                                                 \
        OUT_T *o = (OUT_T *)out;                                                      \
        const IDX_T *ix = (const IDX_T *)index;                                       \
        for (int64_t r = 0; r < n; r++, o += k) {                                     \
            int64_t len = lengths[r] < k ? lengths[r] : k, s = starts[r];             \
            if (len > 0 && (s < 0 || s + len > m))                                    \
                return r;                                                             \
            if (m == 0) {                                                             \
                for (int64_t p = 0; p < k; p++)                                       \
                    o[p] = (OUT_T)pad;                                                \
                continue;                                                             \
            }                                                                         \
            if (len <= 0)                                                             \
                s = s >= 0 && s < m ? s : m - 1;                                      \
            for (int64_t p = 0; p < k; p++) {                                         \
                int64_t at = ix[s + (p < len ? p : 0)];                               \
                if (at < 0 || at >= d)                                                \
                    return r;                                                         \
                int64_t v = ids[at];                                                  \
                o[p] = (OUT_T)(p < len ? v : pad);                                    \
            }                                                                         \
        }                                                                             \
        return -1;                                                                    \
    }

int64_t pad_lists(const int64_t *ids, int64_t d, const void *index, int64_t index_width, int64_t m,
                  const int64_t *starts, const int64_t *lengths, int64_t n, int64_t k, int64_t pad,
                  int64_t width, void *out)
{
    if (index_width == 4) {
        switch (width) {
        case 1: PAD_LISTS(int8_t, int32_t)
        case 2: PAD_LISTS(int16_t, int32_t)
        case 4: PAD_LISTS(int32_t, int32_t)
        default: PAD_LISTS(int64_t, int32_t)
        }
    }
    switch (width) {
    case 1: PAD_LISTS(int8_t, int64_t)
    case 2: PAD_LISTS(int16_t, int64_t)
    case 4: PAD_LISTS(int32_t, int64_t)
    default: PAD_LISTS(int64_t, int64_t)
    }
}
