// The BPE merge step: a word (the token ids of its bytes) is merged pair by pair, always the pair of
// lowest merge rank first and, among equal ranks, the leftmost, until no adjacent pair has a merge.
// This is the order of HF tokenizers' BPE without dropout.
#pragma once
#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace ssmtune {

class BpeMerges {
 public:
  // Adds the merge (left, right) -> merged with the next rank (merges are added in rank order);
  // false when the pair already has a merge.
  bool add(uint32_t left, uint32_t right, uint32_t merged);
  size_t size() const { return merges_.size(); }

  // Merges `word` in place; a heap of candidate pairs keeps long words O(n log n).
  void apply(std::vector<uint32_t>& word) const;

 private:
  struct Merge {
    uint32_t rank;
    uint32_t merged;
  };
  static uint64_t key(uint32_t left, uint32_t right) { return (uint64_t{left} << 32) | right; }
  const Merge* find(uint32_t left, uint32_t right) const;

  std::unordered_map<uint64_t, Merge> merges_;
};

}  // namespace ssmtune
