#include "io/atomic_file.h"

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <c10/util/Exception.h>

namespace lora_ext::detail {

namespace {

std::string folder_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::string base_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// 64 random bits as hex: from the kernel each time (a fork()ed child must not repeat its parent's names).
std::string random_hex() {
  std::random_device rd;
  const uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

bool pid_alive(long pid) {
  if (pid <= 0) return true;                                         // not a writer's pid: leave the file alone
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH;  // EPERM: someone else's, alive
}

void fsync_folder(const std::string& folder) {
  const int fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // some filesystems cannot open folders: the rename is done either way
  (void)::fsync(fd);
  ::close(fd);
}

}  // namespace

void remove_stale_temporaries(const std::string& folder) {
  DIR* dir = ::opendir(folder.c_str());
  if (dir == nullptr) return;
  while (const dirent* e = ::readdir(dir)) {
    const std::string_view name(e->d_name);
    const size_t at = name.find(kTmpMark);
    if (at == std::string_view::npos) continue;
    long pid = 0;
    size_t i = at + kTmpMark.size(), digits = 0;
    for (; i < name.size() && name[i] >= '0' && name[i] <= '9' && digits < 10; ++i, ++digits)
      pid = pid * 10 + (name[i] - '0');
    if (digits == 0 || (i < name.size() && name[i] != '-')) continue;  // not "<pid>-...": not ours
    if (!pid_alive(pid)) (void)::unlinkat(::dirfd(dir), e->d_name, 0);
  }
  ::closedir(dir);
}

AtomicFile::AtomicFile(std::string path, std::string where)
    : path_(std::move(path)), folder_(folder_of(path_)), where_(std::move(where)) {
  remove_stale_temporaries(folder_);
  const std::string stem = folder_ + "/." + base_of(path_) + std::string(kTmpMark) + std::to_string(::getpid()) + "-";
  for (int attempt = 0; fd_ < 0; ++attempt) {
    tmp_ = stem + random_hex();
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);  // 0666 & ~umask
    const int err = fd_ < 0 ? errno : 0;
    if (fd_ < 0 && (err != EEXIST || attempt >= 16)) {
      const std::string tmp = std::move(tmp_);
      tmp_.clear();  // nothing of ours to delete
      TORCH_CHECK(false, where_, "cannot open ", tmp,
                  " (a temporary file next to the target) for writing: ", std::strerror(err));
    }
  }
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!tmp_.empty()) (void)::unlink(tmp_.c_str());
}

void AtomicFile::fail(const std::string& what, int err) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!tmp_.empty()) (void)::unlink(tmp_.c_str());
  tmp_.clear();
  TORCH_CHECK(false, where_, what, ": ", std::strerror(err));
}

void AtomicFile::write(const void* data, size_t n) {
  TORCH_CHECK(fd_ >= 0, where_, "AtomicFile::write after commit or failure");
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t k = ::write(fd_, p, n);
    const int err = k < 0 ? errno : EIO;  // (0 bytes written: no error code; should not happen)
    if (k < 0 && err == EINTR) continue;
    if (k <= 0) fail("writing " + tmp_ + " failed", err);
    p += k;
    n -= static_cast<size_t>(k);
  }
}

void AtomicFile::commit() {
  TORCH_CHECK(fd_ >= 0, where_, "AtomicFile::commit after commit or failure");
  if (::fsync(fd_) != 0) {
    const int err = errno;
    fail("fsync of " + tmp_ + " failed", err);
  }
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) {
    const int err = errno;
    fail("closing " + tmp_ + " failed", err);
  }
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    fail("could not rename " + tmp_ + " to the target", err);
  }
  tmp_.clear();  // it is the target now
  fsync_folder(folder_);
}

void write_file_atomic(const std::string& path, std::string_view data, const std::string& where) {
  AtomicFile f(path, where);
  f.write(data.data(), data.size());
  f.commit();
}

}  // namespace lora_ext::detail
