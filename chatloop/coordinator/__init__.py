"""The coordinator: HTTP API, tokenization, continuous batching across the stage chain, routing and failover."""
