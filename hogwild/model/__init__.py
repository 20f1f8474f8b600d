"""Model runtime: config, weights loading, tokenizer, and the decoder."""
