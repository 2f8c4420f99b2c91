#include <lora_ext/safetensors.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include "io/atomic_file.h"
#include "io/text.h"

namespace lora_ext {

namespace {

static_assert(std::endian::native == std::endian::little, "lora_ext reads safetensors on little-endian hosts only");

constexpr uint64_t kMaxHeader = uint64_t(100) << 20;  // the format's own limit (100 MB)

std::optional<at::ScalarType> dtype_of(const std::string& s) {
  static const std::map<std::string, at::ScalarType> m = {
      {"F64", at::kDouble},
      {"F32", at::kFloat},
      {"F16", at::kHalf},
      {"BF16", at::kBFloat16},
      {"I64", at::kLong},
      {"I32", at::kInt},
      {"I16", at::kShort},
      {"I8", at::kChar},
      {"U8", at::kByte},
      {"BOOL", at::kBool},
      {"F8_E4M3", at::kFloat8_e4m3fn},
      {"F8_E5M2", at::kFloat8_e5m2},
  };
  auto it = m.find(s);
  if (it == m.end()) return std::nullopt;
  return it->second;
}

std::optional<std::string> name_of(at::ScalarType t) {
  static const std::map<at::ScalarType, std::string> m = {
      {at::kDouble, "F64"},
      {at::kFloat, "F32"},
      {at::kHalf, "F16"},
      {at::kBFloat16, "BF16"},
      {at::kLong, "I64"},
      {at::kInt, "I32"},
      {at::kShort, "I16"},
      {at::kChar, "I8"},
      {at::kByte, "U8"},
      {at::kBool, "BOOL"},
      {at::kFloat8_e4m3fn, "F8_E4M3"},
      {at::kFloat8_e5m2, "F8_E5M2"},
  };
  auto it = m.find(t);
  if (it == m.end()) return std::nullopt;
  return it->second;
}

struct Entry {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

}  // namespace

SafetensorsFile read_safetensors(const std::string& path) {
  const std::string where = "lora_ext::read_safetensors: " + path + ": ";
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  TORCH_CHECK(f.good(), where, "cannot open the file");
  const auto file_size = static_cast<uint64_t>(f.tellg());
  TORCH_CHECK(file_size >= 8, where, "expected at least 8 bytes (the header length), got a file of ", file_size,
              " bytes");
  f.seekg(0);
  unsigned char len_bytes[8];
  f.read(reinterpret_cast<char*>(len_bytes), 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  TORCH_CHECK(n <= kMaxHeader && n <= file_size - 8, where, "header length ", n, " does not fit the file (", file_size,
              " bytes; at most 100 MB of header)");
  std::string header(n, '\0');
  f.read(header.data(), static_cast<std::streamsize>(n));
  TORCH_CHECK(f.good(), where, "could not read the ", n, "-byte header");
  const uint64_t data_size = file_size - 8 - n;

  const size_t bad_byte = detail::invalid_utf8_at(header);
  TORCH_CHECK(bad_byte == std::string::npos, where, "the header is not valid UTF-8 (byte ", bad_byte, ")");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(header);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, where, "the header is not valid JSON: ", detail::printable(e.what()));
  }
  TORCH_CHECK(j.is_object(), where, "expected the header to be a JSON object, got ", j.type_name());

  SafetensorsFile out;
  std::vector<Entry> entries;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const auto& v = it.value();
    if (key == "__metadata__") {
      TORCH_CHECK(v.is_object(), where, "expected __metadata__ to be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        TORCH_CHECK(m.value().is_string(), where, "expected __metadata__[\"", m.key(), "\"] to be a string");
        out.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    TORCH_CHECK(v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"), where,
                "tensor \"", key, "\": expected an object with dtype, shape and data_offsets");
    TORCH_CHECK(v["dtype"].is_string(), where, "tensor \"", key, "\": expected dtype to be a string");
    const auto dt = dtype_of(v["dtype"].get<std::string>());
    TORCH_CHECK(dt.has_value(), where, "tensor \"", key, "\": unknown dtype ", v["dtype"].get<std::string>());
    TORCH_CHECK(v["shape"].is_array(), where, "tensor \"", key, "\": expected shape to be an array");
    Entry e{key, *dt, {}, 0, 0};
    uint64_t numel = 1;
    bool overflow = false;
    for (const auto& d : v["shape"]) {
      TORCH_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0), where, "tensor \"", key,
                  "\": expected non-negative integer dims, got ", d.dump());
      const uint64_t dim = d.get<uint64_t>();
      TORCH_CHECK(dim <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), where, "tensor \"", key,
                  "\": dimension ", dim, " too large");
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / dim) overflow = true;
      numel *= dim;
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& off = v["data_offsets"];
    TORCH_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(), where,
                "tensor \"", key, "\": expected data_offsets [begin, end] of non-negative integers");
    e.begin = off[0].get<uint64_t>();
    e.end = off[1].get<uint64_t>();
    TORCH_CHECK(e.begin <= e.end && e.end <= data_size, where, "tensor \"", key, "\": data_offsets [", e.begin, ", ",
                e.end, "] outside the data section of ", data_size, " bytes");
    const uint64_t esize = c10::elementSize(e.dtype);
    TORCH_CHECK(!overflow && numel <= std::numeric_limits<uint64_t>::max() / esize && numel * esize == e.end - e.begin,
                where, "tensor \"", key, "\": shape ", v["shape"].dump(), " of ", v["dtype"].get<std::string>(),
                " needs ", (overflow ? std::string("an overflowing number of") : std::to_string(numel * esize)),
                " bytes, but data_offsets span ", e.end - e.begin);
    entries.push_back(std::move(e));
  }
  std::vector<const Entry*> by_offset;
  for (const auto& e : entries) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const Entry* a, const Entry* b) {
    return a->begin < b->begin || (a->begin == b->begin && a->end < b->end);
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const Entry* a = by_offset[i - 1];
    const Entry* b = by_offset[i];
    TORCH_CHECK(a->end <= b->begin || a->begin == a->end || b->begin == b->end, where, "tensors \"", a->name, "\" [",
                a->begin, ", ", a->end, ") and \"", b->name, "\" [", b->begin, ", ", b->end, ") overlap");
  }
  uint64_t covered = 0;  // no overlaps: the spans tile the data section iff their sizes add up to it
  for (const auto& e : entries) covered += e.end - e.begin;
  TORCH_CHECK(covered == data_size, where, "the tensors cover ", covered, " of the data section's ", data_size,
              " bytes (the format has no unused bytes; the file is truncated, padded or corrupt)");
  for (const auto& e : entries) {
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype));
    const uint64_t nbytes = e.end - e.begin;
    if (nbytes) {
      f.seekg(static_cast<std::streamoff>(8 + n + e.begin));
      f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes));
      TORCH_CHECK(f.good(), where, "could not read the ", nbytes, " bytes of tensor \"", e.name, "\"");
    }
    out.tensors.emplace(e.name, std::move(t));
  }
  return out;
}

void write_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string where = "lora_ext::write_safetensors: " + path + ": ";
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(!name.empty() && name != "__metadata__", where,
                "expected a non-empty tensor name other than "
                "__metadata__, got \"",
                name, "\"");
    TORCH_CHECK(t.defined(), where, "tensor \"", name, "\" is undefined");
    const auto dt = name_of(t.scalar_type());
    TORCH_CHECK(dt.has_value(), where, "tensor \"", name, "\": unsupported dtype ", t.scalar_type(),
                " (expected one of F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2)");
    TORCH_CHECK(t.layout() == at::kStrided && !t.is_complex(), where, "tensor \"", name,
                "\": expected a dense (strided) tensor, got layout ", t.layout());
    const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[name] = {{"dtype", *dt}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // the safetensors library pads the header to 8 bytes with spaces
  detail::AtomicFile f(path, where);      // crash-safe: a temporary sibling, fsync, rename, fsync the folder
  unsigned char len_bytes[8];
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i, n >>= 8) len_bytes[i] = static_cast<unsigned char>(n & 0xff);
  f.write(len_bytes, 8);
  f.write(h.data(), h.size());
  for (const auto& [name, t] : tensors) {
    if (t.numel() == 0) continue;
    const at::Tensor c = t.detach().to(at::kCPU).contiguous();  // one tensor in CPU memory at a time
    f.write(c.const_data_ptr(), static_cast<size_t>(c.numel()) * c.element_size());
  }
  f.commit();
}

}  // namespace lora_ext
