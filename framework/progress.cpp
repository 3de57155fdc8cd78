#include "framework/progress.h"

#include <fmt/format.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cmath>

namespace ssmtune {
namespace {

// The live line on this process's terminal, so that warnings can clear it first.
LiveLine* g_live_line = nullptr;

// The memory part of a line: the device's use when the backend knows it, else the memory plans.
std::string memory_field(const ProgressFigures& f) {
  if (f.device.total > 0)
    return fmt::format("gpu {:.2f}/{:.1f} GiB", f.device.used / 1073741824.0, f.device.total / 1073741824.0);
  return "mem " + format_bytes(f.plan_bytes);
}

std::string eta_field(const ProgressFigures& f) { return f.eta_s ? format_duration(*f.eta_s) : "?"; }

// Columns of the terminal on `out`, 0 when unknown. A live line must fit: one that wraps would leave
// its first part behind at every redraw, since \r only returns to the start of the last screen row.
size_t terminal_columns(FILE* out) {
  winsize size{};
  if (::ioctl(::fileno(out), TIOCGWINSZ, &size) != 0) return 0;
  return size.ws_col;
}

}  // namespace

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = std::llround(seconds);
  if (s < 3600) return fmt::format("{}:{:02}", s / 60, s % 60);
  return fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
}

std::string format_bytes(size_t bytes) {
  if (bytes < (size_t{1} << 30)) return fmt::format("{:.2f} MiB", bytes / 1048576.0);
  return fmt::format("{:.2f} GiB", bytes / 1073741824.0);
}

std::string format_live_line(const ProgressFigures& f) {
  return fmt::format("step {}/{}  loss {:.4f}  lr {:.2e}  {:.0f} tokens/s  {}  elapsed {}  eta {}", f.step,
                     f.total_steps, f.loss, f.lr, f.tokens_per_s, memory_field(f), format_duration(f.elapsed_s),
                     eta_field(f));
}

std::string format_plain_line(const ProgressFigures& f) {
  return fmt::format("step {:>5}/{}  loss {:.4f}  lr {:.2e}  grad_norm {:.3f}  {:.0f} tokens/s  {}  elapsed {}  eta {}",
                     f.step, f.total_steps, f.loss, f.lr, f.grad_norm, f.tokens_per_s, memory_field(f),
                     format_duration(f.elapsed_s), eta_field(f));
}

std::string format_warning(std::string_view message, int rank, int world_size) {
  return world_size > 1 ? fmt::format("rank {}: warning: {}", rank, message) : fmt::format("warning: {}", message);
}

void print_warning(std::string_view message, int rank, int world_size) {
  if (g_live_line) g_live_line->clear();
  fmt::print(stderr, "{}\n", format_warning(message, rank, world_size));
  std::fflush(stderr);
}

bool stdout_is_terminal() { return ::isatty(STDOUT_FILENO) == 1; }

LiveLine::LiveLine(FILE* out) : out_(out) { g_live_line = this; }

LiveLine::~LiveLine() {
  if (showing_) {
    std::fputc('\n', out_);
    std::fflush(out_);
  }
  if (g_live_line == this) g_live_line = nullptr;
}

bool LiveLine::due() const {
  return !showing_ || std::chrono::steady_clock::now() - last_draw_ >= std::chrono::milliseconds(100);
}

void LiveLine::draw(std::string line) {
  if (const size_t columns = terminal_columns(out_); columns > 1 && line.size() >= columns) line.resize(columns - 1);
  // \r and "clear to the end of the line" (ANSI EL): a shorter line leaves nothing of the longer one.
  fmt::print(out_, "\r{}\033[K", line);
  std::fflush(out_);
  showing_ = true;
  last_draw_ = std::chrono::steady_clock::now();
}

void LiveLine::message(std::string_view line) {
  clear();
  fmt::print(out_, "{}\n", line);
  std::fflush(out_);
}

void LiveLine::clear() {
  if (!showing_) return;
  fmt::print(out_, "\r\033[K");
  std::fflush(out_);
  showing_ = false;
}

ProgressDisplay::ProgressDisplay(const Backend& backend, bool live, int64_t first_step, int64_t total_steps, FILE* out)
    : backend_(backend),
      live_(live),
      first_step_(first_step),
      total_steps_(total_steps),
      out_(out),
      line_(out),
      start_(std::chrono::steady_clock::now()) {}

ProgressFigures ProgressDisplay::figures(int64_t step, double loss, double lr, double grad_norm,
                                         double tokens_per_s) const {
  ProgressFigures f;
  f.step = step;
  f.total_steps = total_steps_;
  f.loss = loss;
  f.lr = lr;
  f.grad_norm = grad_norm;
  f.tokens_per_s = tokens_per_s;
  f.plan_bytes = backend_.allocated_bytes();
  f.device = backend_.device_memory();
  f.elapsed_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  // Wall time per step so far, evaluations and checkpoints included, times the steps left.
  if (const int64_t done = step - first_step_; done > 0)
    f.eta_s = f.elapsed_s / static_cast<double>(done) * static_cast<double>(total_steps_ - step);
  return f;
}

void ProgressDisplay::step(int64_t step, double loss, double lr, double grad_norm, double tokens, double seconds,
                           bool logged) {
  if (std::isfinite(loss)) loss_.add(loss);  // a skipped step's NaN would stick in the average for good
  const bool first = step == first_step_ + 1;
  if (!first) {
    run_tokens_ += tokens;
    run_seconds_ += seconds;
  }
  if (!live_) {
    if (logged) {
      fmt::print(out_, "{}\n", format_plain_line(figures(step, loss, lr, grad_norm, tokens / seconds)));
      std::fflush(out_);
    }
    return;
  }
  if (!first && step != total_steps_ && !line_.due()) return;
  const double tokens_per_s = run_seconds_ > 0 ? run_tokens_ / run_seconds_ : tokens / seconds;
  line_.draw(format_live_line(figures(step, loss_.value(), lr, grad_norm, tokens_per_s)));
}

void ProgressDisplay::message(std::string_view line) { line_.message(line); }

}  // namespace ssmtune
