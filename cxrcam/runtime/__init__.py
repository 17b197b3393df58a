"""Run-time helpers shared by training and inference: devices, torchrun, mixed precision."""
