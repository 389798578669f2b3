//! The native half of `kotlin/dev/coordgen/CoordGen.kt`: JNI entry points over the C API
//! (`coordgen_capi`). A session is a `jlong` handle; text streams to a Kotlin callback
//! while it is decoded; a failure throws `java.lang.RuntimeException` with the C API's
//! message. Nothing here panics into the JVM: the C API catches its own panics, and JNI
//! failures become exceptions or return values.

use std::ffi::{c_char, c_void, CStr, CString};

use coordgen_capi::*;
use jni::objects::{JClass, JObject, JObjectArray, JString, JValue};
use jni::sys::{jfloat, jint, jlong, jstring};
use jni::JNIEnv;

fn last_error() -> String {
    // SAFETY: the C API returns a valid NUL-terminated string for this thread.
    unsafe { CStr::from_ptr(coordgen_last_error()) }.to_string_lossy().into_owned()
}

fn throw(env: &mut JNIEnv, msg: &str) {
    let _ = env.throw_new("java/lang/RuntimeException", msg);
}

/// A Java string as a C string; `None` for a null reference.
fn c_string(env: &mut JNIEnv, s: &JString) -> Result<Option<CString>, String> {
    if s.is_null() {
        return Ok(None);
    }
    let v: String = env.get_string(s).map_err(|e| format!("reading a string argument: {e}"))?.into();
    CString::new(v).map(Some).map_err(|_| "a string argument contains NUL".to_string())
}

#[no_mangle]
pub extern "system" fn Java_dev_coordgen_CoordGen_nativeOpen<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    config: JString<'l>,
    model: JString<'l>,
    n_ctx: jint,
    threads: jint,
    drafter: JString<'l>,
) -> jlong {
    let args = (|| Ok::<_, String>((c_string(&mut env, &config)?, c_string(&mut env, &model)?.ok_or("model is null")?, c_string(&mut env, &drafter)?)))();
    let (config, model, drafter) = match args {
        Ok(a) => a,
        Err(e) => {
            throw(&mut env, &e);
            return 0;
        }
    };
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    let mut s: *mut CoordgenSession = std::ptr::null_mut();
    // SAFETY: the strings live until the call returns; `s` is writable.
    let st = unsafe { coordgen_session_open(ptr(&config), model.as_ptr(), n_ctx.max(0) as u32, threads.max(0) as u32, ptr(&drafter), &mut s) };
    if st != CoordgenStatus::Ok {
        throw(&mut env, &last_error());
        return 0;
    }
    s as jlong
}

/// What the text callback needs: the JNI environment of this thread and the Kotlin object.
struct Sink<'a, 'l> {
    env: &'a mut JNIEnv<'l>,
    callback: &'a JObject<'l>,
}

extern "C" fn on_text(text: *const c_char, len: usize, user: *mut c_void) -> bool {
    // SAFETY: `user` is the `Sink` of the running `nativeChat`, on this thread; `text`
    // points at `len` bytes of UTF-8 for the duration of the call.
    let sink = unsafe { &mut *(user as *mut Sink) };
    let bytes = unsafe { std::slice::from_raw_parts(text as *const u8, len) };
    let Ok(jtext) = sink.env.new_string(String::from_utf8_lossy(bytes)) else { return false };
    let r = sink.env.call_method(sink.callback, "onText", "(Ljava/lang/String;)Z", &[JValue::Object(&jtext)]);
    let _ = sink.env.delete_local_ref(jtext);
    // A Kotlin exception (or a false return) stops the request; the exception stays
    // pending and reaches the caller when the native method returns.
    matches!(r.and_then(|v| v.z()), Ok(true))
}

#[no_mangle]
pub extern "system" fn Java_dev_coordgen_CoordGen_nativeChat<'l>(
    mut env: JNIEnv<'l>,
    _class: JClass<'l>,
    handle: jlong,
    roles: JObjectArray<'l>,
    contents: JObjectArray<'l>,
    max_tokens: jint,
    temperature: jfloat,
    callback: JObject<'l>,
) -> jstring {
    let session = handle as *const CoordgenSession;
    let mut strings: Vec<(CString, CString)> = Vec::new();
    let n = env.get_array_length(&roles).unwrap_or(0);
    if n != env.get_array_length(&contents).unwrap_or(-1) {
        throw(&mut env, "roles and contents differ in length");
        return std::ptr::null_mut();
    }
    for i in 0..n {
        let pair = (|| -> Result<(CString, CString), String> {
            let r = JString::from(env.get_object_array_element(&roles, i).map_err(|e| e.to_string())?);
            let c = JString::from(env.get_object_array_element(&contents, i).map_err(|e| e.to_string())?);
            Ok((c_string(&mut env, &r)?.ok_or("a role is null")?, c_string(&mut env, &c)?.ok_or("a content is null")?))
        })();
        match pair {
            Ok(p) => strings.push(p),
            Err(e) => {
                throw(&mut env, &e);
                return std::ptr::null_mut();
            }
        }
    }
    let messages: Vec<CoordgenMessage> = strings.iter().map(|(r, c)| CoordgenMessage { role: r.as_ptr(), content: c.as_ptr() }).collect();
    let mut p = coordgen_params_default();
    p.max_tokens = max_tokens.max(0) as u32;
    p.temperature = temperature;
    let mut stats = CoordgenStats::default();
    let st = {
        let mut sink = Sink { env: &mut env, callback: &callback };
        // SAFETY: `session` is a handle from nativeOpen (the Kotlin class keeps it until
        // close); the messages' strings and the sink outlive the call.
        unsafe { coordgen_chat(session, messages.as_ptr(), messages.len(), &p, Some(on_text), &mut sink as *mut Sink as *mut c_void, &mut stats) }
    };
    if st != CoordgenStatus::Ok {
        if !env.exception_check().unwrap_or(false) {
            throw(&mut env, &last_error());
        }
        return std::ptr::null_mut();
    }
    let finish = match stats.finish {
        CoordgenFinish::Stop => "stop",
        CoordgenFinish::Length => "length",
        CoordgenFinish::Cancelled => "cancelled",
    };
    let json = format!(
        "{{\"prompt_tokens\":{},\"prefill_tokens\":{},\"generated_tokens\":{},\"decode_ms\":{:.1},\"tokens_per_step\":{:.3},\"finish\":\"{finish}\"}}",
        stats.prompt_tokens, stats.prefill_tokens, stats.generated_tokens, stats.decode_ms, stats.tokens_per_step
    );
    env.new_string(json).map(|s| s.into_raw()).unwrap_or(std::ptr::null_mut())
}

#[no_mangle]
pub extern "system" fn Java_dev_coordgen_CoordGen_nativeCancel(_env: JNIEnv, _class: JClass, handle: jlong) {
    // SAFETY: a handle from nativeOpen, not yet closed.
    unsafe { coordgen_cancel(handle as *const CoordgenSession) }
}

#[no_mangle]
pub extern "system" fn Java_dev_coordgen_CoordGen_nativeClose(_env: JNIEnv, _class: JClass, handle: jlong) {
    // SAFETY: a handle from nativeOpen; the Kotlin class zeroes it so this runs once.
    unsafe { coordgen_session_free(handle as *mut CoordgenSession) }
}

/// Whether the library is the one this glue was built against (a quick check for apps).
#[no_mangle]
pub extern "system" fn Java_dev_coordgen_CoordGen_nativeVersion<'l>(env: JNIEnv<'l>, _class: JClass<'l>) -> jstring {
    // SAFETY: a static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(coordgen_version()) }.to_string_lossy().into_owned();
    env.new_string(v).map(|s| s.into_raw()).unwrap_or(std::ptr::null_mut())
}

