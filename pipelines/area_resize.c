/* OpenCV's INTER_AREA reduction of 8-bit images, byte for byte, vectorised (pipelines/area_resize.py).
 *
 * OpenCV's generic path (cv::resize, a factor that is not whole on one axis) sums in float32. The
 * horizontal pass: for each source row and output column, from zero, each tap's weight times its
 * pixel, taps in ascending source order. The vertical pass: for each output row, its first source
 * row's sum times that row's weight, then the others' added in ascending order. cv::saturate_cast<uchar>
 * rounds half to even and clamps. OpenCV's horizontal pass is scalar and runs again for every (source
 * row, output row) pair. Here each source row's horizontal pass runs once, STRIP rows at a time,
 * transposed so that one tap of those rows is one contiguous vector: every float operation OpenCV does,
 * in its order, on the same values, so the same bytes. Built with -ffp-contract=off: no multiply-add is
 * fused where OpenCV's x86-64 build does not fuse one.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { STRIP = 16 };
typedef uint8_t bytes16 __attribute__((vector_size(16)));
_Static_assert(STRIP == sizeof(bytes16), "transpose_block moves one 16-byte vector per row of a strip");

/* The bytes of a and b interleaved: a0 b0 a1 b1 ... a7 b7 (LOW), a8 b8 ... a15 b15 (HIGH). */
#if defined(__clang__)
#define INTERLEAVE_LOW(a, b) __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23)
#define INTERLEAVE_HIGH(a, b) __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31)
#else
#define INTERLEAVE_LOW(a, b) __builtin_shuffle(a, b, (bytes16){0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23})
#define INTERLEAVE_HIGH(a, b) __builtin_shuffle(a, b, (bytes16){8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31})
#endif

/* Where byte column j of a strip (pixel j / cn's channel j % cn) starts in the tile: its STRIP rows in order. */
static inline __attribute__((always_inline)) size_t
tile_column(int j, int lane, const int cn)
{
    return (size_t)(j / cn) * lane + j % cn * STRIP;
}

/* Byte columns j0 .. j0 + 15 of the strip's rows (srow, STRIP of them) into the tile, each at its
 * `tile_column`. Four rounds of interleaving row i with row i + 8 transpose a 16 x 16 block of bytes. */
static inline __attribute__((always_inline)) void
transpose_block(const uint8_t *const *srow, int j0, uint8_t *tile, int lane, const int cn)
{
    bytes16 v[STRIP], u[STRIP];
    for (int r = 0; r < STRIP; r++) memcpy(&v[r], srow[r] + j0, 16);
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < STRIP / 2; i++) {
            u[2 * i] = INTERLEAVE_LOW(v[i], v[i + STRIP / 2]);
            u[2 * i + 1] = INTERLEAVE_HIGH(v[i], v[i + STRIP / 2]);
        }
        memcpy(v, u, sizeof v);
    }
    for (int k = 0; k < 16; k++)
        memcpy(tile + tile_column(j0 + k, lane, cn), &v[k], 16);
}

/* OpenCV's computeResizeAreaTab for one axis, grouped by output index: output d sums count[d]
 * consecutive source indices from first[d], with weights w[d * stride + k]. Returns the largest count. */
static int area_taps(int ssize, int dsize, int *first, int *count, float *w, int stride)
{
    const double scale = 1.0 / ((double)dsize / ssize);
    int most = 0;
    for (int d = 0; d < dsize; d++) {
        const double f1 = d * scale, f2 = f1 + scale;
        const double cell = scale < ssize - f1 ? scale : ssize - f1;
        int s1 = (int)ceil(f1), s2 = (int)floor(f2);
        if (s2 > ssize - 1) s2 = ssize - 1;
        if (s1 > s2) s1 = s2;
        float *wd = w + (size_t)d * stride;
        int n = 0;
        first[d] = s1;
        if (s1 - f1 > 1e-3) {
            first[d] = s1 - 1;
            wd[n++] = (float)((s1 - f1) / cell);
        }
        for (int s = s1; s < s2; s++) wd[n++] = (float)(1.0 / cell);
        if (f2 - s2 > 1e-3) {
            const double part = f2 - s2 < 1. ? f2 - s2 : 1.;
            wd[n++] = (float)((part < cell ? part : cell) / cell);
        }
        count[d] = n;
        if (n > most) most = n;
    }
    return most;
}

static inline __attribute__((always_inline)) int
resize_channels(const uint8_t *src, int h, int w, const int cn, long src_step,
                uint8_t *dst, int dh, int dw, long dst_step)
{
    /* A tile lane holds one source column of the strip, channel after channel, each channel's STRIP
       rows in order; for 3 channels a fourth of zeros follows, which GCC vectorises better. The
       horizontal pass sums whole lanes and stores only the channels' sums. */
    const int lane = STRIP * (cn == 3 ? 4 : cn), row_len = dw * cn;
    const int xstride = (int)ceil((double)w / dw) + 2, ystride = (int)ceil((double)h / dh) + 2;
    int *tab = malloc(sizeof(int) * 2 * ((size_t)dw + dh));
    float *xw = malloc(sizeof(float) * ((size_t)xstride * dw + (size_t)ystride * dh));
    uint8_t *tile = malloc((size_t)w * lane);
    float *sum = malloc(sizeof(float) * (size_t)row_len);
    float *ring = NULL;
    int ok = tab && xw && tile && sum;
    if (tile) memset(tile, 0, (size_t)w * lane);
    if (ok) {
        int *xf = tab, *xc = tab + dw, *yf = tab + 2 * dw, *yc = yf + dh;
        float *yw = xw + (size_t)xstride * dw;
        area_taps(w, dw, xf, xc, xw, xstride);
        /* horizontal sums of the source rows that an unfinished output row still needs, and the strip's */
        const int ring_rows = STRIP + area_taps(h, dh, yf, yc, yw, ystride) - 1;
        ring = malloc(sizeof(float) * (size_t)ring_rows * row_len);
        ok = ring != NULL;
        for (int y0 = 0, dy = 0; ok && y0 < h; y0 += STRIP) {
            const int rows = h - y0 < STRIP ? h - y0 : STRIP;
            const uint8_t *srow[STRIP];  /* a short last strip repeats its last row; those sums are not stored */
            for (int r = 0; r < STRIP; r++) srow[r] = src + (size_t)(y0 + (r < rows ? r : rows - 1)) * src_step;
            int j = 0;  /* the strip transposed: tile[x * lane + c * STRIP + r] */
            for (; j + 16 <= w * cn; j += 16) transpose_block(srow, j, tile, lane, cn);
            for (; j < w * cn; j++)
                for (int r = 0; r < STRIP; r++) tile[tile_column(j, lane, cn) + r] = srow[r][j];
            float *strip_rows[STRIP];
            for (int r = 0; r < rows; r++) strip_rows[r] = ring + (size_t)((y0 + r) % ring_rows) * row_len;
            for (int dx = 0; dx < dw; dx++) {
                const float *wd = xw + (size_t)dx * xstride;
                const uint8_t *t0 = tile + (size_t)xf[dx] * lane;
                float acc[STRIP * 4];
                for (int i = 0; i < lane; i++) acc[i] = (float)t0[i] * wd[0];  /* OpenCV's 0 + this: the same */
                for (int k = 1; k < xc[dx]; k++) {
                    const uint8_t *t = tile + (size_t)(xf[dx] + k) * lane;
                    const float a = wd[k];
                    for (int i = 0; i < lane; i++) acc[i] = acc[i] + (float)t[i] * a;
                }
                for (int r = 0; r < rows; r++)
                    for (int c = 0; c < cn; c++) strip_rows[r][dx * cn + c] = acc[c * STRIP + r];
            }
            for (; dy < dh && yf[dy] + yc[dy] <= y0 + rows; dy++) {  /* every output row whose rows are in */
                const float *wd = yw + (size_t)dy * ystride;
                const float *r0 = ring + (size_t)(yf[dy] % ring_rows) * row_len;
                for (int i = 0; i < row_len; i++) sum[i] = wd[0] * r0[i];
                for (int k = 1; k < yc[dy]; k++) {
                    const float *rk = ring + (size_t)((yf[dy] + k) % ring_rows) * row_len;
                    const float a = wd[k];
                    for (int i = 0; i < row_len; i++) sum[i] = sum[i] + a * rk[i];
                }
                uint8_t *o = dst + (size_t)dy * dst_step;
                for (int i = 0; i < row_len; i++) {
                    const float v = rintf(sum[i]);  /* the current rounding mode: to nearest, ties to even */
                    o[i] = (uint8_t)(int)(v < 0.f ? 0.f : v > 255.f ? 255.f : v);
                }
            }
        }
    }
    free(tab);
    free(xw);
    free(tile);
    free(sum);
    free(ring);
    return ok ? 0 : -1;
}

/* One function per channel count, each with its own frame, and an AVX2 clone on x86-64. GCC's
 * unroll-and-jam (-O3) would fuse pairs of the vertical pass's taps into a loop it leaves scalar. */
#if defined(__x86_64__) && defined(__GNUC__)
#define CLONED __attribute__((target_clones("avx2", "default")))
#else
#define CLONED
#endif
#if defined(__GNUC__) && !defined(__clang__)
#define NO_JAM __attribute__((optimize("no-loop-unroll-and-jam")))
#else
#define NO_JAM
#endif
#define RESIZE_CHANNELS(CN)                                                                      \
    CLONED NO_JAM static int resize_##CN(const uint8_t *src, int h, int w, long src_step,         \
                                         uint8_t *dst, int dh, int dw, long dst_step)             \
    {                                                                                            \
        return resize_channels(src, h, w, CN, src_step, dst, dh, dw, dst_step);                  \
    }
RESIZE_CHANNELS(1)
RESIZE_CHANNELS(3)
RESIZE_CHANNELS(4)

/* `src` (h x w pixels of cn bytes, rows src_step bytes apart) reduced into `dst` (dh x dw, rows dst_step
 * apart), 0 < dh <= h, 0 < dw <= w, cn 1, 3 or 4. Returns 0, or -1 where memory ran out or cn is another. */
int area_resize(const uint8_t *src, int h, int w, int cn, long src_step,
                uint8_t *dst, int dh, int dw, long dst_step)
{
    if (cn == 3) return resize_3(src, h, w, src_step, dst, dh, dw, dst_step);
    if (cn == 1) return resize_1(src, h, w, src_step, dst, dh, dw, dst_step);
    if (cn == 4) return resize_4(src, h, w, src_step, dst, dh, dw, dst_step);
    return -1;
}
