#pragma once
// Text checks for the readers: file contents are untrusted bytes.
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace lora_ext::detail {

// The index of the first byte that breaks UTF-8 (RFC 3629: no overlongs, no surrogates, <= U+10FFFF),
// or npos when `s` is valid UTF-8.
inline size_t invalid_utf8_at(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    // continuation bytes after the lead byte, and the lead byte's payload bits
    const size_t n = c < 0x80 ? 0 : (c >> 5) == 0x6 ? 1 : (c >> 4) == 0xE ? 2 : (c >> 3) == 0x1E ? 3 : 4;
    if (n == 4 || i + n >= s.size()) return i;  // a byte that cannot start a character, or cut short
    uint32_t cp = n == 0 ? c : n == 1 ? (c & 0x1Fu) : n == 2 ? (c & 0x0Fu) : (c & 0x07u);
    for (size_t k = 1; k <= n; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc >> 6) != 0x2) return i;
      cp = (cp << 6) | (cc & 0x3Fu);
    }
    const bool overlong = (n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000);
    if (overlong || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += n + 1;
  }
  return std::string_view::npos;
}

// `s` with every byte outside printable ASCII written as \xNN, so that an error message quoting
// file contents is always valid UTF-8 (Python decodes c10::Error messages as UTF-8).
inline std::string printable(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7F) {
      out.push_back(ch);
    } else if (c == '\n' || c == '\t') {
      out.push_back(ch);
    } else {
      char buf[5];
      std::snprintf(buf, sizeof(buf), "\\x%02X", c);
      out += buf;
    }
  }
  return out;
}

}  // namespace lora_ext::detail
