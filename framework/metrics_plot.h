// The plot of a training run: <output_dir>/metrics.svg drawn from <output_dir>/metrics.jsonl (the lines
// the trainer writes: {step, loss, lr, grad_norm, tokens_per_s, ...} per logged step, {step, val_loss,
// ...} per evaluation). Two charts: the training loss (as logged, and smoothed as the live progress
// line smooths it) with the validation loss as points, against step; and tokens/s against step. The
// trainer writes it at the end of a run, `ssmtune plot <output_dir>` at any time.
#pragma once
#include <array>
#include <filesystem>
#include <string>
#include <vector>

namespace ssmtune {

struct RunMetrics {
  std::vector<std::array<double, 2>> loss;          // (step, loss); a non-finite loss (null) is kept as NaN
  std::vector<std::array<double, 2>> val_loss;      // (step, val_loss)
  std::vector<std::array<double, 2>> tokens_per_s;  // (step, tokens/s)
};

// Errors name the file, and file:line for a line that is not a JSON object, has no integer "step", or
// has a loss, val_loss or tokens_per_s that is neither a number nor null. Blank lines and lines of other
// kinds (neither loss nor val_loss) are skipped.
RunMetrics read_metrics(const std::filesystem::path& metrics_jsonl);

// The SVG document of the two charts; `title` heads the loss chart.
std::string metrics_svg(const RunMetrics& metrics, const std::string& title);

// Reads <output_dir>/metrics.jsonl and replaces <output_dir>/metrics.svg with its plot (atomically);
// returns the SVG's path.
std::filesystem::path write_metrics_plot(const std::filesystem::path& output_dir);

}  // namespace ssmtune
