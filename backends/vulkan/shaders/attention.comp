#version 450
// Attention of one (token, head): over the slot's cached entries 0 .. start, then the batch
// entries its mask row lets it see, in batch order. The scores go to a scratch row, the
// softmax's max and sum are reduced in a fixed order, and thread d sums p_j * v_j[d] over the
// visible entries in order. Everything is indexed by the visible entry's *rank* (0 .. L),
// never by its cache index, so a token inside a tree (its ancestors scattered through the
// batch) gets the same bits as the same token decoded alone after its ancestors, and the
// same again after keep_entries has compacted them: this is the batch invariance.
layout(local_size_x = 64) in;
layout(std430, binding = 0) readonly buffer Q { float q[]; };
layout(std430, binding = 1) readonly buffer KC { uint kc[]; };
layout(std430, binding = 2) readonly buffer VC { uint vc[]; };
layout(std430, binding = 3) readonly buffer M { uint mask[]; }; // W x W bytes, packed
layout(std430, binding = 4) buffer S { float scratch[]; };
layout(std430, binding = 5) writeonly buffer O { float outp[]; };
layout(push_constant) uniform P {
    uint start;     // cached entries before the batch
    uint n_tok;     // batch width W
    uint tok0;      // first token of this dispatch
    uint n_head;
    uint n_head_kv;
    uint hd;
    uint causal;    // 1: no mask, token i sees batch tokens 0..=i
    uint stride;    // floats per scratch row
    float scale;
} p;

#define MAXW 512u
shared uint vis[MAXW];
shared uint nvis;
shared float red[64];

uint entry(uint r) { return r < p.start ? r : p.start + vis[r - p.start]; }

void main() {
    uint t = p.tok0 + gl_WorkGroupID.x;
    uint h = gl_WorkGroupID.y;
    uint tid = gl_LocalInvocationID.x;
    uint kvd = p.n_head_kv * p.hd;
    uint kvh = h / (p.n_head / p.n_head_kv);
    if (tid == 0u) {
        uint n = 0u;
        for (uint j = 0u; j < p.n_tok; j++) {
            bool see;
            if (p.causal != 0u) {
                see = j <= t;
            } else {
                uint bi = t * p.n_tok + j;
                see = ((mask[bi >> 2] >> ((bi & 3u) * 8u)) & 0xFFu) != 0u;
            }
            if (see) { vis[n] = j; n++; }
        }
        nvis = n;
    }
    barrier();
    uint L = p.start + nvis;
    uint srow = (gl_WorkGroupID.x * p.n_head + h) * p.stride;
    uint qo = (t * p.n_head + h) * p.hd;
    uint half_hd = p.hd / 2u;
    float mx = -3.0e38;
    for (uint r = tid; r < L; r += 64u) {
        uint ko = (entry(r) * kvd + kvh * p.hd) / 2u;
        float s = 0.0;
        for (uint i = 0u; i < half_hd; i++) {
            vec2 kk = unpackHalf2x16(kc[ko + i]);
            s += q[qo + 2u * i] * kk.x + q[qo + 2u * i + 1u] * kk.y;
        }
        s *= p.scale;
        scratch[srow + r] = s;
        mx = max(mx, s);
    }
    red[tid] = mx;
    barrier();
    for (uint s = 32u; s > 0u; s >>= 1) { if (tid < s) red[tid] = max(red[tid], red[tid + s]); barrier(); }
    mx = red[0];
    barrier();
    float sum = 0.0;
    for (uint r = tid; r < L; r += 64u) {
        float e = exp(scratch[srow + r] - mx);
        scratch[srow + r] = e;
        sum += e;
    }
    red[tid] = sum;
    memoryBarrierBuffer();
    barrier();
    for (uint s = 32u; s > 0u; s >>= 1) { if (tid < s) red[tid] += red[tid + s]; barrier(); }
    float inv = 1.0 / red[0];
    for (uint d = tid; d < p.hd; d += 64u) {
        float acc = 0.0;
        uint vo = kvh * p.hd + d;
        for (uint r = 0u; r < L; r++) {
            uint vi = entry(r) * kvd + vo;
            float vv = unpackHalf2x16(vc[vi >> 1])[vi & 1u];
            acc += scratch[srow + r] * vv;
        }
        outp[qo + d] = acc * inv;
    }
}
