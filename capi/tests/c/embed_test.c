/* Exercises the C API from C: a bad model path, a completion, a two-turn chat that reuses
 * its cache, a callback that stops early, invalid arguments, and freeing. Prints the
 * completion's text between markers so the Rust test can compare it with plain greedy
 * decoding. Usage: embed_test CONFIG MODEL */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordgen.h"

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "FAILED %s:%d: %s (last error: %s)\n", __FILE__, __LINE__,   \
                    #cond, coordgen_last_error());                                       \
            return 1;                                                                    \
        }                                                                                \
    } while (0)

struct text {
    char buf[8192];
    size_t len;
    int pieces;
    int stop_after; /* 0: never */
};

static bool collect(const char *piece, size_t len, void *user) {
    struct text *t = user;
    if (t->len + len < sizeof t->buf) {
        memcpy(t->buf + t->len, piece, len);
        t->len += len;
        t->buf[t->len] = '\0';
    }
    t->pieces++;
    return t->stop_after == 0 || t->pieces < t->stop_after;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CONFIG MODEL\n", argv[0]);
        return 2;
    }
    const char *config = argv[1], *model = argv[2];
    printf("coordgen %s\n", coordgen_version());

    CoordgenSession *s = (CoordgenSession *)1;
    CHECK(coordgen_session_open(config, "/no/such/model.gguf", 256, 2, "none", &s) == COORDGEN_STATUS_LOAD);
    CHECK(s == NULL);
    CHECK(strstr(coordgen_last_error(), "not found") != NULL);
    CHECK(coordgen_session_open(config, NULL, 256, 2, NULL, &s) == COORDGEN_STATUS_INVALID_ARGUMENT);

    CHECK(coordgen_session_open(config, model, 1024, 2, NULL, &s) == COORDGEN_STATUS_OK);
    CHECK(s != NULL);

    /* A completion, speculative with the config's drafter. */
    CoordgenParams p = coordgen_params_default();
    p.max_tokens = 24;
    struct text t = {0};
    CoordgenStats st;
    CHECK(coordgen_generate(s, "The three primary colors are", &p, collect, &t, &st) == COORDGEN_STATUS_OK);
    CHECK(st.generated_tokens > 0 && st.generated_tokens <= 24);
    CHECK(st.steps > 0 && st.steps <= st.generated_tokens);
    CHECK(t.len > 0);
    printf("<<<%s>>>\n", t.buf);
    printf("completion: %u tokens in %llu steps (%.2f tokens/step), finish %d\n", st.generated_tokens,
           (unsigned long long)st.steps, st.tokens_per_step, (int)st.finish);

    /* Two chat turns: the second sends the whole conversation and reuses the first's cache. */
    CoordgenMessage turn1[] = {{"user", "What is the capital of France?"}};
    struct text a = {0};
    CoordgenStats s1, s2;
    p.max_tokens = 12;
    CHECK(coordgen_chat(s, turn1, 1, &p, collect, &a, &s1) == COORDGEN_STATUS_OK);
    CoordgenMessage turn2[] = {{"user", "What is the capital of France?"}, {"assistant", a.buf}, {"user", "And of Italy?"}};
    struct text b = {0};
    CHECK(coordgen_chat(s, turn2, 3, &p, collect, &b, &s2) == COORDGEN_STATUS_OK);
    CHECK(s2.prompt_tokens > s1.prompt_tokens);
    CHECK(s2.prefill_tokens < s2.prompt_tokens - s1.prompt_tokens + 16);
    printf("chat: turn 2 computed %u of %u prompt tokens\n", s2.prefill_tokens, s2.prompt_tokens);

    /* A callback that stops after 3 pieces cancels the request after that step. */
    struct text c = {0};
    c.stop_after = 3;
    p.max_tokens = 64;
    p.stop_at_eos = false;
    CHECK(coordgen_generate(s, "Count: one, two, three, four, five,", &p, collect, &c, &st) == COORDGEN_STATUS_OK);
    CHECK(st.finish == COORDGEN_FINISH_CANCELLED);
    CHECK(st.generated_tokens < 64);

    /* Invalid arguments get codes and messages, not crashes. */
    p.temperature = -1.0f;
    CHECK(coordgen_generate(s, "x", &p, NULL, NULL, NULL) == COORDGEN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(coordgen_last_error(), "temperature") != NULL);
    p = coordgen_params_default();
    CHECK(coordgen_generate(NULL, "x", &p, NULL, NULL, NULL) == COORDGEN_STATUS_INVALID_ARGUMENT);
    CHECK(coordgen_generate(s, NULL, &p, NULL, NULL, NULL) == COORDGEN_STATUS_INVALID_ARGUMENT);
    CHECK(coordgen_chat(s, NULL, 0, &p, NULL, NULL, NULL) == COORDGEN_STATUS_INVALID_ARGUMENT);
    CoordgenMessage bad[] = {{"user", "\xff\xfe"}};
    CHECK(coordgen_chat(s, bad, 1, &p, NULL, NULL, NULL) == COORDGEN_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(coordgen_last_error(), "UTF-8") != NULL);

    coordgen_cancel(s); /* nothing running: harmless */
    coordgen_session_free(s);
    coordgen_session_free(NULL);
    printf("ok\n");
    return 0;
}
