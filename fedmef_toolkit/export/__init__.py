"""Reading and writing model files (dense and CSR-sparse safetensors)."""
