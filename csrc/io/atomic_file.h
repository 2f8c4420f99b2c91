#pragma once
// Crash-safe file writes for every C++ writer: a file is replaced whole or not at all. The C++
// counterpart of lora_ext/atomic.py, with the same conventions, so that each language also cleans up
// after the other.
//
// The data goes to a temporary sibling ".<name>.lora_ext-tmp-<pid>-<random hex>" in the target's folder,
// created exclusively (O_EXCL) with mode 0666 & ~umask (what open() gives the target, so another user's
// serving process can read it); it is fsync'ed, renamed over the target (atomic on POSIX), and the folder
// is fsync'ed so that the rename itself survives a power loss. After a crash (kill -9) at any moment the
// target holds its old or its new content, never a mix. Concurrent writers of one target each have their
// own temporary: the last rename wins, and neither corrupts the other. Temporaries of writers that no
// longer run (their pid is gone) are removed by the next write in that folder.
#include <cstddef>
#include <string>
#include <string_view>

#include <lora_ext/export.h>

namespace lora_ext::detail {

// Marks a temporary's name; the pid of its writer follows (the same mark as lora_ext/atomic.py).
inline constexpr std::string_view kTmpMark = ".lora_ext-tmp-";

// One file being replaced: construct (creates the temporary), write() the bytes, commit(). Destroyed
// without a successful commit(), the temporary is deleted and the target left as it was.
class LORA_EXT_API AtomicFile {
 public:
  // `where` starts every error message ("lora_ext::write_safetensors: <path>: "). Removes the folder's
  // stale temporaries first. Throws c10::Error when the temporary cannot be created.
  AtomicFile(std::string path, std::string where);
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile();

  void write(const void* data, size_t n);  // all n bytes (retries short writes); throws on an I/O error
  void commit();                           // fsync, close, rename over the target, fsync the folder; throws on failure
  const std::string& temp_path() const { return tmp_; }

 private:
  void fail(const std::string& what, int err);  // deletes the temporary, then throws
  std::string path_, folder_, tmp_, where_;
  int fd_ = -1;
};

// Deletes the temporaries in `folder` whose writer process no longer exists. Never throws.
LORA_EXT_API void remove_stale_temporaries(const std::string& folder);

// Replaces `path` by `data` through an AtomicFile.
LORA_EXT_API void write_file_atomic(const std::string& path, std::string_view data, const std::string& where);

}  // namespace lora_ext::detail
