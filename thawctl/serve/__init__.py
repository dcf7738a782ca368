"""`thawctl serve`: a pool of warm vLLM engines behind an OpenAI-compatible API, each engine
(a slot) swapping its weights on demand from thawd (docs/SERVE.md).

One job per module: `models` (what may be served, and which slots can hold it), `engine`
(one slot's vLLM engine, driven from its own thread), `pool` (routing: affinity, LRU swap,
bounded waits), `metrics` (Prometheus), `app` (the OpenAI routes), `admin` (the operator's
routes and their authentication), `command` (the CLI). vLLM is imported only inside
functions: `thawctl --help` stays fast.
"""
