#pragma once
// Symbol visibility for the lora_ext core library.
#if defined(_WIN32)
#define LORA_EXT_API __declspec(dllexport)
#else
#define LORA_EXT_API __attribute__((visibility("default")))
#endif
