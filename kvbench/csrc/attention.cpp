// Decode attention on the CPU: a few query rows over a cache of keys and values, stored as float32 or as
// int8 with one float32 scale per stored vector.
//
// Why hand-written: a decode step streams the whole cache once, so attention should run at the memory's
// speed. torch.compile's fused int8 loop ends every key's dot product in a horizontal sum (~30 cycles a
// key) and converts int8 at ~8 G elements/s on cache-cold data; SDPA's float32 kernel, built for many query
// rows, streams a one-row decode at ~15 GB/s. Here keys go in blocks of 16 whose 16 partial-sum vectors are
// reduced together by one transpose-and-add, softmax uses a vectorized exp, values are accumulated in
// registers, up to 4 query rows share each key's load (and conversion), and loads are prefetched ahead.
// Built at run time by kvbench/native.py with the machine's compiler (-O3 -march=native -fopenmp); the
// OpenMP runtime is the one torch already loaded.
//
// Arithmetic, in float32: score = (q . k) * kscale / sqrt(hd), -inf where not visible, softmax over keys,
// out = sum_s softmax_s * vscale_s * v_s (scales 1 for float32 storage).
// Layouts: q, out (B*H, R, hd) contiguous; k, v (B, H, S, hd) with contiguous hd and keys hd apart (views of
// a longer buffer are fine); scales (B, H, S) with contiguous keys; visible (B, R, S) bytes, keys contiguous.

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(KVBENCH_GENERIC)
#include <immintrin.h>
#define KVBENCH_AVX512 1
#endif

namespace {

template <typename T>
struct Head {  // one (batch row, K/V head): where its keys, values, scales (null: all 1) and mask start
    const T* k;
    const T* v;
    const float* kscale;
    const float* vscale;
    const uint8_t* visible;  // (R, S)
};

// ---- portable loops: any CPU; the compiler vectorizes what it can ------------------------------------------

template <typename T, int HD>
void scores_generic(const float* q, const Head<T>& h, int64_t R, int64_t S, int64_t vis_row, float scale,
                    float* scores) {  // scores (R, S)
    for (int64_t s = 0; s < S; ++s) {
        const T* k = h.k + s * HD;
        const float key_scale = h.kscale ? h.kscale[s] * scale : scale;
        for (int64_t r = 0; r < R; ++r) {
            float acc = 0.f;
            for (int d = 0; d < HD; ++d) acc += q[r * HD + d] * static_cast<float>(k[d]);
            scores[r * S + s] = h.visible[r * vis_row + s] ? acc * key_scale : -INFINITY;
        }
    }
}

void softmax_generic(float* row, const float* vscale, int64_t S) {  // row becomes softmax(row) * vscale
    float m = -INFINITY, sum = 0.f;
    for (int64_t s = 0; s < S; ++s) m = row[s] > m ? row[s] : m;
    for (int64_t s = 0; s < S; ++s) sum += (row[s] = std::exp(row[s] - m));
    for (int64_t s = 0; s < S; ++s) row[s] = row[s] / sum * (vscale ? vscale[s] : 1.f);
}

template <typename T, int HD>
void values_generic(const float* weights, const T* v, int64_t S, float* out) {  // out (HD)
    float acc[HD] = {};
    for (int64_t s = 0; s < S; ++s)
        for (int d = 0; d < HD; ++d) acc[d] += weights[s] * static_cast<float>(v[s * HD + d]);
    for (int d = 0; d < HD; ++d) out[d] = acc[d];
}

#ifdef KVBENCH_AVX512

inline __m512 load16(const int8_t* p) {  // 16 int8 -> 16 float32
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// Cache-cold K/V is the normal case (a decode step reads far more than the caches hold): asking for the
// lines a few keys ahead keeps loads in flight while the current keys are converted and multiplied.
constexpr int64_t PREFETCH_KEYS = 32;  // int8 at head_dim 64: 2 KB ahead; 64-256 keys measured no better

template <typename T, int HD>
inline void prefetch_key(const T* k) {  // may point past the end: prefetching never faults
    const char* bytes = reinterpret_cast<const char*>(k);
    for (int line = 0; line < HD * int(sizeof(T)); line += 64) _mm_prefetch(bytes + line, _MM_HINT_T0);
}

// 16 vectors in, one vector out whose lane j is the sum of the 16 lanes of a[j].
inline __m512 sum_each(__m512* a) {
    __m512 pairs[8], quads[4], octs[2];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+.., a1+.., a0+.., a1+..] of a[2i], a[2i+1]
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                                 _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane: one partial sum of each of 4 vectors
        __m512d x = _mm512_castps_pd(pairs[2 * i]), y = _mm512_castps_pd(pairs[2 * i + 1]);
        quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; ++i)  // 128-bit lanes (0+1, 2+3) of quads[2i], then of quads[2i+1]
        octs[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                                _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(octs[0], octs[1], 0x88),
                         _mm512_shuffle_f32x4(octs[0], octs[1], 0xDD));
}

// exp(x) for x <= 0 or -inf: e^x = 2^n e^r with |r| <= ln2/2, e^r by its Taylor series to r^7 (< 1 ulp).
inline __m512 exp_nonpositive(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts: exact n*hi
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    const __m512 e = _mm512_scalef_ps(p, n);  // p * 2^n, without building the exponent's bits
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.f), _CMP_LT_OQ);  // and -inf
    return _mm512_mask_blend_ps(underflow, e, _mm512_setzero_ps());
}

// Query rows go in groups of up to MAX_GROUP (a grouped-query head's rows, a short prompt): each key and
// value is loaded (and converted) once per group, not once per row.
constexpr int MAX_GROUP = 4;

// One thread reads its keys as STREAMS interleaved sequential streams (the key range cut into STREAMS parts,
// one key of each part in turn): the memory system keeps more lines in flight for several streams than for one.
// Measured on a 2-core Xeon, plain reductions: 1 stream 26.2 GB/s, 4 streams switching every line 32.2, but
// switching every 4 KB (one block of 16 float32 keys at a time) no better than one stream (docs/perf.md).
#ifndef KVBENCH_STREAMS
#define KVBENCH_STREAMS 2
#endif
constexpr int STREAMS = KVBENCH_STREAMS;

template <typename T, int HD, int ROWS>
void scores_group(const float* q, const Head<T>& h, int64_t S16, int64_t S, int64_t vis_row, float scale,
                  float* scores) {  // rows q[0..ROWS), scores (ROWS, S), keys 0..S16
    constexpr int C = HD / 16;  // 16-float chunks of one head
    __m512 qr[ROWS][C];
    for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < C; ++c) qr[r][c] = _mm512_loadu_ps(q + r * HD + 16 * c);
    alignas(64) __m512 partial[STREAMS][ROWS][16];
    const int64_t blocks = S16 / 16, per_stream = blocks / STREAMS;  // blocks of 16 keys; the rest run 1 stream
    auto finish_block = [&](int stream, int64_t s0) {  // the 16 keys' dot products, scaled, masked, stored
        const __m512 key_scale = h.kscale ? _mm512_mul_ps(_mm512_loadu_ps(h.kscale + s0), _mm512_set1_ps(scale))
                                          : _mm512_set1_ps(scale);
        for (int r = 0; r < ROWS; ++r) {
            const __m512 dots = _mm512_mul_ps(sum_each(partial[stream][r]), key_scale);
            const __m128i vis = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h.visible + r * vis_row + s0));
            const __mmask16 seen = _mm_test_epi8_mask(vis, vis);
            _mm512_storeu_ps(scores + r * S + s0, _mm512_mask_blend_ps(seen, _mm512_set1_ps(-INFINITY), dots));
        }
    };
    auto dot_key = [&](int stream, int j, int64_t key) {  // key `key` into partial[stream][r][j], each row
        const T* k = h.k + key * HD;
        prefetch_key<T, HD>(k + PREFETCH_KEYS * HD);
        __m512 kf[C];
        for (int c = 0; c < C; ++c) kf[c] = load16(k + 16 * c);
        for (int r = 0; r < ROWS; ++r) {
            __m512 acc = _mm512_mul_ps(qr[r][0], kf[0]);
            for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qr[r][c], kf[c], acc);
            partial[stream][r][j] = acc;
        }
    };
    for (int64_t b = 0; b < per_stream; ++b) {
        for (int j = 0; j < 16; ++j)
            for (int stream = 0; stream < STREAMS; ++stream) dot_key(stream, j, ((stream * per_stream + b) * 16) + j);
        for (int stream = 0; stream < STREAMS; ++stream) finish_block(stream, (stream * per_stream + b) * 16);
    }
    for (int64_t s0 = STREAMS * per_stream * 16; s0 < S16; s0 += 16) {  // blocks left over: one stream
        for (int j = 0; j < 16; ++j) dot_key(0, j, s0 + j);
        finish_block(0, s0);
    }
}

template <typename T, int HD, int ROWS>
void values_group(const float* weights, int64_t S, const T* v, float* out) {  // weights (ROWS, S)
    constexpr int C = HD / 16;
    __m512 acc[ROWS][C];
    for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    auto add_value = [&](int64_t s) {  // acc += weight_s * v_s, each row (keys in any order: a sum)
        prefetch_key<T, HD>(v + (s + PREFETCH_KEYS) * HD);
        __m512 vf[C];
        for (int c = 0; c < C; ++c) vf[c] = load16(v + s * HD + 16 * c);
        for (int r = 0; r < ROWS; ++r) {
            const __m512 w = _mm512_set1_ps(weights[r * S + s]);
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(w, vf[c], acc[r][c]);
        }
    };
    const int64_t per_stream = S / STREAMS;
    for (int64_t i = 0; i < per_stream; ++i)
        for (int stream = 0; stream < STREAMS; ++stream) add_value(stream * per_stream + i);
    for (int64_t s = STREAMS * per_stream; s < S; ++s) add_value(s);  // keys left over: one stream
    for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + r * HD + 16 * c, acc[r][c]);
}

template <typename T, int HD, int ROWS>
struct Scores {
    static void run(const float* q, const Head<T>* h, int64_t S16, int64_t S, int64_t vis_row, float scale,
                    float* scores) { scores_group<T, HD, ROWS>(q, *h, S16, S, vis_row, scale, scores); }
};

template <typename T, int HD, int ROWS>
struct Values {
    static void run(const float* weights, int64_t S, const T* v, float* out) {
        values_group<T, HD, ROWS>(weights, S, v, out);
    }
};

template <typename T, int HD, template <typename, int, int> class Kernel, typename... Args>
void by_group(int64_t rows, Args... args) {  // Kernel<T, HD, n>::run for n = the group's size (1..MAX_GROUP)
    switch (rows) {
        case 1: Kernel<T, HD, 1>::run(args...); break;
        case 2: Kernel<T, HD, 2>::run(args...); break;
        case 3: Kernel<T, HD, 3>::run(args...); break;
        default: Kernel<T, HD, 4>::run(args...); break;
    }
}

template <typename T, int HD>
void scores_avx512(const float* q, const Head<T>& h, int64_t R, int64_t S, int64_t vis_row, float scale,
                   float* scores) {
    const int64_t S16 = S - S % 16;
    for (int64_t r0 = 0; r0 < R; r0 += MAX_GROUP) {
        Head<T> rows = h;
        rows.visible += r0 * vis_row;
        by_group<T, HD, Scores>(R - r0, q + r0 * HD, &rows, S16, S, vis_row, scale, scores + r0 * S);
    }
    if (S16 < S) {  // the last S % 16 keys
        Head<T> tail = h;
        tail.k += S16 * HD, tail.visible += S16;
        if (tail.kscale) tail.kscale += S16;
        std::vector<float> rest(R * (S - S16));
        scores_generic<T, HD>(q, tail, R, S - S16, vis_row, scale, rest.data());
        for (int64_t r = 0; r < R; ++r)
            for (int64_t s = S16; s < S; ++s) scores[r * S + s] = rest[r * (S - S16) + s - S16];
    }
}

void softmax_avx512(float* row, const float* vscale, int64_t S) {  // row becomes softmax(row) * vscale
    const int64_t S16 = S - S % 16;
    __m512 m16 = _mm512_set1_ps(-INFINITY);
    for (int64_t s = 0; s < S16; s += 16) m16 = _mm512_max_ps(m16, _mm512_loadu_ps(row + s));
    float m = _mm512_reduce_max_ps(m16);
    for (int64_t s = S16; s < S; ++s) m = row[s] > m ? row[s] : m;
    __m512 sum16 = _mm512_setzero_ps();
    for (int64_t s = 0; s < S16; s += 16) {
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + s), _mm512_set1_ps(m)));
        _mm512_storeu_ps(row + s, e);
        sum16 = _mm512_add_ps(sum16, e);
    }
    float sum = _mm512_reduce_add_ps(sum16);
    for (int64_t s = S16; s < S; ++s) sum += (row[s] = std::exp(row[s] - m));
    const __m512 inv = _mm512_set1_ps(1.f / sum);
    for (int64_t s = 0; s < S16; s += 16) {
        const __m512 w = _mm512_mul_ps(_mm512_loadu_ps(row + s), inv);
        _mm512_storeu_ps(row + s, vscale ? _mm512_mul_ps(w, _mm512_loadu_ps(vscale + s)) : w);
    }
    for (int64_t s = S16; s < S; ++s) row[s] = row[s] * (1.f / sum) * (vscale ? vscale[s] : 1.f);
}

#endif

template <typename T, int HD>
void attend_head(const float* q, const Head<T>& h, int64_t R, int64_t S, int64_t vis_row, float scale,
                 float* scores, float* out) {
#ifdef KVBENCH_AVX512
    scores_avx512<T, HD>(q, h, R, S, vis_row, scale, scores);
    for (int64_t r = 0; r < R; ++r) softmax_avx512(scores + r * S, h.vscale, S);
    for (int64_t r0 = 0; r0 < R; r0 += MAX_GROUP)
        by_group<T, HD, Values>(R - r0, scores + r0 * S, S, h.v, out + r0 * HD);
#else
    scores_generic<T, HD>(q, h, R, S, vis_row, scale, scores);
    for (int64_t r = 0; r < R; ++r) softmax_generic(scores + r * S, h.vscale, S);
    for (int64_t r = 0; r < R; ++r) values_generic<T, HD>(scores + r * S, h.v, S, out + r * HD);
#endif
}

// Every (batch row, head), spread over `threads` OpenMP threads; scales may be null (float32 storage).
template <typename T>
int attention(const float* q, const T* k, const float* kscale, const T* v, const float* vscale,
              const uint8_t* visible, float* out, int64_t batch, int64_t heads, int64_t rows, int64_t keys,
              int64_t head_dim, int64_t kv_batch, int64_t kv_head, int64_t scale_batch, int64_t scale_head,
              int64_t visible_batch, int threads) {
    if (head_dim != 64 && head_dim != 128) return 1;
    const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < batch * heads; ++bh) {
        const int64_t b = bh / heads, h = bh % heads;
        const Head<T> head{k + b * kv_batch + h * kv_head, v + b * kv_batch + h * kv_head,
                           kscale ? kscale + b * scale_batch + h * scale_head : nullptr,
                           vscale ? vscale + b * scale_batch + h * scale_head : nullptr,
                           visible + b * visible_batch};
        std::vector<float> scores(rows * keys);  // (R, S): this head's scores, then its softmax weights
        const float* qh = q + bh * rows * head_dim;
        float* oh = out + bh * rows * head_dim;
        if (head_dim == 64) attend_head<T, 64>(qh, head, rows, keys, keys, scale, scores.data(), oh);
        else attend_head<T, 128>(qh, head, rows, keys, keys, scale, scores.data(), oh);
    }
    return 0;
}

}  // namespace

extern "C" {

// Which loops this build runs, for kvbench to record: "avx512" or "generic".
const char* kvbench_attention_isa() {
#ifdef KVBENCH_AVX512
    return "avx512";
#else
    return "generic";
#endif
}

// int8 K/V with per-vector scales. head_dim 64 or 128 (returns 1 otherwise, having written nothing);
// strides in elements: kv_* of k and v, scale_* of the scales, visible_batch of visible (0: one mask for all).
int kvbench_int8_attention(const float* q, const int8_t* k, const float* kscale, const int8_t* v,
                           const float* vscale, const uint8_t* visible, float* out, int64_t batch, int64_t heads,
                           int64_t rows, int64_t keys, int64_t head_dim, int64_t kv_batch, int64_t kv_head,
                           int64_t scale_batch, int64_t scale_head, int64_t visible_batch, int threads) {
    return attention<int8_t>(q, k, kscale, v, vscale, visible, out, batch, heads, rows, keys, head_dim, kv_batch,
                             kv_head, scale_batch, scale_head, visible_batch, threads);
}

// float32 K/V, the same otherwise.
int kvbench_float_attention(const float* q, const float* k, const float* v, const uint8_t* visible, float* out,
                            int64_t batch, int64_t heads, int64_t rows, int64_t keys, int64_t head_dim,
                            int64_t kv_batch, int64_t kv_head, int64_t visible_batch, int threads) {
    return attention<float>(q, k, nullptr, v, nullptr, visible, out, batch, heads, rows, keys, head_dim, kv_batch,
                            kv_head, 0, 0, visible_batch, threads);
}

}  // extern "C"
