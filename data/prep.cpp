// `diffuse prep`: input formats as Sources that produce image i on any thread, and one loop
// that decodes blocks in parallel, writes them in order, and publishes the file atomically.
#include "data/prep.h"

#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>

#include "data/dataset.h"
#include "data/impl/hdf5.h"
#include "data/impl/pixels.h"
#include "data/synthetic.h"
#include "util/durable_file.h"
#include "util/remove_on_signal.h"

namespace diffuse::data {
namespace fs = std::filesystem;

namespace {

// std::string(1, '\'') rather than "'" + ...: GCC 12 warns falsely (-Wstringop-overflow) on the latter.
std::string quoted(const fs::path& path) { return std::string(1, '\'') + path.string() + "'"; }

std::string lower(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(), [](unsigned char c) { return std::tolower(c); });
  return text;
}

// An input that cannot be used; skippable with skip_bad. Other exceptions always stop the run.
struct BadItem : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Runs fn(0..n-1) on `threads` threads; the first exception stops the others and is rethrown.
void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
  threads = static_cast<int>(std::clamp<int64_t>(threads, 1, std::max<int64_t>(n, 1)));
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto body = [&] {
    for (int64_t i = next++; i < n; i = next++) {
      try {
        fn(i);
      } catch (...) {
        std::lock_guard lock(error_mutex);
        if (!error) error = std::current_exception();
        next = n;
        return;
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(body);
  body();
  for (auto& thread : pool) thread.join();
  if (error) std::rethrow_exception(error);
}

// An input format: its geometry after the transforms, and image i on demand (thread-safe).
class Source {
 public:
  virtual ~Source() = default;
  /// Writes image i (height x width x channels) to `out`; returns its label (0 without labels).
  virtual int64_t produce(int64_t i, uint8_t* out) const = 0;
  /// A name for image i in error reports (its file, or file and record).
  virtual std::string item_name(int64_t i) const = 0;

  int64_t total = 0, height = 0, width = 0, channels = 0, size = 0;  // size 0: no resize
  bool has_labels = false;
  std::vector<std::string> class_names;
  std::string description;
  std::vector<BadInput> bad;              // inputs dropped before the main pass
  std::vector<BadInput> skipped_entries;  // folder entries not searched (links, unreadable folders)
};

// --- folders of images -----------------------------------------------------------------------

bool is_image_file(const fs::path& path) {
  const std::string extension = lower(path.extension().string());
  return extension == ".png" || extension == ".jpg" || extension == ".jpeg" || extension == ".bmp";
}

// The images under a folder, and the entries the search left out with the reason.
struct FolderWalk {
  std::vector<fs::path> images;
  std::vector<BadInput> skipped;
};

// A folder's identity: two paths (through links) to one folder have the same.
using FolderId = std::pair<dev_t, ino_t>;

// Breadth first, so of two paths to one folder the shallower one counts (then the first by name).
class FolderWalker {
 public:
  explicit FolderWalker(const fs::path& root) : root_(root) {}

  FolderWalk walk() {
    struct stat info {};
    if (::stat(root_.c_str(), &info) != 0) {
      throw std::runtime_error("cannot list folder " + quoted(root_) + ": " + std::strerror(errno));
    }
    const FolderId root_id{info.st_dev, info.st_ino};
    seen_[root_id] = root_;
    std::deque<Pending> queue{{root_, {root_id}}};
    while (!queue.empty()) {
      Pending folder = std::move(queue.front());
      queue.pop_front();
      visit(folder, queue);
    }
    std::sort(result_.images.begin(), result_.images.end(), [&](const fs::path& a, const fs::path& b) {
      return a.lexically_relative(root_).generic_string() < b.lexically_relative(root_).generic_string();
    });
    return std::move(result_);
  }

 private:
  struct Pending {
    fs::path path;
    std::vector<FolderId> ancestors;  // root first, this folder last
  };

  // One folder's entries in name order.
  std::vector<fs::path> entries(const fs::path& folder) {
    std::vector<fs::path> names;
    std::error_code error;
    fs::directory_iterator it(folder, error), end;
    for (; !error && it != end; it.increment(error)) names.push_back(it->path());
    if (error) {
      if (folder == root_) throw std::runtime_error("cannot list folder " + quoted(root_) + ": " + error.message());
      result_.skipped.push_back({folder, "cannot list this folder: " + error.message()});
      return {};
    }
    std::sort(names.begin(), names.end());
    return names;
  }

  void visit(const Pending& folder, std::deque<Pending>& queue) {
    for (const fs::path& path : entries(folder.path)) {
      const std::string name = path.filename().string();
      if (!name.empty() && name[0] == '.') continue;  // hidden files and folders (.git, macOS ._ files)
      struct stat entry {}, target {};
      if (::lstat(path.c_str(), &entry) != 0) continue;  // vanished while listing
      const bool is_link = S_ISLNK(entry.st_mode);
      if (is_link && ::stat(path.c_str(), &target) != 0) {
        const int code = errno;
        std::error_code ignored;
        const std::string points_to = fs::read_symlink(path, ignored).string();
        result_.skipped.push_back(
            {path, code == ELOOP    ? "symbolic link loop: '" + points_to + "' never resolves to a file or folder"
                   : code == ENOENT ? "dangling symbolic link to '" + points_to + "'"
                                    : "symbolic link to '" + points_to + "': " + std::strerror(code)});
        continue;
      }
      if (!is_link) target = entry;
      if (S_ISDIR(target.st_mode)) {
        const FolderId id{target.st_dev, target.st_ino};
        if (auto earlier = seen_.find(id); earlier != seen_.end()) {
          const bool loop = std::find(folder.ancestors.begin(), folder.ancestors.end(), id) != folder.ancestors.end();
          result_.skipped.push_back({path, loop ? "symbolic link loop: leads back to " + quoted(earlier->second)
                                                : "same folder as " + quoted(earlier->second) + ", already searched"});
          continue;
        }
        seen_[id] = path;
        Pending child{path, folder.ancestors};
        child.ancestors.push_back(id);
        queue.push_back(std::move(child));
      } else if (S_ISREG(target.st_mode) && is_image_file(path)) {
        result_.images.push_back(path);
      }
    }
  }

  fs::path root_;
  FolderWalk result_;
  std::map<FolderId, fs::path> seen_;  // every folder queued, by the path it was first reached by
};

// "; skipped N entries, e.g. 'PATH': REASON", or "" when nothing was skipped.
std::string skipped_summary(const std::vector<BadInput>& skipped) {
  if (skipped.empty()) return "";
  return "; skipped " + std::to_string(skipped.size()) + (skipped.size() == 1 ? " entry: " : " entries, e.g. ") +
         quoted(skipped.front().path) + ": " + skipped.front().reason;
}

// Searches `root` recursively, following links to folders and files; hidden entries are left out
// silently, dangling links, link loops, a folder reached twice and unreadable folders are
// reported in `skipped`.
FolderWalk walk_folder(const fs::path& root) { return FolderWalker(root).walk(); }

class FolderSource final : public Source {
 public:
  FolderSource(const fs::path& root, FolderWalk walk, const PrepOptions& options, int threads) {
    std::vector<fs::path> found = std::move(walk.images);
    skipped_entries = std::move(walk.skipped);
    if (found.empty()) {
      throw std::runtime_error("no images under " + quoted(root) + " (looked for .png, .jpg, .jpeg and .bmp files, "
                               "recursively" + skipped_summary(skipped_entries) + ")");
    }
    // Headers first: the output geometry must be known before writing, and unreadable files
    // are found without decoding anything.
    std::vector<impl::ImageHeader> headers(found.size());
    std::vector<std::string> errors(found.size());
    parallel_for(static_cast<int64_t>(found.size()), threads,
                 [&](int64_t i) { impl::read_image_header(found[i], headers[i], errors[i]); });
    for (size_t i = 0; i < found.size(); ++i) {
      if (errors[i].empty()) {
        files_.push_back(found[i]);
        kept_headers_.push_back(headers[i]);
      } else if (options.skip_bad) {
        bad.push_back({found[i], errors[i]});
      } else {
        throw std::runtime_error("cannot read image " + quoted(found[i]) + ": " + errors[i] +
                                 " (pass --skip-bad to leave unreadable images out)");
      }
    }
    if (files_.empty()) throw std::runtime_error("no readable images under " + quoted(root));
    total = static_cast<int64_t>(files_.size());

    bool colour = false;
    for (const auto& header : kept_headers_) colour = colour || header.channels >= 3;
    channels = options.channels.value_or(colour ? 3 : 1);
    if (options.size) {
      size = height = width = *options.size;
    } else {
      height = kept_headers_[0].height;
      width = kept_headers_[0].width;
      for (size_t i = 1; i < files_.size(); ++i) {
        if (kept_headers_[i].height != height || kept_headers_[i].width != width) {
          throw std::runtime_error(
              "images differ in size: " + quoted(files_[0]) + " is " + std::to_string(width) + "x" +
              std::to_string(height) + " but " + quoted(files_[i]) + " is " + std::to_string(kept_headers_[i].width) +
              "x" + std::to_string(kept_headers_[i].height) + " (pass --size S to centre-crop and resize all to SxS)");
        }
      }
    }

    if (options.labels_from_folders) {
      has_labels = true;
      std::set<std::string> names;
      for (const auto& file : files_) {
        fs::path relative = file.lexically_relative(root);
        if (std::distance(relative.begin(), relative.end()) < 2) {
          throw std::runtime_error("image " + quoted(file) + " is directly in " + quoted(root) +
                                   "; with --labels-from-folders every image must be inside a class sub-folder");
        }
        folder_.push_back(relative.begin()->string());
        names.insert(folder_.back());
      }
      class_names.assign(names.begin(), names.end());
    }
    description = "folder " + fs::absolute(root).lexically_normal().string();
  }

  int64_t produce(int64_t i, uint8_t* out) const override {
    impl::Image image;
    try {
      image = impl::decode_image_file(files_[i]);
    } catch (const std::exception& error) {
      throw BadItem(error.what());
    }
    if (size == 0 && (image.height != height || image.width != width)) {
      throw BadItem("image " + quoted(files_[i]) + " decodes to " + std::to_string(image.width) + "x" +
                    std::to_string(image.height) + ", expected " + std::to_string(width) + "x" +
                    std::to_string(height));
    }
    impl::fit_image(image.view(), size, channels, out);
    if (folder_.empty()) return 0;
    return std::lower_bound(class_names.begin(), class_names.end(), folder_[i]) - class_names.begin();
  }

  std::string item_name(int64_t i) const override { return files_[i].string(); }

 private:
  std::vector<fs::path> files_;
  std::vector<impl::ImageHeader> kept_headers_;
  std::vector<std::string> folder_;  // class folder of each file, with labels
};

// --- MNIST-style idx files -------------------------------------------------------------------

// Reads a whole file, gunzipping it when it is gzip (zlib reads plain files unchanged).
std::vector<uint8_t> read_maybe_gzipped(const fs::path& path) {
  if (!fs::is_regular_file(path)) throw std::runtime_error(quoted(path) + " does not exist or is not a file");
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) throw std::runtime_error("cannot open " + quoted(path));
  gzbuffer(file, 1 << 20);
  std::vector<uint8_t> data;
  std::vector<uint8_t> block(1 << 20);
  for (;;) {
    int n = gzread(file, block.data(), static_cast<unsigned>(block.size()));
    if (n < 0) {
      int code = 0;
      std::string message = gzerror(file, &code);
      gzclose(file);
      throw std::runtime_error(quoted(path) + " is corrupt or truncated (gzip: " + message + ")");
    }
    if (n == 0) break;
    data.insert(data.end(), block.begin(), block.begin() + n);
  }
  gzclose(file);
  return data;
}

uint32_t big_endian(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

std::string hex(uint32_t value) {
  char text[16];
  std::snprintf(text, sizeof(text), "0x%08X", value);
  return text;
}

constexpr uint32_t kIdxImagesMagic = 0x00000803;  // unsigned bytes, 3 dimensions
constexpr uint32_t kIdxLabelsMagic = 0x00000801;  // unsigned bytes, 1 dimension

std::optional<fs::path> sibling_labels(const fs::path& images) {
  const std::string name = images.filename().string();
  for (const std::string pattern : {"-images-idx3-ubyte", "-images.idx3-ubyte"}) {
    auto at = name.find(pattern);
    if (at == std::string::npos) continue;
    std::string base = name.substr(0, at) + (pattern[7] == '-' ? "-labels-idx1-ubyte" : "-labels.idx1-ubyte");
    for (const std::string suffix : {".gz", ""}) {
      fs::path candidate = images.parent_path() / (base + suffix);
      if (fs::is_regular_file(candidate)) return candidate;
    }
  }
  return std::nullopt;
}

class IdxSource final : public Source {
 public:
  IdxSource(const fs::path& path, const PrepOptions& options) : path_(path) {
    data_ = read_maybe_gzipped(path);
    if (data_.size() < 16 || big_endian(data_.data()) != kIdxImagesMagic) {
      const std::string magic = data_.size() >= 4 ? hex(big_endian(data_.data())) : "missing (file too short)";
      throw std::runtime_error(quoted(path) + " is not an idx image file: magic number " + magic + ", expected " +
                               hex(kIdxImagesMagic) + (data_.size() >= 4 && big_endian(data_.data()) == kIdxLabelsMagic
                                                           ? " (this is a labels file: give the images file)"
                                                           : ""));
    }
    const int64_t n = big_endian(data_.data() + 4), rows = big_endian(data_.data() + 8),
                  cols = big_endian(data_.data() + 12);
    const int64_t expected = 16 + n * rows * cols;
    if (static_cast<int64_t>(data_.size()) != expected) {
      throw std::runtime_error(quoted(path) + " is " + (static_cast<int64_t>(data_.size()) < expected ? "truncated" : "too long") +
                               ": its header announces " + std::to_string(n) + " images of " + std::to_string(rows) +
                               "x" + std::to_string(cols) + " (" + std::to_string(expected) + " bytes) but it holds " +
                               std::to_string(data_.size()) + " bytes");
    }
    if (n == 0 || rows == 0 || cols == 0) throw std::runtime_error(quoted(path) + " holds no images");
    total = n;
    source_height_ = rows;
    source_width_ = cols;
    channels = options.channels.value_or(1);
    if (options.size) size = height = width = *options.size;
    else height = rows, width = cols;

    auto labels_path = options.labels ? options.labels : sibling_labels(path);
    if (labels_path) {
      labels_ = read_maybe_gzipped(*labels_path);
      if (labels_.size() < 8 || big_endian(labels_.data()) != kIdxLabelsMagic) {
        throw std::runtime_error(quoted(*labels_path) + " is not an idx labels file: magic number " +
                                 (labels_.size() >= 4 ? hex(big_endian(labels_.data())) : "missing") + ", expected " +
                                 hex(kIdxLabelsMagic));
      }
      const int64_t count = big_endian(labels_.data() + 4);
      if (count != n || static_cast<int64_t>(labels_.size()) != 8 + count) {
        throw std::runtime_error(quoted(*labels_path) + " holds " + std::to_string(labels_.size() - 8) +
                                 " label bytes (header: " + std::to_string(count) + ") but " + quoted(path) + " has " +
                                 std::to_string(n) + " images");
      }
      has_labels = true;
      uint8_t max_label = *std::max_element(labels_.begin() + 8, labels_.end());
      for (int label = 0; label <= max_label; ++label) class_names.push_back(std::to_string(label));
    }
    description = "idx " + fs::absolute(path).lexically_normal().string() +
                  (labels_path ? " + " + fs::absolute(*labels_path).lexically_normal().string() : "");
  }

  int64_t produce(int64_t i, uint8_t* out) const override {
    const uint8_t* pixels = data_.data() + 16 + i * source_height_ * source_width_;
    impl::fit_image({pixels, source_height_, source_width_, 1}, size, channels, out);
    return has_labels ? labels_[8 + i] : 0;
  }

  std::string item_name(int64_t i) const override { return path_.string() + " image " + std::to_string(i); }

 private:
  fs::path path_;
  std::vector<uint8_t> data_, labels_;
  int64_t source_height_ = 0, source_width_ = 0;
};

// --- CIFAR-10 binary batches -------------------------------------------------------------------

constexpr int64_t kCifarRecord = 1 + 3 * 32 * 32;  // label byte, then R, G, B planes of 32x32

// The data_batch_N.bin files of a folder, in N order (none: empty).
std::vector<fs::path> cifar_batches(const fs::path& input) {
  std::vector<std::pair<int, fs::path>> numbered;
  for (const auto& entry : fs::directory_iterator(input)) {
    const std::string name = entry.path().filename().string();
    int number = 0;
    if (std::sscanf(name.c_str(), "data_batch_%d.bin", &number) == 1 && name == "data_batch_" + std::to_string(number) + ".bin") {
      numbered.emplace_back(number, entry.path());
    }
  }
  std::sort(numbered.begin(), numbered.end());
  std::vector<fs::path> files;
  for (auto& [number, path] : numbered) files.push_back(path);
  return files;
}

std::string no_images_message(const fs::path& input, const std::vector<BadInput>& skipped) {
  return "no images under " + quoted(input) + " (no .png/.jpg/.jpeg/.bmp files and no CIFAR-10 data_batch_N.bin files" +
         skipped_summary(skipped) + ")";
}

std::vector<fs::path> cifar_files(const fs::path& input) {
  if (!fs::is_directory(input)) return {input};
  std::vector<fs::path> files = cifar_batches(input);
  if (files.empty()) throw std::runtime_error(no_images_message(input, {}));
  return files;
}

class CifarSource final : public Source {
 public:
  CifarSource(const fs::path& input, const PrepOptions& options) {
    std::string names;
    for (const fs::path& file : cifar_files(input)) {
      std::ifstream stream(file, std::ios::binary);
      if (!stream) throw std::runtime_error("cannot open " + quoted(file));
      std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(stream)), std::istreambuf_iterator<char>());
      if (bytes.empty() || bytes.size() % kCifarRecord != 0) {
        throw std::runtime_error(quoted(file) + " holds " + std::to_string(bytes.size()) + " bytes, not a multiple of " +
                                 std::to_string(kCifarRecord) +
                                 " (one CIFAR-10 record: a label byte and 32x32x3 pixels): truncated or not CIFAR-10");
      }
      for (size_t r = 0; r < bytes.size() / kCifarRecord; ++r) {
        const uint8_t label = bytes[r * kCifarRecord];
        if (label > 9) {
          throw std::runtime_error(quoted(file) + " record " + std::to_string(r) + " has label " + std::to_string(label) +
                                   "; CIFAR-10 labels are 0..9 (CIFAR-100's two-byte records are not supported)");
        }
      }
      files_.push_back(file);
      offsets_.push_back(static_cast<int64_t>(data_.size() / kCifarRecord));
      data_.insert(data_.end(), bytes.begin(), bytes.end());
      names += (names.empty() ? "" : " + ") + fs::absolute(file).lexically_normal().string();
    }
    total = static_cast<int64_t>(data_.size() / kCifarRecord);
    channels = options.channels.value_or(3);
    if (options.size) size = height = width = *options.size;
    else height = width = 32;
    has_labels = true;
    class_names = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"};
    fs::path meta = files_.front().parent_path() / "batches.meta.txt";
    if (fs::is_regular_file(meta)) {
      std::ifstream stream(meta);
      std::vector<std::string> names_in_file;
      for (std::string line; std::getline(stream, line);) {
        line.erase(line.find_last_not_of(" \r\t") + 1);
        if (!line.empty()) names_in_file.push_back(line);
      }
      if (names_in_file.size() == 10) class_names = names_in_file;
    }
    description = "cifar10 " + names;
  }

  int64_t produce(int64_t i, uint8_t* out) const override {
    const uint8_t* record = data_.data() + i * kCifarRecord;
    std::vector<uint8_t> hwc(32 * 32 * 3);
    for (int64_t p = 0; p < 32 * 32; ++p) {
      for (int64_t c = 0; c < 3; ++c) hwc[p * 3 + c] = record[1 + c * 1024 + p];
    }
    impl::fit_image({hwc.data(), 32, 32, 3}, size, channels, out);
    return record[0];
  }

  std::string item_name(int64_t i) const override {
    size_t f = std::upper_bound(offsets_.begin(), offsets_.end(), i) - offsets_.begin() - 1;
    return files_[f].string() + " record " + std::to_string(i - offsets_[f]);
  }

 private:
  std::vector<fs::path> files_;
  std::vector<int64_t> offsets_;  // first record of each file
  std::vector<uint8_t> data_;
};

// --- synthetic -------------------------------------------------------------------------------

class SyntheticSource final : public Source {
 public:
  explicit SyntheticSource(const PrepOptions& options) : name_(options.synthetic), seed_(options.seed) {
    class_names = synthetic_class_names(name_);  // throws on an unknown name
    if (options.count < 1) {
      throw std::invalid_argument("--synthetic " + name_ + " needs --count N (N >= 1), got " + std::to_string(options.count));
    }
    total = options.count;
    render_size_ = options.size.value_or(32);
    height = width = render_size_;
    channels = options.channels.value_or(3);
    has_labels = true;
    description = "synthetic " + name_ + " seed=" + std::to_string(seed_) + " count=" + std::to_string(total) +
                  " size=" + std::to_string(render_size_);
  }

  int64_t produce(int64_t i, uint8_t* out) const override {
    std::vector<uint8_t> rgb(render_size_ * render_size_ * 3);
    int64_t label = render_synthetic(name_, seed_, i, render_size_, rgb.data());
    impl::fit_image({rgb.data(), render_size_, render_size_, 3}, 0, channels, out);
    return label;
  }

  std::string item_name(int64_t i) const override { return name_ + " image " + std::to_string(i); }

 private:
  std::string name_;
  uint64_t seed_;
  int64_t render_size_ = 32;
};

// --- choosing the source ---------------------------------------------------------------------

// The format of a file input (folders are told apart by what walk_folder finds).
std::string detect_format(const fs::path& input) {
  const std::string name = lower(input.filename().string());
  if (name.size() >= 4 && name.substr(name.size() - 4) == ".bin") return "cifar10";
  if (name.find("idx") != std::string::npos || name.find("ubyte") != std::string::npos) return "idx";
  // Otherwise look at the (possibly gzipped) magic number.
  gzFile file = gzopen(input.c_str(), "rb");
  if (file == nullptr) throw std::runtime_error("cannot open " + quoted(input));
  uint8_t head[4] = {0, 0, 0, 0};
  int n = gzread(file, head, 4);
  gzclose(file);
  if (n == 4 && (big_endian(head) == kIdxImagesMagic || big_endian(head) == kIdxLabelsMagic)) return "idx";
  throw std::runtime_error(quoted(input) + ": unrecognised input (expected a folder of PNG/JPEG/BMP images, an idx "
                           "images file, or CIFAR-10 .bin batches; or pass --format)");
}

std::unique_ptr<Source> make_source(const PrepOptions& options, int threads) {
  if (!options.synthetic.empty()) {
    if (!options.input.empty()) throw std::invalid_argument("give either an input or --synthetic, not both");
    return std::make_unique<SyntheticSource>(options);
  }
  if (options.input.empty()) throw std::invalid_argument("no input given (a folder, idx file, CIFAR-10 batch, or --synthetic NAME)");
  if (!fs::exists(options.input)) throw std::runtime_error("input " + quoted(options.input) + " does not exist");
  std::string format = options.format;
  std::optional<FolderWalk> walk;
  if ((format == "auto" || format == "folder") && fs::is_directory(options.input)) {
    walk = walk_folder(options.input);
    // A folder without images may hold CIFAR-10 batches.
    if (format == "auto" && walk->images.empty()) {
      if (cifar_batches(options.input).empty()) throw std::runtime_error(no_images_message(options.input, walk->skipped));
      format = "cifar10";
    } else if (format == "auto") {
      format = "folder";
    }
  } else if (format == "auto") {
    format = detect_format(options.input);
  }
  if (format == "folder") {
    if (!walk) throw std::runtime_error("input " + quoted(options.input) + " is not a folder");
    return std::make_unique<FolderSource>(options.input, std::move(*walk), options, threads);
  }
  if (format == "idx") return std::make_unique<IdxSource>(options.input, options);
  if (format == "cifar10") return std::make_unique<CifarSource>(options.input, options);
  throw std::invalid_argument("format must be auto, folder, idx or cifar10, got '" + options.format + "'");
}

void validate(const PrepOptions& options) {
  if (options.output.empty()) throw std::invalid_argument("no output file given");
  if (options.size && (*options.size < 1 || *options.size > 16384)) {
    throw std::invalid_argument("--size must be 1..16384, got " + std::to_string(*options.size));
  }
  if (options.channels && *options.channels != 1 && *options.channels != 3) {
    throw std::invalid_argument("--channels must be 1 or 3, got " + std::to_string(*options.channels));
  }
  require_compression(options.compression);
  std::error_code error;
  if (fs::is_directory(options.output, error)) {
    throw std::invalid_argument("output " + quoted(options.output) + " is a folder; give a file name (e.g. data.h5)");
  }
  // Before any work: an existing output without --overwrite, or a device node, FIFO, ... (which
  // the final rename would replace) stop the run now, not after the conversion.
  util::check_destination(options.output, options.overwrite);
}

}  // namespace

PrepReport prep_dataset(const PrepOptions& options) {
  const auto started = std::chrono::steady_clock::now();
  validate(options);
  const int threads = options.threads > 0 ? options.threads : std::max(1u, std::thread::hardware_concurrency());
  std::unique_ptr<Source> source = make_source(options, threads);

  PrepReport report;
  report.output = options.output;
  report.source = source->description;
  report.height = source->height;
  report.width = source->width;
  report.channels = source->channels;
  report.has_labels = source->has_labels;
  report.class_names = source->class_names;
  report.skipped_bad = source->bad;
  report.skipped_entries = source->skipped_entries;

  if (!options.output.parent_path().empty()) fs::create_directories(options.output.parent_path());
  // Runs killed without a chance to clean up (SIGKILL, a crash, a lost node) left their
  // OUTPUT.incomplete-PID behind: remove those of processes that are gone.
  report.removed_stale = util::remove_stale_temporaries(options.output, ".incomplete-");
  // Ctrl-C or a kill while converting removes the partial file (hundreds of MB) before exiting;
  // armed before the file exists, so no moment is left when a signal would leave it behind.
  util::RemoveOnSignal remove_on_signal(util::AtomicFile::temporary_for(options.output, ".incomplete-"));
  util::AtomicFile output(options.output, options.overwrite, ".incomplete-");
  {
    DatasetWriteOptions write_options;
    write_options.source = source->description;
    write_options.compression = options.compression;
    write_options.class_names = source->class_names;
    DatasetWriter writer(output.temporary(), source->total, source->height, source->width, source->channels,
                         source->has_labels, write_options);
    // Blocks of whole chunks, large enough to keep every thread busy.
    const int64_t chunk_rows = dataset_chunk_shape(source->total, source->height, source->width, source->channels,
                                                   options.compression)[0];
    const int64_t block = chunk_rows * std::max<int64_t>(1, (std::max(256, 32 * threads) + chunk_rows - 1) / chunk_rows);
    const int64_t image_bytes = source->height * source->width * source->channels;
    auto pixels = torch::empty({block, source->height, source->width, source->channels}, torch::kUInt8);
    auto labels = torch::empty({block}, torch::kInt64);
    std::vector<std::string> errors(block);
    for (int64_t start = 0; start < source->total; start += block) {
      const int64_t n = std::min(block, source->total - start);
      uint8_t* base = pixels.data_ptr<uint8_t>();
      int64_t* label = labels.data_ptr<int64_t>();
      std::fill(errors.begin(), errors.end(), std::string());
      parallel_for(n, threads, [&](int64_t j) {
        try {
          label[j] = source->produce(start + j, base + j * image_bytes);
        } catch (const BadItem& bad) {
          errors[j] = bad.what();
        }
      });
      // Compact the good images in order; the bad ones are reported or stop the run.
      int64_t good = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (!errors[j].empty()) {
          if (!options.skip_bad) {
            throw std::runtime_error(errors[j] + " (pass --skip-bad to leave unreadable images out)");
          }
          report.skipped_bad.push_back({source->item_name(start + j), errors[j]});
          continue;
        }
        if (good != j) {
          std::memmove(base + good * image_bytes, base + j * image_bytes, image_bytes);
          label[good] = label[j];
        }
        ++good;
      }
      if (good > 0) {
        writer.append(pixels.narrow(0, 0, good), source->has_labels ? labels.narrow(0, 0, good) : torch::Tensor());
      }
      if (options.progress) options.progress({start + n, source->total});
    }
    if (writer.written() == 0) {
      throw std::runtime_error("every input image was unreadable; nothing to write (" +
                               std::to_string(report.skipped_bad.size()) + " skipped)");
    }
    writer.finish();
    report.written = writer.written();
  }
  output.commit();
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return report;
}

}  // namespace diffuse::data
