"""The CTM paper's sorting task: emit the argsort of N reals over the ticks, trained with CTC."""
