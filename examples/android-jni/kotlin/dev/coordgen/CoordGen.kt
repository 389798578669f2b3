// CoordGen from an Android app: a Kotlin class over the native library libcoordgen_jni.so
// (examples/android-jni/src/lib.rs, itself over the C API). Build steps: ../README.md.
package dev.coordgen

import java.io.Closeable

/** Receives the reply's text as it is decoded; return false to stop after the current step. */
fun interface TextCallback {
    fun onText(text: String): Boolean
}

/**
 * One model with its KV cache. [config] is a plugins.toml path (null: the built-in CPU
 * default, the backend plugin next to the library), [model] a GGUF file path (e.g. in the
 * app's files dir), [drafter] null for the config's default or "none" for plain decoding.
 * Calls on one instance must not overlap (use one per thread); [cancel] may come from any
 * thread. Failures throw RuntimeException with CoordGen's message.
 */
class CoordGen(
    config: String?,
    model: String,
    nCtx: Int = 4096,
    threads: Int = 0,
    drafter: String? = null,
) : Closeable {
    private var handle: Long = nativeOpen(config, model, nCtx, threads, drafter)

    /**
     * Replies to [messages] (role to content, e.g. "user" to "Hello"); sending the whole
     * conversation each turn reuses the cached earlier turns. Returns the request's
     * figures as JSON (prompt_tokens, prefill_tokens, generated_tokens, decode_ms,
     * tokens_per_step, finish).
     */
    fun chat(
        messages: List<Pair<String, String>>,
        maxTokens: Int = 256,
        temperature: Float = 0f,
        onText: TextCallback,
    ): String {
        check(handle != 0L) { "closed" }
        val roles = messages.map { it.first }.toTypedArray()
        val contents = messages.map { it.second }.toTypedArray()
        return nativeChat(handle, roles, contents, maxTokens, temperature, onText)
    }

    /** Stops the running [chat] after its current step. */
    fun cancel() {
        if (handle != 0L) nativeCancel(handle)
    }

    override fun close() {
        if (handle != 0L) {
            nativeClose(handle)
            handle = 0L
        }
    }

    companion object {
        init {
            System.loadLibrary("coordgen_jni")
        }

        @JvmStatic external fun nativeVersion(): String
        @JvmStatic private external fun nativeOpen(config: String?, model: String, nCtx: Int, threads: Int, drafter: String?): Long
        @JvmStatic private external fun nativeChat(
            handle: Long, roles: Array<String>, contents: Array<String>, maxTokens: Int, temperature: Float, callback: TextCallback,
        ): String
        @JvmStatic private external fun nativeCancel(handle: Long)
        @JvmStatic private external fun nativeClose(handle: Long)
    }
}
