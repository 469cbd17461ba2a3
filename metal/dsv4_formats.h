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
