"""Export for C++ inference: ``export_causal_lm`` writes a torch.export + AOTInductor package that the C++ class
``lora_ext::AotiModel`` loads (with adapter slots filled at run time, or an adapter merged in)."""

from .aoti import FORMAT, export_causal_lm

__all__ = ["export_causal_lm", "FORMAT"]
