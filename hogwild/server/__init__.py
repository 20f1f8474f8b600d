"""The OpenAI-compatible HTTP server (`hogwild serve`) and its web page.

`config.py` holds `ServerConfig` (and which `Host` and `Origin` it answers); `protocol.py` maps OpenAI request
bodies to engine runs and run events to OpenAI responses and stream chunks, with `logprobs.py` shaping their
log-probabilities; `service.py` runs them on one engine (`replicas.py`: on Ray actors); `metrics.py` is the
Prometheus registry; `app.py` is the FastAPI app (the guard, endpoints, errors, streaming, cancellation);
`command.py` registers `hogwild serve`; `static/` is the web page. Only
`command.py` and `config.py` import without the `serve` extra installed.
"""
