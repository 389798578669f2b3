#version 450
// out[t] = x[src(t)] / sqrt(mean(x[src(t)]^2) + eps) * g: one workgroup per output row; with
// flag 1 the source row is rows[t] (the logit rows of a forward), else t. Fixed order: each
// thread sums elements tid, tid+64, ..., then a fixed tree.
layout(local_size_x = 64) in;
layout(std430, binding = 0) readonly buffer X { float xs[]; };
layout(std430, binding = 1) writeonly buffer O { float outp[]; };
layout(std430, binding = 2) readonly buffer G { float g[]; };
layout(std430, binding = 3) readonly buffer R { uint rows[]; };
layout(push_constant) uniform P { uint n; uint flags; float eps; } p;
shared float red[64];
void main() {
    uint t = gl_WorkGroupID.x;
    uint tid = gl_LocalInvocationID.x;
    uint src = (p.flags & 1u) != 0u ? rows[t] : t;
    float ss = 0.0;
    for (uint i = tid; i < p.n; i += 64u) { float v = xs[src * p.n + i]; ss += v * v; }
    red[tid] = ss;
    barrier();
    for (uint s = 32u; s > 0u; s >>= 1) { if (tid < s) red[tid] += red[tid + s]; barrier(); }
    float scale = 1.0 / sqrt(red[0] / float(p.n) + p.eps);
    for (uint i = tid; i < p.n; i += 64u) outp[t * p.n + i] = xs[src * p.n + i] * scale * g[i];
}
