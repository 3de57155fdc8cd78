#include "framework/recipe_config.h"

#include <yaml-cpp/yaml.h>

#include <functional>
#include <map>

#include "framework/atomic_file.h"
#include "framework/error.h"

namespace ssmtune {
namespace {

using Flat = std::map<std::string, YAML::Node>;

// Mappings become dotted keys; scalars and sequences are leaves. Aliases can make the mappings a graph:
// one naming another exponentially often, or one containing itself. So the walk stops after far more
// nodes, and deeper, than a recipe has (its keys are two levels deep).
constexpr size_t kMaxRecipeNodes = 10'000;
constexpr int kMaxRecipeDepth = 8;
void flatten(const YAML::Node& node, const std::string& prefix, const std::string& source, Flat& out,
             size_t& visited, int depth = 0) {
  if (++visited > kMaxRecipeNodes)
    fail("{}: more than {} mappings and values (aliases expanding?); a recipe has a few dozen", source,
         kMaxRecipeNodes);
  if (!node.IsMap()) {
    out[prefix] = node;
    return;
  }
  if (depth == kMaxRecipeDepth)
    fail("{}: key '{}' is nested more than {} levels deep (an alias to a mapping that contains it?)", source,
         prefix.substr(0, 200), kMaxRecipeDepth);
  for (const auto& item : node) {
    if (!item.first.IsScalar())
      fail("{}: line {}: a key must be a plain name, not a list, mapping or null", source, item.first.Mark().line + 1);
    const std::string key = item.first.Scalar();
    if (key.find('.') != std::string::npos || key.empty())
      fail("{}: key '{}' must be a plain name (nest mappings instead of using dots)", source, key);
    flatten(item.second, prefix.empty() ? key : prefix + "." + key, source, out, visited, depth + 1);
  }
}

template <typename T>
T scalar(const Flat& flat, const std::string& key, const std::string& source) {
  const YAML::Node& node = flat.at(key);
  try {
    if (!node.IsScalar()) throw YAML::Exception(node.Mark(), "not a scalar");
    return node.as<T>();
  } catch (const YAML::Exception&) {
    const char* expected = std::is_same_v<T, bool>             ? "true or false"
                           : std::is_floating_point_v<T>       ? "a number"
                           : std::is_integral_v<T>             ? "an integer"
                                                               : "a string";
    fail("{}: key '{}' must be {}, got '{}'", source, key, expected, YAML::Dump(node));
  }
}

// Sets a.b.c = value inside nested mappings. The node is taken by value: yaml-cpp nodes are handles,
// and passing node[part] on (rather than assigning it to a variable) keeps it bound to its parent.
void insert_dotted(YAML::Node node, const std::string& key, const YAML::Node& value) {
  const size_t dot = key.find('.');
  if (dot == std::string::npos) {
    node[key] = value;
    return;
  }
  insert_dotted(node[key.substr(0, dot)], key.substr(dot + 1), value);
}

// A recipe value is one line of printable text. A control character would not survive the resolved YAML
// saved with checkpoints (yaml-cpp writes it unquoted, and a carriage return before the line end reads
// back as part of the line break: found by fuzz_recipe), and no path, name or number needs one.
void check_printable(const YAML::Node& node, const std::string& key, const std::string& source) {
  if (node.IsSequence()) {
    for (const auto& item : node) check_printable(item, key, source);
    return;
  }
  if (!node.IsScalar()) return;  // the key's setter names what it expected
  for (const char ch : node.Scalar()) {
    const auto byte = static_cast<unsigned char>(ch);
    if (byte < 0x20 || byte == 0x7f)
      fail("{}: key '{}' contains the control character 0x{:02x}: a recipe value is one line of printable text",
           source, key, byte);
  }
}

Projection parse_projection(const std::string& name, const std::string& source) {
  for (Projection p : kProjections)
    if (projection_name(p) == name) return p;
  fail("{}: lora.targets: unknown projection '{}' (expected in_proj, x_proj, dt_proj or out_proj)", source, name);
}

}  // namespace

RecipeConfig parse_recipe(const std::string& yaml_text, const std::string& source,
                          const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    fail("{}: line {}, column {}: {}", source, e.mark.line + 1, e.mark.column + 1, e.msg);
  }
  if (!root.IsMap() && !root.IsNull()) fail("{}: a recipe is a YAML mapping of keys", source);
  Flat flat;
  size_t visited = 0;
  if (root.IsMap()) flatten(root, "", source, flat, visited);

  RecipeConfig r;
  r.source = source;
  using Setter = std::function<void(const std::string&)>;
  const std::map<std::string, Setter> keys{
      {"device", [&](const std::string& k) { r.device = scalar<std::string>(flat, k, source); }},
      {"model.path", [&](const std::string& k) { r.model_path = scalar<std::string>(flat, k, source); }},
      {"data.path", [&](const std::string& k) { r.data_path = scalar<std::string>(flat, k, source); }},
      {"data.val_path", [&](const std::string& k) { r.val_path = scalar<std::string>(flat, k, source); }},
      {"data.seq_len", [&](const std::string& k) { r.step.seq_len = scalar<int64_t>(flat, k, source); }},
      {"data.packing", [&](const std::string& k) { r.packing = scalar<bool>(flat, k, source); }},
      {"lora.rank", [&](const std::string& k) { r.lora.rank = scalar<int64_t>(flat, k, source); }},
      {"lora.alpha", [&](const std::string& k) { r.lora.alpha = scalar<double>(flat, k, source); }},
      {"lora.dropout", [&](const std::string& k) { r.lora.dropout = scalar<double>(flat, k, source); }},
      {"lora.rslora", [&](const std::string& k) { r.lora.rslora = scalar<bool>(flat, k, source); }},
      {"lora.targets",
       [&](const std::string& k) {
         const YAML::Node& node = flat.at(k);
         if (!node.IsSequence() || node.size() == 0)
           fail("{}: key '{}' must be a non-empty list of projections, e.g. [in_proj, x_proj]", source, k);
         r.lora.targets.clear();
         for (const auto& item : node) {
           if (!item.IsScalar()) fail("{}: key '{}' must be a list of projection names, e.g. [in_proj, x_proj]", source, k);
           r.lora.targets.push_back(parse_projection(item.Scalar(), source));
         }
       }},
      {"train.batch_size", [&](const std::string& k) { r.step.batch = scalar<int64_t>(flat, k, source); }},
      {"train.grad_accum", [&](const std::string& k) { r.grad_accum = scalar<int64_t>(flat, k, source); }},
      {"train.max_steps", [&](const std::string& k) { r.max_steps = scalar<int64_t>(flat, k, source); }},
      {"train.lr", [&](const std::string& k) { r.optimizer.lr = scalar<double>(flat, k, source); }},
      {"train.min_lr_ratio", [&](const std::string& k) { r.optimizer.min_lr_ratio = scalar<double>(flat, k, source); }},
      {"train.warmup_steps", [&](const std::string& k) { r.optimizer.warmup_steps = scalar<int64_t>(flat, k, source); }},
      {"train.weight_decay", [&](const std::string& k) { r.optimizer.weight_decay = scalar<double>(flat, k, source); }},
      {"train.beta1", [&](const std::string& k) { r.optimizer.beta1 = scalar<double>(flat, k, source); }},
      {"train.beta2", [&](const std::string& k) { r.optimizer.beta2 = scalar<double>(flat, k, source); }},
      {"train.eps", [&](const std::string& k) { r.optimizer.eps = scalar<double>(flat, k, source); }},
      {"train.max_grad_norm", [&](const std::string& k) { r.optimizer.max_grad_norm = scalar<double>(flat, k, source); }},
      {"train.seed", [&](const std::string& k) { r.seed = scalar<uint64_t>(flat, k, source); }},
      {"train.output_dir", [&](const std::string& k) { r.output_dir = scalar<std::string>(flat, k, source); }},
      {"train.save_every", [&](const std::string& k) { r.save_every = scalar<int64_t>(flat, k, source); }},
      {"train.log_every", [&](const std::string& k) { r.log_every = scalar<int64_t>(flat, k, source); }},
      {"train.resume", [&](const std::string& k) { r.resume = scalar<bool>(flat, k, source); }},
      {"train.keep_last", [&](const std::string& k) { r.keep_last = scalar<int64_t>(flat, k, source); }},
      {"train.max_bad_steps", [&](const std::string& k) { r.max_bad_steps = scalar<int64_t>(flat, k, source); }},
      {"eval.every", [&](const std::string& k) { r.eval_every = scalar<int64_t>(flat, k, source); }},
      {"eval.batches", [&](const std::string& k) { r.eval_batches = scalar<int64_t>(flat, k, source); }},
      {"distributed.strategy",
       [&](const std::string& k) {
         const std::string name = scalar<std::string>(flat, k, source);
         const std::optional<ShardingStrategy> strategy = strategy_from_name(name);
         if (!strategy) fail("{}: key '{}' must be ddp, zero1 or zero2, got '{}'", source, k, name);
         r.distributed.strategy = *strategy;
       }},
      {"distributed.bucket_mb", [&](const std::string& k) { r.distributed.bucket_mb = scalar<double>(flat, k, source); }},
      {"distributed.timeout_s", [&](const std::string& k) { r.distributed.timeout_s = scalar<double>(flat, k, source); }},
      {"parallel.context", [&](const std::string& k) { r.distributed.context = scalar<int>(flat, k, source); }},
      {"distributed.shard_base_weights",
       [&](const std::string& k) { r.distributed.shard_base_weights = scalar<bool>(flat, k, source); }},
      {"memory.recompute", [&](const std::string& k) { r.step.recompute = scalar<bool>(flat, k, source); }},
      {"memory.scan_chunk", [&](const std::string& k) { r.step.scan_chunk = scalar<int64_t>(flat, k, source); }},
      {"memory.checkpoint_every",
       [&](const std::string& k) { r.step.checkpoint_every = scalar<int64_t>(flat, k, source); }},
      {"memory.keep_layer_outputs",
       [&](const std::string& k) { r.step.keep_layer_outputs = scalar<bool>(flat, k, source); }},
      {"memory.loss_slice", [&](const std::string& k) { r.step.loss_slice_rows = scalar<int64_t>(flat, k, source); }},
      {"memory.budget_mb", [&](const std::string& k) { r.memory_budget_mb = scalar<double>(flat, k, source); }},
  };

  for (const std::string& override_text : overrides) {
    const size_t eq = override_text.find('=');
    if (eq == std::string::npos || eq == 0)
      fail("override '{}' must look like dotted.key=value", override_text);
    const std::string key = override_text.substr(0, eq);
    if (!keys.contains(key)) fail("override '{}': unknown key '{}' (not a recipe key)", override_text, key);
    try {
      flat[key] = YAML::Load(override_text.substr(eq + 1));
    } catch (const YAML::Exception& e) {
      fail("override '{}': {}", override_text, e.msg);
    }
  }
  for (const auto& [key, node] : flat) {
    auto it = keys.find(key);
    if (it == keys.end()) fail("{}: unknown key '{}'", source, key);
    check_printable(node, key, source);
    it->second(key);
  }
  for (const char* required : {"model.path", "data.path", "train.output_dir"})
    if (!flat.contains(required)) fail("{}: missing required key '{}'", source, required);
  if (r.max_steps <= 0) fail("{}: train.max_steps must be positive, got {}", source, r.max_steps);
  if (r.grad_accum <= 0) fail("{}: train.grad_accum must be positive, got {}", source, r.grad_accum);
  if (r.log_every <= 0) fail("{}: train.log_every must be positive, got {}", source, r.log_every);
  if (r.keep_last < 0) fail("{}: train.keep_last must be 0 (keep all) or a number of checkpoints, got {}", source, r.keep_last);
  if (r.max_bad_steps <= 0)
    fail("{}: train.max_bad_steps must be positive (1 stops at the first non-finite step), got {}", source,
         r.max_bad_steps);
  if (r.eval_every < 0) fail("{}: eval.every must be 0 (off) or a positive number of steps, got {}", source, r.eval_every);
  if (r.eval_batches <= 0) fail("{}: eval.batches must be positive, got {}", source, r.eval_batches);
  if (r.eval_every > 0 && !flat.contains("data.val_path"))
    fail("{}: eval.every is {}: evaluation needs a validation set, key 'data.val_path' (or set eval.every=0)", source,
         r.eval_every);
  if (!(r.distributed.bucket_mb > 0))
    fail("{}: distributed.bucket_mb must be positive, got {}", source, r.distributed.bucket_mb);
  if (r.distributed.context < 1)
    fail("{}: parallel.context must be at least 1 (the ranks one sequence is split over), got {}", source,
         r.distributed.context);
  if (r.step.seq_len % r.distributed.context != 0)
    fail("{}: data.seq_len {} must be a multiple of parallel.context {} (each rank takes an equal slice)", source,
         r.step.seq_len, r.distributed.context);
  if (!(r.distributed.timeout_s > 0))
    fail("{}: distributed.timeout_s must be positive, got {}", source, r.distributed.timeout_s);
  if (!(r.memory_budget_mb >= 0))
    fail("{}: memory.budget_mb must be 0 (no budget) or a number of MiB, got {}", source, r.memory_budget_mb);
  if (r.device != "auto" && r.device != "cpu" && r.device != "cuda")
    fail("{}: device must be auto, cpu or cuda, got '{}'", source, r.device);
  r.optimizer.total_steps = r.max_steps;

  YAML::Node resolved(YAML::NodeType::Map);
  for (const auto& [key, node] : flat) insert_dotted(resolved, key, node);
  r.resolved_yaml = YAML::Dump(resolved) + "\n";
  return r;
}

RecipeConfig load_recipe(const std::filesystem::path& yaml_file, const std::vector<std::string>& overrides) {
  return parse_recipe(read_text_file(yaml_file), yaml_file.string(), overrides);
}

}  // namespace ssmtune
