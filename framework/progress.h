// What a training run shows while it runs. On a terminal, one live line rewritten in place (step/total,
// smoothed loss, lr, tokens/s, memory, elapsed, ETA); otherwise one plain line per logged step, as
// metrics.jsonl gets them. Lines of their own (validation, "saved ...") and warnings first clear the
// live line, so nothing is garbled, and it is drawn again at the next step. Only rank 0 shows progress;
// warnings come from any rank, prefixed with the rank in a job of several.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>

#include "framework/backend.h"
#include "framework/smoothed_value.h"

namespace ssmtune {

// What one progress line shows.
struct ProgressFigures {
  int64_t step = 0, total_steps = 0;  // steps completed, and the run's max_steps
  double loss = 0;                    // live: the smoothed loss; plain: the step's own
  double lr = 0, grad_norm = 0;
  double tokens_per_s = 0;            // live: over the run's steps so far; plain: the step's own
  size_t plan_bytes = 0;              // Backend::allocated_bytes(): weights, adapters, activations
  DeviceMemory device;                // the whole device's use (CUDA); zeros on the CPU
  double elapsed_s = 0;               // wall time since this run's first step began
  std::optional<double> eta_s;        // unknown before the first step completes
};

// 42 -> "0:42", 125 -> "2:05", 3725 -> "1:02:05"; "?" for a negative or non-finite time.
std::string format_duration(double seconds);
// "8.42 MiB" below a GiB, "1.50 GiB" from there on: two decimals.
std::string format_bytes(size_t bytes);
// The live line (no line end): step/total, loss, lr, tokens/s, memory (the device's use and size on
// CUDA, the memory plans' bytes on the CPU), elapsed and ETA.
std::string format_live_line(const ProgressFigures& f);
// The plain line (no line end): step/total, loss, lr, grad_norm, tokens/s, memory, elapsed and ETA.
std::string format_plain_line(const ProgressFigures& f);
// "warning: ..." alone, "rank 3: warning: ..." in a job of several ranks.
std::string format_warning(std::string_view message, int rank, int world_size);

// Prints a warning to stderr as format_warning does, clearing this process's live line first.
void print_warning(std::string_view message, int rank = 0, int world_size = 1);

// Whether progress should be drawn live: stdout is a terminal.
bool stdout_is_terminal();

// One line on a terminal, redrawn in place. Lines of their own and warnings (print_warning) first clear
// it, so nothing is garbled, and the next draw brings it back; its last state stays on screen, with a
// line end, when it is destroyed. Used by training's progress and by `ssmtune prepare`.
class LiveLine {
 public:
  explicit LiveLine(FILE* out);
  ~LiveLine();
  LiveLine(const LiveLine&) = delete;
  LiveLine& operator=(const LiveLine&) = delete;

  // Whether to draw now: the line is not showing, or was drawn a tenth of a second ago or more (a
  // redraw at every update would keep a fast loop waiting on the terminal).
  bool due() const;
  // `line` (no line end) in place of the last, cut to the terminal's width.
  void draw(std::string line);
  // A line of its own (no line end).
  void message(std::string_view line);
  // Clears the line if it is showing.
  void clear();

 private:
  FILE* out_;
  bool showing_ = false;
  std::chrono::steady_clock::time_point last_draw_;
};

class ProgressDisplay {
 public:
  // live: the live line on `out`; otherwise plain lines. first_step: the step the run starts from
  // (non-zero after resume); total_steps: max_steps.
  ProgressDisplay(const Backend& backend, bool live, int64_t first_step, int64_t total_steps, FILE* out = stdout);
  ProgressDisplay(const ProgressDisplay&) = delete;
  ProgressDisplay& operator=(const ProgressDisplay&) = delete;

  // Step `step` (1-based) has completed: its loss, lr, grad norm, tokens and seconds. logged: whether it
  // is a step that metrics.jsonl records, the one a plain line is printed for. The live line is redrawn
  // at most ten times a second, and always at the first and last step.
  void step(int64_t step, double loss, double lr, double grad_norm, double tokens, double seconds, bool logged);
  // A line of its own (no line end): validation, "saved ...", notes.
  void message(std::string_view line);

 private:
  ProgressFigures figures(int64_t step, double loss, double lr, double grad_norm, double tokens_per_s) const;
  const Backend& backend_;
  bool live_;
  int64_t first_step_, total_steps_;
  FILE* out_;
  LiveLine line_;  // live: the line; plain: clears nothing before a message
  SmoothedValue loss_;
  double run_tokens_ = 0, run_seconds_ = 0;  // steps after the run's first (which carries the warm-up)
  std::chrono::steady_clock::time_point start_;
};

}  // namespace ssmtune
