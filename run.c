/*
Inference for nanollama models in one C file: libc and libm only (OpenMP optional).

    make runfast
    ./run model.bin -z tokenizer.bin -t 0.8 -p 0.9 -n 256 -s 42 -i "Once upon a time"
    ./run model.bin -z tokenizer.bin -m chat -y "You are a helpful assistant."

The model file and the tokenizer file are written by export.py, whose docstring documents both layouts.
The forward pass is model.py's: RMSNorm, RoPE on interleaved pairs (with Llama 3.1's long-context scaling),
grouped-query attention (with Qwen2's q/k/v biases), SwiGLU, with float32 or group-wise int8 weights. Prompts are
encoded like tokenizer.py: the tokenizer's regex pre-split (GPT-4's, Llama 3's, Qwen2's, GPT-2's or SmolLM2's,
written out by hand below, with the Unicode letter / number / space classes read from the tokenizer file), then
byte-level BPE by merge rank.

The file reads top to bottom: the model's structs, its building blocks in plain C, the forward pass (one token),
the same for a block of prompt tokens, reading the model file, the tokenizer, the sampler, the calculator tool,
generation and chat, the command line. The last section ("speed") holds what only makes it fast: SIMD dot products
for AVX2 / AVX-512 (float32, and int8 with the CPU's int8 dot-product instructions), tiled matrix-matrix kernels for
the prompt's blocks, SIMD attention, a vectorizable e^x and 2 MB pages for the weights. The plain functions hand their
work to it where this build has it; a reader may skip it.
*/

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif

// ----------------------------------------------------------------------------
// errors: user errors print one line and exit 1

static void fail(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "error: ");
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    va_end(args);
    exit(1);
}

static void *xmalloc(size_t n) {
    void *p = calloc(1, n ? n : 1);
    if (!p) fail("out of memory (allocating %zu bytes)", n);
    return p;
}

// a whole file, with a NUL after its end; pipes and /dev/stdin too (their size is known only once read)
static char *read_file(const char *path, const char *what, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) fail("cannot open %s %s: %s", what, path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) fail("%s %s is a directory; expected a file", what, path);
    size_t n = 0, capacity = (size_t)1 << 16;
    char *data = xmalloc(capacity + 1);
    for (size_t got; (got = fread(data + n, 1, capacity - n, f)) > 0;) {
        n += got;
        if (n == capacity) {
            capacity *= 2;
            if (!(data = realloc(data, capacity + 1))) fail("out of memory reading %s %s", what, path);
        }
    }
    if (ferror(f)) fail("cannot read %s %s: %s", what, path, strerror(errno));
    fclose(f);
    data[n] = '\0';
    *size = n;
    return data;
}

// ----------------------------------------------------------------------------
// the Transformer model

typedef struct {
    int dim;         // transformer width
    int hidden_dim;  // feed-forward width
    int n_layers;
    int n_heads;     // query heads
    int n_kv_heads;  // key/value heads (fewer than n_heads: grouped-query attention)
    int vocab_size;
    int seq_len;     // max_seq_len
    float rope_theta;
    float norm_eps;
    int tied;         // 1: the output head is the token embedding
    int weight_type;  // 0 float32, 1 int8
    int group_size;   // int8: values per scale
    uint64_t tokenizer_id;
    int attention_bias;          // 1: wq, wk and wv add a bias (Qwen2)
    float rope_scaling;          // Llama 3.1's long-context RoPE: the factor its low frequencies are divided by; 0 off
    float rope_low_freq_factor;  // (rope_scaling only) the blend between scaled and kept frequencies, and
    float rope_high_freq_factor; // the original context the wavelengths are measured against
    int rope_original_max_seq_len;
} Config;

// A weight matrix (rows, cols), row-major: float32 values, or int8 values with one scale per group.
typedef struct {
    const float *f;   // float32 files
    const int8_t *q;  // int8 files
    const float *s;   // int8 files: (rows * cols / group_size) scales
} Matrix;

typedef struct {
    const float *rms_att;    // (layer, dim)
    const float *rms_ffn;    // (layer, dim)
    const float *rms_final;  // (dim)
    const float *bq;         // (layer, dim) the biases of wq, wk, wv; NULL without attention_bias
    const float *bk;         // (layer, kv_dim)
    const float *bv;         // (layer, kv_dim)
    Matrix tok_embeddings;   // (vocab_size, dim)
    Matrix wq;               // (layer, dim, dim)
    Matrix wk;               // (layer, kv_dim, dim)
    Matrix wv;               // (layer, kv_dim, dim)
    Matrix wo;               // (layer, dim, dim)
    Matrix w1;               // (layer, hidden_dim, dim)   gate
    Matrix w2;               // (layer, dim, hidden_dim)   down
    Matrix w3;               // (layer, hidden_dim, dim)   up
    Matrix wcls;             // (vocab_size, dim), the embedding when tied
} Weights;

// an activation vector quantized to int8 for the int8 matmuls
typedef struct {
    int8_t *q;  // (n,)
    float *s;   // (n / group_size,)
} QVector;

// The activations have a row per token of a block of prompt tokens (see forward_block); forward() uses the first row.
typedef struct {
    int block;      // rows: prompt tokens processed together
    float *x;       // (block, dim) the residual stream
    float *xb;      // (block, dim)
    float *xb2;     // (block, dim)
    float *hb;      // (block, hidden_dim)
    float *hb2;     // (block, hidden_dim)
    float *q;       // (block, dim)
    float *k;       // (block, kv_dim) the keys of the positions
    float *v;       // (block, kv_dim) and their values
    float *att;     // (n_heads, seq_len)
    float *logits;  // (vocab_size,)
    float *key_cache;    // (layer, kv_head, seq_len, head_dim): one head's keys are contiguous for attention
    float *value_cache;  // (layer, kv_head, seq_len, head_dim)
    float *rope_cos;     // (seq_len, head_dim / 2)
    float *rope_sin;     // (seq_len, head_dim / 2)
    QVector xq;          // the next matmul's input quantized (int8 files): (block, max(dim, hidden_dim)) + scales
} RunState;

typedef struct {
    Config config;
    Weights weights;
    RunState state;
    void *data;        // the mmapped file
    size_t file_size;
    const char *path;  // for messages
} Transformer;

// The speed section at the end of the file. A fast_* function returns 0 where this build has nothing faster,
// and the plain loop that called it runs instead.
static inline float exp_nonpositive(float x);
static int fast_matmul(float *out, const float *x, const QVector *xq, Matrix w, int n, int d, int group_size);
static int fast_matmul_block(float *out, const float *x, const QVector *xq, Matrix w, int n, int d, int group_size,
                             int n_tokens);
static int fast_attention(float *out, const float *q, const float *keys, const float *values, int pos, int head_dim,
                          float *att);
static void *map_file_huge(int fd, size_t size);

// ----------------------------------------------------------------------------
// the building blocks of the forward pass

/*
The `omp simd` pragmas below let the compiler vectorize reductions (a sum, a maximum) by reordering their additions,
which it otherwise must not do without -ffast-math; they need -fopenmp or -fopenmp-simd and are ignored without.
*/
static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    float ss = 0.0f;
    #pragma omp simd reduction(+:ss)
    for (int j = 0; j < n; j++) ss += x[j] * x[j];
    float scale = 1.0f / sqrtf(ss / n + eps);
    for (int j = 0; j < n; j++) out[j] = weight[j] * (scale * x[j]);
}

// out (d,) = W (d, n) @ x (n,): one dot product per row of W (int8 matrices read the quantized xq instead of x).
// This is the hot loop: every weight is read once per token, so its speed is that of reading memory.
static void matmul(float *out, const float *x, const QVector *xq, Matrix w, int n, int d, int group_size) {
    if (fast_matmul(out, x, xq, w, n, d, group_size)) return;  // SIMD kernels, where this build has them
    int i, n_groups = group_size ? n / group_size : 0;
    #pragma omp parallel for private(i)
    for (i = 0; i < d; i++) {
        float val = 0.0f;
        if (w.f) {
            const float *row = w.f + (size_t)i * n;
            #pragma omp simd reduction(+:val)
            for (int j = 0; j < n; j++) val += row[j] * x[j];
        } else {  // int8: per group, the exact integer dot product times the two scales
            const int8_t *row = w.q + (size_t)i * n;
            const float *row_scales = w.s + (size_t)i * n_groups;
            for (int g = 0; g < n_groups; g++) {
                int32_t sum = 0;
                for (int j = g * group_size; j < (g + 1) * group_size; j++) sum += (int32_t)xq->q[j] * row[j];
                val += (float)sum * row_scales[g] * xq->s[g];
            }
        }
        out[i] = val;
    }
}

// Quantize x (n,) to int8 in groups: scale = max|x| / 127, q = round(x / scale). A group holding a NaN or an
// infinity gets a NaN scale, so that it reaches the logits as in float32 (checked_logits) instead of vanishing.
static void quantize(QVector *out, const float *x, int n, int group_size) {
    for (int g = 0; g < n / group_size; g++) {
        const float *xg = x + (size_t)g * group_size;
        int8_t *qg = out->q + (size_t)g * group_size;
        float max_abs = 0.0f;
        int finite = 1;
        #pragma omp simd reduction(max:max_abs) reduction(&:finite)
        for (int j = 0; j < group_size; j++) {
            max_abs = fabsf(xg[j]) > max_abs ? fabsf(xg[j]) : max_abs;
            finite &= fabsf(xg[j]) <= FLT_MAX;  // (false for NaN and infinity)
        }
        float scale = finite ? max_abs / 127.0f : NAN, inverse = finite && max_abs > 0.0f ? 127.0f / max_abs : 0.0f;
        out->s[g] = scale;
        #pragma omp simd
        for (int j = 0; j < group_size; j++) qg[j] = (int8_t)rintf(finite ? xg[j] * inverse : 0.0f);
    }
}

// the input of the following matmuls: int8 files quantize it once for all of them
static void matmul_input(RunState *s, const float *x, int n, const Config *c) {
    if (c->weight_type == 1) quantize(&s->xq, x, n, c->group_size);
}

static float max_of(const float *x, int n) {
    float max_val = x[0];
    #pragma omp simd reduction(max:max_val)
    for (int i = 1; i < n; i++) max_val = x[i] > max_val ? x[i] : max_val;
    return max_val;
}

static float sum_of(const float *x, int n) {
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int i = 0; i < n; i++) sum += x[i];
    return sum;
}

// (exp_nonpositive is e^x for x <= 0, in arithmetic the compiler vectorizes: see the speed section)
static void softmax(float *x, int n) {
    float max_val = max_of(x, n), sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int i = 0; i < n; i++) { x[i] = exp_nonpositive(x[i] - max_val); sum += x[i]; }
    float inverse = 1.0f / sum;
    for (int i = 0; i < n; i++) x[i] *= inverse;
}

// silu(gate) * up = gate * sigmoid(gate) * up, with e^-|gate| so that the exponential never overflows
static void swiglu(float *gate, const float *up, int n) {
    #pragma omp simd
    for (int i = 0; i < n; i++) {
        float g = gate[i], e = exp_nonpositive(-fabsf(g));  // sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) else
        gate[i] = g * (g >= 0.0f ? 1.0f : e) / (1.0f + e) * up[i];
    }
}

static void embedding_row(float *out, Matrix table, int token, int dim, int group_size) {
    if (table.f) {
        memcpy(out, table.f + (size_t)token * dim, dim * sizeof(float));
    } else {
        const int8_t *q = table.q + (size_t)token * dim;
        const float *s = table.s + (size_t)token * dim / group_size;
        for (int j = 0; j < dim; j++) out[j] = q[j] * s[j / group_size];
    }
}

// out (n,) += bias (n,): the q, k and v projections of a model with attention biases (Qwen2)
static void add_bias(float *out, const float *bias, int n) {
    for (int i = 0; i < n; i++) out[i] += bias[i];
}

// rotate interleaved pairs (v[2i], v[2i+1]) of every head by the angles of position pos
static void rope(float *v, int n, int head_dim, const float *cos_pos, const float *sin_pos) {
    for (int i = 0; i < n; i += 2) {
        int pair = (i % head_dim) / 2;
        float c = cos_pos[pair], s = sin_pos[pair], v0 = v[i], v1 = v[i + 1];
        v[i] = v0 * c - v1 * s;
        v[i + 1] = v0 * s + v1 * c;
    }
}

// the matrix of one layer: `offset` values into a stacked matrix
static Matrix layer_matrix(Matrix m, size_t offset, int group_size) {
    Matrix r = m;
    if (m.f) r.f = m.f + offset;
    else { r.q = m.q + offset; r.s = m.s + offset / group_size; }
    return r;
}

// the (seq_len, head_dim) keys or values of one K/V head of layer l in the cache
static float *cache_head(float *cache, const Config *c, int l, int kv_head) {
    return cache + ((size_t)l * c->n_kv_heads + kv_head) * c->seq_len * (c->dim / c->n_heads);
}

// write the keys and values (kv_dim,) of position pos into the cache of layer l
static void store_kv(RunState *s, const Config *c, int l, int pos, const float *k, const float *v) {
    int head_dim = c->dim / c->n_heads;
    for (int kv_head = 0; kv_head < c->n_kv_heads; kv_head++) {
        memcpy(cache_head(s->key_cache, c, l, kv_head) + (size_t)pos * head_dim, k + kv_head * head_dim,
               head_dim * sizeof(float));
        memcpy(cache_head(s->value_cache, c, l, kv_head) + (size_t)pos * head_dim, v + kv_head * head_dim,
               head_dim * sizeof(float));
    }
}

// One head's attention for the query q at position pos: its scores against the keys of positions 0..pos, their
// softmax, and the values weighted by it, into out (head_dim,). att (pos + 1,) is scratch.
static void attention(float *out, const float *q, const float *keys, const float *values, int pos, int head_dim,
                      float *att) {
    if (fast_attention(out, q, keys, values, pos, head_dim, att)) return;  // SIMD, where this build has it
    float scale = 1.0f / sqrtf((float)head_dim);
    for (int p = 0; p <= pos; p++) {
        const float *key = keys + (size_t)p * head_dim;
        float score = 0.0f;
        #pragma omp simd reduction(+:score)
        for (int i = 0; i < head_dim; i++) score += q[i] * key[i];
        att[p] = score * scale;
    }
    softmax(att, pos + 1);
    memset(out, 0, head_dim * sizeof(float));
    for (int p = 0; p <= pos; p++) {
        const float *value = values + (size_t)p * head_dim;
        float a = att[p];
        for (int i = 0; i < head_dim; i++) out[i] += a * value[i];
    }
}

// ----------------------------------------------------------------------------
// the forward pass

// Logits that are not finite numbers come from weights that are not (training that diverged, a damaged file): stop
// with a message instead of printing garbage. One pass over the vocabulary, nothing beside the matmuls; a scan of the
// whole file at load would read every weight before the first token, and miss values that overflow in the forward pass.
static float *checked_logits(Transformer *t, int pos) {
    const float *logits = t->state.logits;
    for (int i = 0; i < t->config.vocab_size; i++)
        if (!isfinite(logits[i]))
            fail("%s: the logits at position %d are not finite numbers (%g): the file has NaN or infinite weights, or "
                 "weights so large they overflow; export.py refuses to write such a model", t->path, pos, logits[i]);
    return t->state.logits;
}

// the logits of the next token after `token` at position `pos` (the KV cache holds positions < pos)
static float *forward(Transformer *t, int token, int pos) {
    Config *c = &t->config;
    Weights *w = &t->weights;
    RunState *s = &t->state;
    int dim = c->dim, hidden = c->hidden_dim, head_dim = dim / c->n_heads;
    int kv_dim = head_dim * c->n_kv_heads, kv_mul = c->n_heads / c->n_kv_heads, gs = c->group_size;
    float *x = s->x;
    embedding_row(x, w->tok_embeddings, token, dim, gs);
    const float *cos_pos = s->rope_cos + (size_t)pos * (head_dim / 2);
    const float *sin_pos = s->rope_sin + (size_t)pos * (head_dim / 2);

    for (int l = 0; l < c->n_layers; l++) {
        // attention: x = x + wo(attention(rmsnorm(x)))
        rmsnorm(s->xb, x, w->rms_att + (size_t)l * dim, dim, c->norm_eps);
        matmul_input(s, s->xb, dim, c);
        matmul(s->q, s->xb, &s->xq, layer_matrix(w->wq, (size_t)l * dim * dim, gs), dim, dim, gs);
        matmul(s->k, s->xb, &s->xq, layer_matrix(w->wk, (size_t)l * kv_dim * dim, gs), dim, kv_dim, gs);
        matmul(s->v, s->xb, &s->xq, layer_matrix(w->wv, (size_t)l * kv_dim * dim, gs), dim, kv_dim, gs);
        if (c->attention_bias) {
            add_bias(s->q, w->bq + (size_t)l * dim, dim);
            add_bias(s->k, w->bk + (size_t)l * kv_dim, kv_dim);
            add_bias(s->v, w->bv + (size_t)l * kv_dim, kv_dim);
        }
        rope(s->q, dim, head_dim, cos_pos, sin_pos);
        rope(s->k, kv_dim, head_dim, cos_pos, sin_pos);
        store_kv(s, c, l, pos, s->k, s->v);
        int h;
        #pragma omp parallel for private(h)
        for (h = 0; h < c->n_heads; h++) {
            int kv_head = h / kv_mul;  // grouped-query attention: kv_mul query heads share a K/V head
            attention(s->xb + h * head_dim, s->q + h * head_dim, cache_head(s->key_cache, c, l, kv_head),
                      cache_head(s->value_cache, c, l, kv_head), pos, head_dim, s->att + (size_t)h * c->seq_len);
        }
        matmul_input(s, s->xb, dim, c);
        matmul(s->xb2, s->xb, &s->xq, layer_matrix(w->wo, (size_t)l * dim * dim, gs), dim, dim, gs);
        for (int i = 0; i < dim; i++) x[i] += s->xb2[i];

        // feed-forward: x = x + w2(silu(w1(rmsnorm(x))) * w3(rmsnorm(x)))
        rmsnorm(s->xb, x, w->rms_ffn + (size_t)l * dim, dim, c->norm_eps);
        matmul_input(s, s->xb, dim, c);
        matmul(s->hb, s->xb, &s->xq, layer_matrix(w->w1, (size_t)l * hidden * dim, gs), dim, hidden, gs);
        matmul(s->hb2, s->xb, &s->xq, layer_matrix(w->w3, (size_t)l * hidden * dim, gs), dim, hidden, gs);
        swiglu(s->hb, s->hb2, hidden);
        matmul_input(s, s->hb, hidden, c);
        matmul(s->xb, s->hb, &s->xq, layer_matrix(w->w2, (size_t)l * dim * hidden, gs), hidden, dim, gs);
        for (int i = 0; i < dim; i++) x[i] += s->xb[i];
    }
    rmsnorm(x, x, w->rms_final, dim, c->norm_eps);
    matmul_input(s, x, dim, c);
    matmul(s->logits, x, &s->xq, w->wcls, dim, c->vocab_size, gs);
    return checked_logits(t, pos);
}

// ----------------------------------------------------------------------------
// the prompt, a block of tokens at a time

/*
The tokens of a prompt are all known before the first one is generated, so they need not go through the model one
by one. forward_block does what forward() does for n_tokens tokens at positions pos, pos + 1, ..., layer by layer for
all of them together: every matmul multiplies a weight matrix with n_tokens vectors (matmul_block), which the speed
section does reading each weight once per block instead of once per token. Reading the weights is what bounds
forward(), so a prompt goes through many times faster. Only the last token's logits are computed.
*/

// out (n_tokens, d) = X (n_tokens, n) @ W (d, n)^T: matmul for each row of X (and of its quantized form xq)
static void matmul_block(float *out, const float *x, const QVector *xq, Matrix w, int n, int d, int group_size,
                         int n_tokens) {
    if (fast_matmul_block(out, x, xq, w, n, d, group_size, n_tokens)) return;  // the speed section's tiled kernels
    for (int t = 0; t < n_tokens; t++) {
        QVector row = {xq->q + (size_t)t * n, xq->s + (group_size ? (size_t)t * n / group_size : 0)};
        matmul(out + (size_t)t * d, x + (size_t)t * n, &row, w, n, d, group_size);
    }
}

// the logits of the next token after tokens[0 .. n_tokens), which take positions pos .. pos + n_tokens - 1
static float *forward_block(Transformer *t, const int *tokens, int n_tokens, int pos) {
    Config *c = &t->config;
    Weights *w = &t->weights;
    RunState *s = &t->state;
    int dim = c->dim, hidden = c->hidden_dim, head_dim = dim / c->n_heads;
    int kv_dim = head_dim * c->n_kv_heads, kv_mul = c->n_heads / c->n_kv_heads, gs = c->group_size;
    int rows_dim = n_tokens * dim, rows_hidden = n_tokens * hidden;  // (at most 1024 * 2^18: no overflow)
    for (int i = 0; i < n_tokens; i++) embedding_row(s->x + (size_t)i * dim, w->tok_embeddings, tokens[i], dim, gs);

    for (int l = 0; l < c->n_layers; l++) {
        // attention: x = x + wo(attention(rmsnorm(x))), row by row where the rows do not mix
        for (int i = 0; i < n_tokens; i++)
            rmsnorm(s->xb + (size_t)i * dim, s->x + (size_t)i * dim, w->rms_att + (size_t)l * dim, dim, c->norm_eps);
        matmul_input(s, s->xb, rows_dim, c);  // (a group of group_size values never straddles two rows)
        matmul_block(s->q, s->xb, &s->xq, layer_matrix(w->wq, (size_t)l * dim * dim, gs), dim, dim, gs, n_tokens);
        matmul_block(s->k, s->xb, &s->xq, layer_matrix(w->wk, (size_t)l * kv_dim * dim, gs), dim, kv_dim, gs,
                     n_tokens);
        matmul_block(s->v, s->xb, &s->xq, layer_matrix(w->wv, (size_t)l * kv_dim * dim, gs), dim, kv_dim, gs,
                     n_tokens);
        for (int i = 0; i < n_tokens; i++) {
            if (c->attention_bias) {
                add_bias(s->q + (size_t)i * dim, w->bq + (size_t)l * dim, dim);
                add_bias(s->k + (size_t)i * kv_dim, w->bk + (size_t)l * kv_dim, kv_dim);
                add_bias(s->v + (size_t)i * kv_dim, w->bv + (size_t)l * kv_dim, kv_dim);
            }
            const float *cos_pos = s->rope_cos + (size_t)(pos + i) * (head_dim / 2);
            const float *sin_pos = s->rope_sin + (size_t)(pos + i) * (head_dim / 2);
            rope(s->q + (size_t)i * dim, dim, head_dim, cos_pos, sin_pos);
            rope(s->k + (size_t)i * kv_dim, kv_dim, head_dim, cos_pos, sin_pos);
            store_kv(s, c, l, pos + i, s->k + (size_t)i * kv_dim, s->v + (size_t)i * kv_dim);
        }
        int h;
        #pragma omp parallel for private(h)
        for (h = 0; h < c->n_heads; h++) {  // token i attends to the positions up to its own: causal
            int kv_head = h / kv_mul;
            for (int i = 0; i < n_tokens; i++)
                attention(s->xb + (size_t)i * dim + h * head_dim, s->q + (size_t)i * dim + h * head_dim,
                          cache_head(s->key_cache, c, l, kv_head), cache_head(s->value_cache, c, l, kv_head), pos + i,
                          head_dim, s->att + (size_t)h * c->seq_len);
        }
        matmul_input(s, s->xb, rows_dim, c);
        matmul_block(s->xb2, s->xb, &s->xq, layer_matrix(w->wo, (size_t)l * dim * dim, gs), dim, dim, gs, n_tokens);
        for (int j = 0; j < rows_dim; j++) s->x[j] += s->xb2[j];

        // feed-forward: x = x + w2(silu(w1(rmsnorm(x))) * w3(rmsnorm(x)))
        for (int i = 0; i < n_tokens; i++)
            rmsnorm(s->xb + (size_t)i * dim, s->x + (size_t)i * dim, w->rms_ffn + (size_t)l * dim, dim, c->norm_eps);
        matmul_input(s, s->xb, rows_dim, c);
        matmul_block(s->hb, s->xb, &s->xq, layer_matrix(w->w1, (size_t)l * hidden * dim, gs), dim, hidden, gs,
                     n_tokens);
        matmul_block(s->hb2, s->xb, &s->xq, layer_matrix(w->w3, (size_t)l * hidden * dim, gs), dim, hidden, gs,
                     n_tokens);
        swiglu(s->hb, s->hb2, rows_hidden);
        matmul_input(s, s->hb, rows_hidden, c);
        matmul_block(s->xb, s->hb, &s->xq, layer_matrix(w->w2, (size_t)l * dim * hidden, gs), hidden, dim, gs,
                     n_tokens);
        for (int j = 0; j < rows_dim; j++) s->x[j] += s->xb[j];
    }
    float *last = s->x + (size_t)(n_tokens - 1) * dim;
    rmsnorm(last, last, w->rms_final, dim, c->norm_eps);
    matmul_input(s, last, dim, c);
    matmul(s->logits, last, &s->xq, w->wcls, dim, c->vocab_size, gs);
    return checked_logits(t, pos + n_tokens - 1);
}

// feed tokens[0 .. n) at positions pos .. pos + n - 1 into the KV cache, a block at a time (-b); the logits after
// the last one (a block of one token is forward())
static float *prefill(Transformer *t, const int *tokens, int n, int pos) {
    float *logits = NULL;
    for (int i = 0; i < n; i += t->state.block) {
        int n_tokens = n - i < t->state.block ? n - i : t->state.block;
        logits = n_tokens == 1 ? forward(t, tokens[i], pos + i) : forward_block(t, tokens + i, n_tokens, pos + i);
    }
    return logits;
}

// ----------------------------------------------------------------------------
// reading the model file


#define MODEL_MAGIC "NLLM"
#define MODEL_VERSION 2  // version 1 files (no attention biases, no RoPE scaling) are read too
#define MODEL_HEADER_BYTES 256
#define ALIGN 64

static int read_i32(const unsigned char *p) { int32_t v; memcpy(&v, p, 4); return v; }
static float read_f32(const unsigned char *p) { float v; memcpy(&v, p, 4); return v; }
static uint64_t read_u64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static uint64_t align_up(uint64_t n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }

// lay a matrix of n values over the file at *offset and advance the offset past its sections
static Matrix map_matrix(const unsigned char *base, uint64_t *offset, uint64_t n, const Config *c) {
    Matrix m = {0};
    if (c->weight_type == 0) {
        if (base) m.f = (const float *)(base + *offset);
        *offset += align_up(n * 4);
    } else {
        if (base) m.q = (const int8_t *)(base + *offset);
        *offset += align_up(n);
        if (base) m.s = (const float *)(base + *offset);
        *offset += align_up(n / c->group_size * 4);
    }
    return m;
}

// the sections of the file in order; with base NULL it only computes the size the file must have
static uint64_t map_weights(Weights *w, const unsigned char *base, const Config *c) {
    uint64_t dim = c->dim, hidden = c->hidden_dim, layers = c->n_layers, vocab = c->vocab_size;
    uint64_t kv_dim = dim / c->n_heads * c->n_kv_heads;
    uint64_t offset = MODEL_HEADER_BYTES;
    w->rms_att = base ? (const float *)(base + offset) : NULL;
    offset += align_up(layers * dim * 4);
    w->rms_ffn = base ? (const float *)(base + offset) : NULL;
    offset += align_up(layers * dim * 4);
    w->rms_final = base ? (const float *)(base + offset) : NULL;
    offset += align_up(dim * 4);
    w->bq = w->bk = w->bv = NULL;
    if (c->attention_bias) {
        w->bq = base ? (const float *)(base + offset) : NULL;
        offset += align_up(layers * dim * 4);
        w->bk = base ? (const float *)(base + offset) : NULL;
        offset += align_up(layers * kv_dim * 4);
        w->bv = base ? (const float *)(base + offset) : NULL;
        offset += align_up(layers * kv_dim * 4);
    }
    w->tok_embeddings = map_matrix(base, &offset, vocab * dim, c);
    w->wq = map_matrix(base, &offset, layers * dim * dim, c);
    w->wk = map_matrix(base, &offset, layers * kv_dim * dim, c);
    w->wv = map_matrix(base, &offset, layers * kv_dim * dim, c);
    w->wo = map_matrix(base, &offset, layers * dim * dim, c);
    w->w1 = map_matrix(base, &offset, layers * hidden * dim, c);
    w->w2 = map_matrix(base, &offset, layers * dim * hidden, c);
    w->w3 = map_matrix(base, &offset, layers * hidden * dim, c);
    w->wcls = c->tied ? w->tok_embeddings : map_matrix(base, &offset, vocab * dim, c);
    return offset;
}


// Read and check the header; every field is bounded so that sizes below cannot overflow.
static void read_config(Config *c, const unsigned char *h, size_t file_size, const char *path) {
    memset(c, 0, sizeof(*c));
    if (memcmp(h, MODEL_MAGIC, 4) != 0)
        fail("%s is not a nanollama model file (no \"NLLM\" magic at its start); write one with export.py", path);
    int version = read_i32(h + 4);
    if (version < 1 || version > MODEL_VERSION)
        fail("%s: model file version %d, this run.c reads versions 1 to %d; export the model again with the export.py "
             "beside this run.c", path, version, MODEL_VERSION);
    c->dim = read_i32(h + 8);
    c->hidden_dim = read_i32(h + 12);
    c->n_layers = read_i32(h + 16);
    c->n_heads = read_i32(h + 20);
    c->n_kv_heads = read_i32(h + 24);
    c->vocab_size = read_i32(h + 28);
    c->seq_len = read_i32(h + 32);
    c->rope_theta = read_f32(h + 36);
    c->norm_eps = read_f32(h + 40);
    c->tied = read_i32(h + 44);
    c->weight_type = read_i32(h + 48);
    c->group_size = read_i32(h + 52);
    c->tokenizer_id = read_u64(h + 56);
    uint64_t recorded_size = read_u64(h + 64);
    if (version >= 2) {  // (zero in version 1: plain attention and RoPE)
        c->attention_bias = read_i32(h + 72);
        c->rope_scaling = read_f32(h + 76);
        c->rope_low_freq_factor = read_f32(h + 80);
        c->rope_high_freq_factor = read_f32(h + 84);
        c->rope_original_max_seq_len = read_i32(h + 88);
    }
    const char *bad = NULL;
    if (c->dim <= 0 || c->dim > 65536) bad = "dim";
    else if (c->hidden_dim <= 0 || c->hidden_dim > 262144) bad = "hidden_dim";
    else if (c->n_layers <= 0 || c->n_layers > 1024) bad = "n_layers";
    else if (c->n_heads <= 0 || c->dim % c->n_heads != 0 || (c->dim / c->n_heads) % 2 != 0) bad = "n_heads";
    else if (c->n_kv_heads <= 0 || c->n_heads % c->n_kv_heads != 0) bad = "n_kv_heads";
    else if (c->vocab_size <= 0 || c->vocab_size > (1 << 22)) bad = "vocab_size";
    else if (c->seq_len <= 0 || c->seq_len > (1 << 20)) bad = "max_seq_len";
    else if (!(c->rope_theta > 0.0f) || !isfinite(c->rope_theta)) bad = "rope_theta";
    else if (!(c->norm_eps >= 0.0f) || !isfinite(c->norm_eps)) bad = "norm_eps";
    else if (c->tied != 0 && c->tied != 1) bad = "tied";
    else if (c->weight_type != 0 && c->weight_type != 1) bad = "weight_type";
    else if (c->weight_type == 0 && c->group_size != 0) bad = "group_size";
    else if (c->weight_type == 1 && (c->group_size <= 0 || c->dim % c->group_size || c->hidden_dim % c->group_size))
        bad = "group_size";
    else if (c->attention_bias != 0 && c->attention_bias != 1) bad = "attention_bias";
    else if (!(c->rope_scaling >= 0.0f) || !isfinite(c->rope_scaling)) bad = "rope_scaling";
    else if (c->rope_scaling > 0.0f && !(c->rope_low_freq_factor > 0.0f && isfinite(c->rope_high_freq_factor) &&
                                         c->rope_high_freq_factor > c->rope_low_freq_factor &&
                                         c->rope_original_max_seq_len > 0))
        bad = "RoPE scaling factors";
    if (bad) fail("%s: the header has an invalid %s; the file is corrupt (export it again)", path, bad);
    Weights w;
    uint64_t expected_size = map_weights(&w, NULL, c);
    if (recorded_size != file_size || expected_size != file_size)
        fail("%s: the file has %zu bytes but its header describes %llu (records %llu); it is truncated or corrupt",
             path, file_size, (unsigned long long)expected_size, (unsigned long long)recorded_size);
}

/*
The rotation frequency of pair i of a head: theta^(-2i/head_dim). Llama 3.1's scaling (model.llama3_scaled_frequencies)
divides the frequencies whose wavelength is longer than original_max_seq_len / low_freq_factor by rope_scaling, keeps
those shorter than original_max_seq_len / high_freq_factor, and blends the two in between. In double, as model.py.
*/
static double rope_frequency(const Config *c, int i, int head_dim) {
    double frequency = 1.0 / pow((double)c->rope_theta, (double)(2 * i) / head_dim);
    if (c->rope_scaling == 0.0f) return frequency;
    double wavelength = 2 * 3.141592653589793 / frequency;
    double blend = ((double)c->rope_original_max_seq_len / wavelength - c->rope_low_freq_factor) /
                   ((double)c->rope_high_freq_factor - c->rope_low_freq_factor);  // 0: scaled .. 1: kept
    blend = blend < 0.0 ? 0.0 : blend > 1.0 ? 1.0 : blend;
    return (1 - blend) * (frequency / c->rope_scaling) + blend * frequency;
}

static void alloc_run_state(RunState *s, const Config *c, int block) {
    int kv_dim = c->dim / c->n_heads * c->n_kv_heads, head_dim = c->dim / c->n_heads;
    size_t widest = (size_t)block * (c->dim > c->hidden_dim ? c->dim : c->hidden_dim);
    s->block = block;
    s->x = xmalloc((size_t)block * c->dim * sizeof(float));
    s->xb = xmalloc((size_t)block * c->dim * sizeof(float));
    s->xb2 = xmalloc((size_t)block * c->dim * sizeof(float));
    s->hb = xmalloc((size_t)block * c->hidden_dim * sizeof(float));
    s->hb2 = xmalloc((size_t)block * c->hidden_dim * sizeof(float));
    s->q = xmalloc((size_t)block * c->dim * sizeof(float));
    s->k = xmalloc((size_t)block * kv_dim * sizeof(float));
    s->v = xmalloc((size_t)block * kv_dim * sizeof(float));
    s->att = xmalloc((size_t)c->n_heads * c->seq_len * sizeof(float));
    s->logits = xmalloc(c->vocab_size * sizeof(float));
    s->key_cache = xmalloc((size_t)c->n_layers * c->seq_len * kv_dim * sizeof(float));
    s->value_cache = xmalloc((size_t)c->n_layers * c->seq_len * kv_dim * sizeof(float));
    s->xq.q = xmalloc(widest);
    s->xq.s = xmalloc((c->group_size ? widest / c->group_size : 1) * sizeof(float));
    // RoPE angles pos * frequency, in double then rounded, as model.py precomputes them
    s->rope_cos = xmalloc((size_t)c->seq_len * (head_dim / 2) * sizeof(float));
    s->rope_sin = xmalloc((size_t)c->seq_len * (head_dim / 2) * sizeof(float));
    for (int pos = 0; pos < c->seq_len; pos++) {
        for (int i = 0; i < head_dim / 2; i++) {
            double angle = (double)pos * rope_frequency(c, i, head_dim);
            s->rope_cos[(size_t)pos * (head_dim / 2) + i] = (float)cos(angle);
            s->rope_sin[(size_t)pos * (head_dim / 2) + i] = (float)sin(angle);
        }
    }
}

static void free_run_state(RunState *s) {
    free(s->x); free(s->xb); free(s->xb2); free(s->hb); free(s->hb2); free(s->q); free(s->att);
    free(s->logits); free(s->k); free(s->v); free(s->key_cache); free(s->value_cache); free(s->xq.q); free(s->xq.s);
    free(s->rope_cos); free(s->rope_sin);
}

static void build_transformer(Transformer *t, const char *path, int block) {
    int fd = open(path, O_RDONLY);
    if (fd == -1) fail("cannot open model file %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) fail("cannot read model file %s: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode))
        fail("model file %s is %s; expected the file export.py writes", path,
             S_ISDIR(st.st_mode) ? "a directory" : "not a regular file");
    size_t size = (size_t)st.st_size;
    if (size < MODEL_HEADER_BYTES)
        fail("%s has %zu bytes, fewer than the %d-byte header of a model file; it is truncated or not a model file",
             path, size, MODEL_HEADER_BYTES);
    void *data = map_file_huge(fd, size);  // 2 MB pages where the kernel can (speed section)
    if (!data) data = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (data == MAP_FAILED) fail("cannot mmap %s: %s", path, strerror(errno));
    read_config(&t->config, data, size, path);
    map_weights(&t->weights, data, &t->config);
    t->data = data;
    t->file_size = size;
    t->path = path;
    alloc_run_state(&t->state, &t->config, block < t->config.seq_len ? block : t->config.seq_len);
}

static void free_transformer(Transformer *t) {
    munmap(t->data, t->file_size);
    free_run_state(&t->state);
}

// ----------------------------------------------------------------------------
// the BPE tokenizer

#define TOKENIZER_MAGIC "NLTK"
#define TOKENIZER_VERSION 2  // version 1 files (GPT-4's pre-split, every byte a token) are read too
#define TOKENIZER_HEADER_BYTES 64

enum { CLASS_LETTER, CLASS_NUMBER, CLASS_SPACE };

// the pre-split patterns of tokenizer.py (see chunk_end)
enum { SPLIT_GPT4, SPLIT_QWEN2, SPLIT_GPT2, SPLIT_SMOLLM2, N_SPLITS };

typedef struct {
    int vocab_size;
    int bos_id;
    int max_token_bytes;
    uint64_t id;                    // ties it to a model file
    int split;                      // SPLIT_*
    int unk_id;                     // the token for a run of bytes that have no token, or -1: such bytes are left out
    const char *default_system;     // the system message of the chat template when -y gives none ("" none)
    const uint32_t *ranges[3];      // per class: inclusive (first, last) code point pairs, sorted
    int n_ranges[3];
    const unsigned char **pieces;   // (vocab_size,) each token's bytes
    int *lengths;                   // (vocab_size,)
    unsigned char *kinds;           // (vocab_size,) 0 ordinary, 1 special, 2 unused
    int *table;                     // open-addressing hash table: bytes -> ordinary token id, -1 empty
    uint32_t table_mask;
    unsigned char has_byte[256];    // 1 where the byte is a token of its own (real vocabularies lack a few)
    unsigned char *data;            // the whole file
} Tokenizer;

static uint32_t hash_bytes(const unsigned char *s, int n) {
    uint32_t h = 2166136261u;  // FNV-1a
    for (int i = 0; i < n; i++) { h ^= s[i]; h *= 16777619u; }
    return h;
}

// the id of the ordinary token with these bytes, or -1; an ordinary token's id is its merge rank
static int lookup(const Tokenizer *t, const unsigned char *s, int n) {
    for (uint32_t i = hash_bytes(s, n) & t->table_mask;; i = (i + 1) & t->table_mask) {
        int id = t->table[i];
        if (id < 0) return -1;
        if (t->lengths[id] == n && memcmp(t->pieces[id], s, n) == 0) return id;
    }
}

static int special_id(const Tokenizer *t, const char *name) {
    int n = (int)strlen(name);
    for (int i = 0; i < t->vocab_size; i++)
        if (t->kinds[i] == 1 && t->lengths[i] == n && memcmp(t->pieces[i], name, n) == 0) return i;
    return -1;
}

static void build_tokenizer(Tokenizer *t, const char *path) {
    size_t size;
    unsigned char *data = (unsigned char *)read_file(path, "tokenizer file", &size);
    if (size < TOKENIZER_HEADER_BYTES)
        fail("%s has %zu bytes, fewer than the %d-byte header of a tokenizer file; it is truncated or not one",
             path, size, TOKENIZER_HEADER_BYTES);
    if (memcmp(data, TOKENIZER_MAGIC, 4) != 0)
        fail("%s is not a nanollama tokenizer file (no \"NLTK\" magic); export.py writes one beside the model", path);
    int version = read_i32(data + 4);
    if (version < 1 || version > TOKENIZER_VERSION)
        fail("%s: tokenizer file version %d, this run.c reads versions 1 to %d; export it again with the export.py "
             "beside this run.c", path, version, TOKENIZER_VERSION);
    t->vocab_size = read_i32(data + 8);
    t->bos_id = read_i32(data + 12);
    t->max_token_bytes = read_i32(data + 20);
    t->id = read_u64(data + 24);
    t->split = version >= 2 ? read_i32(data + 44) : SPLIT_GPT4;
    t->unk_id = version >= 2 ? read_i32(data + 48) : -1;
    int system_bytes = version >= 2 ? read_i32(data + 52) : 0;
    if (t->vocab_size <= 0 || t->vocab_size > (1 << 22) || t->bos_id < 0 || t->bos_id >= t->vocab_size ||
        t->max_token_bytes < 0 || t->max_token_bytes > (1 << 20) || t->split < 0 || t->split >= N_SPLITS ||
        t->unk_id < -1 || t->unk_id >= t->vocab_size || system_bytes < 0 || (size_t)system_bytes > size)
        fail("%s: the header is corrupt (vocab_size %d, bos_id %d, split %d, unk_id %d)", path, t->vocab_size,
             t->bos_id, t->split, t->unk_id);
    size_t offset = TOKENIZER_HEADER_BYTES, end = size - (size_t)system_bytes;  // the system message is last
    for (int c = 0; c < 3; c++) {
        int n = read_i32(data + 32 + 4 * c);
        if (n < 0 || offset > end || (size_t)n * 8 > end - offset)
            fail("%s: truncated or corrupt (Unicode tables)", path);
        t->n_ranges[c] = n;
        t->ranges[c] = (const uint32_t *)(data + offset);  // offsets are multiples of 4: aligned
        offset += (size_t)n * 8;
    }
    t->pieces = xmalloc(t->vocab_size * sizeof(unsigned char *));
    t->lengths = xmalloc(t->vocab_size * sizeof(int));
    t->kinds = xmalloc(t->vocab_size);
    for (int i = 0; i < t->vocab_size; i++) {
        if (end - offset < 5) fail("%s: truncated (token %d of %d)", path, i, t->vocab_size);
        unsigned char kind = data[offset];
        uint32_t length;
        memcpy(&length, data + offset + 1, 4);
        offset += 5;
        if (kind > 2 || length > (uint32_t)t->max_token_bytes || length > end - offset)
            fail("%s: truncated or corrupt (token %d of %d)", path, i, t->vocab_size);
        t->kinds[i] = kind;
        t->lengths[i] = (int)length;
        t->pieces[i] = data + offset;
        offset += length;
    }
    if (offset != end) fail("%s: %zu unexpected bytes after the last token; the file is corrupt", path, end - offset);
    t->default_system = (const char *)data + end;  // (read_file ends the data with a NUL)
    if (strlen(t->default_system) != (size_t)system_bytes) fail("%s: the default system message is corrupt", path);
    uint32_t table_size = 1;
    while (table_size < 2u * (uint32_t)t->vocab_size) table_size <<= 1;
    t->table = xmalloc(table_size * sizeof(int));
    t->table_mask = table_size - 1;
    memset(t->table, 0xff, table_size * sizeof(int));
    for (int id = 0; id < t->vocab_size; id++) {
        if (t->kinds[id] != 0) continue;
        if (lookup(t, t->pieces[id], t->lengths[id]) >= 0) fail("%s: token %d appears twice; corrupt", path, id);
        uint32_t i = hash_bytes(t->pieces[id], t->lengths[id]) & t->table_mask;
        while (t->table[i] >= 0) i = (i + 1) & t->table_mask;
        t->table[i] = id;
    }
    for (int b = 0; b < 256; b++) {
        unsigned char byte = (unsigned char)b;
        t->has_byte[b] = lookup(t, &byte, 1) >= 0;
    }
    if (t->kinds[t->bos_id] != 1) fail("%s: bos_id %d is not a special token; corrupt", path, t->bos_id);
    if (t->unk_id >= 0 && t->kinds[t->unk_id] != 1)
        fail("%s: unk_id %d is not a special token; corrupt", path, t->unk_id);
    t->data = data;
}

static void free_tokenizer(Tokenizer *t) {
    free(t->pieces); free(t->lengths); free(t->kinds); free(t->table); free(t->data);
}

// --- the pre-split, on code points ---

static int in_class(const Tokenizer *t, int class, uint32_t cp) {
    if (cp < 128) {  // ASCII fast path
        if (class == CLASS_LETTER) return (cp | 32) >= 'a' && (cp | 32) <= 'z';
        if (class == CLASS_NUMBER) return cp >= '0' && cp <= '9';
        return cp == ' ' || (cp >= 9 && cp <= 13);
    }
    const uint32_t *r = t->ranges[class];
    int lo = 0, hi = t->n_ranges[class] - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        uint32_t first, last;
        memcpy(&first, r + 2 * mid, 4);
        memcpy(&last, r + 2 * mid + 1, 4);
        if (cp < first) hi = mid - 1;
        else if (cp > last) lo = mid + 1;
        else return 1;
    }
    return 0;
}

// decode UTF-8; an invalid byte becomes one code point of its own (0xFFFD) so nothing is lost
static int utf8_decode(const unsigned char *s, int n, uint32_t *cp) {
    unsigned char c = s[0];
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || len > n) { *cp = 0xFFFD; return 1; }
    uint32_t v = len == 1 ? c : c & (0x7F >> len);
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) { *cp = 0xFFFD; return 1; }
        v = (v << 6) | (s[i] & 0x3F);
    }
    *cp = v;
    return len;
}

/*
Where the chunk starting at code point i ends (exclusive), following the tokenizer's pre-split pattern alternative by
alternative, as the regex engine tries them:
    GPT-4 (ours)  '(?i:[sdmt]|ll|ve|re) | [^\r\n\p{L}\p{N}]?+\p{L}+ | \p{N}{1,3} | ?[^\s\p{L}\p{N}]++[\r\n]* |
                  \s*[\r\n] | \s+(?!\S) | \s+
                  Llama 3's pattern is written differently (quantifiers that are not possessive, \s*[\r\n]+) and ends
                  every chunk at the same place: what could be given back never matches what follows
    Qwen2         Llama 3's with \p{N} instead of \p{N}{1,3}: a digit is a chunk
    GPT-2         's|'t|'re|'ve|'m|'ll|'d | ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+ | \s+(?!\S) | \s+
    SmolLM2       GPT-2's with \p{N} (a digit is a chunk) and \s+(?![^\s\p{N}]) (all the whitespace before a digit)
The case-insensitive contractions match ASCII letters only (the regex engines would also fold a few exotic letters,
e.g. U+017F into s).
*/
static int chunk_end(const Tokenizer *t, const uint32_t *cp, int n, int i) {
#define IS_L(c) in_class(t, CLASS_LETTER, c)
#define IS_N(c) in_class(t, CLASS_NUMBER, c)
#define IS_S(c) in_class(t, CLASS_SPACE, c)
#define IS_NL(c) ((c) == '\r' || (c) == '\n')
    int gpt2 = t->split == SPLIT_GPT2 || t->split == SPLIT_SMOLLM2;
    int max_digits = t->split == SPLIT_GPT4 ? 3 : t->split == SPLIT_GPT2 ? n : 1;
    if (cp[i] == '\'' && i + 1 < n && cp[i + 1] < 128) {  // contractions (GPT-2: lower case only)
        uint32_t a = gpt2 ? cp[i + 1] : (uint32_t)tolower((int)cp[i + 1]);
        if (a == 's' || a == 'd' || a == 'm' || a == 't') return i + 2;
        if (i + 2 < n && cp[i + 2] < 128) {
            uint32_t b = gpt2 ? cp[i + 2] : (uint32_t)tolower((int)cp[i + 2]);
            if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) return i + 3;
        }
    }
    int j = i;  // letters, after one character that is not \r \n a letter or a digit (GPT-2: after a space)
    if (gpt2 ? cp[i] == ' ' : !IS_NL(cp[i]) && !IS_L(cp[i]) && !IS_N(cp[i])) j++;  // possessive: never given back
    if (j < n && IS_L(cp[j])) {
        while (j < n && IS_L(cp[j])) j++;
        return j;
    }
    j = i + (t->split == SPLIT_GPT2 && cp[i] == ' ');  // digits (GPT-2: after a space, too)
    if (j < n && IS_N(cp[j])) {
        int start = j;
        while (j < n && j - start < max_digits && IS_N(cp[j])) j++;
        return j;
    }
    j = i + (cp[i] == ' ');  // other symbols after a space, and (GPT-4) the line breaks after them
    int k = j;
    while (k < n && !IS_S(cp[k]) && !IS_L(cp[k]) && !IS_N(cp[k])) k++;
    if (k > j) {
        while (!gpt2 && k < n && IS_NL(cp[k])) k++;
        return k;
    }
    int end = i;
    while (end < n && IS_S(cp[end])) end++;  // the whitespace run [i, end)
    for (int p = end - 1; !gpt2 && p >= i; p--) if (IS_NL(cp[p])) return p + 1;  // \s*[\r\n]
    if (end == n) return end;                                    // \s+(?!\S) at the end of the text
    if (t->split == SPLIT_SMOLLM2 && IS_N(cp[end])) return end;  // \s+(?![^\s\p{N}]): all of it before a digit
    if (end - i >= 2) return end - 1;                            // \s+(?!\S): leave one space for the next word
    return end > i ? end : i + 1;                                // \s+
#undef IS_L
#undef IS_N
#undef IS_S
#undef IS_NL
}

// byte-level BPE of one chunk: merge the adjacent pair with the lowest rank until none is a token
static int bpe_chunk(const Tokenizer *t, const unsigned char *s, int n, int *out, int *starts, int *ranks) {
    int whole = lookup(t, s, n);
    if (whole >= 0) { out[0] = whole; return 1; }
    int parts = n;  // part p is s[starts[p] .. starts[p + 1])
    for (int p = 0; p <= n; p++) starts[p] = p;
    for (int p = 0; p + 1 < parts; p++) ranks[p] = lookup(t, s + starts[p], starts[p + 2] - starts[p]);
    for (;;) {
        int best = -1;
        for (int p = 0; p + 1 < parts; p++)
            if (ranks[p] >= 0 && (best < 0 || ranks[p] < ranks[best])) best = p;
        if (best < 0) break;
        // part best absorbs part best + 1; the pairs after it shift down by one
        memmove(starts + best + 1, starts + best + 2, (parts - best - 1) * sizeof(int));
        if (parts - best - 3 > 0) memmove(ranks + best + 1, ranks + best + 2, (parts - best - 3) * sizeof(int));
        parts--;
        if (best > 0) ranks[best - 1] = lookup(t, s + starts[best - 1], starts[best + 1] - starts[best - 1]);
        if (best + 1 < parts) ranks[best] = lookup(t, s + starts[best], starts[best + 2] - starts[best]);
    }
    for (int p = 0; p < parts; p++) out[p] = lookup(t, s + starts[p], starts[p + 1] - starts[p]);  // (all tokens)
    return parts;
}

/*
The tokens of one chunk. A byte that is no token of its own (SmolLM2's vocabulary has none for 0x04, 0xC0 and 19
others) is left out and the rest of the chunk is merged as if it was not there, as tokenizer.py does after Hugging
Face's BPE; with an unk token, that token stands for each run of such bytes instead, between the merged parts.
*/
static int encode_chunk(const Tokenizer *t, const unsigned char *s, int n, int *out, int *starts, int *ranks,
                        unsigned char *kept) {
    int n_out = 0, n_kept = 0;
    for (int b = 0; b < n; b++) {
        if (t->has_byte[s[b]]) { kept[n_kept++] = s[b]; continue; }
        if (t->unk_id < 0 || (b > 0 && !t->has_byte[s[b - 1]])) continue;  // left out, or the run has its unk
        if (n_kept) n_out += bpe_chunk(t, kept, n_kept, out + n_out, starts, ranks);
        n_kept = 0;
        out[n_out++] = t->unk_id;
    }
    if (n_kept) n_out += bpe_chunk(t, kept, n_kept, out + n_out, starts, ranks);
    return n_out;
}

// text -> token ids (no <|bos|>); returns how many were written to *ids (malloc'd)
static int encode(const Tokenizer *t, const char *text, int **ids) {
    const unsigned char *s = (const unsigned char *)text;
    int n_bytes = (int)strlen(text);
    uint32_t *cp = xmalloc((n_bytes + 1) * sizeof(uint32_t));
    int *offsets = xmalloc((n_bytes + 1) * sizeof(int));  // byte offset of each code point
    int n = 0;
    for (int b = 0; b < n_bytes; n++) {
        offsets[n] = b;
        b += utf8_decode(s + b, n_bytes - b, &cp[n]);
    }
    offsets[n] = n_bytes;
    *ids = xmalloc((n_bytes + 1) * sizeof(int));
    int *starts = xmalloc((n_bytes + 2) * sizeof(int)), *ranks = xmalloc((n_bytes + 1) * sizeof(int));
    unsigned char *kept = xmalloc(n_bytes + 1);
    int n_ids = 0;
    for (int i = 0; i < n;) {
        int end = chunk_end(t, cp, n, i);
        n_ids += encode_chunk(t, s + offsets[i], offsets[end] - offsets[i], *ids + n_ids, starts, ranks, kept);
        i = end;
    }
    free(cp); free(offsets); free(starts); free(ranks); free(kept);
    return n_ids;
}

// ----------------------------------------------------------------------------
// the sampler: greedy, or temperature + top-p with a seeded generator

typedef struct {
    int vocab_size;
    float temperature;  // 0 = greedy
    float topp;         // 1.0 = off
    uint64_t rng_state;
} Sampler;

static uint32_t random_u32(uint64_t *state) {  // xorshift64*
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float random_f32(uint64_t *state) { return (random_u32(state) >> 8) / 16777216.0f; }  // [0, 1)

static int argmax(const float *x, int n) {
    int best = 0;  // the first maximum, as torch.argmax
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

// the first token whose cumulative probability passes coin; whole blocks are skipped by their (vectorized) sums,
// since a running sum over 32000 tokens is a chain of 32000 dependent additions
static int sample_from(const float *probs, int n, float coin) {
    float cdf = 0.0f;
    int i = 0;
    for (float block; i + 256 <= n && coin >= cdf + (block = sum_of(probs + i, 256)); i += 256) cdf += block;
    for (; i < n; i++) { cdf += probs[i]; if (coin < cdf) return i; }
    return n - 1;  // rounding
}

// total probability and number of the tokens >= threshold (a branch-free loop the compiler vectorizes)
static float mass_at_least(const float *probs, int n, float threshold, int *count) {
    float mass = 0.0f;
    int k = 0;
    #pragma omp simd reduction(+:mass, k)
    for (int i = 0; i < n; i++) { mass += probs[i] >= threshold ? probs[i] : 0.0f; k += probs[i] >= threshold; }
    *count = k;
    return mass;
}

static float float_of_bits(uint32_t bits) { float f; memcpy(&f, &bits, 4); return f; }
static uint32_t bits_of_float(float f) { uint32_t bits; memcpy(&bits, &f, 4); return bits; }

// is token i in the nucleus: above the threshold, or equal to it and not after the last tie taken
static inline int in_nucleus(float p, int i, float threshold, int last_tie) {
    return p > threshold || (p == threshold && i <= last_tie);
}

static float nucleus_mass(const float *probs, int from, int to, float threshold, int last_tie) {
    float mass = 0.0f;
    #pragma omp simd reduction(+:mass)
    for (int i = from; i < to; i++) mass += in_nucleus(probs[i], i, threshold, last_tie) ? probs[i] : 0.0f;
    return mass;
}

// the ids of the tokens with lo <= p < hi, at most `max` of them; blocks holding none are skipped by a vectorized count
static int tokens_between(const float *probs, int n, float lo, float hi, int *ids, int max) {
    int found = 0;
    for (int start = 0; start < n; start += 32) {
        int end = start + 32 < n ? start + 32 : n, hits = 0;
        #pragma omp simd reduction(+:hits)
        for (int i = start; i < end; i++) hits += (probs[i] >= lo) & (probs[i] < hi);  // & not &&: no branch
        for (int i = start; hits && i < end && found < max; i++) if (probs[i] >= lo && probs[i] < hi) ids[found++] = i;
    }
    return found;
}

#define TOPP_FEW 64  // bisection stops once this few tokens are left around the boundary; they are sorted instead

/*
Top-p without sorting the vocabulary. The nucleus boundary is the smallest probability t such that the tokens >= t
hold at least p of the mass; the nucleus is every token > t plus, among those equal to t, as many as needed in id
order (what a stable sort by probability would take). t is found by bisection: positive floats order like their bit
patterns, so each vectorized pass over the probabilities halves a range [lo, hi) of bit patterns that holds t, and
counts the tokens in it. The search starts at (1 - p) / (n - 1), below which no token can be in the nucleus
(llama2.c's cutoff). Once at most TOPP_FEW tokens lie in the range, they are copied out, sorted by probability, and
t is read off their running mass: 11 passes on the flat logits of a random 32000-token model, 1 on peaked ones,
where bisecting down to a single bit pattern took ~26. Ties that keep more than TOPP_FEW tokens in the range are
bisected to the end. The nucleus is then sampled in id order, skipping whole blocks by their nucleus mass as
sample_from does.
*/
static int sample_topp(const float *probs, int n, float topp, float coin) {
    float max_prob = max_of(probs, n), cutoff = n > 1 ? (1.0f - topp) / (n - 1) : 0.0f;
    uint32_t lo = cutoff < max_prob ? bits_of_float(cutoff) : 0, hi = bits_of_float(max_prob) + 1;
    int count_lo = n, count_hi = 0, count;  // count_lo >= the number of tokens >= lo (exact once lo has moved)
    float mass_hi = 0.0f;                   // the mass of the tokens >= hi
    while (hi - lo > 1 && count_lo - count_hi > TOPP_FEW) {  // mass(>= lo) >= topp > mass(>= hi)
        uint32_t mid = lo + (hi - lo) / 2;
        float mass = mass_at_least(probs, n, float_of_bits(mid), &count);
        if (mass >= topp) { lo = mid; count_lo = count; }
        else { hi = mid; count_hi = count; mass_hi = mass; }
    }
    float threshold, mass;
    int last_tie = -1;
    if (hi - lo == 1) {  // t = lo exactly: take the tokens > t, then ties at t in id order until the mass is reached
        threshold = float_of_bits(lo);
        mass = mass_at_least(probs, n, float_of_bits(hi), &count);
        for (int i = 0; i < n && mass < topp; i++) if (probs[i] == threshold) { mass += probs[i]; last_tie = i; }
    } else {  // few tokens left in [lo, hi): add them to mass_hi from the most probable (first id among equals)
        int ids[TOPP_FEW];
        int few = tokens_between(probs, n, float_of_bits(lo), float_of_bits(hi), ids, TOPP_FEW);
        for (int a = 1; a < few; a++) {  // insertion sort by probability, descending; ids stay ascending among ties
            int id = ids[a], b = a;
            for (; b > 0 && probs[ids[b - 1]] < probs[id]; b--) ids[b] = ids[b - 1];
            ids[b] = id;
        }
        mass = mass_hi;
        threshold = few ? probs[ids[few - 1]] : float_of_bits(lo);  // (rounding: the sum fell short, take them all)
        last_tie = few ? ids[few - 1] : -1;
        for (int a = 0; a < few; a++) {
            mass += probs[ids[a]];
            if (mass >= topp) { threshold = probs[ids[a]]; last_tie = ids[a]; break; }
        }
    }
    if (!(mass > 0.0f)) return argmax(probs, n);  // NaN probabilities
    float r = coin * mass, cdf = 0.0f;
    int i = 0;
    for (float block; i + 256 <= n && r >= cdf + (block = nucleus_mass(probs, i, i + 256, threshold, last_tie));
         i += 256)
        cdf += block;
    for (; i < n; i++) {
        if (!in_nucleus(probs[i], i, threshold, last_tie)) continue;
        cdf += probs[i];
        if (r < cdf) return i;
    }
    for (i = n - 1; i > 0 && !in_nucleus(probs[i], i, threshold, last_tie); i--) {}
    return i;  // rounding: the last token of the nucleus
}

static int sample(Sampler *sampler, float *logits) {
    if (sampler->temperature == 0.0f) return argmax(logits, sampler->vocab_size);
    for (int i = 0; i < sampler->vocab_size; i++) logits[i] /= sampler->temperature;
    softmax(logits, sampler->vocab_size);
    float coin = random_f32(&sampler->rng_state);
    if (sampler->topp <= 0.0f || sampler->topp >= 1.0f) return sample_from(logits, sampler->vocab_size, coin);
    return sample_topp(logits, sampler->vocab_size, sampler->topp, coin);
}

// ----------------------------------------------------------------------------
// the calculator: what chat mode answers a tool call with

/*
The model calls the calculator by writing <|python_start|>expression<|python_end|>; chat mode then evaluates the
expression and forces <|output_start|>result<|output_end|> into the sequence, as engine.py does (the model continues
from there). This is engine.calculator's arithmetic, with its limits and its result text:
    numbers (1_000, 2.5, 1e3, thousands separators as in 1,200), + - * / // % ** with Python's precedence and
    floor rules, parentheses, unary + and -; at most 200 characters and 100 syntax-tree nodes, exponents up to
    1000, results below 10^200; integers print as integers, floats rounded to 6 decimals as Python's repr prints
    them, and what goes wrong as the same "error: ..." text (division by zero, a syntax error, a tuple, ...).
Names and calls get engine.py's errors too (Name not allowed, len() takes a string, ...). Where it differs:
Python's integers have any size, these have 64 bits, so an integer beyond 2^63 answers "error: result too large"
(Python prints it, up to 200 digits); a true division of integers beyond 2^53 may differ in its last bit; hex and
complex literals are syntax errors; and strings, Python's keywords and other operators (engine.py's len('...') and
string methods, comparisons) answer "error: run.c's calculator does arithmetic only".
*/
#define CALC_MAX_CHARS 200     // engine.MAX_EXPRESSION_CHARS
#define CALC_MAX_NODES 100     // engine.MAX_NODES, counted as Python's ast.walk counts them
#define CALC_MAX_EXPONENT 1000 // engine.MAX_EXPONENT
#define CALC_MAX_DIGITS 200    // engine.MAX_RESULT_DIGITS

typedef struct {
    int is_float;
    int64_t i;
    double f;
} Number;

enum { TOKEN_NUMBER, TOKEN_NAME, TOKEN_OP, TOKEN_END };
enum { NODE_NUMBER, NODE_NAME, NODE_TUPLE, NODE_CALL, NODE_UNARY, NODE_BINARY };

typedef struct {
    int kind;        // NODE_*
    char op[3];      // the operator: "+", "-", "*", "/", "//", "%", "**"
    int left, right; // operands; a call: the function and its first argument, n_args of them
    int n_args;
    Number value;    // NODE_NUMBER
    int too_large;   // NODE_NUMBER: an integer literal beyond 64 bits
    const char *name;  // NODE_NAME: its evaluation error (names are never looked up)
    int is_len;      // NODE_NAME: it is len
} Node;

typedef struct {
    int kind;        // TOKEN_*
    char op[3];
    Number value;
    int too_large;
    char name[16];   // TOKEN_NAME: a name, or the start of a long one
} CalcToken;

typedef struct {
    CalcToken tokens[CALC_MAX_CHARS + 1];
    int n_tokens, at;
    Node nodes[2 * CALC_MAX_CHARS + 2];
    int n_nodes, python_nodes;  // python_nodes: Python's count (an operator is a node of its own)
    int bad;                    // 1 once the expression is not valid Python
} Calc;

static int is_digit(uint32_t c) { return c >= '0' && c <= '9'; }
static int is_name_char(uint32_t c) { return c >= 128 || isalnum((int)c) || c == '_'; }  // (after a number)

// Python's str.isspace, which str.strip() removes
static int is_python_space(uint32_t c) {
    return (c >= 9 && c <= 13) || (c >= 28 && c <= 32) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// a digit part as Python writes it: digits with single underscores between them; returns its end, or -1
static int digit_part(const uint32_t *cp, int n, int i) {
    if (i >= n || !is_digit(cp[i])) return -1;
    while (i < n && (is_digit(cp[i]) || (cp[i] == '_' && i + 1 < n && is_digit(cp[i + 1])))) i++;
    return i < n && cp[i] == '_' ? -1 : i;
}

// Split the code points into tokens. Returns NULL, or the error: not valid Python, or outside arithmetic.
static const char *calc_lex(Calc *k, const Tokenizer *tok, const uint32_t *cp, int n) {
    int depth = 0;
    k->n_tokens = 0;
    for (int i = 0; i < n;) {
        uint32_t c = cp[i];
        if (c == ' ' || c == '\t' || c == '\f') { i++; continue; }
        if (c == '#') { while (i < n && cp[i] != '\n' && cp[i] != '\r') i++; continue; }  // a comment
        if (c == '\\' && i + 1 < n && (cp[i + 1] == '\n' || cp[i + 1] == '\r')) {  // a line continuation
            i += cp[i + 1] == '\r' && i + 2 < n && cp[i + 2] == '\n' ? 3 : 2;
            continue;
        }
        if (c == '\n' || c == '\r') {  // a line break ends the expression, except inside parentheses
            if (depth == 0) return "not a valid expression";
            i++;
            continue;
        }
        if (c < 32 || c == 127 || c == '\\') return "not a valid expression";  // (control characters, a lone \)
        if (c == '$' || c == '?' || c == '`' || c == ';' || (c == '!' && !(i + 1 < n && cp[i + 1] == '=')) ||
            (c == '=' && !(i + 1 < n && cp[i + 1] == '=')))
            return "not a valid expression";  // never valid here, as in 4 * 6 = 24 (a lone = needs a name before it)
        if (c >= 128 && !in_class(tok, CLASS_LETTER, c)) return "not a valid expression";  // e.g. 4 × 6
        CalcToken *t = &k->tokens[k->n_tokens++];
        memset(t, 0, sizeof(*t));
        if (is_digit(c) || (c == '.' && i + 1 < n && is_digit(cp[i + 1]))) {
            int start = i, is_float = 0;
            if (c != '.' && (i = digit_part(cp, n, i)) < 0) return "not a valid expression";
            if (i < n && cp[i] == '.') {
                is_float = 1;
                i++;
                if (i < n && is_digit(cp[i]) && (i = digit_part(cp, n, i)) < 0) return "not a valid expression";
            }
            if (i < n && (cp[i] == 'e' || cp[i] == 'E')) {
                is_float = 1;
                i++;
                if (i < n && (cp[i] == '+' || cp[i] == '-')) i++;
                if ((i = digit_part(cp, n, i)) < 0) return "not a valid expression";
            }
            if (i < n && is_name_char(cp[i])) return "not a valid expression";  // Python's "invalid decimal literal"
            char text[CALC_MAX_CHARS + 1];
            int length = 0, nonzero = 0;
            for (int j = start; j < i; j++) if (cp[j] != '_') text[length++] = (char)cp[j];
            text[length] = '\0';
            t->kind = TOKEN_NUMBER;
            t->value.is_float = is_float;
            if (is_float) {
                t->value.f = strtod(text, NULL);  // correctly rounded, as Python's float(); 1e999 is inf
            } else {
                for (int j = 0; j < length; j++) {
                    nonzero |= text[j] != '0';
                    if (__builtin_mul_overflow(t->value.i, 10, &t->value.i) ||
                        __builtin_add_overflow(t->value.i, text[j] - '0', &t->value.i))
                        t->too_large = 1;
                }
                if (text[0] == '0' && nonzero) return "not a valid expression";  // leading zeros, as in 007
            }
            continue;
        }
        if (c == '_' || c >= 128 || isalpha((int)c)) {  // a name: Python's own (True, if, ...) are beyond arithmetic
            static const char *keywords[] = {"False", "None", "True", "and", "as", "assert", "async", "await",
                "break", "class", "continue", "def", "del", "elif", "else", "except", "finally", "for", "from",
                "global", "if", "import", "in", "is", "lambda", "nonlocal", "not", "or", "pass", "raise", "return",
                "try", "while", "with", "yield"};
            int start = i;
            while (i < n && (cp[i] == '_' || (cp[i] < 128 && isalnum((int)cp[i])) ||
                             (cp[i] >= 128 && in_class(tok, CLASS_LETTER, cp[i]))))
                i++;
            t->kind = TOKEN_NAME;
            for (int j = start; j < i && j - start < 15; j++) t->name[j - start] = cp[j] < 128 ? (char)cp[j] : '?';
            for (int w = 3; w < 35; w++)  // (False, None and True are constants, which engine.py refuses)
                if (i - start < 16 && !strcmp(t->name, keywords[w])) return "run.c's calculator does arithmetic only";
            continue;
        }
        static const char *ops[] = {"**", "//", "+", "-", "*", "/", "%", "(", ")", ","};
        int found = 0;
        for (int o = 0; o < 10 && !found; o++) {
            int len = (int)strlen(ops[o]);
            if (cp[i] == (uint32_t)ops[o][0] && (len == 1 || (i + 1 < n && cp[i + 1] == (uint32_t)ops[o][1]))) {
                t->kind = TOKEN_OP;
                memcpy(t->op, ops[o], len + 1);
                i += len;
                found = 1;
            }
        }
        if (!found && c == '.' && !(i + 1 < n && is_name_char(cp[i + 1]))) return "not a valid expression";
        if (!found) return "run.c's calculator does arithmetic only";  // letters, quotes, other operators
        depth += t->op[0] == '(' ? 1 : t->op[0] == ')' ? -1 : 0;
    }
    k->tokens[k->n_tokens].kind = TOKEN_END;
    return NULL;
}

static int calc_is(Calc *k, const char *op) {
    return k->tokens[k->at].kind == TOKEN_OP && !strcmp(k->tokens[k->at].op, op);
}

static int new_node(Calc *k, int kind, const char *op, int left, int right) {
    Node *node = &k->nodes[k->n_nodes];
    memset(node, 0, sizeof(*node));
    node->kind = kind;
    if (op) strcpy(node->op, op);
    node->left = left;
    node->right = right;
    k->python_nodes += kind == NODE_NUMBER || kind == NODE_CALL ? 1 : 2;  // BinOp + its operator, Name + Load, ...
    return k->n_nodes++;
}

// recursive descent on Python's grammar: tuple > sum > term > factor (unary) > power > atom
static int parse_sum(Calc *k);

static int parse_tuple(Calc *k, int first) {  // after `first ,`: the rest of a tuple (its items are never evaluated)
    int tuple = new_node(k, NODE_TUPLE, NULL, first, -1);
    while (calc_is(k, ",")) {
        k->at++;
        if (k->tokens[k->at].kind == TOKEN_END || calc_is(k, ")")) break;  // a trailing comma
        parse_sum(k);
    }
    return tuple;
}

static int parse_atom(Calc *k) {
    CalcToken *t = &k->tokens[k->at];
    if (t->kind == TOKEN_NUMBER) {
        k->at++;
        int node = new_node(k, NODE_NUMBER, NULL, -1, -1);
        k->nodes[node].value = t->value;
        k->nodes[node].too_large = t->too_large;
        return node;
    }
    if (t->kind == TOKEN_NAME) {  // evaluating a name is an error; len(...) is one as well, on a number
        k->at++;
        int node = new_node(k, NODE_NAME, NULL, -1, -1);
        k->nodes[node].name = !strcmp(t->name, "True") ? "constant True not allowed" :
                              !strcmp(t->name, "False") ? "constant False not allowed" :
                              !strcmp(t->name, "None") ? "constant None not allowed" : "Name not allowed";
        if (k->nodes[node].name[0] == 'c') k->python_nodes--;  // a Constant is one node, a Name two (with Load)
        k->nodes[node].is_len = !strcmp(t->name, "len");
        return node;
    }
    if (calc_is(k, "(")) {
        k->at++;
        int inside = calc_is(k, ")") ? new_node(k, NODE_TUPLE, NULL, -1, -1) : parse_sum(k);  // () is a tuple
        if (calc_is(k, ",")) inside = parse_tuple(k, inside);
        if (!calc_is(k, ")")) k->bad = 1;
        else k->at++;
        return inside;
    }
    k->bad = 1;
    return -1;
}

static int parse_factor(Calc *k);

static int parse_power(Calc *k) {  // right-associative, and -2**2 is -(2**2): the exponent is a factor
    int base = parse_atom(k);
    while (!k->bad && calc_is(k, "(")) {  // 2(3) calls 2 in Python: a call with its arguments (never evaluated)
        k->at++;
        base = new_node(k, NODE_CALL, NULL, base, -1);
        while (!k->bad && !calc_is(k, ")")) {
            int argument = parse_sum(k);
            if (k->nodes[base].n_args++ == 0) k->nodes[base].right = argument;
            if (calc_is(k, ",")) k->at++;
            else if (!calc_is(k, ")")) k->bad = 1;
        }
        if (!k->bad) k->at++;
    }
    if (k->bad || !calc_is(k, "**")) return base;
    k->at++;
    int exponent = parse_factor(k);
    return new_node(k, NODE_BINARY, "**", base, exponent);
}

static int parse_factor(Calc *k) {
    if (calc_is(k, "-") || calc_is(k, "+")) {
        char op[3];
        strcpy(op, k->tokens[k->at++].op);
        int operand = parse_factor(k);
        return new_node(k, NODE_UNARY, op, operand, -1);
    }
    return parse_power(k);
}

static int parse_term(Calc *k) {
    int left = parse_factor(k);
    while (!k->bad && (calc_is(k, "*") || calc_is(k, "/") || calc_is(k, "//") || calc_is(k, "%"))) {
        char op[3];
        strcpy(op, k->tokens[k->at++].op);
        int right = parse_factor(k);
        left = new_node(k, NODE_BINARY, op, left, right);
    }
    return left;
}

static int parse_sum(Calc *k) {
    int left = parse_term(k);
    while (!k->bad && (calc_is(k, "+") || calc_is(k, "-"))) {
        char op[3];
        strcpy(op, k->tokens[k->at++].op);
        int right = parse_term(k);
        left = new_node(k, NODE_BINARY, op, left, right);
    }
    return left;
}

static double as_double(Number x) { return x.is_float ? x.f : (double)x.i; }
static Number float_number(double f) { Number x = {1, 0, f}; return x; }
static Number int_number(int64_t i) { Number x = {0, i, 0.0}; return x; }

static int is_odd_integer(double x) { return fmod(fabs(x), 2.0) == 1.0; }

// x ** y for floats, case by case as CPython's float_pow; *error set where Python raises
static double float_pow(double x, double y, const char **error) {
    static char range_error[96];
    if (y == 0.0) return 1.0;
    if (isnan(x)) return x;
    if (isnan(y)) return x == 1.0 ? 1.0 : y;
    if (isinf(y)) {
        x = fabs(x);
        if (x == 1.0) return 1.0;
        return (y > 0.0) == (x > 1.0) ? fabs(y) : 0.0;
    }
    if (isinf(x)) return y > 0.0 ? (is_odd_integer(y) ? x : fabs(x)) : (is_odd_integer(y) ? copysign(0.0, x) : 0.0);
    if (x == 0.0) {
        if (y < 0.0) *error = "division by zero";  // "0.0 cannot be raised to a negative power"
        return is_odd_integer(y) ? x : 0.0;
    }
    if (x == 1.0) return 1.0;
    int negate = 0;
    if (x < 0.0) {
        if (y != floor(y)) { *error = "result is not a real number"; return 0.0; }  // Python makes it complex
        x = -x;
        negate = is_odd_integer(y);
    }
    if (x == 1.0) return negate ? -1.0 : 1.0;
    errno = 0;
    double r = pow(x, y);
    if (errno == 0 && isinf(r)) errno = ERANGE;
    else if (errno == ERANGE && r == 0.0) errno = 0;  // underflow to zero is fine
    if (errno) {  // Python raises OverflowError(errno, strerror), whose text engine.py passes on
        snprintf(range_error, sizeof(range_error), "(%d, '%s')", errno, strerror(errno));
        *error = range_error;
    }
    return negate ? -r : r;
}

// floor division and modulo of floats, as CPython's float_divmod (the modulo has the sign of y)
static void float_divmod(double x, double y, double *quotient, double *modulo) {
    double mod = fmod(x, y), div = (x - mod) / y;
    if (mod != 0.0) {
        if ((y < 0) != (mod < 0)) { mod += y; div -= 1.0; }
    } else {
        mod = copysign(0.0, y);
    }
    if (div != 0.0) {
        double floor_div = floor(div);
        *quotient = div - floor_div > 0.5 ? floor_div + 1.0 : floor_div;
    } else {
        *quotient = copysign(0.0, x / y);
    }
    *modulo = mod;
}

// evaluate node into *out; NULL, or the error text (after "error: ")
static const char *calc_eval(Calc *k, int index, Number *out) {
    Node *node = &k->nodes[index];
    if (node->kind == NODE_TUPLE) return "Tuple not allowed";
    if (node->kind == NODE_NAME) return node->name;
    if (node->kind == NODE_CALL) {  // engine.py calls len(one string) and string methods only
        Node *function = &k->nodes[node->left];
        if (function->kind != NODE_NAME || !function->is_len || node->n_args != 1)
            return "only len() and string methods may be called";
        const char *error = calc_eval(k, node->right, out);
        return error ? error : "len() takes a string";
    }
    if (node->kind == NODE_NUMBER) {
        *out = node->value;
        return node->too_large ? "result too large" : NULL;
    }
    Number a, b, r = {0, 0, 0.0};
    const char *error = calc_eval(k, node->left, &a);
    if (error) return error;
    if (node->kind == NODE_UNARY) {
        if (node->op[0] == '-' && !a.is_float && a.i == INT64_MIN) return "result too large";
        r = node->op[0] == '+' ? a : a.is_float ? float_number(-a.f) : int_number(-a.i);
    } else {
        if ((error = calc_eval(k, node->right, &b))) return error;
        const char *op = node->op;
        int ints = !a.is_float && !b.is_float;
        double x = as_double(a), y = as_double(b);
        if (!strcmp(op, "**")) {
            if (fabs(y) > CALC_MAX_EXPONENT) return "exponent too large";
            if (fabs(x) > 1 && y > 0 && y * log10(fabs(x)) > CALC_MAX_DIGITS) return "result too large";
            if (ints && b.i >= 0) {  // exact, by squaring
                int64_t base = a.i, result = 1;
                for (int64_t e = b.i; e > 0;) {
                    if ((e & 1) && __builtin_mul_overflow(result, base, &result)) return "result too large";
                    e >>= 1;
                    if (e && __builtin_mul_overflow(base, base, &base)) return "result too large";
                }
                r = int_number(result);
            } else {
                r = float_number(float_pow(x, y, &error));
                if (error) return error;
            }
        } else if (ints && (op[0] == '+' || op[0] == '-' || !strcmp(op, "*"))) {
            int64_t v;
            int overflow = op[0] == '+' ? __builtin_add_overflow(a.i, b.i, &v) :
                           op[0] == '-' ? __builtin_sub_overflow(a.i, b.i, &v) : __builtin_mul_overflow(a.i, b.i, &v);
            if (overflow) return "result too large";
            r = int_number(v);
        } else if (op[0] == '+' || op[0] == '-' || !strcmp(op, "*")) {
            r = float_number(op[0] == '+' ? x + y : op[0] == '-' ? x - y : x * y);
        } else if (!strcmp(op, "/")) {
            if (y == 0.0) return "division by zero";
            const int64_t big = (int64_t)1 << 53;  // integers up to 2^53 are exact doubles; beyond, long double
            int exact = ints && a.i >= -big && a.i <= big && b.i >= -big && b.i <= big;
            r = float_number(!ints || exact ? x / y : (double)((long double)a.i / (long double)b.i));
        } else {  // "//" and "%": the quotient rounded down, and a modulo with the sign of the divisor
            if (y == 0.0) return "division by zero";
            if (ints) {
                if (b.i == -1) {
                    if (op[0] == '/' && a.i == INT64_MIN) return "result too large";
                    r = int_number(op[0] == '/' ? -a.i : 0);
                } else {
                    int64_t q = a.i / b.i, m = a.i % b.i;
                    if (m != 0 && ((m < 0) != (b.i < 0))) { q -= 1; m += b.i; }
                    r = int_number(op[0] == '/' ? q : m);
                }
            } else {
                double q, m;
                float_divmod(x, y, &q, &m);
                r = float_number(op[0] == '/' ? q : m);
            }
        }
    }
    if (r.is_float && !isfinite(r.f)) return "result is not a finite number";
    *out = r;
    return NULL;
}

// a float as Python's repr writes it: the fewest digits that read back as the same float, in Python's layout
static void python_repr(char *out, size_t size, double x) {
    if (isinf(x)) { snprintf(out, size, x > 0 ? "inf" : "-inf"); return; }
    char buffer[40], digits[24], text[64];
    for (int precision = 1; precision <= 17; precision++) {
        snprintf(buffer, sizeof(buffer), "%.*e", precision - 1, x);  // [-]D.DDDe[+-]XX
        if (strtod(buffer, NULL) == x) break;
    }
    int n_digits = 0, negative = buffer[0] == '-';
    const char *p = buffer + negative;
    for (; *p != 'e'; p++) if (*p != '.') digits[n_digits++] = *p;
    digits[n_digits] = '\0';
    int point = atoi(p + 1) + 1, at = 0;  // x = 0.DIGITS * 10^point
    if (negative) text[at++] = '-';
    if (point <= -4 || point > 16) {  // where Python switches to an exponent
        at += sprintf(text + at, "%c%s%s", digits[0], n_digits > 1 ? "." : "", digits + 1);
        sprintf(text + at, "e%c%02d", point - 1 < 0 ? '-' : '+', abs(point - 1));
    } else if (point <= 0) {
        at += sprintf(text + at, "0.");
        for (int i = 0; i < -point; i++) text[at++] = '0';
        sprintf(text + at, "%s", digits);
    } else if (point < n_digits) {
        sprintf(text + at, "%.*s.%s", point, digits, digits + point);
    } else {
        at += sprintf(text + at, "%s", digits);
        for (int i = n_digits; i < point; i++) text[at++] = '0';
        sprintf(text + at, ".0");
    }
    snprintf(out, size, "%s", text);
}

// engine.format_result: integers, integral floats below 1e15 as integers, other floats rounded to 6 decimals
static void format_result(char *out, size_t size, Number x) {
    if (!x.is_float) { snprintf(out, size, "%lld", (long long)x.i); return; }
    if (isfinite(x.f) && x.f == floor(x.f) && fabs(x.f) < 1e15) { snprintf(out, size, "%lld", (long long)x.f); return; }
    double rounded = x.f;
    if (isfinite(x.f)) {  // round(x, 6): the correctly rounded 6-decimal value, read back as a float
        char buffer[400];
        snprintf(buffer, sizeof(buffer), "%.6f", x.f);
        rounded = strtod(buffer, NULL);
    }
    python_repr(out, size, rounded);
}

// engine.calculator(expression) into out: the result text, or "error: ..."
static void calculator(const Tokenizer *tok, const char *expression, char *out, size_t size) {
    int n_bytes = (int)strlen(expression), n = 0;
    uint32_t *cp = xmalloc((n_bytes + 1) * sizeof(uint32_t));
    for (int b = 0; b < n_bytes; n++) b += utf8_decode((const unsigned char *)expression + b, n_bytes - b, &cp[n]);
    int start = 0, end = n;
    while (start < end && is_python_space(cp[start])) start++;
    while (end > start && is_python_space(cp[end - 1])) end--;
    int quoted = 0, length = 0;
    for (int i = start; i < end; i++) quoted |= cp[i] == '"' || cp[i] == '\'';
    for (int i = start; i < end; i++) {  // thousands separators: a comma after a digit and before exactly 3 digits
        int separator = !quoted && cp[i] == ',' && i > start && is_digit(cp[i - 1]) && i + 3 < end &&
                        is_digit(cp[i + 1]) && is_digit(cp[i + 2]) && is_digit(cp[i + 3]) &&
                        (i + 4 >= end || !is_digit(cp[i + 4]));
        if (!separator) cp[length++] = cp[i];
    }
    Calc *k = xmalloc(sizeof(Calc));
    Number value;
    const char *error = NULL;
    if (length > CALC_MAX_CHARS) error = "expression too long";
    else if (!(error = calc_lex(k, tok, cp, length))) {
        int root = parse_sum(k);
        if (!k->bad && calc_is(k, ",")) root = parse_tuple(k, root);
        if (k->bad || k->tokens[k->at].kind != TOKEN_END) error = "not a valid expression";
        else if (k->python_nodes + 1 > CALC_MAX_NODES) error = "expression too complex";  // (+1: the Expression)
        else error = calc_eval(k, root, &value);
    }
    if (error) snprintf(out, size, "error: %s", error);
    else format_result(out, size, value);
    free(k);
    free(cp);
}

// ----------------------------------------------------------------------------
// generation, chat and perplexity

static double time_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// print a token's bytes; the special tokens of tool use print as chat.py shows them ([calculator: 4*6 = 24]),
// others not at all
static void print_token(const Tokenizer *t, int id) {
    if (id < 0 || id >= t->vocab_size) return;
    if (t->kinds[id] == 0) {
        fwrite(t->pieces[id], 1, t->lengths[id], stdout);
    } else if (t->kinds[id] == 1) {
        const char *name = (const char *)t->pieces[id];
        int n = t->lengths[id];
        if (n == 16 && !memcmp(name, "<|python_start|>", 16)) printf("[calculator: ");
        else if (n == 16 && !memcmp(name, "<|output_start|>", 16)) printf(" = ");
        else if (n == 14 && !memcmp(name, "<|output_end|>", 14)) printf("]");
    }
    fflush(stdout);
}

static void print_logits(const float *logits, int n) {
    printf("\nlogits:");  // on a line of its own, after the prompt text
    for (int i = 0; i < n; i++) printf(" %.9g", logits[i]);
    printf("\n");
}

// how long the prompt took: from its first token into the model to the first generated token out
static void report_prompt(int n_prompt, double seconds) {
    if (n_prompt > 0 && seconds > 0)
        fprintf(stderr, "time to first token: %.4f s (prompt of %d tokens: %.2f tok/s)\n", seconds, n_prompt,
                n_prompt / seconds);
}

static void report_speed(int n_timed, double t_start) {
    double elapsed = time_s() - t_start;
    if (n_timed > 0 && elapsed > 0) fprintf(stderr, "achieved tok/s: %.2f\n", n_timed / elapsed);
}

// generate mode also says what share of that time the sampler took (top-p should stay a small part of a step)
static void report_sampling(int n_timed, double t_start, double time_sampling) {
    double elapsed = time_s() - t_start;
    if (n_timed > 0 && elapsed > 0) fprintf(stderr, "sampling: %.1f%% of the time\n", 100.0 * time_sampling / elapsed);
}

static void generate(Transformer *tr, Tokenizer *tok, Sampler *sampler, const char *prompt, int steps,
                     int print_first_logits, int show_tokens) {
    int *text_ids;
    int n_text = encode(tok, prompt, &text_ids);
    int n_prompt = n_text + 1, seq_len = tr->config.seq_len;
    if (n_prompt > seq_len) fail("the prompt is %d tokens; the model's context is %d", n_prompt, seq_len);
    int *tokens = xmalloc((size_t)(n_prompt + (steps > 0 ? steps : 0)) * sizeof(int));
    tokens[0] = tok->bos_id;
    memcpy(tokens + 1, text_ids, n_text * sizeof(int));
    free(text_ids);
    int max_len = n_prompt + steps < seq_len ? n_prompt + steps : seq_len;
    fputs(prompt, stdout);
    fflush(stdout);
    double t_prompt = time_s(), t_start = 0.0, time_sampling = 0.0;
    int n_generated = 0, n_timed = 0;
    float *logits = n_prompt < max_len ? prefill(tr, tokens, n_prompt, 0) : NULL;  // the prompt, in blocks
    for (int pos = n_prompt - 1; pos + 1 < max_len; pos++) {
        if (n_generated > 0) logits = forward(tr, tokens[pos], pos);
        if (print_first_logits && n_generated == 0) print_logits(logits, tr->config.vocab_size);
        double t_sample = time_s();
        int next = sample(sampler, logits);
        if (n_generated > 0) time_sampling += time_s() - t_sample;  // within the timed span
        tokens[pos + 1] = next;
        n_generated++;
        if (n_generated == 1) t_start = time_s();  // like llama2.c: time from the first sampled token on
        else n_timed++;
        if (next == tok->bos_id) break;  // the model started a new document
        print_token(tok, next);
    }
    printf("\n");
    if (show_tokens) {
        printf("tokens:");
        for (int i = n_prompt; i < n_prompt + n_generated; i++) printf(" %d", tokens[i]);
        printf("\n");
    }
    if (n_generated > 0) report_prompt(n_prompt, t_start - t_prompt);
    report_sampling(n_timed, t_start, time_sampling);
    report_speed(n_timed, t_start);
    free(tokens);
}

// read a line from stdin into buffer without its newline; 0 at end of input
static int read_line(const char *message, char *buffer, size_t size) {
    printf("%s", message);
    fflush(stdout);
    if (!fgets(buffer, (int)size, stdin)) return 0;
    buffer[strcspn(buffer, "\r\n")] = '\0';
    return 1;
}

// append ids to the pending tokens, failing clearly when the conversation outgrows the context
static void push(int *pending, int *n_pending, int id, int pos, int seq_len) {
    if (pos + *n_pending + 1 > seq_len) fail("the conversation is longer than the model's context (%d tokens)", seq_len);
    pending[(*n_pending)++] = id;
}

/*
Chat in the format of tokenizer.render_conversation, chosen by the special tokens the tokenizer file has:
    ours     <|bos|> [<|system_start|> system <|system_end|>] <|user_start|> user <|user_end|> <|assistant_start|> ...
             the assistant's turn ends at <|assistant_end|>
    ChatML   (SmolLM2, Qwen2.5) <|endoftext|> <|im_start|>"user\n" user<|im_end|>"\n" <|im_start|>"assistant\n" ...
             ends at <|im_end|>; role header and content are encoded as one piece, as Hugging Face does
    Llama 3  <|begin_of_text|> <|start_header_id|>user<|end_header_id|>"\n\n" user<|eot_id|> ... ends at <|eot_id|>
The first user message comes from -i (or stdin), the following ones from stdin; the conversation continues in the
KV cache until end of input or the end of the context. The system message is -y's, else the one the model's chat
template adds when a conversation has none (SmolLM2's, Qwen2.5's: the tokenizer file carries it), as
tokenizer.render_for_completion does. In our format the calculator answers the model's tool calls (see the
calculator section above), as chat.py's does.
*/
enum { FORMAT_OURS, FORMAT_CHATML, FORMAT_LLAMA3 };

typedef struct {
    int format;
    int ids[6];  // ours: user/assistant/system start and end; ChatML: im_start, im_end; Llama 3: header start/end, eot
    int end_of_turn;
    int tools;   // ours, with the tool tokens: python_start, python_end, output_start, output_end below
    int python_start, python_end, output_start, output_end;
} ChatFormat;

static ChatFormat chat_format(const Tokenizer *tok) {
    static const char *ours[] = {"<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                                 "<|system_start|>", "<|system_end|>"};
    static const char *chatml[] = {"<|im_start|>", "<|im_end|>"};
    static const char *llama3[] = {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"};
    ChatFormat f = {0};
    const char **names = ours;
    int n = 6;
    if (special_id(tok, "<|user_start|>") < 0 && special_id(tok, "<|im_start|>") >= 0) {
        f.format = FORMAT_CHATML, names = chatml, n = 2;
    } else if (special_id(tok, "<|user_start|>") < 0 && special_id(tok, "<|start_header_id|>") >= 0) {
        f.format = FORMAT_LLAMA3, names = llama3, n = 3;
    }
    for (int i = 0; i < n; i++) {
        f.ids[i] = special_id(tok, names[i]);
        if (f.ids[i] < 0) fail("the tokenizer has no %s token; chat mode needs the chat special tokens", names[i]);
    }
    f.end_of_turn = f.format == FORMAT_OURS ? f.ids[3] : f.format == FORMAT_CHATML ? f.ids[1] : f.ids[2];
    f.python_start = special_id(tok, "<|python_start|>");
    f.python_end = special_id(tok, "<|python_end|>");
    f.output_start = special_id(tok, "<|output_start|>");
    f.output_end = special_id(tok, "<|output_end|>");
    f.tools = f.format == FORMAT_OURS && f.python_start >= 0 && f.python_end >= 0 && f.output_start >= 0 &&
              f.output_end >= 0;
    return f;
}

/*
The model just wrote <|python_end|> (the last of history's n tokens): the tokens to force after it, as engine.py's
tool hook makes them: <|output_start|> calculator(expression) <|output_end|>. The expression is the text of the
tokens since the last special token, which must be <|python_start|>. Returns how many tokens are in *forced.
*/
static int tool_answer(const Tokenizer *tok, const ChatFormat *f, const int *history, int n, int **forced) {
    int start = n - 2;
    while (start >= 0 && !(history[start] < tok->vocab_size && tok->kinds[history[start]] == 1)) start--;
    char result[512];
    if (start < 0 || history[start] != f->python_start) {
        snprintf(result, sizeof(result), "error: <|python_end|> without <|python_start|>");
    } else {
        size_t length = 0;
        for (int i = start + 1; i < n - 1; i++) if (history[i] < tok->vocab_size) length += tok->lengths[history[i]];
        char *expression = xmalloc(length + 1), *at = expression;
        for (int i = start + 1; i < n - 1; i++) {
            if (history[i] >= tok->vocab_size) continue;  // (ids past the tokenizer: a vocabulary padded for speed)
            memcpy(at, tok->pieces[history[i]], tok->lengths[history[i]]);
            at += tok->lengths[history[i]];
        }
        *at = '\0';
        calculator(tok, expression, result, sizeof(result));
        free(expression);
    }
    int *ids, n_ids = encode(tok, result, &ids);
    *forced = xmalloc((size_t)(n_ids + 2) * sizeof(int));
    (*forced)[0] = f->output_start;
    memcpy(*forced + 1, ids, n_ids * sizeof(int));
    (*forced)[n_ids + 1] = f->output_end;
    free(ids);
    return n_ids + 2;
}

// push the tokens of a + b, encoded as one piece of text
static void push_text(const Tokenizer *tok, int *pending, int *n_pending, const char *a, const char *b, int pos,
                      int seq_len) {
    size_t la = strlen(a), lb = strlen(b);
    char *text = xmalloc(la + lb + 1);
    memcpy(text, a, la);
    memcpy(text + la, b, lb + 1);
    int *ids, n = encode(tok, text, &ids);
    for (int i = 0; i < n; i++) push(pending, n_pending, ids[i], pos, seq_len);
    free(ids);
    free(text);
}

// a whole turn (role "system" or "user"), or with content NULL the header that starts the assistant's turn
static void push_turn(const Tokenizer *tok, const ChatFormat *f, int *pending, int *n_pending, const char *role,
                      const char *content, int pos, int seq_len) {
    if (f->format == FORMAT_OURS) {
        int system = role[0] == 's';
        if (!content) { push(pending, n_pending, f->ids[2], pos, seq_len); return; }
        push(pending, n_pending, f->ids[system ? 4 : 0], pos, seq_len);
        push_text(tok, pending, n_pending, "", content, pos, seq_len);
        push(pending, n_pending, f->ids[system ? 5 : 1], pos, seq_len);
    } else if (f->format == FORMAT_CHATML) {
        char header[32];
        snprintf(header, sizeof(header), "%s\n", content ? role : "assistant");
        push(pending, n_pending, f->ids[0], pos, seq_len);
        push_text(tok, pending, n_pending, header, content ? content : "", pos, seq_len);
        if (!content) return;
        push(pending, n_pending, f->ids[1], pos, seq_len);
        push_text(tok, pending, n_pending, "\n", "", pos, seq_len);
    } else {
        push(pending, n_pending, f->ids[0], pos, seq_len);
        push_text(tok, pending, n_pending, content ? role : "assistant", "", pos, seq_len);
        push(pending, n_pending, f->ids[1], pos, seq_len);
        if (!content) { push_text(tok, pending, n_pending, "\n\n", "", pos, seq_len); return; }
        // Llama 3's templates trim the content
        const char *start = content, *end = content + strlen(content);
        while (*start && isspace((unsigned char)*start)) start++;
        while (end > start && isspace((unsigned char)end[-1])) end--;
        char *trimmed = xmalloc((size_t)(end - start) + 1);
        memcpy(trimmed, start, (size_t)(end - start));
        trimmed[end - start] = '\0';
        push_text(tok, pending, n_pending, "\n\n", trimmed, pos, seq_len);
        free(trimmed);
        push(pending, n_pending, f->ids[2], pos, seq_len);
    }
}

static void chat(Transformer *tr, Tokenizer *tok, Sampler *sampler, const char *first_message,
                 const char *system_prompt, int steps, int show_tokens) {
    ChatFormat format = chat_format(tok);
    int end_of_turn = format.end_of_turn;
    int seq_len = tr->config.seq_len, pos = 0, carry = -1;  // carry: the last sampled token, not yet fed
    int *history = xmalloc((size_t)seq_len * sizeof(int));  // every token fed, by position
    int *answer = xmalloc((size_t)seq_len * sizeof(int));   // the tokens of the answer, for -v
    char line[8192];
    int n_timed = 0, n_prompt_tokens = 0;
    double time_in_generation = 0.0, time_in_prompts = 0.0;
    for (int turn = 0;; turn++) {
        const char *message = NULL;
        if (turn == 0 && first_message) {
            message = first_message;
            printf("User: %s\n", message);
        } else {
            if (!read_line("User: ", line, sizeof(line))) break;
            message = line;
        }
        int *pending = history + pos, n_pending = 0;  // the tokens to feed before the answer
        if (carry >= 0) {
            push(pending, &n_pending, carry, pos, seq_len);
            if (format.format == FORMAT_CHATML) push_text(tok, pending, &n_pending, "\n", "", pos, seq_len);
        }
        if (turn == 0) {
            push(pending, &n_pending, tok->bos_id, pos, seq_len);
            const char *system = system_prompt && system_prompt[0] ? system_prompt : tok->default_system;
            if (system[0]) push_turn(tok, &format, pending, &n_pending, "system", system, pos, seq_len);
        }
        push_turn(tok, &format, pending, &n_pending, "user", message, pos, seq_len);
        push_turn(tok, &format, pending, &n_pending, "assistant", NULL, pos, seq_len);
        double t_prompt = time_s();
        float *logits = prefill(tr, pending, n_pending, pos);
        pos += n_pending;
        time_in_prompts += time_s() - t_prompt;
        n_prompt_tokens += n_pending;
        printf("Assistant: ");
        double t0 = time_s();
        int n_new = 0, next, n_answer = 0;
        for (;;) {
            next = sample(sampler, logits);
            n_new++;
            if (next == end_of_turn || next == tok->bos_id || pos >= seq_len || (steps > 0 && n_new > steps)) break;
            history[pos] = answer[n_answer++] = next;
            print_token(tok, next);
            int n_feed = 1;
            if (format.tools && next == format.python_end) {  // the calculator's answer goes in as if the model wrote it
                int *forced, n_forced = tool_answer(tok, &format, history, pos + 1, &forced);
                for (int i = 0; i < n_forced && pos + n_feed < seq_len && (steps == 0 || n_new < steps); i++, n_new++) {
                    history[pos + n_feed++] = answer[n_answer++] = forced[i];
                    print_token(tok, forced[i]);
                }
                free(forced);
            }
            logits = prefill(tr, history + pos, n_feed, pos);  // (one token: forward)
            pos += n_feed;
            n_timed += n_feed;
        }
        time_in_generation += time_s() - t0;
        printf("\n");
        if (show_tokens) {
            printf("tokens:");
            for (int i = 0; i < n_answer; i++) printf(" %d", answer[i]);
            printf("\n");
        }
        if (next != end_of_turn) {
            if (pos >= seq_len) { fprintf(stderr, "(the context of %d tokens is full)\n", seq_len); break; }
            next = end_of_turn;  // cut off by -n or ended by <|bos|>: close the turn as the format wants
        }
        carry = next;
    }
    if (n_timed > 0 && time_in_generation > 0) fprintf(stderr, "achieved tok/s: %.2f\n", n_timed / time_in_generation);
    if (n_prompt_tokens > 0 && time_in_prompts > 0)
        fprintf(stderr, "prompt tok/s: %.2f (%d prompt tokens)\n", n_prompt_tokens / time_in_prompts, n_prompt_tokens);
    free(history);
    free(answer);
}

// mean negative log-likelihood of the text, in windows of seq_len tokens that each start with <|bos|>
static void perplexity(Transformer *tr, Tokenizer *tok, const char *text) {
    int *ids, n = encode(tok, text, &ids), seq_len = tr->config.seq_len, vocab = tr->config.vocab_size;
    if (n == 0) fail("perplexity needs some text (-i or -f)");
    double nll = 0.0;
    long count = 0;
    double t0 = time_s();
    for (int start = 0; start < n; start += seq_len - 1) {
        int window = n - start < seq_len - 1 ? n - start : seq_len - 1;
        int previous = tok->bos_id;
        for (int i = 0; i < window; i++) {
            float *logits = forward(tr, previous, i);
            float max_val = logits[argmax(logits, vocab)];
            double sum = 0.0;
            for (int v = 0; v < vocab; v++) sum += exp((double)logits[v] - max_val);
            nll += log(sum) + max_val - logits[ids[start + i]];
            count++;
            previous = ids[start + i];
        }
    }
    printf("tokens: %ld\nmean nll: %.6f\nperplexity: %.6f\n", count, nll / count, exp(nll / count));
    report_speed((int)count, t0);
    free(ids);
}

// print the ids of each line of the text (a line keeps its newline), one line of ids per line: for tests
static void encode_lines(Tokenizer *tok, const char *text) {
    const char *line = text;
    while (*line) {
        const char *newline = strchr(line, '\n');
        size_t length = newline ? (size_t)(newline - line) + 1 : strlen(line);
        char *copy = xmalloc(length + 1);
        memcpy(copy, line, length);
        int *ids, n = encode(tok, copy, &ids);
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        free(ids);
        free(copy);
        line += length;
    }
}

// the calculator's answer to each line of the text, one line each: for tests
static void calculator_lines(const Tokenizer *tok, const char *text) {
    for (const char *line = text; *line;) {
        size_t length = strcspn(line, "\n");
        char *copy = xmalloc(length + 1), result[512];
        memcpy(copy, line, length);
        calculator(tok, copy, result, sizeof(result));
        printf("%s\n", result);
        free(copy);
        line += length + (line[length] == '\n');
    }
}

// ----------------------------------------------------------------------------
// the command line

static void usage(void) {
    fprintf(stderr,
            "Usage:   run <model file> [options]\n"
            "Example: run model.bin -z tokenizer.bin -t 0.8 -p 0.9 -n 256 -s 42 -i \"Once upon a time\"\n"
            "Options:\n"
            "  -z <string> tokenizer file, default tokenizer.bin\n"
            "  -t <float>  temperature in [0, inf), default 1.0 (0 = greedy)\n"
            "  -p <float>  top-p (nucleus) in [0, 1], default 0.9 (1.0 = off)\n"
            "  -s <int>    random seed, default time-based\n"
            "  -n <int>    new tokens to generate, default 256 (capped by the context); chat: per answer, 0 = no cap\n"
            "  -i <string> prompt (chat: the first user message)\n"
            "  -f <string> read the prompt from this file (a pipe or /dev/stdin too)\n"
            "  -m <string> mode: generate | chat | perplexity | encode (token ids of each line) |\n"
            "              calculator (the chat calculator's answer to each line), default generate\n"
            "  -y <string> system prompt in chat mode, default the chat template's own (SmolLM2's, Qwen2.5's) if any\n"
            "  -v <int>    1: print the generated token ids at the end, default 0\n"
            "  -l <int>    1: print the logits the first generated token is drawn from, default 0\n"
            "  -b <int>    prompt tokens that go through the model together, default 64 (1: one at a time)\n");
    exit(1);
}

// the prompt of -f: a file, a pipe or /dev/stdin
static char *read_text_file(const char *path) {
    size_t size;
    char *text = read_file(path, "prompt file", &size);
    if (memchr(text, 0, size)) fail("prompt file %s contains a NUL byte; expected text", path);
    return text;
}

static float parse_float(const char *flag, const char *value) {
    char *end;
    float v = strtof(value, &end);
    if (*value == '\0' || *end != '\0' || !isfinite(v)) fail("%s expects a number, got '%s'", flag, value);
    return v;
}

static long parse_int(const char *flag, const char *value) {
    char *end;
    long v = strtol(value, &end, 10);
    if (*value == '\0' || *end != '\0') fail("%s expects an integer, got '%s'", flag, value);
    return v;
}

int main(int argc, char *argv[]) {
    const char *model_path = NULL, *tokenizer_path = "tokenizer.bin", *prompt = NULL, *prompt_file = NULL;
    const char *mode = "generate", *system_prompt = NULL;
    float temperature = 1.0f, topp = 0.9f;
    long steps = 256, seed = -1, show_tokens = 0, print_first_logits = 0, block = 64;
    if (argc < 2 || argv[1][0] == '-') usage();
    model_path = argv[1];
    for (int i = 2; i < argc; i += 2) {
        if (argv[i][0] != '-' || strlen(argv[i]) != 2) usage();
        if (i + 1 >= argc) fail("%s needs a value", argv[i]);
        const char *v = argv[i + 1];
        switch (argv[i][1]) {
            case 't': temperature = parse_float("-t", v); break;
            case 'p': topp = parse_float("-p", v); break;
            case 's': seed = parse_int("-s", v); break;
            case 'n': steps = parse_int("-n", v); break;
            case 'i': prompt = v; break;
            case 'f': prompt_file = v; break;
            case 'z': tokenizer_path = v; break;
            case 'm': mode = v; break;
            case 'y': system_prompt = v; break;
            case 'v': show_tokens = parse_int("-v", v); break;
            case 'l': print_first_logits = parse_int("-l", v); break;
            case 'b': block = parse_int("-b", v); break;
            default: usage();
        }
    }
    if (temperature < 0.0f) fail("-t must be >= 0, got %g", temperature);
    if (topp < 0.0f || topp > 1.0f) fail("-p must be in [0, 1], got %g", topp);
    if (steps < 0 || steps > (1 << 24)) fail("-n must be in [0, 2^24], got %ld", steps);
    if (block < 1 || block > 1024) fail("-b must be in [1, 1024], got %ld", block);
    if (strcmp(mode, "generate") && strcmp(mode, "chat") && strcmp(mode, "perplexity") && strcmp(mode, "encode") &&
        strcmp(mode, "calculator"))
        fail("unknown mode -m %s; expected generate, chat, perplexity, encode or calculator", mode);
    char *file_text = prompt_file ? read_text_file(prompt_file) : NULL;
    if (file_text) prompt = file_text;

    Transformer transformer;
    build_transformer(&transformer, model_path, (int)block);
    Tokenizer tokenizer;
    build_tokenizer(&tokenizer, tokenizer_path);
    if (tokenizer.id != transformer.config.tokenizer_id)
        fail("%s does not belong to %s (the model was exported with another tokenizer); use the tokenizer file "
             "export.py wrote with it", tokenizer_path, model_path);
    if (tokenizer.vocab_size > transformer.config.vocab_size)
        fail("%s has %d tokens but %s only %d", tokenizer_path, tokenizer.vocab_size, model_path,
             transformer.config.vocab_size);

    Sampler sampler = {transformer.config.vocab_size, temperature, topp,
                       seed >= 0 ? (uint64_t)seed : (uint64_t)time(NULL)};
    if (sampler.rng_state == 0) sampler.rng_state = 0x9E3779B97F4A7C15ull;  // xorshift needs a nonzero state
    for (int i = 0; i < 4; i++) random_u32(&sampler.rng_state);              // mix small seeds

    if (!strcmp(mode, "generate")) generate(&transformer, &tokenizer, &sampler, prompt ? prompt : "", (int)steps,
                                            (int)print_first_logits, (int)show_tokens);
    else if (!strcmp(mode, "chat"))
        chat(&transformer, &tokenizer, &sampler, prompt, system_prompt, (int)steps, (int)show_tokens);
    else if (!strcmp(mode, "perplexity")) perplexity(&transformer, &tokenizer, prompt ? prompt : "");
    else if (!strcmp(mode, "encode")) encode_lines(&tokenizer, prompt ? prompt : "");
    else calculator_lines(&tokenizer, prompt ? prompt : "");

    free_tokenizer(&tokenizer);
    free_transformer(&transformer);
    free(file_text);
    return 0;
}

// ----------------------------------------------------------------------------
// speed: a reader may skip this section
//
// Nothing here changes what the program computes beyond the order of float additions. The plain functions above
// call these: fast_matmul hands the matmuls to SIMD dot products, exp_nonpositive is the e^x of the softmaxes and
// of SwiGLU, map_file_huge maps the weights with 2 MB pages.

/*
e^x for x <= 0, in plain arithmetic that the compiler vectorizes (libm's expf takes one value per call: at a vocabulary
of 32000 the softmax of the sampler alone cost ~10% of a step). x = k ln2 + r with |r| <= ln2 / 2, e^r by its Taylor
series to r^7 (truncation error < 1e-8, below float rounding), 2^k written into the exponent bits. Below -87 (where
e^x is not a normal float) it returns 0; NaN stays NaN, as with expf (a NaN weight must reach the logits).
*/
static inline float exp_nonpositive(float x) {
    float xc = x > -87.0f ? x : -87.0f;  // also maps NaN to -87, so the integer conversion below is defined
    float k = rintf(xc * 1.44269504f);
    float r = (xc - k * 0.693145752f) - k * 1.42860677e-6f;  // ln2 in two parts: k * ln2 without rounding error
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 +
              r * (1.0f / 720 + r * (1.0f / 5040)))))));
    int32_t bits = ((int32_t)k + 127) << 23;  // 2^k, k in [-126, 0]
    float two_k;
    memcpy(&two_k, &bits, 4);
    return x < -87.0f ? 0.0f : x == x ? p * two_k : x;
}

#if defined(__AVX2__)
static inline float hsum256(__m256 v) {
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    return _mm_cvtss_f32(s4);
}
#endif

/*
One row at a time: streaming through one row is what this memory system does fastest (interleaving four rows
measured ~30% slower here). Two float accumulators keep two FMA chains in flight.
*/
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define HAVE_SIMD_DOT_F32 1
static float simd_dot_f32(const float *w, const float *x, int n) {
    float val = 0.0f;
    int j = 0;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; j + 32 <= n; j += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 16), _mm512_loadu_ps(x + j + 16), a1);
    }
    val = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
    }
    val = hsum256(_mm256_add_ps(a0, a1));
#endif
    float rest = 0.0f;  // the tail
    #pragma omp simd reduction(+:rest)
    for (int k = j; k < n; k++) rest += w[k] * x[k];
    return val + rest;
}
#endif

/*
Int8: per group, the int8 dot product (exact, in int32) times w_scale * x_scale. The dot-product instructions
multiply unsigned by signed bytes, so they get |x| and w * sign(x). AVX-512 VNNI (vpdpbusd, on 512-bit vectors
when the group size is a multiple of 64, else 256-bit) where the CPU has it, else AVX2 (vpmaddubsw + vpmaddwd).
simd_int8_applies says whether this build has a kernel for the group size.
*/
static int simd_int8_applies(int group_size) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (group_size % 64 == 0) return 1;
#endif
#if defined(__AVX2__)
    if (group_size % 32 == 0) return 1;
#endif
    (void)group_size;
    return 0;
}

static float simd_dot_int8(const int8_t *w, const float *ws, const int8_t *x, const float *xs, int n, int group_size) {
    int n_groups = n / group_size;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (group_size % 64 == 0) {  // 64 bytes at a time; AVX-512 has no sign_epi8, a masked subtract does it
        __m512 acc = _mm512_setzero_ps();
        for (int g = 0; g < n_groups; g++) {
            __m512i sum = _mm512_setzero_si512();
            for (int j = g * group_size; j < (g + 1) * group_size; j += 64) {
                __m512i xv = _mm512_loadu_si512((const void *)(x + j));
                __m512i wv = _mm512_loadu_si512((const void *)(w + j));
                __mmask64 negative = _mm512_movepi8_mask(xv);
                __m512i w_signed = _mm512_mask_sub_epi8(wv, negative, _mm512_setzero_si512(), wv);
                sum = _mm512_dpbusd_epi32(sum, _mm512_abs_epi8(xv), w_signed);
            }
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(ws[g] * xs[g]), acc);
        }
        return _mm512_reduce_add_ps(acc);
    }
#endif
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < n_groups; g++) {
        __m256i sum = _mm256_setzero_si256();
        for (int j = g * group_size; j < (g + 1) * group_size; j += 32) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x + j));
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + j));
            __m256i x_abs = _mm256_sign_epi8(xv, xv), w_signed = _mm256_sign_epi8(wv, xv);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
            sum = _mm256_dpbusd_epi32(sum, x_abs, w_signed);
#else
            // pairs of products fit in int16: 2 * 127 * 127 < 32767
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(x_abs, w_signed),
                                                          _mm256_set1_epi16(1)));
#endif
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(ws[g] * xs[g]), acc);
    }
    return hsum256(acc);
#else
    (void)w; (void)ws; (void)x; (void)xs; (void)n_groups;
    return 0.0f;  // (never called: simd_int8_applies is 0)
#endif
}

// matmul with the SIMD dot products; rows are split between threads, so results equal one thread's
static int fast_matmul(float *out, const float *x, const QVector *xq, Matrix w, int n, int d, int group_size) {
    int i, groups_per_row = group_size ? n / group_size : 0;  // (a division per row showed in the profile)
    if (w.f) {
#ifdef HAVE_SIMD_DOT_F32
        #pragma omp parallel for private(i)
        for (i = 0; i < d; i++) out[i] = simd_dot_f32(w.f + (size_t)i * n, x, n);
        return 1;
#endif
        (void)x;
    } else if (simd_int8_applies(group_size)) {
        #pragma omp parallel for private(i)
        for (i = 0; i < d; i++)
            out[i] = simd_dot_int8(w.q + (size_t)i * n, w.s + (size_t)i * groups_per_row, xq->q, xq->s, n, group_size);
        return 1;
    }
    return 0;
}

/*
attention for a head_dim that is a multiple of 8: the scores of 8 keys at a time, each key's dot product in its own
register and the 8 sums gathered into one vector at the end (instead of a horizontal sum per key), and the weighted
sum of the values with 64 of the output's values held in registers while the positions pass.
*/
static int fast_attention(float *out, const float *q, const float *keys, const float *values, int pos, int head_dim,
                          float *att) {
#if defined(__AVX2__) && defined(__FMA__)
    if (head_dim % 8 != 0) return 0;
    __m256 scale = _mm256_set1_ps(1.0f / sqrtf((float)head_dim));
    int p = 0;
    for (; p + 8 <= pos + 1; p += 8) {
        __m256 acc[8];
        for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();
        for (int i = 0; i < head_dim; i += 8) {
            __m256 qv = _mm256_loadu_ps(q + i);
            for (int k = 0; k < 8; k++)
                acc[k] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + (size_t)(p + k) * head_dim + i), acc[k]);
        }
        __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
        __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
        __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);  // halves of the 8 sums
        __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                    _mm256_permute2f128_ps(s0123, s4567, 0x31));
        _mm256_storeu_ps(att + p, _mm256_mul_ps(sums, scale));
    }
    for (; p <= pos; p++) {
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < head_dim; i += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(keys + (size_t)p * head_dim + i), acc);
        att[p] = hsum256(acc) * (1.0f / sqrtf((float)head_dim));
    }
    softmax(att, pos + 1);
    for (int i0 = 0; i0 < head_dim; i0 += 64) {  // 64 values of out at a time in 8 registers
        int width = head_dim - i0 < 64 ? (head_dim - i0) / 8 : 8;
        __m256 acc[8];
        for (int c = 0; c < width; c++) acc[c] = _mm256_setzero_ps();
        for (int p2 = 0; p2 <= pos; p2++) {
            __m256 a = _mm256_set1_ps(att[p2]);
            const float *value = values + (size_t)p2 * head_dim + i0;
            for (int c = 0; c < width; c++) acc[c] = _mm256_fmadd_ps(a, _mm256_loadu_ps(value + 8 * c), acc[c]);
        }
        for (int c = 0; c < width; c++) _mm256_storeu_ps(out + i0 + 8 * c, acc[c]);
    }
    return 1;
#else
    (void)out; (void)q; (void)keys; (void)values; (void)pos; (void)head_dim; (void)att;
    return 0;
#endif
}

/*
Map the file at a 2 MB boundary and ask for transparent huge pages. Where the page cache holds the file in large
folios (ext4 and xfs on recent Linux, after the file was read from disk) the weights are then mapped with 2 MB pages,
and streaming them through the matmuls misses the TLB 512 times less often: 10-30% more tokens/s at 42M-110M
float32 here. Elsewhere the advice is ignored and it is an ordinary mapping. NULL where it cannot.
*/
static void *map_file_huge(int fd, size_t size) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    size_t huge = (size_t)2 << 20;
    char *reserved = mmap(NULL, size + huge, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (reserved != MAP_FAILED) {
        char *aligned = (char *)(((uintptr_t)reserved + huge - 1) & ~(uintptr_t)(huge - 1));
        void *data = mmap(aligned, size, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0);
        if (data != MAP_FAILED) {
            size_t page = (size_t)sysconf(_SC_PAGESIZE), mapped = (size + page - 1) / page * page;
            if (aligned > reserved) munmap(reserved, aligned - reserved);  // the rest of the reservation
            if (reserved + size + huge > aligned + mapped) munmap(aligned + mapped, reserved + size + huge - (aligned + mapped));
            madvise(data, size, MADV_HUGEPAGE);
            return data;
        }
        munmap(reserved, size + huge);
    }
#endif
    (void)fd; (void)size;
    return NULL;
}

/*
matmul_block: W (d, n) times a block of n_tokens vectors. Each thread takes a share of W's rows, a tile of TILE_ROWS
rows at a time, and multiplies it with every vector of the block, TILE_TOKENS vectors at a time: the TILE_ROWS x
TILE_TOKENS dot products of a tile run side by side in SIMD registers, so each weight loaded is used TILE_TOKENS
times and each activation TILE_ROWS times, and the tile's rows stay in the L1 cache while the block's vectors pass
by (from L2). W is read from memory once per block. The dot products are those of matmul, summed in another order.
*/
#define TILE_ROWS 4
#define TILE_TOKENS 3

#if defined(__AVX2__) && defined(__FMA__)
// out[t * d + r] = w_r . x_t for the rows r < rows and tokens t < tokens of one tile (float32, n a multiple of 8)
static inline __attribute__((always_inline)) void tile_f32(float *out, const float *w, const float *x, int n, int d,
                                                           int rows, int tokens) {
    __m256 acc[TILE_ROWS][TILE_TOKENS];
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++) acc[r][t] = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) {
        __m256 xv[TILE_TOKENS];
        for (int t = 0; t < tokens; t++) xv[t] = _mm256_loadu_ps(x + (size_t)t * n + j);
        for (int r = 0; r < rows; r++) {
            __m256 wv = _mm256_loadu_ps(w + (size_t)r * n + j);
            for (int t = 0; t < tokens; t++) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++) out[(size_t)t * d + r] = hsum256(acc[r][t]);
}

// the same for int8 (group_size a multiple of 32): per group, exact int32 sums as in simd_dot_int8, then the scales
static inline __attribute__((always_inline)) void tile_int8(float *out, const int8_t *w, const float *ws,
                                                            const int8_t *x, const float *xs, int n, int d,
                                                            int group_size, int rows, int tokens) {
    int n_groups = n / group_size;
    __m256 acc[TILE_ROWS][TILE_TOKENS];
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++) acc[r][t] = _mm256_setzero_ps();
    for (int g = 0; g < n_groups; g++) {
        __m256i sum[TILE_ROWS][TILE_TOKENS];
        for (int r = 0; r < rows; r++)
            for (int t = 0; t < tokens; t++) sum[r][t] = _mm256_setzero_si256();
        for (int j = g * group_size; j < (g + 1) * group_size; j += 32) {
            __m256i xv[TILE_TOKENS], x_abs[TILE_TOKENS];
            for (int t = 0; t < tokens; t++) {
                xv[t] = _mm256_loadu_si256((const __m256i *)(x + (size_t)t * n + j));
                x_abs[t] = _mm256_sign_epi8(xv[t], xv[t]);
            }
            for (int r = 0; r < rows; r++) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(w + (size_t)r * n + j));
                for (int t = 0; t < tokens; t++) {
                    __m256i w_signed = _mm256_sign_epi8(wv, xv[t]);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
                    sum[r][t] = _mm256_dpbusd_epi32(sum[r][t], x_abs[t], w_signed);
#else
                    sum[r][t] = _mm256_add_epi32(sum[r][t], _mm256_madd_epi16(_mm256_maddubs_epi16(x_abs[t], w_signed),
                                                                              _mm256_set1_epi16(1)));
#endif
                }
            }
        }
        for (int r = 0; r < rows; r++)
            for (int t = 0; t < tokens; t++)
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r][t]),
                                            _mm256_set1_ps(ws[(size_t)r * n_groups + g] * xs[(size_t)t * n_groups + g]),
                                            acc[r][t]);
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++) out[(size_t)t * d + r] = hsum256(acc[r][t]);
}
#endif

// GCC keeps a tile's vectors in registers (instead of loading x again for every row) only with its scheduler that
// watches register pressure, which -O3 leaves off on x86: ~40% faster here
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("schedule-insns", "sched-pressure")))
#endif
static int fast_matmul_block(float *out, const float *x, const QVector *xq, Matrix w, int n, int d, int group_size,
                             int n_tokens) {
#if defined(__AVX2__) && defined(__FMA__)
    int is_f32 = w.f != NULL, n_groups = group_size ? n / group_size : 0;
    if (is_f32 ? n % 8 != 0 : group_size % 32 != 0) return 0;
    int tile, n_tiles = (d + TILE_ROWS - 1) / TILE_ROWS;
    #pragma omp parallel for private(tile)
    for (tile = 0; tile < n_tiles; tile++) {
        int i = tile * TILE_ROWS, rows = d - i < TILE_ROWS ? d - i : TILE_ROWS;
        for (int t = 0; t < n_tokens; t += TILE_TOKENS) {
            int tokens = n_tokens - t < TILE_TOKENS ? n_tokens - t : TILE_TOKENS;
            float *o = out + (size_t)t * d + i;
            if (is_f32) {
                const float *wr = w.f + (size_t)i * n, *xr = x + (size_t)t * n;
                if (rows == TILE_ROWS && tokens == TILE_TOKENS) tile_f32(o, wr, xr, n, d, TILE_ROWS, TILE_TOKENS);
                else tile_f32(o, wr, xr, n, d, rows, tokens);  // the edges of W and of the block
            } else {
                const int8_t *wr = w.q + (size_t)i * n, *xr = xq->q + (size_t)t * n;
                const float *wsr = w.s + (size_t)i * n_groups, *xsr = xq->s + (size_t)t * n_groups;
                if (rows == TILE_ROWS && tokens == TILE_TOKENS)
                    tile_int8(o, wr, wsr, xr, xsr, n, d, group_size, TILE_ROWS, TILE_TOKENS);
                else tile_int8(o, wr, wsr, xr, xsr, n, d, group_size, rows, tokens);
            }
        }
    }
    return 1;
#else
    (void)out; (void)x; (void)xq; (void)w; (void)n; (void)d; (void)group_size; (void)n_tokens;
    return 0;
#endif
}
