"""Host-side engine: sequences, page allocation, scheduling, the model runner and the engine loop."""
