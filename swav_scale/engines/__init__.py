"""The parallel engines (DDP, FSDP2, DeepSpeed ZeRO) behind one small interface (base.Engine), so that the
training loop never branches on them. `parallel.engine` picks one (assemble.build_engine); the model code knows
nothing of any."""
