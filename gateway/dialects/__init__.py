"""The dialects the gateway speaks besides its own (DESIGN.md, "One contract"): each is a
thin translation at the edge onto the OpenAI contract, so auth, limits, routing, admission,
A/B, metrics, traces and the access log apply to all alike.

- base.py       what a dialect supplies to the one request path, and OpenAI's own (the identity)
- anthropic.py  Anthropic's Messages API: /v1/messages, /v1/messages/count_tokens
- ollama.py     Ollama's native API: /api/chat, /api/generate, /api/embed, /api/tags ...
- responses.py  OpenAI's Responses API, stateless: /v1/responses
"""
