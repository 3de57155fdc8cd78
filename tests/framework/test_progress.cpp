// The progress output of training: the smoothed loss, the line formats (live and plain), ETA, when
// lines are printed, that messages clear the live line first, and rank-prefixed warnings.
#include <cmath>
#include <cstdio>
#include <string>

#include "framework/cpu_backend.h"
#include "framework/progress.h"
#include "tests/catch.h"

using namespace ssmtune;

namespace {

// What the display wrote to a temporary file.
std::string contents(FILE* file) {
  std::fflush(file);
  std::rewind(file);
  std::string text;
  char buffer[4096];
  while (size_t n = std::fread(buffer, 1, sizeof buffer, file)) text.append(buffer, n);
  return text;
}

size_t count(const std::string& text, const std::string& part) {
  size_t n = 0;
  for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + 1)) ++n;
  return n;
}

}  // namespace

TEST_CASE("the smoothed loss is the bias-corrected exponential moving average") {
  SmoothedValue ema(0.9);
  CHECK(std::isnan(ema.value()));
  ema.add(4.0);
  CHECK(ema.value() == Approx(4.0).epsilon(1e-15));  // no pull toward the zero it started from
  ema.add(2.0);
  // (0.1 * 0.9 * 4 + 0.1 * 2) / (1 - 0.9^2), computed independently.
  CHECK(ema.value() == Approx((0.09 * 4.0 + 0.1 * 2.0) / 0.19).epsilon(1e-14));
  // A value standing for 3 steps weighs as three equal values one step each would.
  SmoothedValue per_step(0.9), logged(0.9);
  per_step.add(4.0);
  logged.add(4.0);
  for (int i = 0; i < 3; ++i) per_step.add(2.0);
  logged.add(2.0, 3);
  CHECK(logged.value() == Approx(per_step.value()).epsilon(1e-14));
  SmoothedValue constant;
  for (int i = 0; i < 50; ++i) constant.add(3.25);
  CHECK(constant.value() == Approx(3.25).epsilon(1e-14));
}

TEST_CASE("durations and lines are formatted from the figures") {
  CHECK(format_duration(0) == "0:00");
  CHECK(format_duration(42.4) == "0:42");
  CHECK(format_duration(125) == "2:05");
  CHECK(format_duration(3725) == "1:02:05");
  CHECK(format_duration(-1) == "?");
  CHECK(format_duration(INFINITY) == "?");
  CHECK(format_bytes(size_t{8830} << 10) == "8.62 MiB");
  CHECK(format_bytes(size_t{3} << 29) == "1.50 GiB");

  ProgressFigures f;
  f.step = 120;
  f.total_steps = 300;
  f.loss = 3.05123;
  f.lr = 0.003;
  f.grad_norm = 0.5;
  f.tokens_per_s = 6123.4;
  f.plan_bytes = size_t{3} << 29;  // 1.5 GiB
  f.elapsed_s = 65;
  f.eta_s = 97.5;
  CHECK(format_live_line(f) == "step 120/300  loss 3.0512  lr 3.00e-03  6123 tokens/s  mem 1.50 GiB  elapsed 1:05  eta 1:38");
  CHECK(format_plain_line(f) ==
        "step   120/300  loss 3.0512  lr 3.00e-03  grad_norm 0.500  6123 tokens/s  mem 1.50 GiB  elapsed 1:05  eta 1:38");
  f.device = {size_t{12} << 30, size_t{80} << 30};  // a GPU: the device's own figures
  f.eta_s.reset();
  CHECK(format_live_line(f) ==
        "step 120/300  loss 3.0512  lr 3.00e-03  6123 tokens/s  gpu 12.00/80.0 GiB  elapsed 1:05  eta ?");
}

TEST_CASE("warnings carry the rank in a job of several") {
  CHECK(format_warning("disk almost full", 0, 1) == "warning: disk almost full");
  CHECK(format_warning("disk almost full", 3, 4) == "rank 3: warning: disk almost full");
}

TEST_CASE("without a terminal, one plain line per logged step") {
  const std::unique_ptr<Backend> backend = make_cpu_backend();
  FILE* out = std::tmpfile();
  REQUIRE(out);
  {
    ProgressDisplay display(*backend, false, 10, 20, out);
    for (int64_t step = 11; step <= 20; ++step)
      display.step(step, 2.0, 1e-3, 0.1, 1000, 0.5, step == 11 || step % 5 == 0);
    display.message("saved runs/x/checkpoints/step_20");
  }
  const std::string text = contents(out);
  std::fclose(out);
  INFO(text);
  CHECK(count(text, "\n") == 4);  // steps 11, 15, 20 and the message
  CHECK(text.find('\r') == std::string::npos);
  CHECK(text.find("\033[") == std::string::npos);
  CHECK(text.find("step    15/20  loss 2.0000") != std::string::npos);
  CHECK(text.find("2000 tokens/s") != std::string::npos);  // the step's own 1000 tokens in 0.5 s
  CHECK(text.find("eta ") != std::string::npos);
  CHECK(text.find("eta 0:00") != std::string::npos);  // the last step leaves nothing to wait for
  CHECK(text.rfind("saved runs/x/checkpoints/step_20\n") == text.size() - 33);
}

TEST_CASE("on a terminal the live line is rewritten in place and cleared before a message") {
  const std::unique_ptr<Backend> backend = make_cpu_backend();
  FILE* out = std::tmpfile();
  REQUIRE(out);
  {
    ProgressDisplay display(*backend, true, 0, 3, out);
    display.step(1, 4.0, 1e-3, 0.1, 100, 0.1, true);
    display.message("step     1/3  val_loss 3.9000  val_perplexity 49.402");
    display.step(2, 2.0, 1e-3, 0.1, 100, 0.1, false);
    display.step(3, 2.0, 1e-3, 0.1, 100, 0.1, true);  // the last step is always drawn
  }
  const std::string text = contents(out);
  std::fclose(out);
  INFO(text);
  // Step 1, cleared; the message on its own line; step 2 is drawn since the line was cleared; step 3;
  // the end of the run leaves the last state on screen with a line end.
  CHECK(text.find("\rstep 1/3  loss 4.0000") == 0);
  CHECK(text.find("\033[K\r\033[Kstep     1/3  val_loss 3.9000  val_perplexity 49.402\n") != std::string::npos);
  CHECK(text.find("\rstep 2/3  loss") != std::string::npos);
  const size_t last = text.find("\rstep 3/3  loss ");
  REQUIRE(last != std::string::npos);
  // The smoothed loss after 4, 2, 2 (beta 0.9, bias-corrected): (0.081*4 + 0.09*2 + 0.1*2) / (1 - 0.729).
  CHECK(text.find(fmt::format("loss {:.4f}", (0.081 * 4 + 0.09 * 2 + 0.1 * 2) / 0.271), last) != std::string::npos);
  CHECK(text.back() == '\n');
  CHECK(count(text, "\n") == 2);
}

TEST_CASE("a live line is due at once when not showing, then not again within a tenth of a second") {
  FILE* out = std::tmpfile();
  REQUIRE(out);
  {
    LiveLine line(out);
    CHECK(line.due());
    line.draw("line 1, x");
    CHECK_FALSE(line.due());  // drawn just now
    line.message("a message");
    CHECK(line.due());  // cleared by the message: drawn again at once
    line.draw("line 2");
  }
  const std::string text = contents(out);
  std::fclose(out);
  CHECK(text == "\rline 1, x\033[K\r\033[Ka message\n\rline 2\033[K\n");
}
