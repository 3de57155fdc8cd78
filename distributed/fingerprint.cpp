#include "distributed/fingerprint.h"

#include <fmt/ranges.h>

#include "framework/error.h"

namespace ssmtune {

uint64_t fnv1a_64(std::string_view text) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (char c : text) hash = (hash ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  return hash;
}

void require_same_on_all_ranks(Communicator& host, const std::vector<Fingerprint>& items) {
  const size_t k = items.size(), ranks = static_cast<size_t>(host.size());
  std::vector<uint64_t> hashes(k * ranks);
  for (size_t i = 0; i < k; ++i) hashes[host.rank() * k + i] = fnv1a_64(items[i].text);
  const std::vector<size_t> counts(ranks, k);
  host.all_gather(hashes.data(), counts, Element::u64);
  for (size_t i = 0; i < k; ++i) {
    std::vector<size_t> differing;
    for (size_t r = 1; r < ranks; ++r)
      if (hashes[r * k + i] != hashes[i]) differing.push_back(r);
    if (!differing.empty())
      fail("rank{} {} of {} run{} a different {} than rank 0: {}", differing.size() > 1 ? "s" : "",
           fmt::join(differing, ", "), ranks, differing.size() > 1 ? "" : "s", items[i].what, items[i].fix);
  }
}

}  // namespace ssmtune
