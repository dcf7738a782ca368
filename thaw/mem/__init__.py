"""Host memory that a copy reads or writes: mmap'd fds (`mapping`), CUDA calls and page-locked
staging (`cuda`), and CUDA VMM host memory imported from thawd (`vmm`)."""
