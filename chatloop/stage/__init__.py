"""One pipeline stage as an aiohttp server: forward frames in, hidden states or sampled tokens out."""
