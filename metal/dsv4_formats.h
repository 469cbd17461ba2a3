// DeepSeek-V4 storage formats, decoded in registers (see dsv4_mlx/quant/codecs.py for the encoders).
//
// All three decoders rebuild the float's bit pattern instead of using a lookup table, so they need
// no constant memory (which Metal and CUDA spell differently) and cost a few integer operations.

// e8m0 block scale: 2^(byte - 127). The encoders never emit 0 (their amax floors keep the exponent
// >= -126) or 255, so the byte is always a normal float exponent.
DSV4_FN float dsv4_e8m0(unsigned int byte) { return dsv4_as_float(byte << 23); }

// e4m3 (fn variant): 1 sign, 4 exponent (bias 7), 3 mantissa bits. Normal codes map onto a float by
// moving the 7 magnitude bits to the top of the float mantissa and rebiasing the exponent
// (+120 = 127 - 7); subnormal codes are m * 2^-9. Code 0x7f (NaN in e4m3fn) never occurs: the
// encoder clamps to +-448.
DSV4_FN float dsv4_e4m3(unsigned int code) {
  const unsigned int mag = code & 0x7fu;
  const float v = mag >= 8u ? dsv4_as_float((mag << 20) + (120u << 23)) : float(mag) * 0.001953125f;
  return (code & 0x80u) ? -v : v;
}

// e2m1: 1 sign, 2 exponent (bias 1), 1 mantissa bit; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
DSV4_FN float dsv4_e2m1(unsigned int code) {
  const unsigned int mag = code & 7u;
  const float v = mag >= 2u ? dsv4_as_float((mag << 22) + (126u << 23)) : float(mag) * 0.5f;
  return (code & 8u) ? -v : v;
}

// An unsigned key that orders like the float (larger float, larger key); -0 is folded onto +0 so
// that equal scores get equal keys.
DSV4_FN unsigned int dsv4_order_key(float x) {
  unsigned int u = dsv4_as_uint(x);
  u = (u == 0x80000000u) ? 0u : u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// --- encoders (the rounding side of quant/codecs.py, for kernels that write FP8/FP4 values) -------------

// The e8m0 block exponent of codecs._block_exponent: ceil(log2(max(amax, floor) / qmax)), read from the
// bits of the float32 quotient (exact, no log2).
DSV4_FN int dsv4_block_exponent(float amax, float amax_floor, float qmax) {
  const unsigned int bits = dsv4_as_uint(dsv4_max(amax, amax_floor) / qmax);
  return int(bits >> 23) - 127 + ((bits & 0x7fffffu) != 0u ? 1 : 0);
}

// 2^e as a float, exact for normal exponents (-126 <= e <= 127).
DSV4_FN float dsv4_exp2i(int e) { return dsv4_as_float((unsigned int)(e + 127) << 23); }

// The e4m3 (fn) code nearest to a, ties to the even code, for |a| <= 448 (callers clamp first):
// subnormals are steps of 2^-9 (a count of 8 is 2^-6, the first normal code), normals keep 3 mantissa
// bits (m / 2^(E-3) rounded to an integer in [8, 16]; 16 carries into the exponent field). The sign
// bit follows the float's, -0 included, as MLX's to_fp8.
DSV4_FN unsigned int dsv4_e4m3_code(float a) {
  const float m = dsv4_fabs(a);
  unsigned int mag;
  if (m < 0.015625f) {
    mag = (unsigned int)dsv4_rint(m * 512.0f);
  } else {
    const unsigned int e = dsv4_as_uint(m) >> 23;  // biased float exponent, 121 .. 135 here
    const float q = dsv4_rint(m * dsv4_as_float((257u - e) << 23));  // m * 2^(3 - E), exact scaling
    mag = ((e - 120u) << 3) + (unsigned int)q - 8u;
  }
  return mag | ((dsv4_as_uint(a) & 0x80000000u) ? 0x80u : 0u);
}

// The e2m1 code of codecs._e2m1_codes: count the midpoints below |s| ('>' before an even code, '>='
// before an odd one, so that a midpoint goes to the even code), sign bit for s < 0.
DSV4_FN unsigned int dsv4_e2m1_code(float s) {
  const float m = dsv4_fabs(s);
  const unsigned int c = (m > 0.25f ? 1u : 0u) + (m >= 0.75f ? 1u : 0u) + (m > 1.25f ? 1u : 0u) +
                         (m >= 1.75f ? 1u : 0u) + (m > 2.5f ? 1u : 0u) + (m >= 3.5f ? 1u : 0u) +
                         (m > 5.0f ? 1u : 0u);
  return c | (s < 0.0f ? 8u : 0u);
}
