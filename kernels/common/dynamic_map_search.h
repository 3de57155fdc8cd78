// The search behind cpu::dynamic_map_encode (kernels/cpu/nf4.h), shared with the CUDA quantizer so both
// pick the same index for every value, midpoint ties included.
#pragma once
#include <cstdint>

#include "kernels/common/host_device.h"

namespace ssmtune {

// Index into a sorted 256-entry map for a value already divided by its block's absmax. Seven halvings from
// the middle leave an even, untested candidate with x in (map[candidate-1], map[candidate+1]]; the last
// tested entries below and above are those neighbours, and the candidate wins unless x lies strictly
// beyond the fp32 midpoint towards one. A search that only ever goes down ends on candidate 0 with
// `below` still 0, so any x <= map[0] maps to 0; one that only goes up ends on 254 with `above` still 255.
// (a + b) * 0.5f is an add then a multiply: no compiler may fuse it, so host and device round alike.
SSMTUNE_HD uint8_t dynamic_map_search(float normalized, const float* map) {
  int candidate = 127, below = 0, above = 255;
  for (int step = 64; step > 0; step /= 2) {
    if (normalized > map[candidate]) {
      below = candidate;
      candidate += step;
    } else {
      above = candidate;
      candidate -= step;
    }
  }
  const float value = map[candidate];
  if (normalized > value) return static_cast<uint8_t>(normalized > (map[above] + value) * 0.5f ? above : candidate);
  return static_cast<uint8_t>(normalized < (map[below] + value) * 0.5f ? below : candidate);
}

}  // namespace ssmtune
