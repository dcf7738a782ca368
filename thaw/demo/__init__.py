"""Demo fixtures, apart from the data path: the embedded tiny Llama (`tiny`) and the demo that
freezes it, restores it into other weights and compares outputs (`roundtrip`, `thawctl demo`).

Nothing is imported here: `python -m thaw.demo.tiny DIR` runs that module alone."""
