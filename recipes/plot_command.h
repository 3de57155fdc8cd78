// `ssmtune plot <output_dir>`: draws <output_dir>/metrics.svg from the run's metrics.jsonl
// (framework/metrics_plot.h), during a run or after it; training writes the same file when it ends.
#pragma once
#include <string>

namespace CLI {
class App;
}

namespace ssmtune {

struct PlotOptions {
  std::string output_dir;  // a train.output_dir
};

// Declares the subcommand's arguments on `command` (created by the caller as app.add_subcommand("plot")).
void add_plot_options(CLI::App& command, PlotOptions& options);

// Writes the SVG and prints its path. Errors name metrics.jsonl, and file:line for a malformed line.
void run_plot(const PlotOptions& options);

}  // namespace ssmtune
