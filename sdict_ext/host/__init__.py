"""Host memory and copies: batched copies, CPU slabs, pinned and shared memory."""
