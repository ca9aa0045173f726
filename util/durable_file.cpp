// Durable, atomic file writes (see the header for the protocol). POSIX calls rather than
// std::filesystem/ofstream: every write, fsync and close result has to be seen, and the
// destination's type has to be known before anything is renamed over it.
#include "util/durable_file.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <system_error>

namespace diffuse::util {
namespace fs = std::filesystem;

namespace {

// Appended piece by piece: GCC 12 warns falsely (-Wstringop-overflow) on "'" + path.string() + "'".
std::string quote_path(const fs::path& path) {
  std::string out = "'";
  out += path.string();
  out += '\'';
  return out;
}

std::string type_of_mode(mode_t mode) {
  if (S_ISREG(mode)) return "a regular file";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

[[noreturn]] void throw_errno(const std::string& what, int code) {
  throw std::runtime_error(what + ": " + std::strerror(code));
}

// The folder a file lives in, "." for a bare name.
fs::path folder_of(const fs::path& path) {
  fs::path parent = path.parent_path();
  return parent.empty() ? fs::path(".") : parent;
}

// rename() that, without `overwrite`, refuses to replace anything (also a file created since the
// last check). Falls back to check + rename where the file system lacks RENAME_NOREPLACE.
int publish(const fs::path& from, const fs::path& to, bool overwrite) {
  if (!overwrite) {
    int result = ::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE);
    if (result == 0 || (errno != EINVAL && errno != ENOSYS)) return result;
    struct stat ignored {};
    if (::lstat(to.c_str(), &ignored) == 0) {
      errno = EEXIST;
      return -1;
    }
  }
  return ::rename(from.c_str(), to.c_str());
}

}  // namespace

std::string describe_file_type(const fs::path& path) {
  struct stat link {};
  if (::lstat(path.c_str(), &link) != 0) return "";
  if (!S_ISLNK(link.st_mode)) return type_of_mode(link.st_mode);
  std::error_code error;
  const fs::path target = fs::read_symlink(path, error);
  struct stat followed {};
  if (::stat(path.c_str(), &followed) != 0) {
    return "a symbolic link to " + quote_path(target) + " (" + std::strerror(errno) + ")";
  }
  return "a symbolic link to " + type_of_mode(followed.st_mode) + " (" + quote_path(target) + ")";
}

void check_destination(const fs::path& path, bool overwrite) {
  if (path.empty() || !path.has_filename()) {
    throw std::invalid_argument("cannot write " + quote_path(path) + ": not a file name");
  }
  struct stat link {};
  if (::lstat(path.c_str(), &link) != 0) {
    if (errno == ENOENT) return;
    throw_errno("cannot write " + quote_path(path), errno);
  }
  struct stat followed {};
  const bool dangling = S_ISLNK(link.st_mode) && ::stat(path.c_str(), &followed) != 0;
  if (!dangling) {
    if (!S_ISLNK(link.st_mode)) followed = link;
    if (!S_ISREG(followed.st_mode)) {
      // A rename over a device node would replace it: as root, `--out /dev/null` would replace
      // the system's /dev/null with a regular file.
      throw std::runtime_error("refusing to replace " + quote_path(path) + ": it is " + describe_file_type(path) +
                               ", not a regular file");
    }
  }
  if (!overwrite) throw std::runtime_error(quote_path(path) + " exists; pass --overwrite to replace it");
}

void write_all(int fd, const void* data, std::size_t size, const fs::path& name) {
  const char* cursor = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, cursor, size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw_errno("cannot write " + quote_path(name), errno);
    if (n == 0) throw std::runtime_error("cannot write " + quote_path(name) + ": the device accepted no bytes");
    cursor += n;
    size -= static_cast<std::size_t>(n);
  }
}

void sync_and_close(int fd, const fs::path& name) {
  int synced = ::fsync(fd);
  int sync_error = errno;
  int closed = ::close(fd);
  int close_error = errno;
  if (synced != 0) throw_errno("cannot write " + quote_path(name) + " (fsync)", sync_error);
  if (closed != 0) throw_errno("cannot write " + quote_path(name) + " (close)", close_error);
}

void fsync_path(const fs::path& path, bool directory) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (directory ? O_DIRECTORY : 0));
  if (fd < 0) throw_errno("cannot open " + quote_path(path) + " to fsync it", errno);
  int result = ::fsync(fd);
  int code = errno;
  ::close(fd);
  // Some file systems refuse fsync on folders (EINVAL); their renames are durable anyway.
  if (result != 0 && !(directory && code == EINVAL)) throw_errno("fsync of " + quote_path(path) + " failed", code);
}

void write_file(const fs::path& path, std::string_view bytes, bool overwrite) {
  AtomicFile file(path, overwrite);
  file.write(bytes.data(), bytes.size());
  file.commit();
}

AtomicFile::AtomicFile(fs::path destination, bool overwrite, std::string marker)
    : destination_(std::move(destination)), overwrite_(overwrite) {
  check_destination(destination_, overwrite_);
  const fs::path folder = folder_of(destination_);
  struct stat folder_stat {};
  if (::stat(folder.c_str(), &folder_stat) != 0 || !S_ISDIR(folder_stat.st_mode)) {
    throw std::runtime_error("cannot write " + quote_path(destination_) + ": folder " + quote_path(folder) +
                             " does not exist");
  }
  temporary_ = temporary_for(destination_, marker);
  // O_NOFOLLOW: a link planted at the temporary name must not redirect the write. O_TRUNC, not
  // O_EXCL: a leftover of a killed process that had this PID is simply reused.
  fd_ = ::open(temporary_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0666);
  if (fd_ < 0) throw_errno("cannot write " + quote_path(destination_) + " (creating " + quote_path(temporary_) + ")", errno);
}

fs::path AtomicFile::temporary_for(const fs::path& destination, const std::string& marker) {
  fs::path temporary = destination;
  temporary += marker + std::to_string(::getpid());
  return temporary;
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(temporary_.c_str());
}

void AtomicFile::write(const void* data, std::size_t size) {
  if (committed_ || fd_ < 0) throw std::logic_error("AtomicFile::write after commit of " + quote_path(destination_));
  write_all(fd_, data, size, destination_);
}

void AtomicFile::commit() {
  if (committed_) return;
  if (fd_ >= 0) {
    int fd = fd_;
    fd_ = -1;
    sync_and_close(fd, destination_);
  }
  // Another writer (HDF5) may have replaced the inode our descriptor saw: sync by name too.
  fsync_path(temporary_);
  check_destination(destination_, overwrite_);
  if (publish(temporary_, destination_, overwrite_) != 0) {
    if (errno == EEXIST) throw std::runtime_error(quote_path(destination_) + " exists; pass --overwrite to replace it");
    throw_errno("cannot rename " + quote_path(temporary_) + " to " + quote_path(destination_), errno);
  }
  committed_ = true;
  fsync_path(folder_of(destination_), /*directory=*/true);
}

std::vector<fs::path> remove_stale_temporaries(const fs::path& destination, const std::string& marker,
                                               std::chrono::seconds min_age) {
  std::vector<fs::path> removed;
  const std::string prefix = destination.filename().string() + marker;
  std::error_code error;
  fs::directory_iterator it(folder_of(destination), error), end;
  if (error) return removed;  // no folder yet: nothing stale
  const auto now = fs::file_time_type::clock::now();
  for (; it != end; it.increment(error)) {
    if (error) break;
    const std::string name = it->path().filename().string();
    if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string digits = name.substr(prefix.size());
    if (digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 9) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(digits));
    // EPERM means the process exists (another user's): only ESRCH says nobody runs it.
    if (pid <= 0 || pid == ::getpid() || ::kill(pid, 0) == 0 || errno != ESRCH) continue;
    std::error_code status_error;
    if (!it->is_regular_file(status_error)) continue;
    const auto modified = fs::last_write_time(it->path(), status_error);
    if (status_error || now - modified < min_age) continue;
    if (fs::remove(it->path(), status_error)) removed.push_back(it->path());
  }
  return removed;
}

}  // namespace diffuse::util
