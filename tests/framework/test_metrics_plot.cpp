// The plot of a run's metrics: tick placement, an SVG that is well formed and holds every series,
// and one clear error per bad metrics file (missing, malformed line named file:line).
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "framework/metrics_plot.h"
#include "framework/svg_plot.h"
#include "tests/catch.h"
#include "tests/framework/error_message.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
namespace fs = std::filesystem;

namespace {

// Every element is closed in order (<a>..</a> or <a/>), and the document is one <svg> element after
// the XML declaration. Returns the element names in document order.
std::vector<std::string> check_well_formed(const std::string& svg) {
  std::vector<std::string> open, names;
  REQUIRE(svg.rfind("<?xml", 0) == 0);
  size_t at = svg.find("?>");
  while ((at = svg.find('<', at)) != std::string::npos) {
    const size_t end = svg.find('>', at);
    REQUIRE(end != std::string::npos);
    const std::string tag = svg.substr(at + 1, end - at - 1);
    REQUIRE(!tag.empty());
    if (tag[0] == '/') {
      REQUIRE(!open.empty());
      CHECK(open.back() == tag.substr(1));
      open.pop_back();
    } else {
      const std::string name = tag.substr(0, tag.find_first_of(" />"));
      names.push_back(name);
      if (tag.back() != '/') open.push_back(name);
      CHECK(std::count(tag.begin(), tag.end(), '"') % 2 == 0);  // attribute quotes are paired
    }
    at = end;
  }
  CHECK(open.empty());
  REQUIRE(!names.empty());
  CHECK(names.front() == "svg");
  return names;
}

size_t count(const std::string& text, const std::string& part) {
  size_t n = 0;
  for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + 1)) ++n;
  return n;
}

void write(const fs::path& path, const std::string& text) { std::ofstream(path) << text; }

}  // namespace

TEST_CASE("ticks fall on 1-2-5 steps and cover the range") {
  CHECK(nice_ticks(0, 300, 6) == std::vector<double>{0, 50, 100, 150, 200, 250, 300});
  CHECK(nice_ticks(1, 300, 8) == std::vector<double>{0, 50, 100, 150, 200, 250, 300});
  const std::vector<double> loss = nice_ticks(3.04, 6.21, 6);
  CHECK(loss.front() <= 3.04);
  CHECK(loss.back() >= 6.21);
  CHECK(loss[1] - loss[0] == Approx(1.0));  // the smallest 1-2-5 step of at least (6.21 - 3.04) / 6
  CHECK(loss == std::vector<double>{3, 4, 5, 6, 7});
  const std::vector<double> one = nice_ticks(5, 5);  // a single value: a range around it
  CHECK(one.front() < 5);
  CHECK(one.back() > 5);
}

TEST_CASE("the metrics plot is well-formed SVG with every series") {
  test::ScratchDir dir("plot");
  std::string lines;
  for (int step = 1; step <= 40; ++step) {
    const double loss = step == 17 ? NAN : 6.0 * std::exp(-step / 10.0) + 3.0;
    lines += "{\"step\": " + std::to_string(step) + ", \"loss\": " + (std::isnan(loss) ? "null" : std::to_string(loss)) +
             ", \"lr\": 0.001, \"grad_norm\": 0.5, \"tokens_per_s\": " + std::to_string(5000 + step) +
             ", \"target_tokens\": 1024}\n";
    if (step % 10 == 0)
      lines += "{\"step\": " + std::to_string(step) + ", \"val_loss\": " + std::to_string(3.5 + 10.0 / step) +
               ", \"val_perplexity\": 30, \"val_tokens\": 512}\n";
  }
  lines += "\n";  // a blank line is skipped
  write(dir / "metrics.jsonl", lines);

  const RunMetrics m = read_metrics(dir / "metrics.jsonl");
  CHECK(m.loss.size() == 40);
  CHECK(std::isnan(m.loss[16][1]));  // null: the step whose loss was not finite
  CHECK(m.val_loss.size() == 4);
  CHECK(m.tokens_per_s.size() == 40);
  CHECK(m.val_loss[3] == std::array<double, 2>{40, 3.75});

  const fs::path svg_path = write_metrics_plot(dir.path());
  CHECK(svg_path == dir / "metrics.svg");
  std::ifstream in(svg_path);
  const std::string svg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::vector<std::string> names = check_well_formed(svg);
  // Raw loss: two polylines around the null at step 17; the smoothed loss and tokens/s one each.
  CHECK(std::count(names.begin(), names.end(), "polyline") == 4);
  // The 4 validation points plus the legend's marker.
  CHECK(count(svg, "r=\"3.5\"") == 5);
  for (const char* text : {"loss, smoothed (EMA 0.9 per step, bias-corrected)", "validation loss", "tokens/s", "step", "throughput"})
    CHECK(svg.find(text) != std::string::npos);
  // The validation points are drawn with the x of their step: the x axis spans 0..40 from px 72 to 776.
  CHECK(svg.find("cx=\"776.0\"") != std::string::npos);
}

TEST_CASE("a chart without points says so, and names are escaped") {
  Chart empty{"a <title> & more", "step", "loss", {{"x", "#000", PlotSeries::Style::line, 1, {}}}};
  const std::string svg = svg_charts({empty});
  check_well_formed(svg);
  CHECK(svg.find("no data") != std::string::npos);
  CHECK(svg.find("a &lt;title&gt; &amp; more") != std::string::npos);
}

TEST_CASE("a bad metrics file gives one error naming the file and line") {
  test::ScratchDir dir("plot-errors");
  CHECK(test::contains(test::error_message([&] { write_metrics_plot(dir.path()); }),
                       (dir / "metrics.jsonl").string() + ": cannot open the metrics file (no such file)"));
  const std::string good = "{\"step\": 1, \"loss\": 5.0, \"tokens_per_s\": 100}\n";
  const std::vector<std::pair<std::string, std::string>> cases{
      {good + "{\"step\": 2, \"loss\": 4.0\n", ":2: not a JSON object"},
      {good + "[1, 2]\n", ":2: not a JSON object"},
      {good + good + "{\"loss\": 4.0}\n", ":3: no integer \"step\""},
      {good + "{\"step\": 2.5, \"loss\": 4.0}\n", ":2: no integer \"step\""},
      {good + "{\"step\": 2, \"loss\": \"4.0\"}\n", ":2: \"loss\" must be a number, got \"4.0\""},
      {good + "{\"step\": 2, \"val_loss\": true}\n", ":2: \"val_loss\" must be a number"},
      // The message would print the value, recursing once per level.
      {good + "{\"step\": 2, \"loss\": " + std::string(200, '[') + std::string(200, ']') + "}\n",
       ":2: JSON nested deeper than 128 levels"},
  };
  for (const auto& [text, expected] : cases) {
    write(dir / "metrics.jsonl", text);
    const std::string message = test::error_message([&] { write_metrics_plot(dir.path()); });
    INFO(message);
    CHECK(test::contains(message, (dir / "metrics.jsonl").string() + expected));
    CHECK(!fs::exists(dir / "metrics.svg"));  // nothing half written
  }
}
