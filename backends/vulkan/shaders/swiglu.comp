#version 450
// gate = silu(gate) * up, elementwise.
layout(local_size_x = 256) in;
layout(std430, binding = 0) buffer G { float g[]; };
layout(std430, binding = 1) readonly buffer U { float up[]; };
layout(push_constant) uniform P { uint n; } p;
void main() {
    uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * 65535u * 256u;
    if (i >= p.n) return;
    float x = g[i];
    g[i] = x / (1.0 + exp(-x)) * up[i];
}
