"""`tokenmill plan`: capacity and cost planning from a traffic description.

Modules, in the order a plan uses them: `catalog` (devices, models, precisions,
API prices from the YAML files in `catalogs/`), `architecture` (a model from a
catalog name, a Hugging Face config.json or a GGUF file), `memory` (weights, KV
cache, sequences that fit), `efficiency` and `performance` (rooflines: decode,
prefill, per-user speed, concurrency at a target speed), `traffic` (peak rate,
Little's law, monthly volume), `economics` (monthly bill, APIs, break-even,
serverless), `plan` (one deployment end to end, comparisons), `render` (text,
Markdown, JSON), `plots` (PNG charts). `calibration` fits the efficiency factors
to a `tokenmill bench` sweep; `measure` profiles the local CPU; `command` is the
CLI. Nothing here imports torch at import time (`measure` does, when called).
The formulas are derived in docs/planner.md.
"""
