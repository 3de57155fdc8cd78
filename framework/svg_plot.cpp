#include "framework/svg_plot.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace ssmtune {
namespace {

// Space around each chart's plot area, in pixels: tick labels on the left, the title above, the x
// ticks and label below.
constexpr double kLeft = 72, kRight = 24, kTop = 34, kBottom = 48;
constexpr double kCharWidth = 7;  // about that of a 12 px sans-serif character, for the legend's box

std::string escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

// A tick label with as many decimals as the tick step needs (steps are 1, 2 or 5 times 10^k).
std::string tick_label(double value, double step) {
  const int decimals = std::max(0, -static_cast<int>(std::floor(std::log10(step) + 1e-9)));
  if (std::abs(value) < step * 1e-9) value = 0;  // no "-0.00"
  return fmt::format("{:.{}f}", value, decimals);
}

struct Range {
  double lo = std::numeric_limits<double>::infinity(), hi = -std::numeric_limits<double>::infinity();
  bool empty() const { return !(lo <= hi); }
  void add(double v) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
};

// Maps data coordinates to the pixels of one plot area.
struct Frame {
  double x0, x1, y0, y1;          // the axes' data ranges (outer ticks)
  double left, right, top, bottom;  // the plot area in pixels
  double px(double x) const { return left + (x - x0) / (x1 - x0) * (right - left); }
  double py(double y) const { return bottom - (y - y0) / (y1 - y0) * (bottom - top); }
};

void write_series(std::string& svg, const PlotSeries& s, const Frame& f) {
  if (s.style == PlotSeries::Style::markers) {
    svg += fmt::format(R"(<g fill="{}" fill-opacity="{}">)", escape(s.color), s.opacity);
    for (const auto& [x, y] : s.points)
      if (std::isfinite(x) && std::isfinite(y)) svg += fmt::format(R"(<circle cx="{:.1f}" cy="{:.1f}" r="3.5"/>)", f.px(x), f.py(y));
    svg += "</g>\n";
    return;
  }
  // One polyline per run of finite points; a run of one point is drawn as a dot, which a line would not show.
  std::string run;
  size_t count = 0;
  double last_x = 0, last_y = 0;
  auto flush = [&] {
    if (count >= 2)
      svg += fmt::format(R"(<polyline fill="none" stroke="{}" stroke-opacity="{}" stroke-width="1.6" )"
                         R"(stroke-linejoin="round" points="{}"/>)",
                         escape(s.color), s.opacity, run) + "\n";
    else if (count == 1)
      svg += fmt::format(R"(<circle cx="{:.1f}" cy="{:.1f}" r="2" fill="{}" fill-opacity="{}"/>)", last_x, last_y,
                         escape(s.color), s.opacity) + "\n";
    run.clear();
    count = 0;
  };
  for (const auto& [x, y] : s.points) {
    if (!std::isfinite(x) || !std::isfinite(y)) {
      flush();
      continue;
    }
    last_x = f.px(x);
    last_y = f.py(y);
    run += fmt::format("{}{:.1f},{:.1f}", count ? " " : "", last_x, last_y);
    ++count;
  }
  flush();
}

void write_chart(std::string& svg, const Chart& chart, double width, double height) {
  const Frame area{0, 1, 0, 1, kLeft, width - kRight, kTop, height - kBottom};
  svg += fmt::format(R"(<text x="{:.1f}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{}</text>)",
                     (area.left + area.right) / 2, escape(chart.title)) + "\n";
  svg += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" text-anchor="middle">{}</text>)", (area.left + area.right) / 2,
                     height - 10, escape(chart.x_label)) + "\n";
  svg += fmt::format(R"svg(<text transform="translate(16 {:.1f}) rotate(-90)" text-anchor="middle">{}</text>)svg",
                     (area.top + area.bottom) / 2, escape(chart.y_label)) + "\n";

  Range xr, yr;
  for (const PlotSeries& s : chart.series)
    for (const auto& [x, y] : s.points)
      if (std::isfinite(x) && std::isfinite(y)) xr.add(x), yr.add(y);
  svg += fmt::format(R"(<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="none" stroke="#444"/>)",
                     area.left, area.top, area.right - area.left, area.bottom - area.top) + "\n";
  if (xr.empty()) {
    svg += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" text-anchor="middle" fill="#888">no data</text>)",
                       (area.left + area.right) / 2, (area.top + area.bottom) / 2) + "\n";
    return;
  }
  const std::vector<double> xt = nice_ticks(xr.lo, xr.hi, 8), yt = nice_ticks(yr.lo, yr.hi, 6);
  const Frame f{xt.front(), xt.back(), yt.front(), yt.back(), area.left, area.right, area.top, area.bottom};
  const double xstep = xt[1] - xt[0], ystep = yt[1] - yt[0];
  svg += R"(<g stroke="#e4e4e4">)";
  for (double x : xt) svg += fmt::format(R"(<line x1="{0:.1f}" y1="{1:.1f}" x2="{0:.1f}" y2="{2:.1f}"/>)", f.px(x), f.top, f.bottom);
  for (double y : yt) svg += fmt::format(R"(<line x1="{1:.1f}" y1="{0:.1f}" x2="{2:.1f}" y2="{0:.1f}"/>)", f.py(y), f.left, f.right);
  svg += "</g>\n<g font-size=\"11\" fill=\"#333\">";
  for (double x : xt)
    svg += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" text-anchor="middle">{}</text>)", f.px(x), f.bottom + 16,
                       tick_label(x, xstep));
  for (double y : yt)
    svg += fmt::format(R"(<text x="{:.1f}" y="{:.1f}" text-anchor="end">{}</text>)", f.left - 6, f.py(y) + 4,
                       tick_label(y, ystep));
  svg += "</g>\n";
  for (const PlotSeries& s : chart.series) write_series(svg, s, f);

  // The legend, top right inside the plot area.
  size_t longest = 0;
  for (const PlotSeries& s : chart.series) longest = std::max(longest, s.name.size());
  const double box_w = 34 + kCharWidth * static_cast<double>(longest), box_h = 8 + 18.0 * chart.series.size();
  const double bx = f.right - box_w - 8, by = f.top + 8;
  svg += fmt::format(R"(<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="white" fill-opacity="0.85" stroke="#bbb"/>)",
                     bx, by, box_w, box_h) + "\n";
  for (size_t i = 0; i < chart.series.size(); ++i) {
    const PlotSeries& s = chart.series[i];
    const double ly = by + 16 + 18.0 * static_cast<double>(i);
    if (s.style == PlotSeries::Style::markers)
      svg += fmt::format(R"(<circle cx="{:.1f}" cy="{:.1f}" r="3.5" fill="{}" fill-opacity="{}"/>)", bx + 17, ly - 4,
                         escape(s.color), s.opacity);
    else
      svg += fmt::format(R"(<line x1="{:.1f}" y1="{:.1f}" x2="{:.1f}" y2="{:.1f}" stroke="{}" stroke-opacity="{}" stroke-width="2"/>)",
                         bx + 8, ly - 4, bx + 26, ly - 4, escape(s.color), s.opacity);
    svg += fmt::format(R"(<text x="{:.1f}" y="{:.1f}">{}</text>)", bx + 32, ly, escape(s.name)) + "\n";
  }
}

}  // namespace

std::vector<double> nice_ticks(double lo, double hi, int target) {
  if (!(hi > lo)) {  // one value: a range around it
    const double pad = lo == 0 ? 1 : std::abs(lo) * 0.1;
    lo -= pad;
    hi += pad;
  }
  const double raw = (hi - lo) / std::max(target, 1);
  const double power = std::pow(10.0, std::floor(std::log10(raw)));
  double step = 10 * power;
  for (double m : {1.0, 2.0, 5.0})
    if (m * power >= raw * (1 - 1e-9)) {
      step = m * power;
      break;
    }
  const double first = std::floor(lo / step + 1e-9), last = std::ceil(hi / step - 1e-9);
  std::vector<double> ticks;
  for (double k = first; k <= last; ++k) ticks.push_back(k * step);
  return ticks;
}

std::string svg_charts(const std::vector<Chart>& charts, int width, int chart_height) {
  const int height = chart_height * static_cast<int>(charts.size());
  std::string svg = fmt::format(
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" font-size=\"12\">\n"
      "<rect width=\"{0}\" height=\"{1}\" fill=\"white\"/>\n",
      width, height);
  for (size_t i = 0; i < charts.size(); ++i) {
    svg += fmt::format("<g transform=\"translate(0 {})\">\n", static_cast<int>(i) * chart_height);
    write_chart(svg, charts[i], width, chart_height);
    svg += "</g>\n";
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace ssmtune
