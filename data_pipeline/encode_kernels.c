/* Compiled loops of `manytask shards write` (data_pipeline/compiled_kernels.py loads this
 * with ctypes; the numpy code beside each caller computes the same values when it is absent).
 *
 * Each is one pass over a record batch where numpy needs several passes and temporaries:
 * the `hash=N` string hash (string_hash.py) and the fixed-width id lists of `multi` fields
 * (field_encoders.Vocabulary). The kernels use no Python API: ctypes calls them without the
 * GIL. Every index they follow is checked against the length of what it indexes: bad input is
 * an error returned to Python, never a read or write outside an array.
 */
#include <Python.h>
#include <stdint.h>

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT
#endif

#ifndef SOURCE_SHA256
#define SOURCE_SHA256 ""
#endif

/* setuptools builds this file as an extension module; it is a plain library for ctypes. */
PyMODINIT_FUNC PyInit__encode_kernels(void)
{
    PyErr_SetString(PyExc_ImportError, "manytask.data_pipeline._encode_kernels is a plain C library: "
                                       "data_pipeline/compiled_kernels.py loads it with ctypes");
    return NULL;
}

/* The sha256 of this file as setup.py hashed it: compiled_kernels.py uses the library only when
 * it matches the source beside it. */
EXPORT const char *source_sha256(void) { return SOURCE_SHA256; }

#define POLY64_P 0x100000001B3ULL

/* poly64-splitmix64 of each string: h = sum_j (byte_j + 1) * P^(len - 1 - j) mod 2^64 (Horner),
 * h ^= len, then splitmix64's finaliser; "" -> 0. offsets: [n + 1], int64, into data (nbytes).
 * Returns the first string whose offsets go backwards or outside data (nothing hashed from it
 * on), or -1. */
EXPORT int64_t poly64_splitmix64(const uint8_t *data, int64_t nbytes, const int64_t *offsets, int64_t n,
                                 uint64_t *out)
{
    for (int64_t i = 0; i < n; i++) {
        int64_t a = offsets[i], b = offsets[i + 1];
        if (a < 0 || b < a || b > nbytes)
            return i;
        uint64_t h = 0;
        for (const uint8_t *p = data + a; p < data + b; p++)
            h = h * POLY64_P + (uint64_t)(*p) + 1u;
        h ^= (uint64_t)(b - a);
        h ^= h >> 30;
        h *= 0xBF58476D1CE4E5B9ULL;
        h ^= h >> 27;
        h *= 0x94D049BB133111EBULL;
        h ^= h >> 31;
        out[i] = h;
    }
    return -1;
}

/* out[r, p] = ids[index[starts[r] + p]] for p < min(lengths[r], k), else pad: the rows of a
 * list column as a [n, k] id array. index: [m] (int32, as pyarrow's dictionaries hold it, or
 * int64) into ids (int64 [d]); out: [n * k] of `width` bytes per id (1, 2, 4 or 8; the ids are
 * known to fit). Returns the first row whose values lie outside index or point outside ids
 * (nothing written from it on), or -1.
 *
 * index is checked once up front, so that the loop over rows is branch-free per position (a
 * row's length is random: a branch on it mispredicts often; the select is written with a mask,
 * as a conditional GCC made a branch of it: 0.87 against 1.35 ms per 131k rows): a position
 * past the row's end reads a valid value (the row's first, or the last of index for an empty
 * row) and writes pad instead. Only an index with a bad value takes the loop that checks each
 * position, to name the first row using it. */
#define PAD_LISTS(OUT_T, IDX_T)                                                       \
    {                                                                                 \
        OUT_T *o = (OUT_T *)out;                                                      \
        const IDX_T *ix = (const IDX_T *)index;                                       \
        int64_t valid = 1;                                                            \
        for (int64_t v = 0; v < m; v++)                                               \
            valid &= (uint64_t)ix[v] < (uint64_t)d;                                   \
        for (int64_t r = 0; r < n; r++, o += k) {                                     \
            int64_t len = lengths[r] < k ? lengths[r] : k, s = starts[r];             \
            if (len > 0 && (s < 0 || s > m - len))                                    \
                return r;                                                             \
            if (!valid) {                                                             \
                for (int64_t p = 0; p < k; p++) {                                     \
                    if (p < len && (uint64_t)ix[s + p] >= (uint64_t)d)                \
                        return r;                                                     \
                    o[p] = (OUT_T)(p < len ? ids[ix[s + p]] : pad);                   \
                }                                                                     \
                continue;                                                             \
            }                                                                         \
            if (m == 0) {                                                             \
                for (int64_t p = 0; p < k; p++)                                       \
                    o[p] = (OUT_T)pad;                                                \
                continue;                                                             \
            }                                                                         \
            if (len <= 0)                                                             \
                s = s >= 0 && s < m ? s : m - 1;                                      \
            for (int64_t p = 0; p < k; p++) {                                         \
                int64_t keep = -(int64_t)(p < len); /* all ones, or 0 past the end */ \
                int64_t v = ids[ix[s + (p & keep)]];                                  \
                o[p] = (OUT_T)((v & keep) | (pad & ~keep));                           \
            }                                                                         \
        }                                                                             \
        return -1;                                                                    \
    }

EXPORT int64_t pad_lists(const int64_t *ids, int64_t d, const void *index, int64_t index_width, int64_t m,
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
