"""Serving purified outputs: the transformers processor, the OpenAI-compatible
server (protocol, engine, replies, routes) and the vLLM adapter."""
