"""The generation core: block manager (paged blocks), scheduler (token budget, chunked prefill, preemption) and
the engine core's step (schedule -> run -> sample -> update)."""
