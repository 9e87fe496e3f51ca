"""weightstream: safetensors from S3 straight into CPU and GPU memory."""
