"""ParScale in JAX/Flax: parallel streams with shared weights and learned aggregation."""
