#version 450
// Per (token, head) of q and k: optional per-head RMS norm (qwen3's QK norm), then the
// rotary embedding at the token's position from a cos/sin table the host computed with the
// CPU backend's formula (GPU sin/cos of large angles is not accurate enough).
layout(local_size_x = 64) in;
layout(std430, binding = 0) buffer Q { float q[]; };
layout(std430, binding = 1) buffer K { float k[]; };
layout(std430, binding = 2) readonly buffer QN { float qn[]; };
layout(std430, binding = 3) readonly buffer KN { float kn[]; };
layout(std430, binding = 4) readonly buffer Pos { uint pos[]; };
layout(std430, binding = 5) readonly buffer Tab { vec2 cs[]; }; // [position * half + i] = (cos, sin)
layout(push_constant) uniform P { uint n_head; uint n_head_kv; uint hd; uint flags; float eps; } p;
// flags: 1 neox pairs (i, i + half), 2 q norm, 4 k norm
shared float hv[512];
shared float red[64];
void main() {
    uint t = gl_WorkGroupID.x;
    uint h = gl_WorkGroupID.y;
    uint tid = gl_LocalInvocationID.x;
    bool isq = h < p.n_head;
    uint base = isq ? (t * p.n_head + h) * p.hd : (t * p.n_head_kv + (h - p.n_head)) * p.hd;
    for (uint i = tid; i < p.hd; i += 64u) hv[i] = isq ? q[base + i] : k[base + i];
    barrier();
    bool norm = isq ? (p.flags & 2u) != 0u : (p.flags & 4u) != 0u;
    if (norm) {
        float ss = 0.0;
        for (uint i = tid; i < p.hd; i += 64u) ss += hv[i] * hv[i];
        red[tid] = ss;
        barrier();
        for (uint s = 32u; s > 0u; s >>= 1) { if (tid < s) red[tid] += red[tid + s]; barrier(); }
        float scale = 1.0 / sqrt(red[0] / float(p.hd) + p.eps);
        for (uint i = tid; i < p.hd; i += 64u) hv[i] = hv[i] * scale * (isq ? qn[i] : kn[i]);
        barrier();
    }
    uint half_ = p.hd / 2u;
    for (uint i = tid; i < half_; i += 64u) {
        vec2 c = cs[pos[t] * half_ + i];
        uint a = (p.flags & 1u) != 0u ? i : 2u * i;
        uint b = (p.flags & 1u) != 0u ? i + half_ : 2u * i + 1u;
        float x0 = hv[a], x1 = hv[b];
        float ya = x0 * c.x - x1 * c.y;
        float yb = x0 * c.y + x1 * c.x;
        if (isq) { q[base + a] = ya; q[base + b] = yb; } else { k[base + a] = ya; k[base + b] = yb; }
    }
}
