#include "distributed/strategy.h"

namespace ssmtune {

std::string_view strategy_name(ShardingStrategy strategy) {
  switch (strategy) {
    case ShardingStrategy::ddp: return "ddp";
    case ShardingStrategy::zero1: return "zero1";
    case ShardingStrategy::zero2: return "zero2";
  }
  return "?";
}

std::optional<ShardingStrategy> strategy_from_name(std::string_view name) {
  for (ShardingStrategy s : {ShardingStrategy::ddp, ShardingStrategy::zero1, ShardingStrategy::zero2})
    if (strategy_name(s) == name) return s;
  return std::nullopt;
}

ShardIndex optimizer_shard(ShardingStrategy strategy, int rank, int ranks) {
  return strategy == ShardingStrategy::ddp ? ShardIndex{0, 1} : ShardIndex{rank, ranks};
}

}  // namespace ssmtune
