// Line charts as SVG text, written here rather than by a plotting program the user may lack: charts
// stacked one above another, each with axes, ticks at 1-2-5 steps, grid lines, axis labels, a title and
// a legend; a series is a polyline (broken where a value is not finite) or markers.
#pragma once
#include <array>
#include <string>
#include <vector>

namespace ssmtune {

struct PlotSeries {
  enum class Style { line, markers };
  std::string name;                         // in the legend
  std::string color;                        // an SVG colour, e.g. "#1f77b4"
  Style style = Style::line;
  double opacity = 1;                       // of the line or markers
  std::vector<std::array<double, 2>> points;  // (x, y); non-finite y values are left out
};

struct Chart {
  std::string title, x_label, y_label;
  std::vector<PlotSeries> series;
};

// Tick positions at multiples of 1, 2 or 5 times a power of ten covering [lo, hi] with about
// `target` intervals: the first tick <= lo, the last >= hi. lo == hi is widened around the value.
std::vector<double> nice_ticks(double lo, double hi, int target = 5);

// A standalone SVG document of the charts, `width` pixels wide, each chart `chart_height` pixels high.
// A chart without any finite point shows "no data" in place of its plot.
std::string svg_charts(const std::vector<Chart>& charts, int width = 800, int chart_height = 320);

}  // namespace ssmtune
