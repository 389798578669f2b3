// Dequantization of one 32-value unit of a weight row, for every ggml type. The weights are
// a `uint` buffer holding the file's bytes unchanged (so blocks of 18, 22 or 210 bytes need
// no repacking); `b8`/`b16` read bytes and aligned 16-bit halves out of it. `rb` is the
// row's first byte, `u` the unit (values u*32 .. u*32+31 of the row). Each formula is the
// scalar dequantizer of runtime/model/src/quant.rs.

uint b8(uint off) { return (wq[off >> 2] >> ((off & 3u) * 8u)) & 0xFFu; }
// `off` is even: a 16-bit field never straddles a word.
uint b16(uint off) { return (wq[off >> 2] >> ((off & 2u) * 8u)) & 0xFFFFu; }
float f16at(uint off) { return unpackHalf2x16(b16(off)).x; }
int s8(uint v) { return int(v << 24) >> 24; }
// 16 bytes from byte offset `off` (any alignment) as four words, read as five aligned words
// and funnel-shifted: a quarter of the loads of byte-wise reads. The buffers carry 16 bytes
// of padding so the fifth word of a row's last block is in bounds.
uvec4 bytes16(uint off) {
    uint i = off >> 2;
    uint sh = (off & 3u) * 8u;
    uint a = wq[i], b = wq[i + 1u], c = wq[i + 2u], d = wq[i + 3u], e = wq[i + 4u];
    if (sh == 0u) return uvec4(a, b, c, d);
    uint r = 32u - sh;
    return uvec4((a >> sh) | (b << r), (b >> sh) | (c << r), (c >> sh) | (d << r), (d >> sh) | (e << r));
}
// Byte j (0..15) of a bytes16 result; j is a constant once the loops are unrolled.
uint byte_of(uvec4 v, uint j) { return (v[j >> 2] >> ((j & 3u) * 8u)) & 0xFFu; }

// 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K block whose scales start at `s`.
void k_scale_min(uint s, uint j, out float sc, out float mn) {
    if (j < 4u) {
        sc = float(b8(s + j) & 63u);
        mn = float(b8(s + j + 4u) & 63u);
    } else {
        sc = float((b8(s + j + 4u) & 0xFu) | ((b8(s + j - 4u) >> 6) << 4));
        mn = float((b8(s + j + 4u) >> 4) | ((b8(s + j) >> 6) << 4));
    }
}

void deq(uint rb, uint u, out float w[32]) {
#if defined(TYPE_F32)
    uint o = (rb >> 2) + u * 32u;
    [[unroll]] for (uint l = 0u; l < 32u; l++) w[l] = uintBitsToFloat(wq[o + l]);
#elif defined(TYPE_F16)
    uint o = (rb + u * 64u) >> 2; // rows of 32k halves: word aligned
    [[unroll]] for (uint l = 0u; l < 16u; l++) {
        vec2 h = unpackHalf2x16(wq[o + l]);
        w[2u * l] = h.x;
        w[2u * l + 1u] = h.y;
    }
#elif defined(TYPE_BF16)
    uint o = (rb + u * 64u) >> 2;
    [[unroll]] for (uint l = 0u; l < 16u; l++) {
        uint v = wq[o + l];
        w[2u * l] = uintBitsToFloat(v << 16);
        w[2u * l + 1u] = uintBitsToFloat(v & 0xFFFF0000u);
    }
#elif defined(TYPE_Q4_0)
    uint o = rb + u * 18u;
    float d = f16at(o);
    uvec4 qs = bytes16(o + 2u);
    [[unroll]] for (uint j = 0u; j < 16u; j++) {
        uint q = byte_of(qs, j);
        w[j] = float(int(q & 15u) - 8) * d;
        w[j + 16u] = float(int(q >> 4) - 8) * d;
    }
#elif defined(TYPE_Q4_1)
    uint o = rb + u * 20u;
    float d = f16at(o), m = f16at(o + 2u);
    uvec4 qs = bytes16(o + 4u);
    [[unroll]] for (uint j = 0u; j < 16u; j++) {
        uint q = byte_of(qs, j);
        w[j] = float(q & 15u) * d + m;
        w[j + 16u] = float(q >> 4) * d + m;
    }
#elif defined(TYPE_Q5_0)
    uint o = rb + u * 22u;
    float d = f16at(o);
    uint qh = b16(o + 2u) | (b16(o + 4u) << 16);
    uvec4 qs = bytes16(o + 6u);
    [[unroll]] for (uint j = 0u; j < 16u; j++) {
        uint q = byte_of(qs, j);
        uint h0 = ((qh >> j) << 4) & 16u;
        uint h1 = (qh >> (j + 12u)) & 16u;
        w[j] = float(int((q & 15u) | h0) - 16) * d;
        w[j + 16u] = float(int((q >> 4) | h1) - 16) * d;
    }
#elif defined(TYPE_Q5_1)
    uint o = rb + u * 24u;
    float d = f16at(o), m = f16at(o + 2u);
    uint qh = b16(o + 4u) | (b16(o + 6u) << 16);
    uvec4 qs = bytes16(o + 8u);
    [[unroll]] for (uint j = 0u; j < 16u; j++) {
        uint q = byte_of(qs, j);
        uint h0 = ((qh >> j) << 4) & 16u;
        uint h1 = (qh >> (j + 12u)) & 16u;
        w[j] = float((q & 15u) | h0) * d + m;
        w[j + 16u] = float((q >> 4) | h1) * d + m;
    }
#elif defined(TYPE_Q8_0)
    uint o = rb + u * 34u;
    float d = f16at(o);
    uvec4 q0 = bytes16(o + 2u), q1 = bytes16(o + 18u);
    [[unroll]] for (uint j = 0u; j < 16u; j++) {
        w[j] = float(s8(byte_of(q0, j))) * d;
        w[j + 16u] = float(s8(byte_of(q1, j))) * d;
    }
#elif defined(TYPE_Q4_K)
    uint o = rb + (u >> 3) * 144u;
    uint sub = u & 7u;
    float d = f16at(o), dmin = f16at(o + 2u);
    float sc, mn;
    k_scale_min(o + 4u, sub, sc, mn);
    float d1 = d * sc, m1 = dmin * mn;
    uint qs = o + 16u + (sub >> 1) * 32u;
    uint shift = (sub & 1u) * 4u;
    uvec4 q0 = bytes16(qs), q1 = bytes16(qs + 16u);
    [[unroll]] for (uint l = 0u; l < 16u; l++) {
        w[l] = d1 * float((byte_of(q0, l) >> shift) & 15u) - m1;
        w[l + 16u] = d1 * float((byte_of(q1, l) >> shift) & 15u) - m1;
    }
#elif defined(TYPE_Q5_K)
    uint o = rb + (u >> 3) * 176u;
    uint sub = u & 7u;
    float d = f16at(o), dmin = f16at(o + 2u);
    float sc, mn;
    k_scale_min(o + 4u, sub, sc, mn);
    float d1 = d * sc, m1 = dmin * mn;
    uint qs = o + 48u + (sub >> 1) * 32u;
    uint shift = (sub & 1u) * 4u;
    uint bit = 1u << sub; // (1 or 2) << (2 * pair)
    uvec4 q0 = bytes16(qs), q1 = bytes16(qs + 16u), h0 = bytes16(o + 16u), h1 = bytes16(o + 32u);
    [[unroll]] for (uint l = 0u; l < 16u; l++) {
        uint ha = (byte_of(h0, l) & bit) != 0u ? 16u : 0u;
        uint hb = (byte_of(h1, l) & bit) != 0u ? 16u : 0u;
        w[l] = d1 * float(((byte_of(q0, l) >> shift) & 15u) + ha) - m1;
        w[l + 16u] = d1 * float(((byte_of(q1, l) >> shift) & 15u) + hb) - m1;
    }
#elif defined(TYPE_Q6_K)
    uint o = rb + (u >> 3) * 210u;
    uint sub = u & 7u;
    uint n = sub >> 2, cc = sub & 3u;
    uint ql = o + n * 64u + (cc & 1u) * 32u;
    uint qh = o + 128u + n * 32u;
    uint sc = o + 192u + n * 8u + cc * 2u;
    float d = f16at(o + 208u);
    uint lshift = (cc >> 1) * 4u;
    uint hshift = cc * 2u;
    uvec4 l0 = bytes16(ql), l1 = bytes16(ql + 16u), g0 = bytes16(qh), g1 = bytes16(qh + 16u);
    float s0 = d * float(s8(b8(sc))), s1 = d * float(s8(b8(sc + 1u)));
    [[unroll]] for (uint l = 0u; l < 16u; l++) {
        uint qa = ((byte_of(l0, l) >> lshift) & 15u) | (((byte_of(g0, l) >> hshift) & 3u) << 4);
        uint qb = ((byte_of(l1, l) >> lshift) & 15u) | (((byte_of(g1, l) >> hshift) & 3u) << 4);
        w[l] = s0 * float(int(qa) - 32);
        w[l + 16u] = s1 * float(int(qb) - 32);
    }
#else
#error "no weight type defined"
#endif
}
