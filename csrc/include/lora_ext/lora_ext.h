#pragma once
// Umbrella header: the whole public C++ API of lora_ext.
#include <lora_ext/adapter.h>
#include <lora_ext/aoti.h>
#include <lora_ext/apply.h>
#include <lora_ext/build_info.h>
#include <lora_ext/nn.h>
#include <lora_ext/ops.h>
#include <lora_ext/safetensors.h>
