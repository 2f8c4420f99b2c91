#pragma once
// Shared by the libFuzzer harnesses: a per-process scratch folder for the files the readers
// read (they take paths), and the rule that a thrown exception is the expected rejection of
// bad input (TORCH_CHECK throws c10::Error, a std::exception), never a finding.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Logging.h>

namespace fuzz {

namespace fs = std::filesystem;

// $LORA_EXT_FUZZ_TMP, else /dev/shm (memory), else the system temp folder; one folder per
// process (libFuzzer's -jobs/-fork run several), removed at a normal exit. Never destroyed, so
// the atexit handler can still use it.
inline const fs::path& scratch_dir() {
  static const fs::path* dir = [] {
    const char* env = std::getenv("LORA_EXT_FUZZ_TMP");
    const fs::path base = env                            ? fs::path(env)
                          : fs::is_directory("/dev/shm") ? fs::path("/dev/shm")
                                                         : fs::temp_directory_path();
    std::string tmpl = (base / "lora_ext_fuzz.XXXXXX").string();
    if (!mkdtemp(tmpl.data())) {
      std::perror("mkdtemp");
      std::abort();
    }
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(scratch_dir(), ec);
    });
    return new fs::path(tmpl);
  }();
  return *dir;
}

inline void write_file(const fs::path& p, const uint8_t* data, size_t size) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  if (!f.good()) {
    std::fprintf(stderr, "fuzz: cannot write %s\n", p.c_str());
    std::abort();
  }
}

// Runs f(); true if it returned, false if it threw (a rejected input). LORA_EXT_FUZZ_VERBOSE=1
// prints why (to replay one input: ./fuzz_x input).
template <class F>
bool accepts(F&& f) {
  static const bool verbose = std::getenv("LORA_EXT_FUZZ_VERBOSE") != nullptr;
  try {
    f();
    return true;
  } catch (const std::exception& e) {
    if (verbose) std::fprintf(stderr, "fuzz: rejected: %s\n", e.what());
    return false;
  }
}

// A property the library promises was broken: report and abort, so libFuzzer keeps the input.
[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz: property violated: %s\n", what.c_str());
  std::abort();
}

// Same dtype, shape and bytes (NaN payloads included).
inline bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const at::Tensor ca = a.contiguous(), cb = b.contiguous();
  const size_t n = static_cast<size_t>(ca.numel()) * ca.element_size();
  return n == 0 || std::memcmp(ca.const_data_ptr(), cb.const_data_ptr(), n) == 0;
}

// One intra-op thread: the inputs are tiny, and several fuzzers share the machine. No C++
// backtrace in c10::Error: most inputs are rejected, and unwinding the stack of every throw
// would dominate the run time.
inline void init() {
  at::set_num_threads(1);
  c10::SetStackTraceFetcher([]() -> std::string { return {}; });
}

}  // namespace fuzz
