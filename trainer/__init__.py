"""ul2x.trainer: the shared job setup, train state, optimizer, jitted steps, the loop,
metrics, checkpoints. Import `ul2x.trainer.loop` for the train job (it pulls in seqio)."""
