// A Java stand-in for CoordGen.kt's native half: the same static native methods on the same
// class name (what Kotlin's @JvmStatic companion members compile to), so the JNI symbols of
// libcoordgen_jni.so are exercised from a JVM. The app uses the Kotlin class.
package dev.coordgen;

public final class CoordGen {
    static {
        System.loadLibrary("coordgen_jni");
    }

    static native String nativeVersion();
    static native long nativeOpen(String config, String model, int nCtx, int threads, String drafter);
    static native String nativeChat(long handle, String[] roles, String[] contents, int maxTokens, float temperature, TextCallback callback);
    static native void nativeCancel(long handle);
    static native void nativeClose(long handle);

    /** Usage: CoordGen CONFIG MODEL. Prints the streamed reply between markers and the figures. */
    public static void main(String[] args) {
        System.out.println("version " + nativeVersion());
        try {
            nativeOpen(args[0], "/no/such/model.gguf", 256, 2, "none");
            throw new AssertionError("opening a missing model must throw");
        } catch (RuntimeException e) {
            System.out.println("missing model: " + e.getMessage());
        }
        long h = nativeOpen(args[0], args[1], 1024, 2, null);
        StringBuilder reply = new StringBuilder();
        String stats = nativeChat(h, new String[] {"user"}, new String[] {"What is the capital of France?"}, 16, 0f, text -> {
            reply.append(text);
            return true;
        });
        System.out.println("<<<" + reply + ">>>");
        System.out.println("stats " + stats);
        // A callback that returns false after two pieces stops the request.
        int[] pieces = {0};
        String stopped = nativeChat(h, new String[] {"user"}, new String[] {"Count to twenty."}, 64, 0f, text -> ++pieces[0] < 2);
        System.out.println("stopped " + stopped);
        nativeClose(h);
        System.out.println("ok");
    }
}
