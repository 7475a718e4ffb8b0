// Load a GGUF the way llama-server does (-np 4 auto => kv_unified, -b 2048 -ub 512, --no-warmup, -fit off)
// and hold it, so that nvidia-smi can be read while the model and context are resident.
//
//   probe MODEL NGL CTX CACHE(f16|q8_0|q4_0) FA(on|off) [N_SEQ_MAX=4] [N_UBATCH=512] [N_BATCH=2048]
//
// Logs everything llama.cpp/ggml print (all levels) to stderr. After the context exists it prints
// "PROBE READY" on stdout, then reads commands from stdin, one a line:
//   warmup     -> llama-server's warmup (decode BOS+EOS, clear memory, sync), then "PROBE WARM"
//   prompt N   -> decode N tokens of sequence 0 in n_batch chunks, clear memory, then "PROBE DECODED N"
//   quit / EOF -> free everything and exit 0
// Env: PROBE_PAUSE_INIT=1: after backend init (CUDA context created by the devmem query), print "PROBE INIT"
// and wait for one stdin line before loading. PROBE_THREADS (default 4), PROBE_LOAD_MODE (auto|mmap|none, default auto = what llama-server uses).
#include "llama.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void log_cb(enum ggml_log_level level, const char * text, void * user) {
    (void) level;
    (void) user;
    fputs(text, stderr);
    fflush(stderr);
}

static void say(const char * what, long n) {
    printf("PROBE %s %ld\n", what, n);
    fflush(stdout);
}

// cudaMemGetInfo as ggml sees it (free/total of each GPU), from inside this process: one line per GPU.
static void gpu_mem(const char * stage) {
    for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        enum ggml_backend_dev_type t = ggml_backend_dev_type(dev);
        if (t != GGML_BACKEND_DEVICE_TYPE_GPU && t != GGML_BACKEND_DEVICE_TYPE_IGPU) continue;
        size_t free_b = 0, total_b = 0;
        ggml_backend_dev_memory(dev, &free_b, &total_b);
        fprintf(stderr, "probe: devmem stage=%s dev=%s free_mib=%.2f total_mib=%.2f used_mib=%.2f\n", stage,
                ggml_backend_dev_name(dev), free_b / 1048576.0, total_b / 1048576.0, (total_b - free_b) / 1048576.0);
    }
    fflush(stderr);
}

static enum ggml_type cache_type(const char * s) {
    if (strcmp(s, "f16") == 0) return GGML_TYPE_F16;
    if (strcmp(s, "q8_0") == 0) return GGML_TYPE_Q8_0;
    if (strcmp(s, "q4_0") == 0) return GGML_TYPE_Q4_0;
    if (strcmp(s, "f32") == 0) return GGML_TYPE_F32;
    if (strcmp(s, "bf16") == 0) return GGML_TYPE_BF16;
    fprintf(stderr, "probe: unknown cache type %s\n", s);
    exit(2);
}

static int decode_tokens(struct llama_context * ctx, const struct llama_vocab * vocab, long n, int n_batch) {
    int n_vocab = llama_vocab_n_tokens(vocab);
    llama_token * toks = malloc(sizeof(llama_token) * (size_t) n_batch);
    int rc = 0;
    for (long done = 0; done < n && rc == 0; ) {
        int k = (int) ((n - done) < n_batch ? (n - done) : n_batch);
        for (int i = 0; i < k; i++) {
            // skip the first 8 ids (specials in the synthetic vocab); any id is fine for memory purposes
            toks[i] = (llama_token) (8 + (done + i) * 7919 % (n_vocab - 8));
        }
        rc = llama_decode(ctx, llama_batch_get_one(toks, k));
        done += k;
    }
    free(toks);
    llama_synchronize(ctx);
    return rc;
}

int main(int argc, char ** argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s MODEL NGL CTX CACHE FA(on|off) [N_SEQ_MAX=4] [N_UBATCH=512] [N_BATCH=2048]\n", argv[0]);
        return 2;
    }
    const char * path = argv[1];
    int ngl = atoi(argv[2]);
    int n_ctx = atoi(argv[3]);
    enum ggml_type ct = cache_type(argv[4]);
    int fa = strcmp(argv[5], "on") == 0 ? 1 : strcmp(argv[5], "off") == 0 ? 0 : -1;
    int n_seq = argc > 6 ? atoi(argv[6]) : 4;
    int n_ubatch = argc > 7 ? atoi(argv[7]) : 512;
    int n_batch = argc > 8 ? atoi(argv[8]) : 2048;
    const char * th = getenv("PROBE_THREADS");
    int n_threads = th ? atoi(th) : 4;
    const char * lm = getenv("PROBE_LOAD_MODE");

    llama_log_set(log_cb, NULL);
    llama_backend_init();
    fprintf(stderr, "probe: system_info: %s\n", llama_print_system_info());
    gpu_mem("init");
    if (getenv("PROBE_PAUSE_INIT")) {  // hold here (CUDA context only, nothing loaded) until a line arrives
        char go[64];
        say("INIT pid", (long) getpid());
        if (!fgets(go, sizeof go, stdin)) return 0;
    }

    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = ngl;
    mp.load_mode = LLAMA_LOAD_MODE_AUTO;
    if (lm && strcmp(lm, "mmap") == 0) mp.load_mode = LLAMA_LOAD_MODE_MMAP;
    if (lm && strcmp(lm, "none") == 0) mp.load_mode = LLAMA_LOAD_MODE_NONE;
    struct llama_model * model = llama_model_load_from_file(path, mp);
    if (!model) {
        fprintf(stderr, "probe: failed to load %s\n", path);
        return 1;
    }

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) n_ctx;
    cp.n_batch = (uint32_t) n_batch;
    cp.n_ubatch = (uint32_t) n_ubatch;
    cp.n_seq_max = (uint32_t) n_seq;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.flash_attn_type = fa == 1 ? LLAMA_FLASH_ATTN_TYPE_ENABLED
                       : fa == 0 ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_AUTO;
    cp.type_k = ct;
    cp.type_v = ct;
    cp.kv_unified = n_seq > 1;  // llama-server: -np auto => n_parallel = 4, kv_unified = true
    cp.swa_full = false;        // common_params default (llama_context_default_params says true)
    cp.offload_kqv = true;
    cp.op_offload = true;
    cp.no_perf = false;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "probe: failed to create the context\n");
        llama_model_free(model);
        return 1;
    }
    fprintf(stderr, "probe: n_ctx = %u, n_seq_max = %u, n_batch = %u, n_ubatch = %u\n", llama_n_ctx(ctx),
            llama_n_seq_max(ctx), llama_n_batch(ctx), llama_n_ubatch(ctx));
    gpu_mem("ready");
    say("READY pid", (long) getpid());

    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    char line[256];
    int rc = 0;
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "quit", 4) == 0) break;
        if (strncmp(line, "warmup", 6) == 0) {
            llama_token tmp[2];
            int n = 0;
            llama_token bos = llama_vocab_bos(vocab), eos = llama_vocab_eos(vocab);
            if (bos != LLAMA_TOKEN_NULL) tmp[n++] = bos;
            if (eos != LLAMA_TOKEN_NULL) tmp[n++] = eos;
            if (n == 0) tmp[n++] = 0;
            rc = llama_decode(ctx, llama_batch_get_one(tmp, n));
            llama_memory_clear(llama_get_memory(ctx), true);
            llama_synchronize(ctx);
            gpu_mem("warm");
            say("WARM rc", rc);
        } else if (strncmp(line, "prompt ", 7) == 0) {
            long n = atol(line + 7);
            rc = decode_tokens(ctx, vocab, n, n_batch);
            llama_memory_clear(llama_get_memory(ctx), true);
            gpu_mem("decoded");
            say("DECODED rc", rc);
        } else {
            fprintf(stderr, "probe: unknown command %s", line);
        }
    }
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
