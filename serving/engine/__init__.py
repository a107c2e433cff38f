"""What a call does whatever protocol it came by: its scope and errors, decoding in worker
processes, admission, batching, statistics."""
