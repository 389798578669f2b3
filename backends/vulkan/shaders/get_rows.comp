#version 450
// x[t] = dequantized row tokens[t] of the embedding table, for the tokens whose row lies in
// this chunk of the table's rows (row0 .. row0 + n_rows): one workgroup per token, one
// thread per 32-value unit.
#extension GL_GOOGLE_include_directive : enable
// [[unroll]]: fixed-count loops unrolled so the 32-value unit and the token tile stay in
// registers (an indexed private array lives in memory on some drivers, lavapipe among them).
#extension GL_EXT_control_flow_attributes : enable
layout(local_size_x = 64) in;
layout(std430, binding = 0) readonly buffer Wt { uint wq[]; };
layout(std430, binding = 1) readonly buffer T { uint tokens[]; };
layout(std430, binding = 2) writeonly buffer O { float outp[]; };
layout(push_constant) uniform P { uint cols; uint row0; uint n_rows; uint row_bytes; } p;

#include "dequant.glsl"

void main() {
    uint t = gl_WorkGroupID.x;
    uint tok = tokens[t];
    if (tok < p.row0 || tok >= p.row0 + p.n_rows) return;
    uint rb = (tok - p.row0) * p.row_bytes;
    for (uint u = gl_LocalInvocationID.x; u < p.cols / 32u; u += 64u) {
        float w[32];
        deq(rb, u, w);
        [[unroll]] for (uint l = 0u; l < 32u; l++) outp[t * p.cols + u * 32u + l] = w[l];
    }
}
