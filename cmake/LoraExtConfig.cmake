# CMake package of the lora_ext C++ library (installed inside the Python package).
#   list(APPEND CMAKE_PREFIX_PATH "<python -c 'import lora_ext; print(lora_ext.cmake_prefix_path)'>")
#   find_package(Torch REQUIRED)
#   find_package(LoraExt REQUIRED)
#   target_link_libraries(app LoraExt::lora_ext)
# Linking LoraExt::lora_ext keeps the library (and so its op registrations) in
# the program even when the program references none of its symbols.
include(CMakeFindDependencyMacro)
find_dependency(Torch)
include("${CMAKE_CURRENT_LIST_DIR}/LoraExtTargets.cmake")
set(LoraExt_FOUND TRUE)
