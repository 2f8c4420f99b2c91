"""Internal helpers shared by the subpackages (adapter names, DTensor placements, DDP/FSDP/TP wrappers, submodule
replacement). Not API: anything here may change without notice; use what ``lora_ext`` exports."""
