/* CoordGen embedded in a C program through its C API: loads a plugin config and a model,
 * streams a chat reply (or a plain completion with --raw) to stdout as it is decoded, and
 * prints the speculative figures. Ctrl-C cancels the reply after the current step.
 *
 * Usage: c-embed [--raw] CONFIG MODEL PROMPT [MAX_TOKENS] */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordgen.h"

static CoordgenSession *session;

static void on_sigint(int sig) {
    (void)sig;
    coordgen_cancel(session); /* only sets a flag: safe in a signal handler */
}

static bool print_piece(const char *text, size_t len, void *user) {
    (void)user;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return true;
}

int main(int argc, char **argv) {
    int raw = argc > 1 && strcmp(argv[1], "--raw") == 0;
    if (argc - raw < 4) {
        fprintf(stderr, "usage: %s [--raw] CONFIG MODEL PROMPT [MAX_TOKENS]\n", argv[0]);
        return 2;
    }
    const char *config = argv[1 + raw], *model = argv[2 + raw], *prompt = argv[3 + raw];
    CoordgenParams params = coordgen_params_default();
    if (argc - raw > 4) params.max_tokens = (uint32_t)strtoul(argv[4 + raw], NULL, 10);

    /* n_ctx 4096, backend's default threads, the config's default drafter. */
    if (coordgen_session_open(config, model, 4096, 0, NULL, &session) != COORDGEN_STATUS_OK) {
        fprintf(stderr, "c-embed: %s\n", coordgen_last_error());
        return 1;
    }
    signal(SIGINT, on_sigint);

    CoordgenStats st;
    CoordgenStatus rc;
    if (raw) {
        rc = coordgen_generate(session, prompt, &params, print_piece, NULL, &st);
    } else {
        CoordgenMessage msg = {"user", prompt};
        rc = coordgen_chat(session, &msg, 1, &params, print_piece, NULL, &st);
    }
    if (rc != COORDGEN_STATUS_OK) {
        fprintf(stderr, "\nc-embed: %s\n", coordgen_last_error());
        coordgen_session_free(session);
        return 1;
    }
    static const char *finish[] = {"stop", "length", "cancelled"};
    fprintf(stderr, "\n[prompt %u tokens (%u computed) | %u tokens in %.0f ms, %.2f tokens per step, %s]\n",
            st.prompt_tokens, st.prefill_tokens, st.generated_tokens, st.decode_ms, st.tokens_per_step,
            finish[st.finish]);
    coordgen_session_free(session);
    return 0;
}
