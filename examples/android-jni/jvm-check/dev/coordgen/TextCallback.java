// The JVM-side check of the JNI glue (no Android, no Kotlin compiler on CI): the same
// interface as CoordGen.kt's `fun interface TextCallback`.
package dev.coordgen;

public interface TextCallback {
    boolean onText(String text);
}
