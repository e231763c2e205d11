/* Fused per-row Matryoshka softmax for the single-pass loss (see loss.py, native.py).
 *
 * Input: buf [K, rows, n] fp32, buf[k] = H[:, blk_k] @ E[:, blk_k]^T (per-block partial logits).
 * For every row (its K x n values, 290 KB for K = 6, n = 12,101, stay in L2 between the passes):
 *   1. per size k, tile by tile: the cumulative logits z_k = z_{k-1} + buf[k] (a scratch row), the
 *      tile's max raising the running shift m_k (online softmax: the running sum is rescaled), and
 *      e = exp(z_k - m_k) written in place, s_k += e; then lse_k = m_k + log s_k;
 *   2. (grad) G_j = sum_{k >= j} (w_k / s_k) e_k in place (the gradient wrt the size-j block's
 *      logits), each tile re-based from the shift it was exponentiated with to the final m_k.
 * The buffer streams from memory once per pass; composed from PyTorch ops the same work takes
 * about ten passes. exp is a branch-free polynomial that gcc vectorises; values below FLT_MIN are
 * flushed to 0 so no subnormal reaches the GEMMs after it (they run 5-20x slower on subnormals).
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_K 64

static inline float exp_nonpos(float x) {
    /* exp(x) for x <= 0 (finite): 2^n p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-7 Taylor p
     * (truncation < 3e-8 relative); exp(x) < 1.7e-38 returns 0. */
    const float lo = -87.0f;
    float xc = x < lo ? lo : x;
    float n = rintf(xc * 1.44269504088896341f);
    float r = xc - n * 0.693145751953125f;
    r = r - n * 1.42860682030941723212e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < lo ? 0.0f : p * scale;
}

/* Items per tile of the online shift: a tile's logits stay in L1 between its max and its exp. */
#define TILE 1024

static void one_row(float *buf, int64_t K, int64_t rows, int64_t n, int64_t row, const float *w,
                    float *lse, int need_grad, float *z, float *tile_shift) {
    const int64_t ntiles = (n + TILE - 1) / TILE;
    float coef[MAX_K], shift[MAX_K];
    for (int64_t k = 0; k < K; ++k) {
        float *cur = buf + (k * rows + row) * n;
        float *ts = tile_shift + k * ntiles;
        float m = -FLT_MAX, s = 0.0f;
        for (int64_t t = 0; t < ntiles; ++t) {
            const int64_t i0 = t * TILE, i1 = i0 + TILE < n ? i0 + TILE : n;
            float tm = -FLT_MAX;
            if (k == 0) {
                for (int64_t i = i0; i < i1; ++i) {
                    z[i] = cur[i];
                    tm = fmaxf(tm, cur[i]);
                }
            } else {
                for (int64_t i = i0; i < i1; ++i) {
                    float v = z[i] + cur[i];
                    z[i] = v;
                    tm = fmaxf(tm, v);
                }
            }
            if (tm > m) { /* online softmax: rescale the running sum to the new shift */
                s *= expf(m - tm);
                m = tm;
            }
            ts[t] = m;
            float st = 0.0f;
            for (int64_t i = i0; i < i1; ++i) {
                float e = exp_nonpos(z[i] - m);
                cur[i] = e;
                st += e;
            }
            s += st;
        }
        shift[k] = m;
        lse[k * rows + row] = m + logf(s);
        coef[k] = w[k] / s;
    }
    if (!need_grad) return;
    /* G_j = sum_{k >= j} coef_k e_k, e_k re-based from each tile's shift to the final one. */
    for (int64_t k = K - 1; k >= 0; --k) {
        float *cur = buf + (k * rows + row) * n;
        const float *next = k == K - 1 ? NULL : buf + ((k + 1) * rows + row) * n;
        const float *ts = tile_shift + k * ntiles;
        for (int64_t t = 0; t < ntiles; ++t) {
            const int64_t i0 = t * TILE, i1 = i0 + TILE < n ? i0 + TILE : n;
            const float c = coef[k] * expf(ts[t] - shift[k]);
            if (next == NULL) {
                for (int64_t i = i0; i < i1; ++i) {
                    float g = c * cur[i];
                    cur[i] = fabsf(g) < FLT_MIN ? 0.0f : g;
                }
            } else {
                for (int64_t i = i0; i < i1; ++i) {
                    float g = c * cur[i] + next[i];
                    cur[i] = fabsf(g) < FLT_MIN ? 0.0f : g;
                }
            }
        }
    }
}

typedef struct {
    float *buf;
    int64_t K, rows, n, r0, r1;
    const float *w;
    float *lse;
    int need_grad, failed;
} task_t;

static void *run_task(void *arg) {
    task_t *t = (task_t *)arg;
    const int64_t ntiles = (t->n + TILE - 1) / TILE;
    float *scratch = malloc(sizeof(float) * (size_t)(t->n + t->K * ntiles));
    if (scratch == NULL) {
        t->failed = 1;
        return NULL;
    }
    for (int64_t row = t->r0; row < t->r1; ++row)
        one_row(t->buf, t->K, t->rows, t->n, row, t->w, t->lse, t->need_grad, scratch, scratch + t->n);
    free(scratch);
    return NULL;
}

/* Returns 0 on success, 1 if K is out of range, 2 if scratch memory could not be allocated (the
 * output is then incomplete). A worker thread that cannot be started has its rows done on the
 * calling thread. */
int fmrl_matryoshka_softmax(float *buf, int64_t K, int64_t rows, int64_t n, const float *w,
                            float *lse, int need_grad, int threads) {
    if (K < 1 || K > MAX_K) return 1;
    if (threads < 1) threads = 1;
    if (threads > rows) threads = (int)(rows > 0 ? rows : 1);
    if (threads > 64) threads = 64;
    task_t tasks[64];
    pthread_t ids[64];
    int started[64] = {0};
    for (int t = 0; t < threads; ++t) {
        tasks[t] = (task_t){buf, K, rows, n, rows * t / threads, rows * (t + 1) / threads, w, lse, need_grad, 0};
    }
    for (int t = 1; t < threads; ++t) started[t] = pthread_create(&ids[t], NULL, run_task, &tasks[t]) == 0;
    run_task(&tasks[0]);
    for (int t = 1; t < threads; ++t) {
        if (started[t]) {
            pthread_join(ids[t], NULL);
        } else {
            run_task(&tasks[t]);
        }
    }
    for (int t = 0; t < threads; ++t)
        if (tasks[t].failed) return 2;
    return 0;
}
