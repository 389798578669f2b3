/* CoordGen C API. Generated from capi/src/lib.rs by cbindgen; do not edit. */

#ifndef COORDGEN_H
#define COORDGEN_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

/**
 * What a call did.
 */
typedef enum CoordgenStatus {
  COORDGEN_STATUS_OK = 0,
  /**
   * A null pointer, text that is not UTF-8, or an out-of-range parameter.
   */
  COORDGEN_STATUS_INVALID_ARGUMENT = 1,
  /**
   * The config, a plugin or the model could not be loaded.
   */
  COORDGEN_STATUS_LOAD = 2,
  /**
   * The request failed (the prompt does not fit the context, a backend error, ...).
   */
  COORDGEN_STATUS_GENERATE = 3,
  /**
   * A panic inside CoordGen was caught; the session should be freed.
   */
  COORDGEN_STATUS_PANIC = 4,
} CoordgenStatus;

/**
 * Why a generation ended.
 */
typedef enum CoordgenFinish {
  /**
   * An end-of-sequence token or a stop string.
   */
  COORDGEN_FINISH_STOP = 0,
  /**
   * `max_tokens` reached.
   */
  COORDGEN_FINISH_LENGTH = 1,
  /**
   * `coordgen_cancel`, or the callback returned false.
   */
  COORDGEN_FINISH_CANCELLED = 2,
} CoordgenFinish;

/**
 * A loaded model with its KV cache (opaque).
 */
typedef struct CoordgenSession CoordgenSession;

/**
 * Sampling and length of one request; `coordgen_params_default()` gives greedy decoding
 * of up to 256 tokens.
 */
typedef struct CoordgenParams {
  uint32_t max_tokens;
  /**
   * 0: greedy.
   */
  float temperature;
  /**
   * 0: off.
   */
  uint32_t top_k;
  /**
   * 1: off.
   */
  float top_p;
  /**
   * 0: off.
   */
  float min_p;
  /**
   * 1: off.
   */
  float repeat_penalty;
  uint64_t seed;
  /**
   * Stop at the model's end-of-sequence tokens (false: run to `max_tokens`).
   */
  bool stop_at_eos;
} CoordgenParams;

/**
 * Receives each piece of generated text (`len` bytes of UTF-8, not NUL-terminated; valid
 * during the call). Return true to go on, false to stop after the current step.
 */
typedef bool (*CoordgenTextCallback)(const char *text, size_t len, void *user);

/**
 * Figures of one generation.
 */
typedef struct CoordgenStats {
  uint32_t prompt_tokens;
  /**
   * Prompt tokens computed (the rest were reused from the session's cache).
   */
  uint32_t prefill_tokens;
  uint32_t generated_tokens;
  double prefill_ms;
  double decode_ms;
  /**
   * Verification steps and drafted tokens accepted (0 without a drafter).
   */
  uint64_t steps;
  uint64_t accepted;
  /**
   * Tokens produced per verification step (1 without a drafter).
   */
  double tokens_per_step;
  enum CoordgenFinish finish;
} CoordgenStats;

/**
 * One chat message: role ("system", "user", "assistant") and content, UTF-8.
 */
typedef struct CoordgenMessage {
  const char *role;
  const char *content;
} CoordgenMessage;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * The message of the last failed call on this thread ("" if none). Valid until the next
 * failing call on this thread.
 */
const char *coordgen_last_error(void);

/**
 * The library's version, e.g. "0.1.0" (static storage).
 */
const char *coordgen_version(void);

/**
 * Greedy decoding of up to 256 tokens, stopping at end-of-sequence.
 */
struct CoordgenParams coordgen_params_default(void);

/**
 * Opens a session: the plugin config at `config_path` (NULL: `$COORDGEN_CONFIG`,
 * `./plugins.toml`, or the built-in CPU-only default), the model at `model` (a GGUF file,
 * a Hugging Face directory, or a default model name under `$COORDGEN_MODELS`), a KV
 * context of `n_ctx` tokens (0: the model's, capped at 8192), `threads` backend threads
 * (0: the backend's default) and the drafter `drafter` (NULL: the config's default;
 * "none": plain decoding). On success `*out` is the session, to be freed with
 * `coordgen_session_free`.
 *
 * # Safety
 * The strings are NULL or NUL-terminated; `out` points at writable storage.
 */
enum CoordgenStatus coordgen_session_open(const char *config_path,
                                          const char *model,
                                          uint32_t n_ctx,
                                          uint32_t threads,
                                          const char *drafter,
                                          struct CoordgenSession **out);

/**
 * Frees a session (NULL is ignored). No call on it may be running.
 *
 * # Safety
 * `s` came from `coordgen_session_open` and is not used afterwards.
 */
void coordgen_session_free(struct CoordgenSession *s);

/**
 * Asks the generation running on `s` (from another thread) to stop after its current
 * step; it then returns `COORDGEN_STATUS_OK` with finish `COORDGEN_FINISH_CANCELLED`.
 *
 * # Safety
 * `s` is a live session.
 */
void coordgen_cancel(const struct CoordgenSession *s);

/**
 * Completes `prompt` (UTF-8 text, tokenized with the model's BOS) with parameters `p`
 * (NULL: the defaults), streaming the text to `cb` (may be NULL) with `user`; fills
 * `*out` (may be NULL) with the figures. The session's cache keeps the longest prefix a
 * later prompt shares.
 *
 * # Safety
 * `s` is a live session not used by another generation; the pointers are NULL or valid.
 */
enum CoordgenStatus coordgen_generate(const struct CoordgenSession *s,
                                      const char *prompt,
                                      const struct CoordgenParams *p,
                                      CoordgenTextCallback cb,
                                      void *user,
                                      struct CoordgenStats *out);

/**
 * Replies to the conversation `messages[0..n]` through the model's chat template (the
 * assistant's turn opened), otherwise as `coordgen_generate`. Sending the growing
 * conversation each turn reuses the cache of the earlier turns.
 *
 * # Safety
 * As `coordgen_generate`; `messages` points at `n` messages with valid strings.
 */
enum CoordgenStatus coordgen_chat(const struct CoordgenSession *s,
                                  const struct CoordgenMessage *messages,
                                  size_t n,
                                  const struct CoordgenParams *p,
                                  CoordgenTextCallback cb,
                                  void *user,
                                  struct CoordgenStats *out);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* COORDGEN_H */
