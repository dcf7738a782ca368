"""What every engine integration shares: its options, per-rank snapshot names, where a rank's
bytes come from (thawd or the file), moving one rank's tensors, fingerprints, the identity
of the weights an engine holds, and the adapter that `thaw.connect().restore(engine)` calls.

Imports neither an engine nor torch at module level; thaw.vllm, thaw.sglang and thaw.kv sit
above it, thaw.daemon and thaw.copy below. docs/ENGINES.md says how ranks find their
snapshots.
"""
