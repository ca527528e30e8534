"""`tokenmill bench`: a load tester for any OpenAI-compatible server.

Modules, in the order a run uses them: `options` (flags) -> `config` (what to
run; the syntaxes of durations, SLOs, sweeps, lengths) -> `preflight` (server,
model, stream capabilities) -> `workload` (the requests) -> `runner` (load
shapes) -> `client` (one streamed request, `sse` parsing) -> `tokens` (token
counts and their sources) -> `metrics` (latencies, summary) -> `sizing`
(max-users search) -> `report` / `plots` (tables, JSON, CSV, PNG). `execute`
ties them together; `command` is the CLI entry point. `fake_server` is a
scripted server with known timings that the bench is tested and measured against;
`markdown` and `machine` serve the benchmark scripts that write docs/benchmarks.md.
"""
