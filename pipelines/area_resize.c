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

enum { STRIP = 16, MOST_LANE = (STRIP * 4 + 16) & ~15 };

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
    /* A tile lane holds one source column of the strip: STRIP pixels of cn bytes, then the spare byte
       that the 4-byte moves below may write, zeros up to a multiple of 16 bytes. The horizontal pass
       sums whole lanes, a whole number of vectors, and stores only the pixels' sums. */
    const int lane = (STRIP * cn + 16) & ~15, row_len = dw * cn;
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
            int x = 0;  /* the strip transposed, one lane after another: tile[x * lane + r * cn + c] */
            if (cn == 3)  /* the 4th byte lands where row r + 1 or the spare byte goes; not past a row */
                for (; x < w - 1; x++)
                    for (int r = 0; r < STRIP; r++) memcpy(tile + (size_t)x * lane + r * 3, srow[r] + x * 3, 4);
            for (; x < w; x++)
                for (int r = 0; r < STRIP; r++)
                    for (int c = 0; c < cn; c++) tile[(size_t)x * lane + r * cn + c] = srow[r][x * cn + c];
            float *strip_rows[STRIP];
            for (int r = 0; r < rows; r++) strip_rows[r] = ring + (size_t)((y0 + r) % ring_rows) * row_len;
            for (int dx = 0; dx < dw; dx++) {
                const float *wd = xw + (size_t)dx * xstride;
                const uint8_t *t0 = tile + (size_t)xf[dx] * lane;
                float acc[MOST_LANE];
                for (int i = 0; i < lane; i++) acc[i] = (float)t0[i] * wd[0];  /* OpenCV's 0 + this: the same */
                for (int k = 1; k < xc[dx]; k++) {
                    const uint8_t *t = tile + (size_t)(xf[dx] + k) * lane;
                    const float a = wd[k];
                    for (int i = 0; i < lane; i++) acc[i] = acc[i] + (float)t[i] * a;
                }
                for (int r = 0; r < rows; r++)
                    for (int c = 0; c < cn; c++) strip_rows[r][dx * cn + c] = acc[r * cn + c];
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
