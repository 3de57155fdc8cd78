// Every rank of a job must run the same recipe on the same model: ranks launched with different
// configs (an override missing on one host, a stale copy of a file) would otherwise train something
// nobody asked for, or hang in mismatched collectives. Each rank hashes what it runs; the hashes are
// all-gathered and compared with rank 0's, and every rank stops with the same Error if any differs.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "distributed/communicator.h"

namespace ssmtune {

struct Fingerprint {
  std::string what;  // "recipe (the resolved YAML after overrides)"
  std::string text;  // what is hashed
  std::string fix;   // what the user should do when it differs
};

uint64_t fnv1a_64(std::string_view text);

// Collective over host's ranks.
void require_same_on_all_ranks(Communicator& host, const std::vector<Fingerprint>& items);

}  // namespace ssmtune
