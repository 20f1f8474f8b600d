"""The shared KV cache: blocks with locally rotated keys, and the layouts that arrange them into views."""
