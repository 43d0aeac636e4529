// The dropout mask of the cpp backend: a counter-based hash of (seed, element index), so the
// forward and the backward draw the same mask from the seed alone, and the CPU and CUDA kernels
// draw the same mask for the same seed. Nothing is stored.
//
// Element (row, col) of an [M, K] input has index row * K + col. Every 64-bit hash word serves
// four consecutive indices, 16 bits each (a quarter of the hashing of one word per element); an
// element is kept when its 16 bits are at least round(p * 65536), so the drop rate is p
// quantised to 1/65536.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace fastdelta {

// splitmix64's finaliser (Steele, Lea and Flood 2014): every input bit flips about half of the
// output bits, so consecutive counters give independent-looking words.
FASTDELTA_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The stream key of a seed: mixed first, so nearby seeds give unrelated streams.
FASTDELTA_HOST_DEVICE uint64_t dropout_key(int64_t seed) {
  return mix64(static_cast<uint64_t>(seed) ^ 0x6A09E667F3BCC909ULL);
}

// The hash word that holds the bits of indices 4 * word .. 4 * word + 3.
FASTDELTA_HOST_DEVICE uint64_t dropout_word(uint64_t key, int64_t word) {
  return mix64(key + (static_cast<uint64_t>(word) + 1) * 0x9E3779B97F4A7C15ULL);
}

// The 16 random bits of element `index` taken from its hash word.
FASTDELTA_HOST_DEVICE uint32_t dropout_bits(uint64_t word, int64_t index) {
  return static_cast<uint32_t>(word >> (16 * (index & 3))) & 0xFFFFu;
}

// Whether element `index` is kept.
FASTDELTA_HOST_DEVICE bool dropout_keep(uint64_t key, int64_t index, uint32_t threshold) {
  return dropout_bits(dropout_word(key, index >> 2), index) >= threshold;
}

// The 16-bit threshold of drop rate p in [0, 1).
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(std::llround(p * 65536.0));
}

}  // namespace fastdelta
