// util/durable_file.h: every file diffuse writes goes through here, so a write either publishes a
// complete file or reports why not, and never replaces what it must not.
//
//   diffuse::util::write_file("run/config.yaml", text, /*overwrite=*/true);
//
//   diffuse::util::AtomicFile file("samples.h5", overwrite);   // for writers that need a path
//   H5Fcreate(file.temporary().c_str(), ...); ...; H5Fclose(...);
//   file.commit();                                            // fsync, rename, fsync the folder
//
// The protocol: check the destination (nothing there, or a regular file and `overwrite`; never a
// device, folder, FIFO or socket, not even through a symbolic link), write `PATH.tmp-<pid>` in
// the same folder with every write and the close checked, fsync it, check the destination again,
// rename over it (without `overwrite`, with RENAME_NOREPLACE, so a file that appeared meanwhile is
// not replaced either), fsync the folder. A failure removes the temporary file.
#pragma once

#include <chrono>
#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace diffuse::util {

/// What is at `path` in words ("a regular file", "a character device", "a directory", "a symbolic
/// link to a character device ('/dev/null')", ...), or "" when nothing is there.
std::string describe_file_type(const std::filesystem::path& path);

/// Throws unless a new regular file may be put at `path`: nothing is there, or `overwrite` is set
/// and a regular file (or a symbolic link to one, or a dangling link; the link itself is replaced)
/// is there. Messages: "PATH exists; pass --overwrite to replace it", "refusing to replace PATH:
/// it is a character device, not a regular file".
void check_destination(const std::filesystem::path& path, bool overwrite);

/// Writes all `size` bytes to `fd`, continuing after short writes and EINTR; throws
/// "cannot write 'NAME': <reason>" (e.g. "No space left on device").
void write_all(int fd, const void* data, std::size_t size, const std::filesystem::path& name);

/// fsyncs and closes `fd`, throwing "cannot write 'NAME': <reason>" when either fails (a close
/// can report a deferred write error, e.g. on NFS). Closes `fd` in every case.
void sync_and_close(int fd, const std::filesystem::path& name);

/// fsyncs a file or folder by name (open + fsync): after a rename, the folder's fsync makes the
/// rename survive a power cut. Folders whose file system refuses fsync (EINVAL) are accepted.
/// Throws naming `path` and the reason.
void fsync_path(const std::filesystem::path& path, bool directory = false);

/// Writes `bytes` to `path` by the protocol above. Throws naming `path` and the reason.
void write_file(const std::filesystem::path& path, std::string_view bytes, bool overwrite = false);

/// A file written under a temporary name beside its destination and published by commit().
/// Destroyed without commit() (an exception, a writer that gave up), it removes the temporary.
class AtomicFile {
 public:
  /// Checks the destination (check_destination) and that its folder exists, and creates the
  /// empty temporary `destination + marker + pid`. Throws naming the destination.
  AtomicFile(std::filesystem::path destination, bool overwrite, std::string marker = ".tmp-");
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  /// The temporary an AtomicFile for `destination` uses in this process (to arm a
  /// RemoveOnSignal before the file exists).
  static std::filesystem::path temporary_for(const std::filesystem::path& destination,
                                             const std::string& marker = ".tmp-");

  const std::filesystem::path& destination() const { return destination_; }
  /// Where to write: for a writer that opens the file itself (HDF5), or for write().
  const std::filesystem::path& temporary() const { return temporary_; }
  /// Appends bytes to the temporary file through this object's descriptor (checked).
  void write(const void* data, std::size_t size);
  /// fsyncs the temporary (whatever wrote it), checks the destination again, renames the
  /// temporary over it and fsyncs the folder. Throws naming the destination; the temporary is
  /// then removed.
  void commit();
  bool committed() const { return committed_; }

 private:
  std::filesystem::path destination_, temporary_;
  bool overwrite_ = false, committed_ = false;
  int fd_ = -1;
};

/// Removes `destination + marker + PID` files that a process killed while writing left behind:
/// those whose PID is not a running process on this host and that were not modified for
/// `min_age` (a process on another host of a shared file system may still be writing one).
/// Returns what it removed.
std::vector<std::filesystem::path> remove_stale_temporaries(const std::filesystem::path& destination,
                                                            const std::string& marker = ".tmp-",
                                                            std::chrono::seconds min_age = std::chrono::seconds(60));

}  // namespace diffuse::util
