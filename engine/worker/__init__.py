"""What runs the model on a device: the model runner (ForwardBatch, eager or graph), the KV pool, CUDA graphs,
the GEMV tuner."""
