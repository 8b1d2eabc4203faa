"""A reference DCP sparse-MLA decode (vLLM 0.33.0's decode path, in readable PyTorch), tapped at every point."""
