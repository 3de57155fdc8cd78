#include "recipes/plot_command.h"

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "framework/metrics_plot.h"

namespace ssmtune {

void add_plot_options(CLI::App& command, PlotOptions& options) {
  command.add_option("output_dir", options.output_dir, "the run's train.output_dir (holds metrics.jsonl)")->required();
}

void run_plot(const PlotOptions& options) {
  fmt::print("wrote {}\n", write_metrics_plot(options.output_dir).string());
}

}  // namespace ssmtune
