// The built-in synthetic datasets. Plain C++ (no LibTorch); each image draws its parameters
// from its own splitmix stream keyed by (seed, index), so threads never change the output.
#include "data/synthetic.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <stdexcept>

#include "data/impl/pixels.h"

namespace diffuse::data {
namespace {

struct Rgb {
  float r, g, b;
};

// Pale backgrounds and saturated foregrounds: every shape contrasts with every background.
constexpr std::array<Rgb, 4> kBackgrounds = {{{236, 228, 206}, {206, 222, 236}, {214, 234, 206}, {236, 212, 222}}};
constexpr std::array<Rgb, 6> kColours = {
    {{200, 40, 40}, {40, 150, 60}, {40, 70, 200}, {230, 130, 20}, {130, 50, 170}, {20, 140, 140}}};
// Shape "radius" as a fraction of the image side. The three shapes have equal areas at equal
// radius, so a shape's size never gives its class away.
constexpr std::array<double, 3> kRadii = {0.16, 0.22, 0.28};
constexpr double kSquareHalf = 0.886226925;    // sqrt(pi) / 2: square of the circle's area
constexpr double kTriangleSide = 2.693249454;  // sqrt(4 pi / sqrt(3)): equilateral, same area
constexpr int kSupersample = 4;                // 4 x 4 samples per pixel for anti-aliased edges

enum Shape { kCircle = 0, kSquare = 1, kTriangle = 2 };

struct Box {
  double x0, x1, y0, y1;  // extent relative to the shape's centre
};

Box shape_box(Shape shape, double r) {
  switch (shape) {
    case kCircle: return {-r, r, -r, r};
    case kSquare: return {-kSquareHalf * r, kSquareHalf * r, -kSquareHalf * r, kSquareHalf * r};
    case kTriangle: {
      const double side = kTriangleSide * r, height = side * std::sqrt(3.0) / 2;
      return {-side / 2, side / 2, -2 * height / 3, height / 3};  // centroid at the centre, apex up
    }
  }
  return {};
}

bool inside(Shape shape, double r, double dx, double dy) {
  switch (shape) {
    case kCircle: return dx * dx + dy * dy <= r * r;
    case kSquare: return std::abs(dx) <= kSquareHalf * r && std::abs(dy) <= kSquareHalf * r;
    case kTriangle: {
      const double side = kTriangleSide * r, height = side * std::sqrt(3.0) / 2;
      const double top = -2 * height / 3, bottom = height / 3;
      if (dy < top || dy > bottom) return false;
      const double half_width = (dy - top) / height * side / 2;  // widens linearly from the apex
      return std::abs(dx) <= half_width;
    }
  }
  return false;
}

// red_blue: the colour is the label (0 red, 1 blue) and the shape is free: two classes that differ
// in one easily measured property (the mean red minus blue of an image), for conditional models.
int64_t render_shapes(uint64_t seed, int64_t index, int64_t size, uint8_t* out, bool red_blue) {
  impl::SplitMix rng(impl::hash_words(seed, red_blue ? 0x5245444255ULL /* "REDBU" */ : 0x5348415045ULL /* "SHAPE" */,
                                      static_cast<uint64_t>(index)));
  const auto shape = static_cast<Shape>(rng.below(3));
  const Rgb background = kBackgrounds[rng.below(kBackgrounds.size())];
  const int64_t colour_class = red_blue ? static_cast<int64_t>(rng.below(2)) : 0;
  const Rgb colour = red_blue ? kColours[colour_class == 0 ? 0 : 2] : kColours[rng.below(kColours.size())];
  const double r = kRadii[rng.below(kRadii.size())] * size;
  const Box box = shape_box(shape, r);
  // Centre anywhere that keeps the whole shape at least one pixel inside the image.
  const double cx_lo = 1 - box.x0, cx_hi = size - 1 - box.x1;
  const double cy_lo = 1 - box.y0, cy_hi = size - 1 - box.y1;
  const double cx = cx_lo + rng.uniform() * std::max(0.0, cx_hi - cx_lo);
  const double cy = cy_lo + rng.uniform() * std::max(0.0, cy_hi - cy_lo);

  for (int64_t y = 0; y < size; ++y) {
    // Vertical gradient: the background darkens by 15% from top to bottom.
    const float shade = 1.0f - 0.15f * static_cast<float>(y) / std::max<int64_t>(size - 1, 1);
    const Rgb bg{background.r * shade, background.g * shade, background.b * shade};
    for (int64_t x = 0; x < size; ++x) {
      float coverage = 0.f;
      const bool near = x + 1 >= cx + box.x0 && x <= cx + box.x1 && y + 1 >= cy + box.y0 && y <= cy + box.y1;
      if (near) {
        int hits = 0;
        for (int sy = 0; sy < kSupersample; ++sy) {
          for (int sx = 0; sx < kSupersample; ++sx) {
            const double px = x + (sx + 0.5) / kSupersample, py = y + (sy + 0.5) / kSupersample;
            hits += inside(shape, r, px - cx, py - cy);
          }
        }
        coverage = static_cast<float>(hits) / (kSupersample * kSupersample);
      }
      uint8_t* p = out + (y * size + x) * 3;
      p[0] = static_cast<uint8_t>(std::lround(bg.r + (colour.r - bg.r) * coverage));
      p[1] = static_cast<uint8_t>(std::lround(bg.g + (colour.g - bg.g) * coverage));
      p[2] = static_cast<uint8_t>(std::lround(bg.b + (colour.b - bg.b) * coverage));
    }
  }
  return red_blue ? colour_class : static_cast<int64_t>(shape);
}

}  // namespace

std::vector<std::string> synthetic_dataset_names() { return {"shapes", "red-blue"}; }

std::vector<std::string> synthetic_class_names(const std::string& name) {
  if (name == "shapes") return {"circle", "square", "triangle"};
  if (name == "red-blue") return {"red", "blue"};
  throw std::invalid_argument("unknown synthetic dataset '" + name + "' (known: shapes, red-blue)");
}

int64_t render_synthetic(const std::string& name, uint64_t seed, int64_t index, int64_t size, uint8_t* out_rgb) {
  if (size < 8) throw std::invalid_argument("synthetic images need a size of at least 8, got " + std::to_string(size));
  if (name == "shapes") return render_shapes(seed, index, size, out_rgb, /*red_blue=*/false);
  if (name == "red-blue") return render_shapes(seed, index, size, out_rgb, /*red_blue=*/true);
  throw std::invalid_argument("unknown synthetic dataset '" + name + "' (known: shapes, red-blue)");
}

}  // namespace diffuse::data
