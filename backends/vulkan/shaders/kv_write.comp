#version 450
// Appends the batch's keys and values (f32) to the slot's cache entries start .. start + W
// as f16 pairs.
layout(local_size_x = 64) in;
layout(std430, binding = 0) readonly buffer K { vec2 k[]; };
layout(std430, binding = 1) readonly buffer V { vec2 v[]; };
layout(std430, binding = 2) writeonly buffer KC { uint kc[]; };
layout(std430, binding = 3) writeonly buffer VC { uint vc[]; };
layout(push_constant) uniform P { uint start; uint pairs; uint n_tok; } p; // pairs = kv_dim / 2
void main() {
    uint i = gl_GlobalInvocationID.x;
    uint t = gl_WorkGroupID.y;
    if (i >= p.pairs) return;
    kc[(p.start + t) * p.pairs + i] = packHalf2x16(k[t * p.pairs + i]);
    vc[(p.start + t) * p.pairs + i] = packHalf2x16(v[t * p.pairs + i]);
}
