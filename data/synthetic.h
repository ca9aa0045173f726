// data/synthetic.h: built-in procedural datasets, so the demo and the tests train on something
// without downloading. `diffuse prep --synthetic shapes --count N --size S` writes one.
//
// "shapes": one filled, anti-aliased shape (circle, square or upright triangle; the label) of
// one of six saturated colours and three sizes, at a random position, on one of four pale
// backgrounds with a vertical gradient. A trained model's samples are easy to judge by eye:
// clean edges, flat colours, one shape of a known kind.
//
// "red-blue": the same pictures with a red (label 0) or blue (label 1) shape of any kind: two
// classes told apart by colour alone, for class-conditional runs and their tests.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace diffuse::data {

/// Names of the built-in synthetic datasets.
std::vector<std::string> synthetic_dataset_names();

/// Label value -> class name of a synthetic dataset; throws on an unknown name.
std::vector<std::string> synthetic_class_names(const std::string& name);

/// Renders image `index` of dataset `name` as size x size RGB (row-major [H, W, 3] uint8) into
/// `out_rgb` and returns its label. A pure function of (name, seed, index, size): any thread,
/// any order, same bytes.
int64_t render_synthetic(const std::string& name, uint64_t seed, int64_t index, int64_t size, uint8_t* out_rgb);

}  // namespace diffuse::data
