"""Multi-digit arithmetic as byte-level text for a small ParScale LM (`task.ArithLMTask`)."""
