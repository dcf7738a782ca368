"""Moving a payload's bytes between host memory and a model's tensors.

`datapath` binds snapshot entries to tensors and runs the CPU loops and the CUDA pipelines;
`pieces` cuts a payload into staging-sized pieces; `restore` and `freeze` are the file paths
(`thaw.restore_file`, `thaw.freeze_file`); `daemon_copy` exports CUDA allocations for thawd
to copy into. Below it: thaw.mem (the host memory it copies from) and thaw.format.
"""
