#include "framework/metrics_plot.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>

#include "framework/atomic_file.h"
#include "framework/error.h"
#include "framework/smoothed_value.h"
#include "framework/svg_plot.h"
#include "framework/untrusted_json.h"

namespace ssmtune {
namespace {

namespace fs = std::filesystem;

// The value of `key` on a line: a number, NaN for null (how nlohmann writes a non-finite double).
double number_or_null(const nlohmann::json& line, const char* key, const std::string& where) {
  const nlohmann::json& v = line[key];
  if (v.is_null()) return std::numeric_limits<double>::quiet_NaN();
  if (!v.is_number()) fail("{}: \"{}\" must be a number, got {}", where, key, v.dump());
  return v.get<double>();
}

}  // namespace

RunMetrics read_metrics(const fs::path& path) {
  std::ifstream in(path);
  if (!in) fail("{}: cannot open the metrics file ({}); is this a train.output_dir?", path.string(),
                fs::exists(path) ? "not readable" : "no such file");
  RunMetrics m;
  std::string text;
  for (int64_t number = 1; std::getline(in, text); ++number) {
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path.string() + ":" + std::to_string(number);
    nlohmann::json line;  // stays null where the text is not JSON
    try {
      line = parse_untrusted_json(where, text);
    } catch (const nlohmann::json::parse_error&) {
    }
    if (!line.is_object()) fail("{}: not a JSON object: {}", where, text.substr(0, 80));
    if (!line.contains("step") || !line["step"].is_number_integer())
      fail("{}: no integer \"step\" in {}", where, text.substr(0, 80));
    const double step = line["step"].get<double>();
    if (line.contains("loss")) {
      m.loss.push_back({step, number_or_null(line, "loss", where)});
      if (line.contains("tokens_per_s")) m.tokens_per_s.push_back({step, number_or_null(line, "tokens_per_s", where)});
    }
    if (line.contains("val_loss")) m.val_loss.push_back({step, number_or_null(line, "val_loss", where)});
  }
  return m;
}

std::string metrics_svg(const RunMetrics& m, const std::string& title) {
  // The smoothed loss skips non-finite values: one bad step would otherwise blank the rest of the line.
  PlotSeries smoothed{fmt::format("loss, smoothed (EMA {} per step, bias-corrected)", SmoothedValue::kDefaultBeta),
                      "#1f5fa8", PlotSeries::Style::line, 1, {}};
  SmoothedValue ema;
  double previous_step = 0;
  for (const auto& [step, loss] : m.loss)
    if (std::isfinite(loss)) {
      ema.add(loss, std::max(step - previous_step, 1.0));
      previous_step = step;
      smoothed.points.push_back({step, ema.value()});
    }
  PlotSeries raw{"loss", "#7fa7d6", PlotSeries::Style::line, 0.6, m.loss};
  PlotSeries val{"validation loss", "#d1495b", PlotSeries::Style::markers, 1, m.val_loss};
  Chart loss_chart{title, "step", "loss (nats per token)", {raw, smoothed}};
  if (!m.val_loss.empty()) loss_chart.series.push_back(val);
  Chart speed_chart{"throughput", "step", "tokens/s", {{"tokens/s", "#2a9d5c", PlotSeries::Style::line, 1, m.tokens_per_s}}};
  return svg_charts({loss_chart, speed_chart});
}

fs::path write_metrics_plot(const fs::path& output_dir) {
  const RunMetrics metrics = read_metrics(output_dir / "metrics.jsonl");
  const fs::path svg_path = output_dir / "metrics.svg";
  fs::path dir = fs::absolute(output_dir).lexically_normal();
  if (dir.filename().empty()) dir = dir.parent_path();  // "runs/demo/train/"
  const std::string svg = metrics_svg(metrics, "training loss: " + dir.filename().string());
  write_file_atomically(svg_path, std::as_bytes(std::span(svg)));
  return svg_path;
}

}  // namespace ssmtune
