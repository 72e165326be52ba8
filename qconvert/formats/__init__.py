"""On-disk formats: bit packing and the native safetensors layout (see docs/format.md)."""
