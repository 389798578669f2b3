#version 450
// out[t][row0 + r] (+)= sum_k W[r][k] * x[t][k] (+ bias), for groups of up to 8 tokens.
// Each weight row is dequantized in registers one 32-value unit at a time and each unit is
// used for all the group's tokens, so the weights stream once per 8 tokens. Every
// (row, token) sum has one fixed order whatever the batch: in the row variant (CPU devices)
// one invocation sums its row's units in order; in the subgroup variant a
// workgroup takes ROWS rows, one subgroup per row, lane i sums units i, i + S, ... (S the
// subgroup size) and `subgroupAdd` combines the lanes, with no barrier at all; in the plain
// variant (devices without subgroup arithmetic) a workgroup takes one row, thread i sums units
// i, i + 64, ... and a fixed shared-memory tree combines them. Nothing depends on how many
// tokens share the dispatch, so the result is batch invariant bit for bit.
#extension GL_GOOGLE_include_directive : enable
// [[unroll]]: fixed-count loops unrolled so the 32-value unit and the token tile stay in
// registers (an indexed private array lives in memory on some drivers, lavapipe among them).
#extension GL_EXT_control_flow_attributes : enable
#ifdef SUBGROUP
#extension GL_KHR_shader_subgroup_basic : enable
#extension GL_KHR_shader_subgroup_arithmetic : enable
#endif

layout(local_size_x = 64) in;
layout(std430, binding = 0) readonly buffer Wt { uint wq[]; };
layout(std430, binding = 1) readonly buffer X { vec4 xs[]; }; // rows of a multiple of 32 floats
layout(std430, binding = 2) buffer O { float outp[]; };
layout(std430, binding = 3) readonly buffer B { float bias[]; };
layout(push_constant) uniform P {
    uint cols;       // k
    uint n_tok;
    uint out_stride; // floats per output token row
    uint row0;       // first output column of this chunk of rows
    uint row_bytes;
    uint flags;      // 1: add bias[row0 + r]; 2: accumulate into out
    uint x_stride;   // floats per input token row
    uint n_rows;     // rows of this chunk
} p;

#include "dequant.glsl"

#define TILE 8u

#if defined(ROW_PER_LANE)
// The CPU-device variant (lavapipe): one invocation per row, summing its units in order;
// every lane of a subgroup reads the same activations, which a CPU driver turns into one
// broadcast load instead of a gather per lane.
void main() {
    uint r = gl_GlobalInvocationID.x;
    if (r >= p.n_rows) return;
    uint t0 = gl_WorkGroupID.y * TILE;
    uint nt = min(TILE, p.n_tok - t0);
    uint units = p.cols / 32u;
    float acc[TILE];
    [[unroll]] for (uint t = 0u; t < TILE; t++) acc[t] = 0.0;
    uint rb = r * p.row_bytes;
    for (uint u = 0u; u < units; u++) {
        float w[32];
        deq(rb, u, w);
        [[unroll]] for (uint t = 0u; t < TILE; t++) {
            if (t < nt) {
                uint xo = ((t0 + t) * p.x_stride + u * 32u) >> 2;
                float s = 0.0;
                [[unroll]] for (uint l = 0u; l < 8u; l++) {
                    vec4 xv = xs[xo + l];
                    s += w[4u * l] * xv.x;
                    s += w[4u * l + 1u] * xv.y;
                    s += w[4u * l + 2u] * xv.z;
                    s += w[4u * l + 3u] * xv.w;
                }
                acc[t] += s;
            }
        }
    }
    [[unroll]] for (uint t = 0u; t < TILE; t++) {
        if (t < nt) {
            uint oi = (t0 + t) * p.out_stride + p.row0 + r;
            float v = acc[t];
            if ((p.flags & 1u) != 0u) v += bias[p.row0 + r];
            if ((p.flags & 2u) != 0u) v += outp[oi];
            outp[oi] = v;
        }
    }
}
#elif defined(SUBGROUP)
// Rows per workgroup: a specialization constant the host picks for the device (shaders.rs).
layout(constant_id = 0) const uint ROWS = 8u;

void main() {
    uint t0 = gl_WorkGroupID.y * TILE;
    uint nt = min(TILE, p.n_tok - t0);
    uint lane = gl_SubgroupInvocationID;
    uint units = p.cols / 32u;
    // Subgroup-uniform loop: every lane of a subgroup works on the same row.
    for (uint rl = gl_SubgroupID; rl < ROWS; rl += gl_NumSubgroups) {
        uint r = gl_WorkGroupID.x * ROWS + rl;
        if (r >= p.n_rows) break;
        float acc[TILE];
        [[unroll]] for (uint t = 0u; t < TILE; t++) acc[t] = 0.0;
        uint rb = r * p.row_bytes;
        for (uint u = lane; u < units; u += gl_SubgroupSize) {
            float w[32];
            deq(rb, u, w);
            [[unroll]] for (uint t = 0u; t < TILE; t++) {
                if (t < nt) {
                    uint xo = ((t0 + t) * p.x_stride + u * 32u) >> 2;
                    float s = 0.0;
                    [[unroll]] for (uint l = 0u; l < 8u; l++) {
                        vec4 xv = xs[xo + l];
                        s += w[4u * l] * xv.x;
                        s += w[4u * l + 1u] * xv.y;
                        s += w[4u * l + 2u] * xv.z;
                        s += w[4u * l + 3u] * xv.w;
                    }
                    acc[t] += s;
                }
            }
        }
        [[unroll]] for (uint t = 0u; t < TILE; t++) {
            float v = subgroupAdd(acc[t]);
            if (t < nt && subgroupElect()) {
                uint oi = (t0 + t) * p.out_stride + p.row0 + r;
                if ((p.flags & 1u) != 0u) v += bias[p.row0 + r];
                if ((p.flags & 2u) != 0u) v += outp[oi];
                outp[oi] = v;
            }
        }
    }
}
#else
shared float red[64u * TILE];

void main() {
    uint r = gl_WorkGroupID.x;
    uint t0 = gl_WorkGroupID.y * TILE;
    uint nt = min(TILE, p.n_tok - t0);
    uint tid = gl_LocalInvocationID.x;
    float acc[TILE];
    [[unroll]] for (uint t = 0u; t < TILE; t++) acc[t] = 0.0;
    uint units = p.cols / 32u;
    uint rb = r * p.row_bytes;
    for (uint u = tid; u < units; u += 64u) {
        float w[32];
        deq(rb, u, w);
        [[unroll]] for (uint t = 0u; t < TILE; t++) {
            if (t < nt) {
                uint xo = ((t0 + t) * p.x_stride + u * 32u) >> 2;
                float s = 0.0;
                [[unroll]] for (uint l = 0u; l < 8u; l++) {
                    vec4 xv = xs[xo + l];
                    s += w[4u * l] * xv.x;
                    s += w[4u * l + 1u] * xv.y;
                    s += w[4u * l + 2u] * xv.z;
                    s += w[4u * l + 3u] * xv.w;
                }
                acc[t] += s;
            }
        }
    }
    [[unroll]] for (uint t = 0u; t < TILE; t++) red[t * 64u + tid] = acc[t];
    barrier();
    for (uint s = 32u; s > 0u; s >>= 1) {
        if (tid < s) {
            [[unroll]] for (uint t = 0u; t < TILE; t++) red[t * 64u + tid] += red[t * 64u + tid + s];
        }
        barrier();
    }
    if (tid < nt) {
        float v = red[tid * 64u];
        uint oi = (t0 + tid) * p.out_stride + p.row0 + r;
        if ((p.flags & 1u) != 0u) v += bias[p.row0 + r];
        if ((p.flags & 2u) != 0u) v += outp[oi];
        outp[oi] = v;
    }
}
#endif
